"""Adapters: the LoRA family as graph passes (`add_adapters`, `merge_adapters`).

One file per method (lora.py, dora.py, pissa.py, ...), `common.py` for what they share.
"""
