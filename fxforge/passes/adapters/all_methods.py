"""Imports every adapter method module, so each registers itself in the "add_adapters" family
(`fxforge.passes.methods.methods_of("add_adapters")`). A new method's file is added here."""
from fxforge.passes.adapters import (  # noqa: F401
    bone,
    dora,
    eva,
    loldu,
    lora,
    lora_ga,
    lora_sb,
    olora,
    pissa,
    sorsa,
    svfit,
)
