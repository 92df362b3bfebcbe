"""The ``parallel`` step runner on gloo (CPU), ranks spawned from the test: CFG-parallel (the sides on different
ranks) and Ulysses sequence parallel (each input's joint sequence split over ranks, uneven lengths, no padding)
give the single-process latents, and every rank ends with the same latents. Also ``cfg=2 × ulysses=2`` on 4
ranks, and the typed errors (degrees against the world size, heads against the Ulysses degree)."""

from __future__ import annotations

import pytest
import torch
from parallel_cases import CASES, STEPS, load_result, rank_main, run_case, run_ranks
from tolerance import check_float32_gap, pipeline_terms

import qi_core as qi
from qi_core.protocols import DenoiseInput, TextSegment
from qi_plugins.parallel.comm import Mesh, degrees
from qi_plugins.parallel.errors import ParallelConfigError
from qi_plugins.parallel.runner import Parallel

pytestmark = pytest.mark.usefixtures("single_thread")

CFG_CASES = ["qwen-image", "edit", "batch"]
ULYSSES_CASES = ["qwen-image", "edit", "eligen", "controlnet", "layered"]
MESH_CASES = ["eligen"]  # cfg 2 × ulysses 2: the EliGen mask, uneven parts


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """QI_CACHE_DIR (the tiny models, built here once and read by the ranks), no launcher variables."""
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("QI_CACHE_DIR", str(tmp_path_factory.mktemp("qi-cache")))
        for name in ("WORLD_SIZE", "RANK", "QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES", "QI_PARALLEL_RING"):
            mp_.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def pipes(env):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = qi.compose(name, model="tiny", progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def single(pipes):
    """The single-process latents of a case (the default ``batched`` runner)."""
    done: dict[str, torch.Tensor] = {}

    def get(case: str) -> torch.Tensor:
        if case not in done:
            with torch.inference_mode():
                done[case] = run_case(pipes(CASES[case][0]), case)
        return done[case]

    return get


def spawn(world: int, jobs: list, folder) -> dict:
    """Run ``jobs`` on ``world`` gloo ranks; {(cfg, ulysses, case): [each rank's {"latents", "parts"}]}."""
    run_ranks(rank_main, world, jobs, folder)
    return {(c, u, case): [load_result(folder / f"{c}x{u}.{case}.{r}.safetensors") for r in range(world)]
            for c, u, cases, _ in jobs for case in cases}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(pipes, tmp_path_factory):
    for case in {*CFG_CASES, *ULYSSES_CASES}:
        pipes(CASES[case][0])  # every tiny model built before the ranks read them
    jobs = [(2, 1, CFG_CASES, STEPS), (1, 2, ULYSSES_CASES, STEPS)]
    return spawn(2, jobs, tmp_path_factory.mktemp("ranks2"))


@pytest.fixture(scope="module")
def four_ranks(pipes, tmp_path_factory):
    for case in MESH_CASES:
        pipes(CASES[case][0])
    return spawn(4, [(2, 2, MESH_CASES, STEPS)], tmp_path_factory.mktemp("ranks4"))


def same_on_every_rank(results: list[dict]) -> torch.Tensor:
    first = results[0]["latents"]
    for r, res in enumerate(results[1:], 1):
        assert torch.equal(res["latents"], first), f"rank {r} holds other latents than rank 0"
    return first


def close_to_single(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Within the float32 bound of the same maths (tests/tolerance.py): a 2-step DiT chain, no decoding."""
    gap = check_float32_gap(got, want, terms=pipeline_terms(STEPS, decode=False), what=what)
    print(f"{what}: max abs diff vs single process {gap:.3g}")
    return gap


@pytest.mark.parametrize("case", CFG_CASES)
def test_cfg_parallel_equals_single_process(case, two_ranks, single):
    results = two_ranks[(2, 1, case)]
    got = same_on_every_rank(results)
    assert not any(r["parts"] for r in results)  # no sequence split under cfg only
    if case == "batch":  # rank 0 stacks the positives, rank 1 the negatives: rows round as in any stack
        close_to_single(got, single(case), f"cfg=2 {case}")
    else:  # each side is exactly its own forward, as in the single process
        assert torch.equal(got, single(case)), float((got - single(case)).abs().max())


@pytest.mark.parametrize("case", ULYSSES_CASES)
def test_ulysses_equals_single_process_with_uneven_parts(case, two_ranks, single):
    results = two_ranks[(1, 2, case)]
    got = same_on_every_rank(results)
    close_to_single(got, single(case), f"ulysses=2 {case}")
    parts = results[0]["parts"]
    assert len(parts) == 2 * STEPS  # both sides, every step, split
    total = [sum(t) + sum(i) for t, i, _ in parts]
    assert any(n % 2 for n in total), f"no odd joint length among {parts}: the uneven case is not covered"
    if case in ("qwen-image", "eligen", "controlnet"):  # 9 image tokens: 5 + 4, no padding
        assert all(i == (5, 4) for _, i, _ in parts), parts
    if case == "eligen":  # the positive side carries the entity attention mask, whole on every rank
        assert any(masked for *_, masked in parts)


def test_cfg_times_ulysses_on_four_ranks(four_ranks, single):
    for case in MESH_CASES:
        results = four_ranks[(2, 2, case)]
        got = same_on_every_rank(results)
        close_to_single(got, single(case), f"cfg=2 x ulysses=2 {case}")
        # ranks 0, 1: the positive side's sequence; ranks 2, 3: the negative side's
        assert results[0]["parts"] == results[1]["parts"] and results[2]["parts"] == results[3]["parts"]
        assert results[0]["parts"] != results[2]["parts"]


# -- one process ---------------------------------------------------------------------------------------------
def test_parallel_runner_alone_is_the_batched_runner(pipes, single):
    pipe = qi.compose("qwen-image", model="tiny", progress=False, step_runner="parallel")
    with torch.inference_mode():
        got = run_case(pipe, "qwen-image")
    assert pipe.step_runner.mesh == Mesh(world=1, rank=0, cfg=1, ulysses=1)
    assert torch.equal(got, single("qwen-image"))


def test_degrees_must_match_the_world_size(pipes):
    pipe = pipes("qwen-image")
    with pytest.raises(ParallelConfigError, match=r"cfg=2 × ulysses=2 needs 4 processes.*has 1"):
        pipe.step_runner = Parallel(cfg=2, ulysses=2)
        try:
            run_case(pipe, "qwen-image", steps=1)
        finally:
            pipe.step_runner = "batched"
    with pytest.raises(ParallelConfigError, match="cfg=3 × ulysses=1 needs 3 processes, but .* has 4"):
        degrees(3, None, 4)
    assert (
        degrees(None, None, 4) == (2, 2)
        and degrees(None, 4, 4) == (1, 4)
        and degrees(None, None, 3) == (1, 3)
    )
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ParallelConfigError, match="positive integer"):
            Parallel(cfg=bad)


def test_degrees_from_the_environment(monkeypatch):
    monkeypatch.setenv("QI_PARALLEL_CFG", "1")
    assert degrees(None, None, 4) == (1, 4)
    monkeypatch.setenv("QI_PARALLEL_ULYSSES", "2")
    with pytest.raises(ParallelConfigError, match="cfg=1 × ulysses=2 needs 2 processes"):
        degrees(None, None, 4)


def test_heads_must_divide_by_the_ulysses_degree(pipes):
    pipe = pipes("qwen-image")
    heads = pipe.dit.config.num_attention_heads  # 2 in the tiny model
    runner = Parallel()
    runner.mesh = Mesh(world=heads + 1, rank=0, cfg=1, ulysses=heads + 1)  # refused before any collective
    pipe.step_runner = runner
    try:
        with pytest.raises(
            ParallelConfigError, match=rf"ulysses={heads + 1} must divide the attention heads \({heads}\)"
        ):
            run_case(pipe, "qwen-image", steps=1)
    finally:
        pipe.step_runner = "batched"


def test_ulysses_needs_a_denoiser_with_sequence_split():
    runner = Parallel()
    runner.mesh = Mesh(world=2, rank=0, cfg=1, ulysses=2)
    inp = DenoiseInput(
        latents=torch.zeros(1, 16, 4, 4), timestep=torch.ones(1), text=[TextSegment(torch.zeros(1, 3, 8))]
    )
    with pytest.raises(ParallelConfigError, match="needs a denoiser with sequence_split"):
        runner.run(lambda x: x.latents, {"positive": inp}, state=None, step=0, sigma=torch.tensor(1.0))
