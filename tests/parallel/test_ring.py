"""Ring attention (``Parallel(ring=)``): the log-sum-exp merge of k/v blocks is softmax attention over the whole
sequence (float64, in-process, uneven blocks, every mask the DiT passes); on gloo ranks, ring=2 gives the
single-process latents of every tiny case and of a DiT whose head count is odd (float32, and float64 to 1e-12),
and cfg=2 × ring=2 on 4 ranks; the degrees and their typed errors."""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from parallel_cases import (
    CASES,
    STEPS,
    load_result,
    record_parts,
    run_case,
    run_ranks,
    save_result,
    start_rank,
)
from test_parallel import env, pipes, single  # noqa: F401 - the fixtures of the tiny cases, shared
from tolerance import F64_RTOL, TINY_DIT_TERMS, check_float32, check_float32_gap, pipeline_terms

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_core.protocols import DenoiseInput, TextSegment
from qi_plugins.parallel.comm import degrees, mesh_degrees
from qi_plugins.parallel.errors import ParallelConfigError
from qi_plugins.parallel.ring import RingPart
from qi_plugins.parallel.runner import Parallel
from qi_plugins.parallel.ulysses import balanced

pytestmark = pytest.mark.usefixtures("single_thread")

RING_CASES = ["qwen-image", "edit", "eligen", "controlnet", "layered"]
MESH_CASE = "eligen"  # cfg 2 × ring 2: the EliGen mask, uneven parts
ODD = "odd-heads"  # a 3-head DiT forward, float32 and float64


# -- the merge, in-process -------------------------------------------------------------------------------------
def _masks(B: int, H: int, n_txt: int, n_img: int, dtype: torch.dtype) -> dict:
    """The masks the DiT gives attention: None, text padding (a keep-mask), EliGen's regions plus padding
    (additive, (B, 1, S, S)), and a per-head additive mask."""
    S = n_txt + n_img
    keep = torch.ones(B, n_txt, dtype=torch.bool)
    keep[1, n_txt - 2 :] = False
    padding = torch.cat([keep, torch.ones(B, n_img, dtype=torch.bool)], dim=1)[:, None, None, :]
    g = torch.Generator().manual_seed(1)
    allowed = (torch.rand(S, S, generator=g) > 0.5) | torch.eye(S, dtype=torch.bool)
    regions = (
        torch.zeros(S, S, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None].expand(B, -1, -1, -1)
    )
    regions = regions + torch.zeros(padding.shape, dtype=dtype).masked_fill(~padding, float("-inf"))
    per_head = torch.randn(B, H, S, S, generator=g, dtype=dtype)
    return {"none": None, "padding": padding, "regions": regions, "per-head": per_head}


def ring_in_process(q, k, v, mask, n_txt: int, n_img: int, P: int) -> torch.Tensor:
    """Every rank of a P-ring simulated in turn: its part's queries merged over the k/v blocks in ring order
    (its own, then rank r-1's, …), written back at its tokens' joint positions."""
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
    for r in range(P):
        split = SimpleNamespace(rank=r, size=P, group=None)
        part = RingPart(split, balanced(n_txt, P), balanced(n_img, P), mask)
        pos = part.positions
        blocks = [((r - s) % P, k[:, pos[(r - s) % P]], v[:, pos[(r - s) % P]]) for s in range(P)]
        out[:, pos[r]] = part.merge(q[:, pos[r]], blocks)
    return out


