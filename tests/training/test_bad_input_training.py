"""Bad input to training and validation: each fails with one typed error naming the fix (exit code 2 from the
CLI) and leaves no file behind; a prompt longer than the text encoder's limit warns with the numbers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_MODEL
from safetensors.torch import save_file
from training_helpers import MODEL, make_dataset, one_thread, write_metadata  # noqa: F401

from qi_core.cli import main
from qi_plugins.qwen_image.text_encoder import (
    T2I_DROP,
    T2I_TEMPLATE,
    PromptTruncatedWarning,
    load_text_encoder,
)
from qi_plugins.sft.data import MetadataDataset, MissingColumnError
from qi_plugins.sft.validate import require_lora


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def train_argv(ds, out) -> list[str]:
    """``qi train`` of a LoRA on the dataset folder ``ds`` (metadata.csv inside), writing to ``out``."""
    return ["train", "--dataset_base_path", str(ds), "--dataset_metadata_path", str(ds / "metadata.csv"),
            "--model", MODEL, "--lora_base_model", "dit", "--output_path", str(out)]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# -- prompts longer than the text encoder's limit ------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(GOLDEN_MODEL, GOLDEN_MODEL / "text_encoder")


def test_a_cut_prompt_warns_with_the_dropped_count_and_the_limit(text_encoder):
    prompt = "a red fox " * 20
    total = len(text_encoder.tokenizer([T2I_TEMPLATE.format(prompt)])["input_ids"][0])
    limit = 8
    with pytest.warns(PromptTruncatedWarning) as record:
        seg = text_encoder.encode_prompt(prompt, max_tokens=limit)
    assert seg.emb.shape[1] == limit  # the cut itself is unchanged (the official max_length)
    msg = str(record[0].message)
    assert f"{total - T2I_DROP} tokens after the {T2I_DROP}-token template prefix, limit {limit}" in msg
    assert f"the last {total - T2I_DROP - limit} tokens were dropped" in msg and "Shorten the prompt" in msg


def test_a_prompt_within_the_limit_does_not_warn(text_encoder):
    n = len(text_encoder.tokenizer([T2I_TEMPLATE.format("a red fox")])["input_ids"][0]) - T2I_DROP
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        seg = text_encoder.encode_prompt("a red fox", max_tokens=n)  # exactly at the limit: nothing is cut
    assert seg.emb.shape[1] == n


# -- qi validate --lora on a file that is not a LoRA ---------------------------------------------------------
def test_validate_lora_on_full_weights_says_it_is_not_a_lora(tmp_path, capsys):
    full = tmp_path / "epoch-1.safetensors"
    save_file({f"transformer_blocks.0.attn.to_{x}.weight": torch.zeros(2, 2) for x in "qkv"}, str(full))
    out = tmp_path / "v.png"
    code, err = run_cli(
        ["validate", "a dog", "--model", MODEL, "--lora", str(full), "--out", str(out)], capsys
    )
    assert code == 2
    assert "epoch-1.safetensors is not a LoRA: none of its 3 keys is a lora_A/lora_B/lora_down/lora_up" in err
    assert "'transformer_blocks.0.attn.to_q.weight'" in err  # names keys it found
    assert f"--dit-weights {full}" in err and "WeightMismatch" not in err and "full-weight" not in err.lower()
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_require_lora_accepts_every_lora_layout(tmp_path):
    for i, key in enumerate(("to_q.lora_A.default.weight", "to_q.lora_up.weight", "x.lora_B.weight")):
        save_file({key: torch.zeros(2, 2)}, str(tmp_path / f"{i}.safetensors"))
        assert require_lora(tmp_path / f"{i}.safetensors") == tmp_path / f"{i}.safetensors"


# -- wrong column names in the metadata ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "json", "jsonl"])
def test_wrong_column_names_are_named_with_the_columns_found(tmp_path, kind):
    ds = make_dataset(tmp_path, [(32, 32)])
    write_metadata(ds, [{"img": "images/0.png", "caption": "a picture"}], kind)
    with pytest.raises(MissingColumnError) as e:
        MetadataDataset(ds, ds / f"metadata.{kind}", ["image"], required=("image", "prompt"))
    msg = str(e.value)
    assert f"metadata.{kind} has no columns 'image', 'prompt' (needed by the training task)" in msg
    assert "its columns are 'img', 'caption'" in msg and "'img' → 'image'" in msg
    assert "row 1" not in msg and "line 1" not in msg


def test_wrong_column_stops_qi_train_before_anything_is_written(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", [(32, 32)])
    write_metadata(ds, [{"image": "images/0.png", "text": "a picture"}])
    out = tmp_path / "out"
    argv = train_argv(ds, out)
    code, err = run_cli(argv, capsys)
    assert (
        code == 2
        and "metadata.csv has no column 'prompt'" in err
        and "its columns are 'image', 'text'" in err
    )
    assert not out.exists()


# -- qi train without a dataset; run files only in the output folder, only once the run starts ---------------
def test_train_without_dataset_options_is_refused_and_scans_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # downloads live here; the seed's default --output_path is ./models too
    save_file({"w": torch.zeros(1)}, str(tmp_path / "models" / "downloaded.safetensors"))
    code, err = run_cli(["train", "--model", MODEL, "--lora_base_model", "dit"], capsys)
    assert code == 2
    assert "no dataset given: pass --dataset_metadata_path" in err and "--task sft:train" in err
    assert files_under(tmp_path) == ["models/downloaded.safetensors"]


def test_data_process_without_metadata_is_refused(tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["train", "--task", "sft:data_process", "--dataset_base_path", str(tmp_path), "--model", MODEL,
            "--output_path", str(out)]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--task sft:data_process encodes a raw dataset: pass --dataset_metadata_path" in err
    assert not out.exists()


def test_train_stage_on_a_folder_that_is_no_cache_is_refused(tmp_path, capsys):
    folder = tmp_path / "not-a-cache"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    argv = ["train", "--task", "sft:train", "--dataset_base_path", str(folder), "--model", MODEL,
            "--lora_base_model", "dit", "--output_path", str(out)]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "model.safetensors is not a qi training cache file" in err
    assert "--output_path of a --task X:data_process run" in err and not out.exists()


def test_a_bad_row_leaves_no_run_files(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", [(32, 32)])
    write_metadata(ds, [{"image": "images/missing.png", "prompt": "gone"}])
    out = tmp_path / "out"
    argv = train_argv(ds, out)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "does not exist" in err and not out.exists()


def test_a_started_run_writes_its_files_in_the_output_folder_only(tmp_path, monkeypatch):
    make_dataset(tmp_path / "ds", [(32, 32)])
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset_base_path", "ds", "--dataset_metadata_path", "ds/metadata.csv", "--model", MODEL,
            "--lora_base_model", "dit", "--lora_rank", "2", "--max_steps", "1", "--output_path", "out"]  # fmt: skip
    assert main(argv) == 0
    written = [f for f in files_under(tmp_path) if not f.startswith("ds/")]
    assert written and all(f.startswith("out/") for f in written)
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["max_steps"] == 1
