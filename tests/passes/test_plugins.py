"""Third-party passes arrive through the `fxforge.passes` entry-point group."""
from importlib.metadata import EntryPoint
from pathlib import Path

import fxforge.passes.registry as registry
from fxforge.passes.pipeline import Pipeline
from fxforge.passes.registry import registered_passes


def test_entry_point_pass_is_usable_by_name(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "plugin_example"))
    entry = EntryPoint(name="plugin_identity", value="fxforge_plugin_demo:PluginIdentity", group="fxforge.passes")

    def fake_entry_points(group=None):
        return [entry] if group == "fxforge.passes" else []

    registered_passes()  # built-ins first
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    try:
        assert "plugin_identity" in registered_passes()
        pipeline = Pipeline("canonicalize,plugin_identity(note='x')")
        assert pipeline.passes[1].note == "x"
    finally:
        registry._REGISTRY.pop("plugin_identity", None)
