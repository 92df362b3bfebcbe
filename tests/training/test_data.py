"""Metadata, sizing, bad rows, the epoch plan and argument validation (no model needed)."""

from __future__ import annotations

import pytest
from PIL import Image
from training_helpers import make_dataset, write_metadata

from qi_core.errors import InvalidInputError
from qi_core.sizing import SizeSpec, crop_and_resize
from qi_plugins.sft.args import make_args
from qi_plugins.sft.data import BadRowError, MetadataDataset, read_metadata
from qi_plugins.sft.plan import PlanSampler, PlanSpec, epoch_plan, local, sample_seed


@pytest.mark.parametrize("kind", ["csv", "json", "jsonl"])
def test_metadata_formats_load_the_same_rows(tmp_path, kind):
    ds = make_dataset(tmp_path, [(32, 32), (48, 32)], kind=kind)
    data = MetadataDataset(ds, ds / f"metadata.{kind}", ["image"])
    assert len(data) == 2
    item = data[1]
    assert item["prompt"] == "a picture number 1"
    assert isinstance(item["image"], Image.Image) and item["image"].size == (48, 32)
    assert "metadata" in item["_where"]


def test_repeat_and_extra_columns(tmp_path):
    ds = make_dataset(tmp_path, [(32, 32)])
    write_metadata(ds, [{"image": "images/0.png", "prompt": "p", "edit_image": "images/0.png", "seed": "3"}])
    data = MetadataDataset(ds, ds / "metadata.csv", ["image", "edit_image", "video"], repeat=3)
    assert len(data) == 3
    item = data[2]
    assert isinstance(item["edit_image"], Image.Image)  # every file key is loaded (the seed's operator)
    assert item["seed"] == "3"


def test_dynamic_resolution_follows_the_seed():
    spec = SizeSpec(max_pixels=64 * 64)
    assert spec.target(50, 40) == (32, 48)  # under max_pixels: floor to multiples of 16
    assert spec.target(100, 60) == (48, 80)  # 6000 px: scale by sqrt(6000/4096), truncate, floor
    # 200x100 = 20000 px > 4096: scale by sqrt(20000/4096), int() truncation, then floor to 16
    assert spec.target(200, 100) == (32, 80)
    assert SizeSpec(height=32, width=48).target(999, 10) == (32, 48)
    with pytest.raises(InvalidInputError, match="smaller than 16"):
        SizeSpec().target(10, 200)


def test_crop_and_resize_scales_then_centre_crops():
    im = Image.new("RGB", (40, 20))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    out = crop_and_resize(im, 32, 32)  # scale 1.6 → 64x32, crop 16 px from the left
    assert out.size == (32, 32)
    assert out.getpixel((0, 16))[0] > 200 and out.getpixel((31, 16))[0] < 50
    same = Image.new("RGB", (32, 16))
    assert crop_and_resize(same, 16, 32) is same


def bad_rows(tmp_path):
    ds = make_dataset(tmp_path, [(32, 32)])
    (ds / "images" / "broken.png").write_bytes(b"not an image")
    outside = tmp_path.parent / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    rows = [
        {"image": "images/0.png", "prompt": "good"},
        {"image": "images/missing.png", "prompt": "missing"},
        {"image": "images/broken.png", "prompt": "broken"},
        {"image": "../outside.png", "prompt": "escapes"},
        {"image": str(outside), "prompt": "absolute"},
        {"image": "images/0.png", "prompt": ""},
    ]
    write_metadata(ds, rows)
    return ds


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (2, "does not exist"),
        (3, "cannot be read as an image"),
        (4, "outside the dataset folder"),
        (5, "outside the dataset folder"),
        (6, "has no value"),
    ],  # fmt: skip
)
def test_bad_rows_are_named(tmp_path, row, message):
    ds = bad_rows(tmp_path)
    lines = (ds / "metadata.csv").read_text().splitlines()
    (ds / "metadata.csv").write_text("\n".join([lines[0], lines[1], lines[row]]) + "\n")
    with pytest.raises(BadRowError, match=message) as e:
        MetadataDataset(ds, ds / "metadata.csv", ["image"], required=("image", "prompt"))
    assert "row 2 of metadata.csv (line 3)" in str(e.value) and "--skip_bad_rows" in str(e.value)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    ds = bad_rows(tmp_path)
    data = MetadataDataset(
        ds, ds / "metadata.csv", ["image"], required=("image", "prompt"), skip_bad_rows=True
    )
    assert len(data) == 1 and len(data.skipped) == 5
    assert {e.key for e in data.skipped} == {"image", "prompt"}
    write_metadata(ds, [{"image": "images/missing.png", "prompt": "x"}])
    with pytest.raises(InvalidInputError, match="no usable rows"):
        MetadataDataset(ds, ds / "metadata.csv", ["image"], skip_bad_rows=True)


