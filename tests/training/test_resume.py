"""A run killed with SIGKILL after step k resumes from its last state to weights bit-identical to a run that was
never interrupted; half-written states are never picked up."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from training_helpers import args_for, make_dataset, one_thread, read  # noqa: F401

from qi_core.errors import InvalidInputError
from qi_plugins.sft import checkpoint as ckpt
from qi_plugins.sft import train
from qi_plugins.sft.metrics import read_log

TOTAL = 12  # optimizer steps of the full run (2 epochs of 2 samples × 3 repeats); states every 2 steps


def run_args(ds, out, **kw):
    return args_for(ds, out, lora_base_model="dit", lora_rank=4, learning_rate=1e-2, dataset_repeat=3,
                    num_epochs=2, save_steps=2, batch_size=1, gradient_accumulation_steps=1, **kw)  # fmt: skip


def _slow_child(args: dict) -> None:
    """The run to be killed (forked: no new interpreter to start). Each step sleeps a little so the parent can
    kill it mid-run; the sleep changes no number."""
    torch.set_num_threads(1)
    from qi_plugins.sft import trainer

    step = trainer._Run.step

    def slow(self, *a, **kw):
        time.sleep(0.05)
        return step(self, *a, **kw)

    trainer._Run.step = slow
    train(args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), [(32, 32), (32, 48)])


def test_sigkill_then_resume_is_bit_identical(dataset, tmp_path):
    out = tmp_path / "killed"
    args = run_args(dataset, out)
    child = mp.get_context("fork").Process(target=_slow_child, args=(args,))
    child.start()
    target = ckpt.state_dir(out, 4) / ckpt.STATE_FILE
    deadline = time.monotonic() + 60
    while not target.exists():
        assert child.is_alive(), f"the run ended before step 4 (exit code {child.exitcode})"
        assert time.monotonic() < deadline, "no checkpoint after 60 s"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not (out / f"step-{TOTAL}.safetensors").exists()  # really killed mid-run
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt.list_states(out))
    assert 4 <= killed_at < TOTAL

    resumed = train({**args, "resume_from_checkpoint": "latest"})
    reference = train(run_args(dataset, tmp_path / "reference"))
    assert resumed.global_step == reference.global_step == TOTAL
    assert resumed.losses == reference.losses[killed_at:]  # the same draws, the same data order
    final, want = (
        read(out / f"step-{TOTAL}.safetensors"),
        read(tmp_path / "reference" / f"step-{TOTAL}.safetensors"),
    )
    assert set(final) == set(want) and all(torch.equal(final[k], want[k]) for k in want)
    # the loss curve was cut back to the resumed step, then continued: one record per step
    assert [r["step"] for r in read_log(out)] == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "reference")]


def test_states_are_atomic_and_pruned(dataset, tmp_path):
    out = tmp_path / "run"
    train(run_args(dataset, out, max_steps=6, keep_last_states=2))
    assert sorted(p.name for p in ckpt.list_states(out)) == ["step-4", "step-6"]  # the 2 newest
    state = ckpt.state_dir(out, 6)
    assert {p.name for p in state.iterdir()} == {"state.json", "trainable.safetensors", "optimizer.safetensors",
                                                 "rng-0.safetensors"}  # fmt: skip
    # a state being written when the process died is invisible to "latest"
    (out / ckpt.STATES / ".step-8.tmp").mkdir()
    (out / ckpt.STATES / "step-9").mkdir()  # no state.json: incomplete
    folder, weights = ckpt.find_resume("latest", out)
    assert folder == state and weights is None
    # a weight file with its state next to it resumes exactly; without, it only loads weights (the seed's way)
    assert ckpt.find_resume(str(out / "step-6.safetensors"), out) == (state, out / "step-6.safetensors")
    assert ckpt.find_resume(str(out / "step-2.safetensors"), out) == (None, out / "step-2.safetensors")


def test_resume_refuses_other_settings(dataset, tmp_path):
    out = tmp_path / "run"
    train(run_args(dataset, out, max_steps=2))
    with pytest.raises(InvalidInputError, match="batch_size=1, this run has batch_size=2"):
        train({**run_args(dataset, out, max_steps=4), "batch_size": 2, "resume_from_checkpoint": "latest"})
    with pytest.raises(InvalidInputError, match="no training state"):
        train(run_args(dataset, tmp_path / "empty", resume_from_checkpoint="latest"))
