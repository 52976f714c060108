"""examples/medusa_decode.py runs end to end on the tiny code-lm and checks its own output."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medusa_decode.py"


@pytest.mark.slow
def test_medusa_example_decodes_the_same_tokens_with_fewer_forwards(capsys):
    spec = importlib.util.spec_from_file_location("medusa_decode", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--variant", "tiny", "--steps", "30", "--prompts", "2", "--new-tokens", "12",
                        "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "same tokens as plain greedy: yes" in out
    plain, fast = [float(line.split()[1]) for line in out.splitlines() if line.strip().startswith(("plain", "medusa"))]
    assert plain == 1.0 and fast >= 1.0
