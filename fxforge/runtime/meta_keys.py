"""Keys of the `gm.meta` entries that passes leave for the runtime to read.

Passes write them (`add_kv_cache`, `add_medusa_heads`) and the runtime reads them; both import
this module, so the runtime never imports a pass.
"""
from __future__ import annotations

# the cached graph's input/output layout, written by passes/kv_cache/add_kv_cache.py
KV_META = "fxforge_kv_cache"
# the Medusa heads' layout, written by passes/add_medusa_heads.py
MEDUSA_META = "fxforge_medusa"

__all__ = ["KV_META", "MEDUSA_META"]
