"""CPU benchmark of pass `fuse_attention`: ONNX Runtime latency unfused vs fused.

Every architecture of issue 4: GPT-2, BERT, Llama (GQA), Mistral (GQA), Qwen2 (GQA), OPT,
GPT-NeoX, Phi and ViT. For each model (random weights, hidden 256, 4 heads, 2 layers, eager
attention) the graph is traced once with a dynamic sequence length, exported to ONNX twice (as
traced, and after `fuse_attention`, whose fxforge::attention ops become ONNX `Attention`), and
both sessions are timed in one run, interleaved, on 2 ORT threads at sequence lengths 128 and
1024 (batch 1): median of several runs, ratio fused / unfused. OPT is called without an
attention mask, so the pass proves its mask purely causal and emits is_causal=True; it is also
exported with the causal `com.microsoft::GroupQueryAttention` lowering. ViT has no sequence
axis: its position embeddings fix the image size, so it is traced once per length with a static
image whose 4x4 patches number 128 (64x32 pixels) or 1024 (128x128), plus the CLS token, i.e.
129 and 1025 tokens. Per model the script checks (and fails at the end otherwise) that the
fused ONNX file holds Attention/GroupQueryAttention nodes, one per layer, while the unfused
file holds none, and that fused and unfused outputs agree (max abs error <= MAX_ERROR). A second table times one attention alone: the ONNX
`Attention` node against the MatMul/Softmax graph it replaces (with and without GQA, causal).

Then a Triton-interpreter correctness check: the `triton` lowering of fxforge::attention
(flash-attention kernel) against the op's reference on tiny shapes (causal, bool and additive
masks, GQA), and a fused tiny Llama run end to end on the triton backend.

Then issue 17's prefill table: one attention at 512 and 2048 tokens with BERT-base's shapes (12
heads of 64, non-causal, the additive (1, 1, L, L) padding mask HF builds once per model) and
TinyLlama's (32 query / 4 key-value heads of 64, causal), from the projections' (B, L, H·D)
outputs to the output projection's input (split heads, attention, merge heads; RoPE left out):
unfused (the eager MatMul/Softmax graph HF's attention exports to, with repeat_kv and the
model's precomputed additive mask) against fxforge::attention lowered with each operator the
ONNX backend offers for it (the default first): fused time / unfused time, interleaved, at 1
and 2 ORT threads, ORT's default graph optimizations (ORT_ENABLE_ALL).

    python bench/attention.py            # prints a table, writes bench/results/attention_cpu.json
    python bench/attention.py --only phi --only vit   # re-time some models, merge their rows
    python bench/attention.py --prefill-only          # re-time the prefill table only, merge it
    python bench/attention.py --prefill-only --shape "bert-base, key padding"   # one shape's rows
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel check runs on CPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FXFORGE_PROGRESS", "0")

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.export import Dim  # noqa: E402
from _host import host_info  # bench/ is on sys.path when a script runs

LENGTHS = (128, 1024)
THREADS = 2
HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 4, 2, 2, 512
RUNS = {128: 30, 1024: 7}  # timed runs per variant (after one warm-up); 9 models must fit in ~15 min
MAX_ERROR = 1e-3  # fused vs unfused outputs, float32, layer-normed hidden states of magnitude ~1
PATCH = 4
VIT_IMAGE = {128: (64, 32), 1024: (128, 128)}  # (height, width): 16*8 and 32*32 patches of 4x4
ATTENTION_OPS = ("Attention", "GroupQueryAttention", "MultiHeadAttention")
PREFILL_LENGTHS = (512, 2048)
PREFILL_THREADS = (1, 2)
PREFILL_RUNS = {512: 15, 2048: 5}
PREFILL_SHAPES = {  # name: (query heads, key/value heads, head dim, mask, ONNX operators to try)
    "bert-base": (12, 12, 64, "padding", ("MultiHeadAttention", "Attention")),
    "bert-base, no mask": (12, 12, 64, None, ("MultiHeadAttention", "Attention")),  # ViT; BERT without padding
    # BERT's extended padding mask as get_extended_attention_mask makes it, (B, 1, 1, L): key-only by
    # its shape, so MultiHeadAttention takes it as key weights on its flash path (attention_prefill.py)
    "bert-base, key padding": (12, 12, 64, "keys", ("MultiHeadAttention", "Attention")),
    "tinyllama": (32, 4, 64, "causal", ("GroupQueryAttention", "Attention")),
}
PREFILL_BAR = 0.8  # issue 17: fused <= 0.8x unfused at 2048 tokens
RESULTS = Path(__file__).resolve().parent / "results" / "attention_cpu.json"


def build(arch: str, seq: int | None = None) -> torch.nn.Module:
    """A random-weight transformers model sized so attention matters at length 1024.

    `seq` only matters for ViT, whose image size (so number of patches) is fixed by its config."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=4 * HIDDEN, max_position_embeddings=2048, attn_implementation="eager")
    if arch == "gpt2":
        model = T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                         n_positions=2048, attn_implementation="eager"))
    elif arch == "llama-gqa":
        model = T.LlamaModel(T.LlamaConfig(num_key_value_heads=KV_HEADS, **common))
    elif arch == "bert":
        model = T.BertModel(T.BertConfig(**common), add_pooling_layer=False)
    elif arch == "mistral-gqa":  # default sliding window 4096 > every length timed: plain causal
        model = T.MistralModel(T.MistralConfig(num_key_value_heads=KV_HEADS, **common))
    elif arch == "qwen2-gqa":
        model = T.Qwen2Model(T.Qwen2Config(num_key_value_heads=KV_HEADS, **common))
    elif arch == "gpt-neox":
        model = T.GPTNeoXModel(T.GPTNeoXConfig(**common))
    elif arch == "phi":
        model = T.PhiModel(T.PhiConfig(**common))
    elif arch == "vit":
        model = T.ViTModel(T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       intermediate_size=4 * HIDDEN, image_size=VIT_IMAGE[seq], patch_size=PATCH,
                                       attn_implementation="eager"), add_pooling_layer=False)
    elif arch == "opt-causal":
        model = T.OPTModel(T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, ffn_dim=4 * HIDDEN, max_position_embeddings=2048,
                                       word_embed_proj_dim=HIDDEN, attn_implementation="eager"))
    else:
        raise KeyError(arch)
    model.config.use_cache = False
    return model.eval()