def sdpa(q, k, v, mask) -> torch.Tensor:
    B, S, H, D = q.shape
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2).reshape(B, S, H * D)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "regions", "per-head"])
@pytest.mark.parametrize(("n_txt", "n_img", "P"), [(7, 9, 2), (5, 9, 3), (2, 3, 4)])
def test_ring_merge_is_attention_over_the_whole_sequence(mask_kind, n_txt, n_img, P):
    """float64: the merge equals single-process attention to 1e-12 (relative); float32 lies within the float32
    bound of it. (2, 3, 4): a rank with no text and one with no image token, blocks of 2, 2, 1 and 0."""
    B, H, D = 2, 3, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(B, n_txt + n_img, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = _masks(B, H, n_txt, n_img, torch.float64)[mask_kind]
    want = sdpa(q, k, v, mask)
    got = ring_in_process(q, k, v, mask, n_txt, n_img, P)
    gap = float((got - want).abs().max())
    print(f"float64 ring={P} {mask_kind}: max abs diff {gap:.3g}")
    assert gap <= F64_RTOL * float(want.abs().max()), gap
    mask32 = mask if mask is None or mask.dtype == torch.bool else mask.float()
    got32 = ring_in_process(q.float(), k.float(), v.float(), mask32, n_txt, n_img, P)
    check_float32(got32, want, terms=D + 2 * (n_txt + n_img), what=f"float32 ring={P} {mask_kind}")


# -- gloo ranks --------------------------------------------------------------------------------------------------
def odd_heads_dit(dtype: torch.dtype):
    from qi_plugins.qwen_image.tiny import TINY_DIT, tiny_dit

    return tiny_dit(5, replace(TINY_DIT, num_attention_heads=3)).to(dtype)  # 3 heads: Ulysses refuses 2


def odd_heads_inputs(dtype: torch.dtype) -> dict:
    """Two inputs of 9 image tokens: 7 text tokens with 2 of padding (a keep-mask), and 6 text tokens with an
    additive region mask."""
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 16, 6, 6, generator=g).to(dtype)
    emb = torch.randn(1, 7, 64, generator=g).to(dtype)
    keep = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    S = 6 + 9
    allowed = (torch.rand(S, S, generator=g) > 0.3) | torch.eye(S, dtype=torch.bool)
    regions = torch.zeros(1, 1, S, S, dtype=dtype).masked_fill(~allowed, float("-inf"))
    t = torch.tensor([700.0])
    return {
        "padded": DenoiseInput(latents=lat, timestep=t, text=[TextSegment(emb, keep)]),
        "regions": DenoiseInput(
            latents=lat, timestep=t, text=[TextSegment(emb[:, :6])], attention_mask=regions
        ),
    }


