"""The command line: compile to an ONNX artifact, inspect, list passes."""
import onnxruntime as ort
import pytest
import torch

from fxforge.cli import main


def test_compile_zoo_model_to_onnx(tmp_path, capsys, monkeypatch):
    from fxforge.backends.onnx import backend

    exports, real = [], backend.export_model
    monkeypatch.setattr(backend, "export_model", lambda *a, **k: exports.append(1) or real(*a, **k))
    out = tmp_path / "out"
    assert main(["compile", "zoo:tiny-llama", "--passes", "fuse_rms_norm", "--backend", "onnx", "-o", str(out)]) == 0
    assert len(exports) == 1  # the backend's export is the artifact's model.onnx
    assert main(["export", str(out), "-o", str(tmp_path / "again.onnx")]) == 0
    assert len(exports) == 1 and (tmp_path / "again.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (1, 5)).numpy()
    logits, = session.run(None, {"input_ids": ids, "attention_mask": (ids * 0 + 1)})
    assert logits.shape == (1, 5, 256)
    printed = capsys.readouterr().out
    assert "fuse_rms_norm" in printed and "saved to" in printed
    assert (out / "manifest.json").is_file()


def test_inspect_model_and_passes(capsys):
    assert main(["inspect", "zoo:mlp"]) == 0
    printed = capsys.readouterr().out
    assert "linear sites: 3" in printed and "aten.linear" in printed
    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    assert "canonicalize:" in printed and "fuse_rms_norm:" in printed


def test_bad_pass_spec_is_reported_not_raised(tmp_path, capsys):
    assert main(["compile", "zoo:mlp", "--passes", "no_such_pass", "-o", str(tmp_path / "x")]) == 2
    assert "unknown pass 'no_such_pass'" in capsys.readouterr().err


def test_unknown_model_spec(capsys):
    assert main(["inspect", "not-a-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxforge: error: cannot interpret MODEL") and err.count("\n") == 1


def test_the_program_exits_with_mains_status(tmp_path):
    """`python -m fxforge.cli` / the `fxforge` script (`cli.entry`): main's status is the exit code,
    its error line reaches stderr, and nothing it made is left behind by the fast exit."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    run = subprocess.run([sys.executable, "-m", "fxforge.cli", "compile", str(missing), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().startswith("fxforge: error:")
    assert not (tmp_path / "out").exists()