MODELS = {  # name: inputs it is called with (issue 4's order)
    "gpt2": ("input_ids", "attention_mask"),
    "bert": ("input_ids", "attention_mask"),
    "llama-gqa": ("input_ids", "attention_mask"),
    "mistral-gqa": ("input_ids", "attention_mask"),
    "qwen2-gqa": ("input_ids", "attention_mask"),
    "opt-causal": ("input_ids",),
    "gpt-neox": ("input_ids", "attention_mask"),
    "phi": ("input_ids", "attention_mask"),
    "vit": ("pixel_values",),
}
STATIC = {"vit"}  # traced and exported once per length (no dynamic sequence axis)


def tokens(arch: str, seq: int) -> int:
    """Sequence length the attention actually sees (ViT: patches + CLS)."""
    return seq + 1 if arch == "vit" else seq


def inputs(names: tuple[str, ...], seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seq)
    if names == ("pixel_values",):
        return {"pixel_values": torch.randn(1, 3, *VIT_IMAGE[seq], generator=gen)}
    made = {"input_ids": torch.randint(3, VOCAB, (1, seq), generator=gen),
            "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    return {n: made[n] for n in names}


def export_variants(arch: str, workdir: Path, seq_static: int | None = None) -> tuple[dict, dict]:
    """{variant: OnnxRunner} and facts about the fused graph for one model (ViT: for one length)."""
    from fxforge.backends.onnx.backend import export_onnx
    from fxforge.backends.onnx.options import OnnxOptions
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import PipelineReport, run_pass
    from fxforge.passes.attention.fuse_attention import FuseAttention

    names = MODELS[arch]
    if seq_static is not None:
        example = inputs(names, seq_static)
        gm = trace(build(arch, seq_static), (), example)
    else:
        example = inputs(names, 64)
        seq = Dim("seq", min=2, max=2048)
        gm = trace(build(arch), (), example, dynamic_shapes={n: {1: seq} for n in names})
    canonicalize(gm)
    flat = tuple(example.values())
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=flat), report=report)
    ops = [n for n in fused.graph.nodes if n.target == torch.ops.fxforge.attention.default]
    facts = {"sites": report.records[0].sites, "skipped": report.records[0].skipped,
             "is_causal": [bool(n.args[4]) for n in ops], "masked": [n.args[3] is not None for n in ops],
             "num_kv_groups": [n.args[6] for n in ops]}
    runners, facts["onnx_ops"] = {}, {}
    tag = arch if seq_static is None else f"{arch}-{seq_static}"
    for variant, graph in (("unfused", gm), ("fused", fused)):
        path = export_onnx(graph, flat, workdir / f"{tag}-{variant}.onnx")
        runners[variant], facts["onnx_ops"][variant] = session(path), attention_ops_in(path)
    if all(facts["is_causal"]) and not any(facts["masked"]):
        path = export_onnx(fused, flat, workdir / f"{tag}-fused-gqa.onnx",
                           options=OnnxOptions(causal_attention="GroupQueryAttention"))
        runners["fused-GQA"], facts["onnx_ops"]["fused-GQA"] = session(path), attention_ops_in(path)
    return runners, facts