def rank_main(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    """One gloo rank. Jobs: ``(cfg, ring, cases)`` runs each tiny case with ``Parallel(cfg=, ring=)`` and saves
    its latents and the parts its forwards split (``{cfg}x{ring}.{case}.{rank}.safetensors``); ``(ODD, ring)``
    runs the 3-head DiT's two inputs in float32 and float64 (``odd.{dtype}.{rank}.safetensors``)."""
    import torch.distributed as dist

    from qi_plugins.parallel.ring import RingSplit

    parts = record_parts(RingSplit, expect=RingPart)  # every part this rank's forwards split
    start_rank(rank, world, port)
    pipes: dict[str, object] = {}
    try:
        for job in jobs:
            parts.clear()
            if job[0] == ODD:
                for dtype in (torch.float32, torch.float64):
                    parts.clear()
                    inputs = odd_heads_inputs(dtype)
                    with torch.inference_mode():
                        preds = Parallel(ring=job[1]).run(odd_heads_dit(dtype), inputs, state=None, step=0,
                                                          sigma=torch.tensor(0.7))  # fmt: skip
                    name = str(dtype).removeprefix("torch.")
                    for label, pred in preds.items():
                        save_result(Path(out) / f"odd.{name}.{label}.{rank}.safetensors", pred, parts)
                continue
            cfg, ring, cases = job
            runner = Parallel(cfg=cfg, ring=ring)
            for case in cases:
                name = CASES[case][0]
                if name not in pipes:
                    pipes[name] = qi.compose(name, model="tiny", progress=False)
                pipes[name].step_runner = runner
                parts.clear()
                with torch.inference_mode():
                    result = run_case(pipes[name], case)
                save_result(Path(out) / f"{cfg}x{ring}.{case}.{rank}.safetensors", result, parts)
    except BaseException:
        (Path(out) / f"error.{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, jobs: list, folder: Path) -> Path:
    run_ranks(rank_main, world, jobs, folder)
    return folder


@pytest.fixture(scope="module")
def two_ranks(pipes, tmp_path_factory):
    for case in RING_CASES:
        pipes(CASES[case][0])  # every tiny model built before the ranks read them
    return spawn(2, [(ODD, 2), (1, 2, RING_CASES)], tmp_path_factory.mktemp("ring2"))


@pytest.fixture(scope="module")
def four_ranks(pipes, tmp_path_factory):
    pipes(CASES[MESH_CASE][0])
    return spawn(4, [(2, 2, [MESH_CASE])], tmp_path_factory.mktemp("ring4"))


def same_on_every_rank(folder: Path, stem: str, world: int) -> dict:
    results = [load_result(folder / f"{stem}.{r}.safetensors") for r in range(world)]
    for r, res in enumerate(results[1:], 1):
        assert torch.equal(res["latents"], results[0]["latents"]), f"{stem}: rank {r} differs from rank 0"
    return results[0]


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_equals_single_process_with_uneven_parts(case, two_ranks, single):
    got = same_on_every_rank(two_ranks, f"1x2.{case}", 2)
    gap = check_float32_gap(got["latents"], single(case), terms=pipeline_terms(STEPS, decode=False),
                            what=f"ring=2 {case}")  # fmt: skip
    print(f"ring=2 {case}: max abs diff vs single process {gap:.3g}")
    parts = got["parts"]
    assert len(parts) == 2 * STEPS  # both sides, every step, split
    assert any((sum(t) + sum(i)) % 2 for t, i, _ in parts), f"no odd joint length among {parts}"
    if case in ("qwen-image", "eligen", "controlnet"):  # 9 image tokens: 5 + 4, no padding
        assert all(i == (5, 4) for _, i, _ in parts), parts
    if case == "eligen":
        assert any(masked for *_, masked in parts)


def test_ring_runs_heads_that_do_not_divide(two_ranks):
    """3 heads on ring=2 (Ulysses refuses them): float64 ranks give the single-process forward to 1e-12, float32
    ranks lie within the float32 bound of one DiT forward."""
    for dtype in (torch.float64, torch.float32):
        dit, inputs = odd_heads_dit(dtype), odd_heads_inputs(dtype)
        name = str(dtype).removeprefix("torch.")
        for label, inp in inputs.items():
            with torch.inference_mode():
                want = dit(inp)
            got = same_on_every_rank(two_ranks, f"odd.{name}.{label}", 2)
            gap = float((got["latents"] - want).abs().max())
            print(f"3 heads, ring=2, {name} {label}: max abs diff vs single process {gap:.3g}")
            if dtype == torch.float64:
                assert gap <= F64_RTOL * float(want.abs().max()), gap
            else:
                check_float32_gap(got["latents"], want, terms=TINY_DIT_TERMS, what=f"3 heads {label}")
        assert all(masked for *_, masked in got["parts"]) and len(got["parts"]) == 2


def test_cfg_times_ring_on_four_ranks(four_ranks, single):
    got = same_on_every_rank(four_ranks, f"2x2.{MESH_CASE}", 4)
    results = [load_result(four_ranks / f"2x2.{MESH_CASE}.{r}.safetensors") for r in range(4)]
    gap = check_float32_gap(got["latents"], single(MESH_CASE), terms=pipeline_terms(STEPS, decode=False),
                            what="cfg=2 x ring=2")  # fmt: skip
    print(f"cfg=2 x ring=2 {MESH_CASE}: max abs diff vs single process {gap:.3g}")
    # ranks 0, 1: the positive side's sequence; ranks 2, 3: the negative side's
    assert results[0]["parts"] == results[1]["parts"] and results[2]["parts"] == results[3]["parts"]
    assert results[0]["parts"] != results[2]["parts"]


# -- degrees and errors -------------------------------------------------------------------------------------------
def test_ring_degrees(monkeypatch):
    for name in ("QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES", "QI_PARALLEL_RING"):
        monkeypatch.delenv(name, raising=False)
    assert mesh_degrees(None, None, 2, 2) == (1, 1, 2)
    assert mesh_degrees(None, None, 2, 4) == (2, 1, 2)  # cfg takes what ring leaves
    assert mesh_degrees(None, None, 4, 8) == (2, 1, 4)
    assert mesh_degrees(None, None, None, 4) == (2, 2, 1)  # ring is never chosen for you
    with pytest.raises(ParallelConfigError, match=r"cfg=2 × ring=2 needs 4 processes, but .* has 2"):
        mesh_degrees(2, None, 2, 2)
    with pytest.raises(ParallelConfigError, match="ulysses=2 with ring=2: Ulysses and ring attention do not"):
        mesh_degrees(None, 2, 2, 4)
    with pytest.raises(ParallelConfigError, match="Ulysses and ring attention do not combine"):
        Parallel(ulysses=2, ring=2)
    with pytest.raises(ParallelConfigError, match="ring degree must be a positive integer"):
        Parallel(ring=0)
    monkeypatch.setenv("QI_PARALLEL_RING", "2")
    assert mesh_degrees(None, None, None, 4) == (2, 1, 2)
    assert degrees(None, None, 4) == (2, 2)  # the two-degree form leaves ring out


def test_ring_from_the_step_runner_options(pipes):
    """``{"name": "parallel", "ring": 2}`` reaches the runner: on one process it asks for 2."""
    pipe = qi.compose("qwen-image", model="tiny", progress=False, step_runner={"name": "parallel", "ring": 2})
    assert pipe.step_runner.ring == 2
    with pytest.raises(ParallelConfigError, match=r"cfg=1 × ring=2 needs 2 processes, but .* has 1"):
        run_case(pipe, "qwen-image", steps=1)


# -- qi generate --ring ------------------------------------------------------------------------------------------
def test_cli_ring_flag(monkeypatch, capsys):
    """``--ring`` sets the degrees like ``--ulysses`` (the launcher's own flag, not passed to the workers), under
    torchrun it sets ``QI_PARALLEL_RING``, and it refuses ``--ulysses`` in one line before anything starts."""
    import argparse

    from qi_core.cli import main
    from qi_plugins.doors import launch

    parser = argparse.ArgumentParser()
    launch.add_flags(parser)
    assert launch.degrees(parser.parse_args(["--ring", "2"])) == (2, 1, 1, 2)
    assert launch.degrees(parser.parse_args(["--nproc", "4", "--ring", "2"])) == (4, 2, 1, 2)
    assert launch.degrees(parser.parse_args(["--nproc", "4"])) == (4, 2, 2, 1)
    with pytest.raises(InvalidInputError, match="--ring 2 must divide --nproc 3"):
        launch.degrees(parser.parse_args(["--nproc", "3", "--ring", "2"]))
    with pytest.raises(InvalidInputError, match=r"--cfg-parallel 1 × --ring 2 = 2 must equal --nproc 4"):
        launch.degrees(parser.parse_args(["--nproc", "4", "--cfg-parallel", "1", "--ring", "2"]))
    assert launch.worker_argv(["a fox", "--ring", "2", "--seed", "1", "--ri=2"]) == [
        "--step-runner", "parallel", "a fox", "--seed", "1"
    ]  # fmt: skip

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES", "QI_PARALLEL_RING"):
        monkeypatch.setenv(name, "1")  # restored after the test, whatever prepare sets
    argv = ["generate", "a fox", "--model", "tiny", "--seed", "1"]
    assert main([*argv, "--ulysses", "2", "--ring", "2"]) == 2
    assert "--ulysses and --ring do not combine" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parser.parse_args(["--ring", "2"])
    args.step_runner = None
    assert launch.prepare(args) == 2 and args.step_runner == "parallel"
    assert os.environ["QI_PARALLEL_RING"] == "2"
