"""bench/scale.py on a shrunken model: each pipeline runs in its own child, whose peak RSS, CPU
time and parameter bytes come back in the table and the JSON (the real run takes an hour)."""
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _scale():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("scale", BENCH / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_shrunken_run_measures_each_pipeline_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "scale.json"
    code = _scale().main(["--layers", "1", "--dtypes", "fp32", "--pipelines", "eager,quantize4", "--shrink", "4",
                          "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["pipeline"] for r in rows] == ["eager", "quantize4"]
    for row in rows:
        assert row["status"] == "ok"
        assert row["p_gib"] > 0 and row["peak_rss_gib"] > row["p_gib"]  # the runtime itself is bigger
        assert abs(row["rss_over_p"] - row["peak_rss_gib"] / row["p_gib"]) < 0.02 * row["rss_over_p"]  # (rounded)
        assert row["cpu_s"] > 0 and row["wall_s"] >= row["pipeline_s"]
    assert "\nquantize " in rows[1]["report"] and "new tensors" in rows[1]["report"]  # (bits=4 is the default)
    assert "eager" in capsys.readouterr().out  # the table


def test_a_failing_pipeline_is_a_row_not_a_crash(tmp_path):
    scale = _scale()
    row = scale.measure(1, "fp32", "eager", timeout_s=0.5, shrink=4)  # killed long before it is done
    assert row["status"].startswith("failed") and "p_gib" not in row


def test_a_streamed_run_reads_a_written_directory(tmp_path):
    scale = _scale()
    scale.DIRS = tmp_path / "dirs"
    out = tmp_path / "stream.json"
    assert scale.main(["--streamed", "tiny", "--blocks", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["pipeline"] == "gptq4-streamed-tiny-eager" and row["layers"] == 2
    assert row["spilled_gib"] is not None and row["peak_owned_gib"] is not None  # a streamed graph (GiB: rounds to 0 here)
    assert "quantize(method='gptq')" in row["report"]
    assert not (scale.DIRS / "tiny-L2-bf16").exists()  # the random-weight directory is removed after