def test_unreadable_metadata(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_metadata(tmp_path / "m.json")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(InvalidInputError, match=r"\.csv, \.json or \.jsonl"):
        read_metadata(tmp_path / "m.txt")
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_metadata(tmp_path / "none.csv")


def test_plan_buckets_same_sizes_and_is_deterministic():
    buckets = [("a",), ("b",), ("a",), ("a",), ("b",)]
    spec = PlanSpec(batch_size=2, seed=3)
    steps = epoch_plan(buckets, spec, epoch=0)
    assert steps == epoch_plan(buckets, spec, epoch=0)
    assert steps != epoch_plan(buckets, spec, epoch=1) or len(steps) == 1
    batches = [[i for i, _ in m] for s in steps for m in s]
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)  # one size per batch
    positions = [p for s in steps for m in s for _, p in m]
    assert len(set(positions)) == len(positions)


def test_plan_splits_global_batches_across_processes():
    """Rank r of a 2-process run gets slot r of the 1-process batch of 2: same samples, same positions, hence
    the same per-sample noise."""
    buckets = [("a",)] * 6
    one = epoch_plan(buckets, PlanSpec(batch_size=2, processes=1, seed=1), 0)
    two_spec = PlanSpec(batch_size=1, processes=2, seed=1)
    two = epoch_plan(buckets, two_spec, 0)
    assert one == two
    for m in (m for s in two for m in s):
        assert local(m, two_spec, 0) + local(m, two_spec, 1) == m
    # an odd bucket is padded so both processes run the same number of micro-batches
    padded = epoch_plan([("a",)] * 3, two_spec, 0)
    assert all(len(m) == 2 for s in padded for m in s)


def test_plan_accumulation_and_resume_position():
    spec = PlanSpec(accumulation=2, seed=0)
    steps = epoch_plan([("a",)] * 5, spec, 0)
    assert [len(s) for s in steps] == [2, 2, 1]
    rest = list(PlanSampler(steps, spec, 0, start=1))
    assert rest == [[i] for s in steps[1:] for m in s for i, _ in m]
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 1) != sample_seed(1, 0, 1)


def test_arguments_are_validated():
    with pytest.raises(InvalidInputError, match="height and --width"):
        make_args(height=32)
    with pytest.raises(InvalidInputError, match="multiple of 16"):
        make_args(height=40, width=32)
    with pytest.raises(InvalidInputError, match="data_process"):
        make_args(task="sft:eval")
    with pytest.raises(InvalidInputError, match="lora_rank"):
        make_args(lora_rank=0)
    args = make_args(task="sft:train", trainable_models="dit, vae")
    assert (args.task_name, args.stage, args.split(args.trainable_models)) == ("sft", "train", ["dit", "vae"])


def test_injectors_declare_file_loaders_per_run(tmp_path):
    """A column's loader comes from the run's injectors (``Injector.file_loaders``), not a global registry."""
    from types import SimpleNamespace

    from qi_core.sizing import load_rgb
    from qi_plugins.sft.encoding import injector_declarations

    ds = make_dataset(tmp_path, [(32, 32)])
    write_metadata(ds, [{"image": "images/0.png", "prompt": "p", "layer": "images/0.png"}])

    def rgba(path, size):
        image = load_rgb(path, size).convert("RGBA")
        return image

    pipe = SimpleNamespace(injectors=[SimpleNamespace(name="rgba", file_loaders={"layer": rgba})])
    loaders = injector_declarations(pipe, "file_loaders")
    item = MetadataDataset(ds, ds / "metadata.csv", ["image", "layer"], loaders=loaders)[0]
    assert item["layer"].mode == "RGBA" and item["image"].mode == "RGB"
    assert MetadataDataset(ds, ds / "metadata.csv", ["image", "layer"])[0]["layer"].mode == "RGB"  # per run
    bad = SimpleNamespace(injectors=[SimpleNamespace(name="bad", file_loaders={"x": "not a function"})])
    with pytest.raises(InvalidInputError, match="injector 'bad': file_loaders\\['x'\\] must be callable"):
        injector_declarations(bad, "file_loaders")


def test_lora_target_resolution():
    from torch import nn

    from qi_plugins.lora.training import lora_targets

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 8)) for _ in range(2)]
            )

    m = Blocks()
    assert lora_targets(m, "to_q, to_k") == ["to_q", "to_k"]
    assert lora_targets(m, "") == ["blocks.0.0", "blocks.1.0"]  # the seed's auto-detection (≥ 512 wide)
    m.default_lora_targets = ("attn.to_q",)  # a denoiser may name its family's targets
    assert lora_targets(m, None) == ["attn.to_q"] and lora_targets(m, "") == ["blocks.0.0", "blocks.1.0"]
    with pytest.raises(InvalidInputError, match="no LoRA targets"):
        lora_targets(nn.Linear(4, 4), "")
