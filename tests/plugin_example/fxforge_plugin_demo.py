"""A stand-in third-party package that ships an fxforge pass through the entry-point group."""
from dataclasses import dataclass

from fxforge.passes.base import Pass, PassResult


@dataclass(frozen=True)
class PluginIdentity(Pass):
    """A plugin's pass: changes nothing, reports zero sites."""

    name = "plugin_identity"
    note: str = "hello"

    def run(self, gm, ctx):
        return PassResult(gm, sites=0, notes={"note": self.note})
