"""Adapters: the LoRA family as graph passes.

    compiled = fxforge.compile(model, args, passes="add_adapters(method=pissa,rank=8,targets=['q_proj','v_proj'])")
    fxforge.train.fit(compiled, batches, loss_fn, steps=200, lr=1e-3)   # only adapter tensors train
    save_adapters(compiled, "adapter.safetensors")                     # fxforge.adapters_io
    merged = run_pass(MergeAdapters(), compiled.graph_module, ctx)      # plain linears again

Passes: `add_adapters` (add_adapters.py), `merge_adapters` and `unmerge_adapters`.
Methods, one file each: lora.py (lora, rslora), dora.py, pissa.py, olora.py, eva.py, lora_ga.py,
lora_sb.py, bone.py (MiSS and Bone's block-affine form), svfit.py, sorsa.py, loldu.py; each is
a frozen dataclass (its fields are its own options) registered in the "add_adapters" family of
`fxforge.passes.methods`, and all_methods.py imports them all. common.py holds the method base
class (`AdapterMethod`), the graph edit they share and the adapter records;
quantized_base.py puts LoRA branches beside quantized (`linear_wq`) layers, QLoRA style.
"""
