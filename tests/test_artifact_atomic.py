"""Saves and ONNX exports are all-or-nothing: killed or failing halfway, they leave the previous
artifact (or file) loadable and unchanged, and what they leave behind never breaks a later save.

The kill tests fork a child that saves (or exports) a new model over a good artifact and
SIGKILL it at several delays after it starts writing; afterwards the target must load and
compute either the old model's outputs or the new one's, never anything else.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxforge
from fxforge.errors import ArtifactError
from fxforge.models import get_model

WIDTH = 1536  # two 1536x1536 layers: ~19 MB of weights, so a save takes long enough to interrupt
KILL_DELAYS = (0.0, 0.02, 0.06, 0.15, 0.4)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH)).eval()


X = torch.ones(2, WIDTH)


@pytest.fixture(scope="module")
def models():
    """(compiled old model, compiled new model, old output, new output)."""
    old = fxforge.compile(_model(0), (X,), verify=False)
    new = fxforge.compile(_model(1), (X,), verify=False)
    with torch.no_grad():
        return old, new, _model(0)(X), _model(1)(X)


def _write_in_child(compiled: fxforge.CompiledModel, target: Path, mode: str, start: int) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's thread pool
    os.write(start, b"s")
    compiled.save(target) if mode == "save" else compiled.export_onnx(target)


def _kill_mid_write(compiled: fxforge.CompiledModel, target: Path, mode: str, delay: float) -> bool:
    """Save/export `compiled` to `target` in a forked child (no start-up cost: it inherits the
    imported torch and the compiled model) and SIGKILL it `delay` seconds after it starts
    writing. True if it had finished by then."""
    read_end, write_end = os.pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_write_in_child, args=(compiled, target, mode, write_end), daemon=True)
    child.start()
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"s", "the child failed before writing"
        time.sleep(delay)
        finished = not child.is_alive()
        if not finished:
            os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
        return finished and child.exitcode == 0
    finally:
        os.close(read_end)
        if child.is_alive():
            child.kill()
            child.join()


def _small() -> fxforge.CompiledModel:
    zoo = get_model("mlp")
    return fxforge.compile(zoo.model, zoo.args, verify=False)


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.fxforge-"))


def test_killed_saves_leave_the_old_or_the_new_artifact(tmp_path, models):
    old, new, want_old, want_new = models
    target = tmp_path / "artifact"
    outcomes = []
    for delay in KILL_DELAYS:
        old.save(target)  # a good previous artifact before every attempt
        finished = _kill_mid_write(new, target, "save", delay)
        got = fxforge.load(target)(X)  # loads despite whatever the killed save left beside it
        is_old, is_new = torch.equal(got, want_old), torch.equal(got, want_new)
        assert is_old or is_new, f"after a kill at {delay}s the artifact computes neither model"
        assert is_new or not finished, "the save finished but the old artifact is still in place"
        outcomes.append("new" if is_new else "old")
    assert "old" in outcomes, f"no kill landed before the save completed ({outcomes}); nothing was tested"
    old.save(target)  # a later save is not disturbed by leftovers, and removes them
    assert _siblings(target) == []
    assert torch.equal(fxforge.load(target)(X), want_old)


def test_killed_exports_leave_the_old_or_the_new_onnx_file(tmp_path, models):
    old, new, want_old, want_new = models
    target = tmp_path / "model.onnx"
    start = time.perf_counter()
    old.export_onnx(target)
    seconds = time.perf_counter() - start  # kills spread over an export of about this length
    pristine = target.read_bytes()
    for fraction in (0.5, 0.95):
        target.write_bytes(pristine)
        _kill_mid_write(new, target, "export", fraction * seconds)
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: X.numpy()})[0])
        assert torch.allclose(got, want_old, atol=1e-4) or torch.allclose(got, want_new, atol=1e-4)
    old.export_onnx(target)
    assert _siblings(target) == []


def test_save_that_fails_validation_writes_nothing(tmp_path, models):
    old, _, want_old, _ = models
    target = tmp_path / "artifact"
    old.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    broken = _small()
    broken.graph_module.meta["fxforge_bad"] = {"when": object()}  # not JSON: refused up front
    with pytest.raises(ArtifactError, match="graph metadata 'fxforge_bad'"):
        broken.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _siblings(target) == []
    assert torch.equal(fxforge.load(target)(X), want_old)


def _failing_onnx_write(monkeypatch) -> None:
    """Make the ONNX writer fail half-way: it leaves a partial file, then raises (a full disk)."""
    from fxforge.backends.onnx import backend

    def write_half_then_fail(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError("No space left on device (injected)")

    monkeypatch.setattr(backend, "write_model", write_half_then_fail)


def test_save_that_fails_while_writing_keeps_the_previous_artifact(tmp_path, models, monkeypatch):
    # save(onnx=True) writes weights, inputs and graph, then exports ONNX; the ONNX writer fails
    # after those files (and part of model.onnx) exist in the staging directory.
    old, _, want_old, _ = models
    target = tmp_path / "artifact"
    old.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    broken = _small()
    _failing_onnx_write(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        broken.save(target, onnx=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _siblings(target) == []
    assert torch.equal(fxforge.load(target)(X), want_old)


def test_export_that_fails_keeps_the_previous_onnx_file(tmp_path, models, monkeypatch):
    old, _, _, _ = models
    target = tmp_path / "model.onnx"
    old.export_onnx(target)
    before = target.read_bytes()
    broken = _small()
    _failing_onnx_write(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        broken.export_onnx(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_replacing_an_artifact_drops_files_of_the_old_one(tmp_path):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    compiled.graph_module.meta["fxforge_masks"] = {"fc1.weight": torch.ones(2, 2, dtype=torch.bool)}
    compiled.save(tmp_path / "a")
    assert (tmp_path / "a" / "meta_tensors.safetensors").is_file()
    del compiled.graph_module.meta["fxforge_masks"]
    compiled.save(tmp_path / "a")
    assert not (tmp_path / "a" / "meta_tensors.safetensors").exists()  # else: an unlisted file
    assert "fxforge_masks" not in fxforge.load(tmp_path / "a").graph_module.meta


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("notes"), "it is a file"),
    (lambda p: (p.mkdir(), (p / "thesis.tex").write_text("years of work")), "holds files but no fxforge artifact"),
])
def test_save_never_replaces_something_that_is_not_an_artifact(tmp_path, make, fragment):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    target = tmp_path / "out"
    make(target)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError, match=fragment):
        compiled.save(target)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_leftovers_of_dead_writers_are_ignored_then_cleaned(tmp_path):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    target = tmp_path / "a"
    compiled.save(target)
    dead = 2**22 + 1  # above Linux's largest pid: no such process
    for kind in ("tmp", "old"):
        junk = tmp_path / f".a.fxforge-{kind}-{dead}-0123abcd"
        junk.mkdir()
        (junk / "weights.safetensors").write_bytes(b"half a file")
    assert torch.equal(fxforge.load(target)(*zoo.args), compiled(*zoo.args))
    compiled.save(target)
    assert _siblings(target) == []


def test_an_interrupted_swap_says_where_the_previous_artifact_is(tmp_path):
    # The fallback swap (old -> backup, new -> target) killed between its two renames leaves
    # no target: loading names the backup and how to restore it.
    zoo = get_model("mlp")
    fxforge.compile(zoo.model, zoo.args, verify=False).save(tmp_path / "a")
    backup = tmp_path / f".a.fxforge-old-{2**22 + 1}-0123abcd"
    (tmp_path / "a").rename(backup)
    with pytest.raises(ArtifactError, match="previous artifact is at .*Rename it to a"):
        fxforge.load(tmp_path / "a")
    backup.rename(tmp_path / "a")
    fxforge.load(tmp_path / "a")


def test_export_to_a_directory_is_refused(tmp_path):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    with pytest.raises(ArtifactError, match="it is a directory"):
        compiled.export_onnx(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_onnx_inside_the_artifact_is_listed_and_runs(tmp_path):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    compiled.save(tmp_path / "a", onnx=True)
    loaded = fxforge.load(tmp_path / "a")  # model.onnx is listed, so the artifact is whole
    session = ort.InferenceSession(str(tmp_path / "a" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: zoo.args[0].numpy()})[0]
    np.testing.assert_allclose(got, loaded(*zoo.args).detach().numpy(), atol=1e-5)
