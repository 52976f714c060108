"""The lazy pass registry: BUILTIN_PASSES is the truth, and a pipeline imports only what it names."""
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fxforge.passes as passes_package
from fxforge.errors import PassSpecError
from fxforge.passes.registry import BUILTIN_PASSES, _REGISTRY, get_pass_class, register_pass

ROOT = Path(__file__).resolve().parents[2]


def _registered_by_fxforge_modules() -> dict[str, str]:
    """Import every module under fxforge.passes; what registers passes from inside fxforge."""
    for info in pkgutil.walk_packages(passes_package.__path__, prefix="fxforge.passes."):
        importlib.import_module(info.name)
    return {name: cls.__module__ for name, cls in _REGISTRY.items() if cls.__module__.startswith("fxforge.")}


def test_builtin_map_is_every_pass_fxforge_registers():
    found = _registered_by_fxforge_modules()
    missing = {name: module for name, module in found.items() if BUILTIN_PASSES.get(name) != module}
    assert not missing, ("passes registered by fxforge modules but missing (or pointing elsewhere) in "
                         "BUILTIN_PASSES of fxforge/passes/registry.py; add these lines: "
                         + " ".join(f'"{n}": "{m}",' for n, m in sorted(missing.items())))
    stale = sorted(set(BUILTIN_PASSES) - set(found))
    assert not stale, f"BUILTIN_PASSES in fxforge/passes/registry.py names passes no module registers: {stale}"
    assert list(BUILTIN_PASSES) == sorted(BUILTIN_PASSES), "keep BUILTIN_PASSES sorted by name"


def test_a_builtin_name_cannot_be_taken_by_another_module():
    from dataclasses import dataclass

    from fxforge.passes.base import Pass

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "quantize"

    with pytest.raises(ValueError, match=r"'quantize' belongs to fxforge's built-in pass in fxforge.passes.quantize"):
        register_pass(Impostor)
    assert get_pass_class("quantize").__module__ == "fxforge.passes.quantize"


def test_unknown_name_lists_the_known_passes():
    with pytest.raises(PassSpecError, match=r"unknown pass 'quantise'\. Did you mean 'quantize'.*Known passes: .*sparsify"):
        get_pass_class("quantise")


_PROBE = """
import json, sys
import fxforge
before = set(sys.modules)
pipeline = fxforge.Pipeline("quantize(bits=4)")
assert pipeline.passes[0].bits == 4
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
"""


def test_parsing_a_pipeline_imports_only_the_passes_it_names():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    after = set(modules["after"])
    # the check is worth something only if parsing did import the pass
    assert "fxforge.passes.quantize" in after and "fxforge.passes.quantize" not in modules["before"]
    pass_modules = {m for m in BUILTIN_PASSES.values() if m in after}
    assert pass_modules == {"fxforge.passes.quantize"}, f"parsing 'quantize(bits=4)' imported {sorted(pass_modules)}"
    others = sorted(m for m in after if m.startswith(("fxforge.passes.attention", "fxforge.passes.attention.fuse_attention",
                                                      "fxforge.passes.kv_cache", "fxforge.passes.kv_cache.add_kv_cache",
                                                      "fxforge.passes.prune", "fxforge.passes.adapters")))
    assert not others, f"parsing 'quantize(bits=4)' imported other families: {others}"
    assert "networkx" not in after
