"""Model resolution: local folders, hub ids through registered sources (faked) or a local hub, sharded weights,
component values with ``resolve()`` (DiffSynth's ModelConfig)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_MODEL
from safetensors.torch import load_file, save_file

import qi_core as qi
from qi_core import plugin_host
from qi_core.errors import DownloadError, MissingComponentError
from qi_core.loading import component_source, fetcher, resolve_model_root, weight_files
from qi_plugins.diffsynth_compat import ModelConfig


class FakeHub:
    """Serves the golden tiny model as if it were the hub repository ``repo_id``."""

    def __init__(self, repo_id: str):
        self.repo_id, self.calls = repo_id, []

    def __call__(self, model_id: str, local_dir: Path, patterns: list[str]) -> None:
        self.calls.append((model_id, patterns))
        if model_id != self.repo_id:
            raise DownloadError(f"no such repository {model_id}")
        for src in GOLDEN_MODEL.rglob("*"):
            rel = src.relative_to(GOLDEN_MODEL).as_posix()
            if src.is_file() and any(Path(rel).match(p) for p in patterns):
                dst = local_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


def test_compose_from_a_hub_id_downloads_only_needed_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("QI_MODEL_DIR", str(tmp_path))
    hub = FakeHub("Qwen/Qwen-Image")
    pipe = qi.compose("qwen-image", downloader=hub, progress=False)  # the recipe's default model id
    assert hub.calls[0][0] == "Qwen/Qwen-Image"
    patterns = hub.calls[0][1]
    assert "model_index.json" in patterns and "transformer/*" in patterns and "vae/*" in patterns
    assert not (tmp_path / "Qwen/Qwen-Image/processor").exists()  # not needed for text-to-image
    lat = pipe("a fox", height=32, width=32, num_inference_steps=2, seed=3, output_type="latent",
               progress_bar_cmd=lambda x: x)  # fmt: skip
    ref = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)(
        "a fox", height=32, width=32, num_inference_steps=2, seed=3, output_type="latent",
        progress_bar_cmd=lambda x: x)  # fmt: skip
    assert torch.equal(lat, ref)


def test_hub_prefixes_pick_the_source(tmp_path, monkeypatch):
    seen = {}
    reg = plugin_host.host().registry
    monkeypatch.setattr(reg.get("source", "huggingface"), "obj", lambda m, d, p: seen.setdefault("hf", m))
    monkeypatch.setattr(reg.get("source", "modelscope"), "obj", lambda m, d, p: seen.setdefault("ms", m))
    monkeypatch.delenv("QI_DOWNLOAD_SOURCE", raising=False)
    monkeypatch.delenv("DIFFSYNTH_DOWNLOAD_SOURCE", raising=False)
    resolve_model_root("hf:Qwen/Qwen-Image", ["transformer"], cache_dir=tmp_path)
    resolve_model_root("Qwen/Qwen-Image-2512", ["transformer"], cache_dir=tmp_path)
    assert seen == {"hf": "Qwen/Qwen-Image", "ms": "Qwen/Qwen-Image-2512"}
    with pytest.raises(DownloadError, match=r"unknown download source 'ftp'; use one of \['huggingface'"):
        fetcher("ftp")


def test_a_plugin_source_with_its_prefix_and_as_the_default(fresh_host, tmp_path, monkeypatch):
    calls = []
    qi.register("source", "mirror", lambda m, d, p: calls.append((m, d, p)), prefixes=("mirror:",))
    root = resolve_model_root("mirror:Org/Model", ["vae"], cache_dir=tmp_path)
    assert root == tmp_path / "Org/Model" and calls == [("Org/Model", root, ["model_index.json", "vae/*"])]
    monkeypatch.setenv("QI_DOWNLOAD_SOURCE", "mirror")
    resolve_model_root("Org/Other", [], cache_dir=tmp_path, patterns=["a.safetensors"])
    assert calls[-1] == ("Org/Other", tmp_path / "Org/Other", ["a.safetensors"])


def test_without_a_source_plugin_only_hub_ids_fail(fresh_host, tmp_path, monkeypatch):
    monkeypatch.setenv(plugin_host.DISABLE_ENV, "hub")
    plugin_host.reset()
    with pytest.raises(DownloadError, match="no model source is registered .* enable the 'hub' plugin"):
        resolve_model_root("Qwen/Qwen-Image", ["vae"], cache_dir=tmp_path)
    assert resolve_model_root(GOLDEN_MODEL, ["vae"]) == GOLDEN_MODEL
    hub = tmp_path / "hub"
    (hub / "Org/Model").mkdir(parents=True)
    assert resolve_model_root("Org/Model", ["vae"], hub=hub) == hub / "Org/Model"  # served, nothing fetched
    with pytest.raises(MissingComponentError, match="'Org/Missing' is not in the local hub"):
        resolve_model_root("Org/Missing", ["vae"], hub=hub)


def test_a_component_value_with_resolve_gives_its_files():
    vae = GOLDEN_MODEL / "vae" / "diffusion_pytorch_model.safetensors"

    class Files:
        def resolve(self):
            return [str(vae)]

    assert component_source(Files()) == vae
    assert component_source([Files(), vae]) == [vae, vae]
    assert component_source(vae.parent) == vae.parent  # a path's own resolve() is not called


def test_sharded_weights_with_index(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(GOLDEN_MODEL, model)
    t = model / "transformer"
    sd = load_file(t / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    names = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    save_file({k: sd[k] for k in keys[:half]}, t / names[0])
    save_file({k: sd[k] for k in keys[half:]}, t / names[1])
    (t / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}
    (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in weight_files(t)] == names
    call = dict(
        height=32, width=32, num_inference_steps=1, seed=0, output_type="latent", progress_bar_cmd=lambda x: x
    )
    a = qi.compose("qwen-image", model=model, progress=False)("x", **call)
    b = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)("x", **call)
    assert torch.equal(a, b)
    (t / names[1]).unlink()
    with pytest.raises(MissingComponentError, match="shards that are missing"):
        weight_files(t)


def test_model_config_mirrors_the_seed(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="either path= .* or model_id="):
        ModelConfig()
    f = GOLDEN_MODEL / "vae" / "diffusion_pytorch_model.safetensors"
    assert ModelConfig(path=str(f)).resolve() == [f]
    hub = FakeHub("Qwen/Qwen-Image")
    cfg = ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/", local_model_path=str(tmp_path))
    files = cfg.resolve(downloader=hub)
    assert sorted(p.name for p in files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert hub.calls == [("Qwen/Qwen-Image", ["vae/*"])]
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    skipped = ModelConfig(
        model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/", local_model_path=str(tmp_path)
    )
    with pytest.raises(MissingComponentError, match="no files match"):
        skipped.resolve(downloader=hub)
    assert len(hub.calls) == 1
    with pytest.raises(Exception, match="offload_devic"):
        ModelConfig(path="x", offload_devic="cpu")
