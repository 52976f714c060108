"""The ONNX backend leaves nothing in the temp dir: not while a compiled model lives, not after.

The compiles run in a subprocess whose TMPDIR is a fresh empty directory, so the count is not
disturbed by other tests. Two entries there belong to libraries, once per TMPDIR, whatever
fxforge does: ONNX Runtime writes a 51-byte session-id file `.ses` when imported, and
torch.export creates torch's (empty) cache directory `torchinductor_<user>` on first trace.
The subprocess takes a baseline after both (import + an eager compile), and every listing
after ONNX compiles, and after exit, must equal it exactly (names and sizes).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys, tempfile, torch
    import fxforge
    from fxforge.models.zoo import get_model

    import onnxruntime

    tmp = tempfile.gettempdir()
    assert os.path.realpath(tmp) == os.path.realpath(sys.argv[1]), (tmp, sys.argv[1])

    def listing():
        found = []
        for root, dirs, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            found += [[os.path.join(rel, d), -1] for d in dirs]
            found += [[os.path.join(rel, f), os.path.getsize(os.path.join(root, f))] for f in files]
        return sorted(found)

    zoo = get_model("mlp")
    fxforge.compile(zoo.model, zoo.args)  # eager: the libraries' own once-per-TMPDIR entries appear
    seen = [listing()]
    compiled = []
    for passes in ("", "fuse_rms_norm", "quantize(bits=8,group_size=32)"):
        cm = fxforge.compile(zoo.model, zoo.args, passes=passes or None, backend="onnx")
        torch.testing.assert_close(cm(*zoo.args), zoo.model(*zoo.args), rtol=2e-2, atol=2e-2)
        compiled.append(cm)
        seen.append(listing())  # while alive: what the session needs is in memory
    # a failing write into the temp dir (a model with external data; small ones stay in memory)
    # must not leave its directory either
    from fxforge.backends.onnx import backend as onnx_backend
    def broken(*a, **k):
        raise RuntimeError("export failed on purpose")
    limit, onnx_backend.EXTERNAL_DATA_BYTES = onnx_backend.EXTERNAL_DATA_BYTES, 0
    onnx_backend.write_model, saved = broken, onnx_backend.write_model
    try:
        fxforge.compile(zoo.model, zoo.args, backend="onnx")
    except Exception as exc:
        assert "on purpose" in repr(exc) or "on purpose" in repr(exc.__cause__), exc
    else:
        raise AssertionError("the broken export did not fail")
    onnx_backend.write_model, onnx_backend.EXTERNAL_DATA_BYTES = saved, limit
    seen.append(listing())
    del compiled, cm
    gc.collect()
    seen.append(listing())
    print(json.dumps(seen))
""")


def test_no_temp_files_during_or_after_onnx_compiles(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), TEMP=str(tmpdir), TMP=str(tmpdir), FXFORGE_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmpdir)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    baseline, *during = json.loads(done.stdout.strip().splitlines()[-1])
    allowed = {"./.ses", "./torchinductor_"}  # the libraries' entries (module docstring)
    assert all(any(path.startswith(a) for a in allowed) for path, _ in baseline), baseline
    assert len(during) == 5
    for step, entries in enumerate(during):
        assert entries == baseline, f"step {step}: temp dir has {entries}, before ONNX compiles {baseline}"
    after = sorted(p.relative_to(tmpdir) for p in tmpdir.rglob("*"))
    assert [str(p) for p in after] == sorted(path[2:] for path, _ in baseline), "the process left files behind"
    assert not any("fxforge" in str(p) for p in after)


def test_a_kept_path_is_the_users_file(tmp_path):
    """backend_options={'path': ...} keeps the .onnx file where the user asked (not a temp file)."""
    import fxforge
    from fxforge.models.zoo import get_model

    zoo = get_model("mlp")
    target = tmp_path / "kept" / "model.onnx"
    cm = fxforge.compile(zoo.model, zoo.args, backend="onnx", backend_options={"path": str(target)})
    assert target.is_file() and target.stat().st_size > 0
    cm(*zoo.args)
    assert target.is_file()
