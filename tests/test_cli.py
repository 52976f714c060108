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
    # a real compile: it writes its file, and the skipped teardown prints nothing after it
    # (frozen objects had triton's bindings print "nanobind: leaked ..." warnings)
    run = subprocess.run([sys.executable, "-m", "fxforge.cli", "compile", "zoo:mlp", "--backend", "onnx",
                          "-o", str(tmp_path / "mlp")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and (tmp_path / "mlp" / "model.onnx").is_file(), run.stderr
    assert "leaked" not in run.stderr and "Traceback" not in run.stderr


def test_the_programs_fast_exit_still_runs_exit_handlers_and_joins_threads(tmp_path):
    """`cli.entry` skips the interpreter's teardown, not what a normal exit does for others:
    non-daemon threads finish, exit handlers and finalizers (a temporary directory) run, and
    everything printed reaches the pipe."""
    import subprocess
    import sys

    script = f"""
import atexit, pathlib, tempfile, threading, time
from fxforge import cli
marker = pathlib.Path({str(tmp_path / "marker")!r})
holder = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})  # removed by its finalizer at exit
threading.Thread(target=lambda: (time.sleep(0.5), marker.write_text("thread"))).start()
atexit.register(lambda: print("handler ran"))
cli.main = lambda argv=None: (print("main ran"), 3)[1]
cli.entry()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    assert run.stdout.splitlines() == ["main ran", "handler ran"]
    assert (tmp_path / "marker").read_text() == "thread"
    assert [p.name for p in tmp_path.iterdir()] == ["marker"]  # the temporary directory is gone
