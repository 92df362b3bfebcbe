"""Compose options (``qi_register_options``): ``qi.compose(..., name=value)`` applies registered options in order
once the pipeline is built, after checking names and values before any weight loads; ``per_call`` options also
apply to one call and are undone after it; a failing option undoes those applied before it."""

from __future__ import annotations

import pytest

import qi_core as qi
from qi_core.errors import InvalidInputError, RegistrationError, UnknownNameError

QUIET = dict(
    num_inference_steps=1, height=32, width=32, seed=0, output_type="latent", progress_bar_cmd=lambda x: x
)


@pytest.fixture
def log(fresh_host):
    """Two in-process options that record what they do: ``tag`` (compose only) and ``label`` (also per call)."""
    events: list[tuple] = []

    def tag(pipe, value):
        events.append(("tag", value))
        pipe.tags = [*getattr(pipe, "tags", []), value]

    def label(pipe, value):
        previous = getattr(pipe, "label", None)
        pipe.label = value
        events.append(("label", value))
        return lambda: (setattr(pipe, "label", previous), events.append(("undo", value)))

    def check(value):
        if value == "bad":
            raise InvalidInputError("label must not be 'bad'")

    qi.register("option", "tag", tag, help="a tag")
    qi.register("option", "label", label, per_call=True, check=check, aliases=("lbl",))
    return events


def test_compose_applies_options_in_order(log):
    pipe = qi.compose("qwen-image", model="tiny", progress=False, label="a", tag="t")
    assert log == [("label", "a"), ("tag", "t")]
    assert (pipe.label, pipe.tags) == ("a", ["t"])


def test_a_per_call_option_applies_to_one_call_only(log):
    pipe = qi.compose("qwen-image", model="tiny", progress=False, lbl="composed")
    seen = []
    pipe.tracer = lambda name, value: seen.append(pipe.label)
    pipe("x", label="this call", **QUIET)
    assert set(seen) == {"this call"}, "the option holds during the call"
    assert pipe.label == "composed" and log[-1] == ("undo", "this call")


def test_a_call_undoes_its_options_when_it_fails(log):
    pipe = qi.compose("qwen-image", model="tiny", progress=False)
    with pytest.raises(InvalidInputError, match="multiples of 16"):
        pipe("x", label="during", **{**QUIET, "height": 33})
    assert pipe.label is None and log[-1] == ("undo", "during")


def test_an_option_not_per_call_is_refused_in_a_call(log):
    pipe = qi.compose("qwen-image", model="tiny", progress=False)
    with pytest.raises(InvalidInputError, match=r"qi.compose\(\.\.\., tag=\.\.\.\)"):
        pipe("x", tag="t", **QUIET)


def test_names_and_values_are_checked_before_anything_loads(log, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UnknownNameError, match="Did you mean 'tag'"):
        qi.compose("qwen-image", model=missing, progress=False, tga="t")
    with pytest.raises(InvalidInputError, match="label must not be 'bad'"):
        qi.compose("qwen-image", model=missing, progress=False, label="bad")
    assert log == []


def test_a_failing_option_undoes_the_ones_before_it(fresh_host):
    done = []
    qi.register(
        "option", "first", lambda pipe, v: (done.append("first"), lambda: done.append("undo first"))[1]
    )

    def boom(pipe, value):
        raise InvalidInputError("second failed")

    qi.register("option", "second", boom)
    with pytest.raises(InvalidInputError, match="second failed"):
        qi.compose("qwen-image", model="tiny", progress=False, first=1, second=2)
    assert done == ["first", "undo first"]


@pytest.mark.parametrize(
    "keywords, message",
    [({"per_call": "yes"}, "per_call of option 'o' must be True or False"),
     ({"switch": 1}, "switch of option 'o' must be True or False"),
     ({"check": 3}, "check of option 'o' must be a callable"),
     ({"help": 3}, "help of option 'o' must be a string")],
)  # fmt: skip
def test_option_registration_is_checked(fresh_host, keywords, message):
    with pytest.raises(RegistrationError, match=message):
        qi.register("option", "o", lambda pipe, v: None, **keywords)