def session(path: Path | bytes):
    """An ORT session on THREADS threads that do not spin: the machine is shared, and spinning
    threads fighting other jobs for the cores distort timings far more than they save."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = sess.run(None, {n: x.numpy() for n, x in zip(names, flat)})
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs)

    return run


def attention_ops_in(path: Path) -> dict[str, int]:
    """How many attention-related ONNX nodes the file holds (Attention, GroupQueryAttention, Softmax)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Attention", "GroupQueryAttention", "Softmax", "MultiHeadAttention"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def time_interleaved(runners: dict, flat: tuple, runs: int) -> dict[str, float]:
    """Median milliseconds per variant; the variants take turns so drift hits all alike."""
    for runner in runners.values():  # warm-up (allocations, thread pool)
        runner(*flat)
    samples = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(*flat)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def attention_op_microbench() -> list[dict]:
    """One attention alone in ORT: the ONNX Attention-23 node vs the MatMul/Softmax graph it replaces.

    Isolates the operator from the rest of the model (whose run-to-run noise on a shared machine
    is larger than one attention's cost at length 128). 4 query heads of dim 64, batch 1.
    """
    import numpy as np
    from onnx import TensorProto, helper

    def graph(length: int, kv_heads: int, kind: str, fused: bool):
        heads, dim = HEADS, HIDDEN // HEADS
        ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, length, dim]),
               helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, kv_heads, length, dim]),
               helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, kv_heads, length, dim])]
        if kind == "mask":
            ins.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 1, length, length]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, heads, length, dim])
        scale = 1 / math.sqrt(dim)
        inits, nodes = [], []
        if fused:
            nodes.append(helper.make_node("Attention", [i.name for i in ins], ["y"], scale=scale,
                                          is_causal=int(kind == "causal")))
        else:
            k, v = "k", "v"
            if kv_heads != heads:  # repeat_kv as the exporter writes it: Unsqueeze, Expand, Reshape
                inits += [helper.make_tensor("ax", TensorProto.INT64, [1], [2]),
                          helper.make_tensor("e", TensorProto.INT64, [5], [1, kv_heads, heads // kv_heads, length, dim]),
                          helper.make_tensor("r", TensorProto.INT64, [4], [1, heads, length, dim])]
                for t in ("k", "v"):
                    nodes += [helper.make_node("Unsqueeze", [t, "ax"], [t + "1"]),
                              helper.make_node("Expand", [t + "1", "e"], [t + "2"]),
                              helper.make_node("Reshape", [t + "2", "r"], [t + "3"])]
                k, v = "k3", "v3"
            inits.append(helper.make_tensor("c", TensorProto.FLOAT, [], [scale]))
            nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
                      helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "c"], ["s1"])]
            bias = "m"
            if kind == "causal":
                triangle = np.triu(np.full((length, length), -np.inf, np.float32), 1)
                inits.append(helper.make_tensor("tri", TensorProto.FLOAT, [length, length], triangle.ravel()))
                bias = "tri"
            nodes += [helper.make_node("Add", ["s1", bias], ["s2"]), helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
                      helper.make_node("MatMul", ["p", v], ["y"])]
        model = helper.make_model(helper.make_graph(nodes, "attention", ins, [out], initializer=inits),
                                  opset_imports=[helper.make_opsetid("", 23)])
        return session(model.SerializeToString())

    rows = []
    for length in LENGTHS:
        for kv_heads, kind in ((HEADS, "mask"), (KV_HEADS, "mask"), (HEADS, "causal")):
            gen = torch.Generator().manual_seed(length)
            flat = [torch.randn(1, h, length, HIDDEN // HEADS, generator=gen) for h in (HEADS, kv_heads, kv_heads)]
            if kind == "mask":
                flat.append(torch.zeros(1, 1, length, length))
            runners = {"unfused": graph(length, kv_heads, kind, False), "fused": graph(length, kv_heads, kind, True)}
            err = (runners["fused"](*flat)[0] - runners["unfused"](*flat)[0]).abs().max().item()
            times = time_interleaved(runners, tuple(flat), 3 * RUNS[length])
            rows.append({"length": length, "kv_heads": kv_heads, "kind": kind, "unfused_ms": times["unfused"],
                         "fused_ms": times["fused"], "ratio": times["fused"] / times["unfused"], "max_abs_error": err})
    return rows


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·D) as a projection leaves it -> (B, H, L, D), as HF's attention views it."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class EagerAttention(torch.nn.Module):
    """HF's eager attention as it exports, between the projections: split heads, repeat_kv,
    Q·Kᵀ·scale + the model's additive mask, softmax, ·V, merge heads."""

    def __init__(self, heads: int, kv_heads: int, scale: float):
        super().__init__()
        self.heads, self.kv_heads, self.scale = heads, kv_heads, scale

    def forward(self, q, k, v, mask=None):
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        groups = self.heads // self.kv_heads
        if groups > 1:
            b, h, n, d = k.shape
            k = k[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
            v = v[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = scores if mask is None else scores + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out.transpose(1, 2).flatten(2)


class FusedAttention(EagerAttention):
    """What fuse_attention leaves there: one fxforge::attention (BERT keeps its mask; Llama's is
    proven causal and dropped)."""

    def __init__(self, heads: int, kv_heads: int, scale: float, causal: bool):
        super().__init__(heads, kv_heads, scale)
        self.causal = causal

    def forward(self, q, k, v, mask=None):
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        out = torch.ops.fxforge.attention(q, k, v, mask, self.causal, self.scale, self.heads // self.kv_heads)
        return out.transpose(1, 2).flatten(2)


def export_module(module: torch.nn.Module, example: tuple, options=None) -> bytes:
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    program = torch.onnx.export(module, example, dynamo=True, custom_translation_table=translation_table(options),
                                opset_version=OPSET_VERSION, verbose=False)
    return program.model_proto.SerializeToString()


def prefill_attention() -> list[dict]:
    """Issue 17's prefill table: fused / unfused attention time at 512 and 2048 tokens."""
    import onnx

    from fxforge.backends.onnx.options import OnnxOptions
    from fxforge.ir.ops import get_op

    get_op("attention")  # importing fxforge.ir.ops registers torch.ops.fxforge.attention

    global THREADS
    rows = []
    chosen = [a for flag, a in zip(sys.argv[1:], sys.argv[2:]) if flag == "--shape"] or list(PREFILL_SHAPES)
    for name, (heads, kv_heads, dim, mask_kind, operators) in PREFILL_SHAPES.items():
        if name not in chosen:
            continue
        causal = mask_kind == "causal"
        scale = 1 / math.sqrt(dim)
        for length in PREFILL_LENGTHS:
            gen = torch.Generator().manual_seed(length)
            q = torch.randn(1, length, heads * dim, generator=gen)
            k, v = (torch.randn(1, length, kv_heads * dim, generator=gen) for _ in range(2))
            lowest = torch.finfo(torch.float32).min
            if causal:  # HF's precomputed causal mask
                mask = torch.full((length, length), lowest).triu(1)[None, None]
            elif mask_kind == "keys":  # (B, 1, 1, L), added by broadcasting: the last eighth are padding
                mask = torch.zeros(1, 1, 1, length)
                mask[..., length - length // 8:] = lowest
            else:  # HF's extended padding mask: the last eighth of the keys are padding
                mask = torch.zeros(1, 1, length, length)
                mask[..., length - length // 8:] = lowest
            unfused_args = (q, k, v) if mask_kind is None else (q, k, v, mask)
            unfused = export_module(EagerAttention(heads, kv_heads, scale).eval(), unfused_args)
            fused_args = (q, k, v) if mask_kind not in ("padding", "keys") else (q, k, v, mask)
            with torch.no_grad():  # the eager module in torch: what every ONNX variant is checked against
                expected = EagerAttention(heads, kv_heads, scale)(*unfused_args)
            key = "causal_attention" if causal else "bidirectional_attention"
            default = getattr(OnnxOptions(), key)  # the backend's choice for this case
            fused = {op: export_module(FusedAttention(heads, kv_heads, scale, causal).eval(), fused_args,
                                       OnnxOptions(**{key: op})) for op in operators}
            kinds = {op: sorted({n.op_type for n in onnx.load_from_string(m).graph.node} & set(ATTENTION_OPS))
                     for op, m in fused.items()}
            for threads in PREFILL_THREADS:
                THREADS = threads
                runners = {"unfused": session(unfused), **{op: session(m) for op, m in fused.items()}}
                feeds = {"unfused": unfused_args, **{op: fused_args for op in fused}}
                errors = {op: (runners[op](*feeds[op])[0] - expected).abs().max().item() for op in runners}
                samples = {n: [] for n in runners}
                for _ in range(PREFILL_RUNS[length]):
                    for n, runner in runners.items():
                        start = time.perf_counter()
                        runner(*feeds[n])
                        samples[n].append((time.perf_counter() - start) * 1e3)
                base = statistics.median(samples["unfused"])
                for op in fused:
                    ms = statistics.median(samples[op])
                    paired = sorted(a / b for a, b in zip(samples[op], samples["unfused"]))
                    rows.append({"shape": name, "tokens": length, "threads": threads, "operator": op,
                                 "default": op == default, "onnx_nodes": kinds[op], "unfused_ms": base,
                                 "fused_ms": ms, "ratio": ms / base, "paired_ratio_median": statistics.median(paired),
                                 "max_abs_error": errors[op], "unfused_max_abs_error": errors["unfused"],
                                 "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "mask": mask_kind})
                    print(f"  {name:<18} L={length:<5} {threads} thr  {op:<20}{'(default)' if op == default else '':<10}"
                          f"unfused {base:9.1f} ms  fused {ms:9.1f} ms  ratio {ms / base:.2f}  err {errors[op]:.1e}",
                          flush=True)
                del runners
    THREADS = 2
    return rows


def print_prefill(rows: list[dict]) -> None:
    print("\nPrefill attention alone (issue 17: fused <= 0.8x unfused at 2048 tokens; median of interleaved runs):")
    print(f"  {'shape':<19}{'tokens':>6}{'thr':>4}  {'operator':<22}{'unfused ms':>11}{'fused ms':>10}{'ratio':>7}"
          f"{'max err':>9}")
    for r in rows:
        mark = " *" if r["default"] else ""
        print(f"  {r['shape']:<19}{r['tokens']:>6}{r['threads']:>4}  {r['operator'] + mark:<22}{r['unfused_ms']:>11.1f}"
              f"{r['fused_ms']:>10.1f}{r['ratio']:>7.2f}{r['max_abs_error']:>9.1e}")
    print("  (* the backend's default operator for this case; max err: fused ONNX vs the eager module in torch)")


def prefill_problems(rows: list[dict]) -> list[str]:
    return [f"prefill {r['shape']} L={r['tokens']} {r['operator']}: max abs error {r['max_abs_error']:.1e}"
            for r in rows if not max(r["max_abs_error"], r["unfused_max_abs_error"]) <= MAX_ERROR]


def check_triton_kernels() -> list[dict]:
    """The triton lowering of fxforge::attention vs the op's reference, under the interpreter."""
    from fxforge.ir.ops import get_op, lowering_for
    from fxforge.kernels import load_all

    load_all()
    reference = get_op("attention").overload
    kernel = lowering_for("triton", "attention")
    torch.manual_seed(0)
    cases = []
    for name, hq, hkv, mask_kind, causal in (
        ("causal", 2, 2, None, True), ("bool mask", 2, 2, "bool", False),
        ("additive mask + causal", 2, 2, "float", True), ("GQA 4/2, causal", 4, 2, None, True),
    ):
        q = torch.randn(1, hq, 24, 16)
        k, v = torch.randn(1, hkv, 24, 16), torch.randn(1, hkv, 24, 16)
        mask = None
        if mask_kind == "bool":
            mask = torch.rand(1, 1, 24, 24) > 0.3
            mask[..., 0] = True
        elif mask_kind == "float":
            mask = torch.where(torch.rand(1, 1, 24, 24) > 0.3, 0.0, float("-inf"))
            mask[..., 0] = 0.0
        args = (q, k, v, mask, causal, None, hq // hkv)
        err = (kernel(*args) - reference(*args)).abs().max().item()
        cases.append({"case": name, "max_abs_error": err, "ok": err <= 1e-4})
    return cases


def check_triton_backend() -> dict:
    """A fused tiny Llama end to end on the triton backend vs the unfused eager graph."""
    from fxforge.backends.triton import prepare
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.ir.verify import run_graph
    from fxforge.models import get_model
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import run_pass
    from fxforge.passes.attention.fuse_attention import FuseAttention

    zoo = get_model("tiny-llama")
    _, kwargs = zoo.make_inputs(batch=2, seq=12)
    gm = trace(zoo.model, (), kwargs)
    canonicalize(gm)
    flat = tuple(kwargs.values())
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=flat))
    got = prepare(fused)(*flat)[0]
    err = (got - run_graph(gm, flat)[0]).abs().max().item()
    return {"model": "tiny-llama (fused, triton backend, seq 12)", "max_abs_error": err, "ok": err <= 1e-4}


def host() -> dict:
    return host_info(ort_threads=THREADS, note="shared machine: other jobs ran concurrently, so absolute times are noisy")


def structure_problems(arch: str, facts: dict) -> list[str]:
    """Fused file: one Attention/GroupQueryAttention node per layer; unfused file: none."""
    problems = []
    for variant, counts in facts["onnx_ops"].items():
        fused_nodes = sum(counts.get(op, 0) for op in ATTENTION_OPS)
        if variant == "unfused" and fused_nodes:
            problems.append(f"{arch}: unfused ONNX holds {counts}")
        if variant != "unfused" and fused_nodes != LAYERS:
            problems.append(f"{arch}: {variant} ONNX holds {counts}, want {LAYERS} attention nodes")
    if facts["sites"] != LAYERS:
        problems.append(f"{arch}: fuse_attention fused {facts['sites']} sites, want {LAYERS} ({facts['skipped']})")
    return problems


def bench_model(arch: str, workdir: Path, problems: list[str]) -> list[dict]:
    rows = []
    built = {None: export_variants(arch, workdir)} if arch not in STATIC else {}
    for seq in LENGTHS:
        if arch in STATIC:
            built = {seq: export_variants(arch, workdir, seq)}
        runners, facts = next(iter(built.values()))
        if seq == LENGTHS[0] or arch in STATIC:
            problems += structure_problems(arch, facts)
            print(f"{arch:<11} ONNX attention nodes: " + ", ".join(f"{v} {c}" for v, c in facts["onnx_ops"].items()),
                  flush=True)
        flat = tuple(inputs(MODELS[arch], seq).values())
        ref = runners["unfused"](*flat)[0]
        errors = {name: (r(*flat)[0] - ref).abs().max().item() for name, r in runners.items() if name != "unfused"}
        for name, err in errors.items():
            if not err <= MAX_ERROR:
                problems.append(f"{arch} seq {seq} {name}: max abs error {err:.1e} > {MAX_ERROR:.0e}")
        times = time_interleaved(runners, flat, RUNS[seq])
        for name in runners:
            if name == "unfused":
                continue
            rows.append({"model": arch, "seq": seq, "tokens": tokens(arch, seq), "variant": name,
                         "unfused_ms": times["unfused"], "fused_ms": times[name],
                         "ratio": times[name] / times["unfused"], "max_abs_error": errors[name], **facts})
            print(f"{arch:<11} seq {tokens(arch, seq):>5}  {name:<9} unfused {times['unfused']:8.2f} ms  "
                  f"fused {times[name]:8.2f} ms  ratio {times[name] / times['unfused']:.2f}  "
                  f"err {errors[name]:.1e}", flush=True)
    return rows


def main() -> None:
    if "--prefill-only" in sys.argv[1:]:  # re-time the prefill table, keep the rest of the file
        torch.set_num_threads(THREADS)
        prefill = prefill_attention()
        print_prefill(prefill)
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        retimed = {r["shape"] for r in prefill}  # --shape NAME: the other shapes' rows stay
        prefill = [r for r in previous.get("prefill_attention", []) if r["shape"] not in retimed] + prefill
        previous.update({"prefill_attention": prefill, "prefill_host": host()})
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(previous, indent=2))
        print(f"\nwrote {RESULTS}")
        if prefill_problems(prefill):
            raise SystemExit("checks failed:\n  " + "\n  ".join(prefill_problems(prefill)))
        return
    only = [a for flag, a in zip(sys.argv[1:], sys.argv[2:]) if flag == "--only"]
    unknown = [a for a in only if a not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    rows, problems = [], []
    with tempfile.TemporaryDirectory(prefix="fxforge-bench-attention-") as tmp:
        for arch in only or MODELS:
            try:
                rows += bench_model(arch, Path(tmp), problems)
            except Exception as exc:  # keep the other models' rows; reported and failed below
                problems.append(f"{arch}: {type(exc).__name__}: {exc}")
                print(f"{arch}: FAILED {type(exc).__name__}: {exc}", flush=True)
    if only and RESULTS.exists():  # re-timed rows replace theirs, the rest of the file is kept
        previous = json.loads(RESULTS.read_text())
        keep = [r for r in previous["latency"] if r["model"] not in only]
        order = list(MODELS)
        rows = sorted(keep + rows, key=lambda r: (order.index(r["model"]), r["seq"]))
        micro, kernels = previous["attention_op_alone"], previous["triton_interpreter"][:-1]
        backend = previous["triton_interpreter"][-1]
        prefill = previous.get("prefill_attention", [])
    else:
        micro = attention_op_microbench()
        prefill = prefill_attention()
        problems += prefill_problems(prefill)
        kernels = check_triton_kernels()
        backend = check_triton_backend()
    print()
    header = (f"{'model':<12}{'seq':>6}  {'variant':<10}{'unfused ms':>11}{'fused ms':>10}{'ratio':>7}{'max err':>10}"
              f"  fused ops")
    print(header)
    print("-" * len(header))
    for r in rows:
        kind = "causal" if all(r["is_causal"]) else "mask" if any(r["masked"]) else "no mask"
        groups = f", {r['num_kv_groups'][0]} kv groups" if r["num_kv_groups"] and r["num_kv_groups"][0] > 1 else ""
        nodes = ", ".join(f"{k} {v}" for k, v in r["onnx_ops"][r["variant"]].items() if k in ATTENTION_OPS)
        print(f"{r['model']:<12}{r.get('tokens', r['seq']):>6}  {r['variant']:<10}{r['unfused_ms']:>11.2f}"
              f"{r['fused_ms']:>10.2f}{r['ratio']:>7.2f}{r['max_abs_error']:>10.1e}  {r['sites']} ({kind}{groups}); "
              f"ONNX {nodes}")
    print("  (vit: 128 or 1024 patches of 4x4 + CLS token = 129 / 1025 tokens; unfused ONNX files hold no "
          "Attention/GroupQueryAttention node)")
    print("\nOne attention alone (ORT Attention-23 node vs the MatMul/Softmax graph it replaces):")
    for r in micro:
        print(f"  L={r['length']:<5} kv heads {r['kv_heads']}  {r['kind']:<7} unfused {r['unfused_ms']:8.3f} ms  "
              f"fused {r['fused_ms']:8.3f} ms  ratio {r['ratio']:.2f}  max err {r['max_abs_error']:.1e}")
    print_prefill(prefill)
    print("\nTriton interpreter checks (flash-attention kernel vs the op's reference):")
    for c in kernels + [backend]:
        print(f"  {c.get('case', c.get('model')):<45} max abs error {c['max_abs_error']:.1e}  {'ok' if c['ok'] else 'FAIL'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"host": host(), "config": {
        "hidden": HIDDEN, "heads": HEADS, "kv_heads_gqa": KV_HEADS, "layers": LAYERS, "batch": 1,
        "lengths": LENGTHS, "runs": RUNS, "statistic": "median, variants interleaved", "max_error": MAX_ERROR,
        "vit": {"patch": PATCH, "image_hw": VIT_IMAGE, "tokens": {s: tokens("vit", s) for s in LENGTHS}}},
        "latency": rows, "attention_op_alone": micro, "prefill_attention": prefill, "triton_interpreter": kernels + [backend],
        "checks_failed": problems}, indent=2))
    print(f"\nwrote {RESULTS}  ({time.perf_counter() - start:.0f} s)")
    if problems:
        raise SystemExit("checks failed:\n  " + "\n  ".join(problems))
    print("checks ok: fused and unfused outputs agree; fused ONNX files hold attention nodes, unfused none")


if __name__ == "__main__":
    main()
