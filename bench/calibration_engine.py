"""Calibrated quantization on a random Llama (hidden 1024, 16 heads / 4 KV heads, 2816 MLP):

wall time, peak-RSS growth during the pass, and held-out relative output error, for
`python bench/calibration_engine.py {gptq|awq} LAYERS` (8 calibration batches of 256 tokens,
one thread). Run it with another checkout on PYTHONPATH to compare implementations.
"""
import resource
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from fxforge.ir.trace import trace
from fxforge.ir.canonicalize import canonicalize
try:
    from fxforge.passes.context import PassContext
except ImportError:  # a checkout from before passes/base.py was split
    from fxforge.passes.base import PassContext
from fxforge.passes.quantize import Quantize
from fxforge.ir.verify import run_graph

method = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                  num_hidden_layers=layers, vocab_size=2000, max_position_embeddings=512)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 2000, (1, 256)); mask = torch.ones_like(ids)
gm = trace(model, (), {"input_ids": ids, "attention_mask": mask})
canonicalize(gm)
del model
g = torch.Generator().manual_seed(1)
data = [{"input_ids": torch.randint(0, 2000, (1, 256), generator=g), "attention_mask": torch.ones(1, 256, dtype=torch.long)} for _ in range(8)]
held = (torch.randint(0, 2000, (1, 256), generator=g), torch.ones(1, 256, dtype=torch.long))
with torch.no_grad():
    ref = run_graph(gm, held)[0]
ctx = PassContext(example_inputs=(ids, mask), calibration=data, progress=lambda it=None, **k: it)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = Quantize(bits=4, group_size=128, method=method).run(gm, ctx)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res.graph_module.recompile()
with torch.no_grad():
    out = run_graph(res.graph_module, held)[0]
err = float((out - ref).norm() / ref.norm())
print(f"{method} layers={layers} wall={wall:.1f}s peak_rss_growth={(peak-base)/1024:.0f}MiB rel_err_heldout={err:.4f}")
