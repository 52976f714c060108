"""bench/gpu_suite.py --smoke on the CPU interpreter: sections run, are checked, and fail alone.

The fast sections only (lora, decode and flash attention: a few seconds); quantize, shift_add
and medusa take minutes under the interpreter and are left to
`TRITON_INTERPRET=1 python bench/gpu_suite.py --smoke`.
"""
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SECTIONS = "lora,decode_attention,flash_attention"


def _suite():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(out: Path) -> dict:
    (path,) = out.glob("gpu_*.json")
    return json.loads(path.read_text())


def test_smoke_sections_pass_and_write_one_json(tmp_path):
    assert _suite().main(["--smoke", "--only", SECTIONS, "--out", str(tmp_path)]) == 0
    record = _record(tmp_path)
    assert record["mode"] == "smoke" and record["torch"] and "device" in record
    assert list(record["sections"]) == SECTIONS.split(",")
    for name, section in record["sections"].items():
        assert section["status"] == "ok", (name, section.get("traceback"))
        assert section["rows"] and section["wall_s"] >= 0
    assert {"fused_ms", "unfused_ms", "base_ms"} <= set(record["sections"]["lora"]["rows"][0])


def test_a_failing_section_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    suite = _suite()
    import lora_gpu

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(lora_gpu, "run", broken)
    assert suite.main(["--smoke", "--only", "lora,decode_attention", "--out", str(tmp_path)]) == 1
    sections = _record(tmp_path)["sections"]
    assert sections["lora"]["status"] == "failed: RuntimeError: kernel exploded"
    assert "kernel exploded" in sections["lora"]["traceback"]
    assert sections["decode_attention"]["status"] == "ok"


def test_a_kernel_that_disagrees_with_its_reference_fails_its_section(tmp_path, monkeypatch):
    suite = _suite()
    import fxforge.kernels.decode_attention as decode

    real = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: real(*a, **k) + 1.0)
    assert suite.main(["--smoke", "--only", "decode_attention", "--out", str(tmp_path)]) == 1
    status = _record(tmp_path)["sections"]["decode_attention"]["status"]
    assert status.startswith("failed: SystemExit") and "disagrees with torch SDPA" in status
