"""Bad input to the ``qi`` CLI: one line on stderr naming the fix, exit 2 (130 for Ctrl-C), nothing
half-written; the modes of what qi writes follow the umask; a closed stdout pipe is quiet."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import qi_core
from qi_core.atomic import atomic_file, atomic_folder
from qi_core.cli import main
from qi_core.devices import check_seed
from qi_core.errors import ModelLoadError
from qi_core.loading import check_safetensors, read_state_dict
from qi_plugins.memory.safetensors_io import safetensors_index

TINY = ["--steps", "1", "--height", "64", "--width", "64", "--seed", "0"]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_error_line(err: str) -> str:
    """The CLI's stderr when nothing else ran: exactly one ``qi: error: …`` line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qi: error: "), err
    return lines[0]


def last_line(err: str) -> str:
    """The last line of stderr, split on newlines only: a progress bar left on it (``\\r…%|``) shows up here."""
    assert err.endswith("\n"), repr(err[-200:])
    return err.split("\n")[-2]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test when the CLI starts loading a model: a bad input must be found before that."""

    def compose(*args, **kwargs):
        raise AssertionError("the model started loading before the bad input was reported")

    monkeypatch.setattr(qi_core, "compose", compose)


def lora_file(path: Path) -> Path:
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 2)}, str(path))  # fmt: skip
    return path


def truncated_copy(model: Path, into: Path, component: str) -> Path:
    """A copy of ``model`` whose ``component`` weights lost their second half (an interrupted download)."""
    copy = into / "model"
    shutil.copytree(model, copy)
    (weights,) = (copy / component).glob("*.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    return weights


# -- truncated weights -----------------------------------------------------------------------------------
def test_truncated_weights_in_generate(tiny_model, tmp_path, capsys):
    weights = truncated_copy(tiny_model, tmp_path, "transformer")
    out = tmp_path / "out" / "x.png"
    rc = main(["generate", "x", "--model", str(weights.parent.parent), *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    line = last_line(err)  # also: the live "loading" bar was ended first, the error has its own line
    assert line.startswith(f"qi: error: {weights} is truncated (") and "download the model again" in line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_truncated_text_encoder_in_compose(tiny_model, tmp_path):
    weights = truncated_copy(tiny_model, tmp_path, "text_encoder")  # read by transformers, not by qi
    says = r"text_encoder/model\.safetensors is truncated .*download the model again"
    with pytest.raises(ModelLoadError, match=says):
        qi_core.compose("qwen-image", model=str(weights.parent.parent), progress=False)


def test_truncated_safetensors_every_reader(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(64.0), "b": torch.ones(4, 4)}, str(f))
    full = f.stat().st_size
    check_safetensors(f)
    assert set(safetensors_index(f)) == {"a", "b"}
    with open(f, "r+b") as fh:
        fh.truncate(full - 10)
    says = rf"{f.name} is truncated \({full - 10:,} of {full:,} bytes\).*download the model again"
    for read in (check_safetensors, lambda p: read_state_dict([p]), safetensors_index):
        with pytest.raises(ModelLoadError, match=says):
            read(f)
    with open(f, "r+b") as fh:  # cut inside the header
        fh.truncate(20)
    with pytest.raises(ModelLoadError, match=r"is truncated \(20 of"):
        read_state_dict([f])
    f.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelLoadError, match="is not a safetensors file .*download the model again"):
        read_state_dict([f])


# -- output path -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, says", [
    ("folder/{seed}.gif", "--out pattern '{tmp}/folder/{{seed}}.gif' must end in .png or .jpg or .jpeg or .webp"),
    ("x.gif", "--out 'x.gif' must end in .png or .jpg or .jpeg or .webp; e.g. {tmp}/x.png"),
    ("file/x.png", "cannot write --out '{tmp}/file/x.png': {tmp}/file is a file, not a folder"),
], ids=["pattern-suffix", "suffix", "parent-is-file"])  # fmt: skip
def test_bad_out_fails_before_loading(out, says, tmp_path, capsys, no_model_load):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    assert main(["generate", "x", "--model", "tiny", "--out", str(tmp_path / out)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("qi: error: " + says.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_read_only_out_folder_fails_before_loading(tmp_path, capsys, monkeypatch, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway; answer as the kernel does for other users (or a ro mount)
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == ro else access(p, m, **kw))
    try:
        for out in (ro / "x.png", ro / "new" / "x.png"):  # missing folders would be made inside ro
            assert main(["generate", "x", "--model", "tiny", "--out", str(out)]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"folder {ro} is read-only or not writable by you; choose a writable location" in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_lora_convert_checks_the_output_first(tmp_path, capsys, monkeypatch):
    import qi_plugins.lora.formats as formats

    def read(*args, **kwargs):
        raise AssertionError("the input was read before the bad output was reported")

    monkeypatch.setattr(formats, "read_state_dict", read)
    src = lora_file(tmp_path / "in.safetensors")
    assert main(["lora", "convert", str(src), str(tmp_path), "--to", "peft"]) == 2
    assert "is a folder; name a file in it" in one_error_line(capsys.readouterr().err)
    assert main(["lora", "convert", str(src), str(tmp_path / "out.pt"), "--to", "peft"]) == 2
    assert "must end in .safetensors" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


# -- device and seed -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, cuda, says", [
    ("gpu", 0, "unknown device 'gpu'; use one of cpu, cuda, cuda:N, mps (available here: cpu)"),
    ("cuda", 0, "device 'cuda' needs CUDA, which is not available here"),
    ("cuda:1", 0, "device 'cuda:1' needs CUDA, which is not available here"),
    ("cuda:3", 2, "device 'cuda:3' does not exist: this machine has 2 CUDA device(s); use one of: cpu, cuda:0, "
                  "cuda:1"),
], ids=["gpu", "cuda", "cuda:1", "cuda:3"])  # fmt: skip
def test_bad_device_fails_before_loading(device, cuda, says, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)  # the same answer on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    rc = main(["generate", "x", "--model", "tiny", "--device", device, "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"qi: error: {says}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_out_of_range_fails_before_loading(seed, tmp_path, capsys, no_model_load):
    assert main(["generate", "x", "--model", "tiny", "--seed", seed, "--out", str(tmp_path / "x.png")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"qi: error: seed must be in [0, 2^64 − 1] = [0, {2**64 - 1}], got {seed}"
    assert check_seed(2**64 - 1) == 2**64 - 1 and check_seed(0) == 0 and check_seed(None) is None
    assert list(tmp_path.iterdir()) == []


# -- Ctrl-C ----------------------------------------------------------------------------------------------
def test_ctrl_c_during_generation_exits_130(tiny_model, tmp_path, capsys, monkeypatch):
    from tqdm.auto import tqdm

    from qi_plugins.qwen_image.vae import QwenImageVAE

    bars = []  # held like a loop's bar in the traceback's frames: still on screen when main() sees Ctrl-C

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the latents are decoded
        bars.append(tqdm(total=4, desc="decoding"))
        bars[-1].update(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(QwenImageVAE, "decode", interrupted)
    out = tmp_path / "out" / "x.png"
    try:
        rc = main(["generate", "x", "--model", str(tiny_model), *TINY, "--out", str(out)])
    except KeyboardInterrupt:  # escaping, it would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped qi_core.cli.main")
    assert rc == 130
    assert last_line(capsys.readouterr().err) == "qi: interrupted"
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# -- closed stdout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, code", [
    (["plugins"], 1),
    (["lora", "info", "{lora}"], 1),
    (["--help"], 0),  # argparse drops a failed help write itself
])  # fmt: skip
def test_closed_stdout_pipe_is_quiet(argv, code, tmp_path):
    lora = lora_file(tmp_path / "l.safetensors")
    argv = [a.format(lora=lora) for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "qi_core.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # `qi … | head`, with head already gone: every write to stdout fails
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode == code, err.decode()


# -- modes -----------------------------------------------------------------------------------------------
UMASKS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]


@pytest.mark.parametrize("mask, file_mode, folder_mode", UMASKS)
def test_generated_png_mode_follows_umask(mask, file_mode, folder_mode, tiny_model, tmp_path):
    out = tmp_path / "new" / "x.png"
    with umask(mask):
        assert main(["generate", "x", "--model", str(tiny_model), *TINY, "--out", str(out)]) == 0
    assert mode(out) == file_mode and mode(out.parent) == folder_mode
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]


@pytest.mark.parametrize("mask, file_mode, folder_mode", UMASKS)
def test_converted_lora_mode_follows_umask(mask, file_mode, folder_mode, tmp_path, capsys):
    src = lora_file(tmp_path / "in.safetensors")  # safetensors itself writes 0600 files
    with umask(mask):
        assert main(["lora", "convert", str(src), str(tmp_path / "out.safetensors"), "--to", "peft"]) == 0
    assert mode(tmp_path / "out.safetensors") == file_mode


@pytest.mark.parametrize("mask, file_mode, folder_mode", UMASKS)
def test_atomic_writes_follow_umask_and_explicit_mode_wins(mask, file_mode, folder_mode, tmp_path):
    with umask(mask):
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
            (tmp / "config.json").write_text("{}")
        with atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("a")
        with atomic_file(tmp_path / "b.txt", mode=0o640) as tmp:
            tmp.write_text("b")
    model = tmp_path / "model"
    assert mode(model) == mode(model / "sub") == folder_mode
    assert mode(model / "sub" / "w.safetensors") == mode(model / "config.json") == file_mode
    assert mode(tmp_path / "a.txt") == file_mode and mode(tmp_path / "b.txt") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "model"]


def test_tiny_model_modes_follow_umask(tiny_model):
    mask = os.umask(0o022)  # read the umask the session fixture was built under (single-threaded here)
    os.umask(mask)
    assert mode(tiny_model) == mode(tiny_model / "transformer") == 0o777 & ~mask
    assert mode(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors") == 0o666 & ~mask
    assert mode(tiny_model / "model_index.json") == 0o666 & ~mask
