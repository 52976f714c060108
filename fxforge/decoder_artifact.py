"""The decoder artifact: an ONNX decoder with conventional names, its runtime config and tokenizer.

    out/
      model.onnx[.data]    inputs  input_ids (batch_size, sequence_length) int64
                                   attention_mask (batch_size, total_sequence_length) int64, 0 = padding
                                   position_ids (batch_size, sequence_length) int64
                                   past_key_values.{i}.key/.value (batch_size, kv_heads, past_sequence_length, head_dim)
                           outputs logits (batch_size, sequence_length, vocab)
                                   present.{i}.key/.value (batch_size, kv_heads, total_sequence_length, head_dim)
      genai_config.json    onnxruntime-genai's config: model type, context length, the I/O names
                           above, eos/pad/bos ids, search defaults
      tokenizer.json, tokenizer_config.json, ...   the tokenizer (save_pretrained)

These are the names optimum's `text-generation-with-past` export and onnxruntime-genai use, so
`og.Model(dir)` + `og.Generator`, a plain `onnxruntime.InferenceSession` loop, and
`fxforge generate DIR` (`runtime.onnx_decoder.OnnxDecoder`) all decode it.

    compiled = fxforge.compile(model, (ids,), passes="quantize(bits=4),add_kv_cache(attention_mask=True)",
                               backend="onnx")          # ids: batch >= 2, so the batch stays dynamic
    fxforge.export_decoder(compiled, "out/", tokenizer=tokenizer, config=model.config)

The file is rewritten for ONNX Runtime's CPU contrib kernels (`fuse_for_ort`): each cached layer
is one com.microsoft::GroupQueryAttention (cache in the op, padding mask and rotary inside it),
RMSNorm/LayerNorm + residual one Skip(Simplified)LayerNormalization; `ort_fusions=False` writes
the standard-ONNX lowering. Either way the file is checked against the compiled graph.

The whole directory is written atomically (`fxforge.atomic`).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fxforge.errors import ArtifactError, InputError
from fxforge.runtime.layouts import KVCacheLayout, decoder_input_names, decoder_output_names, kv_layout

if TYPE_CHECKING:
    import onnx

    from fxforge.api import CompiledModel

ONNX_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
# onnxruntime-genai picks its decoder by "type"; these are decoder-only types it knows whose
# I/O is exactly ours. Others get "llama", the same interface: not "gpt2", which onnxruntime-genai
# reads as the older combined-cache layout (past_%d holding keys and values together).
_GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "phi3": "phi3",
                "gemma": "gemma", "qwen3": "qwen3", "olmo": "olmo", "granite": "granite"}


def export_decoder(compiled: "CompiledModel", directory: str | Path, *, tokenizer: Any = None,
                   config: Any = None, max_length: int | None = None, ort_fusions: bool = True) -> Path:
    """Write the decoder artifact (module docstring) for a model compiled with a KV cache.

    Args:
        compiled: a CompiledModel whose pipeline ended with `add_kv_cache(attention_mask=True)`,
            traced at batch >= 2 (a batch-1 trace fixes the batch to 1).
        directory: the artifact directory; replaced all at once if it exists.
        tokenizer: a transformers tokenizer, saved next to the model (onnxruntime-genai and
            `fxforge generate` need it); its bos/eos/pad ids fill genai_config.json.
        config: the model's transformers config (or a dict of it): model type, hidden size,
            attention heads, context length. Without it these come from the graph.
        max_length: the search default max_length (prompt + generated); default the context length.
        ort_fusions: rewrite for ONNX Runtime's contrib kernels (GroupQueryAttention, skip norms;
            `fuse_for_ort`); False writes the standard-ONNX lowering.

    Raises InputError naming the fix when the model is not such a decoder.
    """
    from fxforge.atomic import atomic_directory
    from fxforge.ir.verify import run_graph

    layout = _decoder_layout(compiled)
    directory = Path(directory)
    settings = _model_settings(compiled, layout, tokenizer, _as_dict(config))
    with atomic_directory(directory) as staging, ThreadPoolExecutor(1, thread_name_prefix="fxforge-check") as pool:
        positions = max(settings["context_length"], max_length or 0)  # rotary caches cover every position
        # The graph's own outputs for the check are computed meanwhile: the eager run spends its
        # time in torch kernels (dequantizing packed weights) that release the GIL, the export in
        # Python, so the two overlap (~0.6 s of a 4-layer TinyLlama-shaped int4 decoder's export).
        inputs = decoder_check_inputs(compiled)
        expected = pool.submit(run_graph, compiled.graph_module, inputs)
        write_decoder_onnx(compiled, staging / ONNX_FILE, ort_fusions=ort_fusions, rotary_length=positions)
        # before anything replaces a previous artifact
        check_decoder_onnx(compiled, staging / ONNX_FILE, inputs=inputs, expected=expected.result())
        vocab = _vocab_of(staging / ONNX_FILE)
        genai = genai_config(layout, vocab_size=vocab, max_length=max_length, **settings)
        (staging / GENAI_CONFIG).write_text(json.dumps(genai, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return directory


def _decoder_layout(compiled: "CompiledModel") -> KVCacheLayout:
    from fxforge.runtime.decoding import static_batch

    layout = kv_layout(compiled.graph_module.meta)
    if layout is None or not layout.padding_mask:
        raise InputError("export_decoder needs a causal LM compiled with a padding-mask KV cache: end the "
                         "pipeline with add_kv_cache(attention_mask=True), tracing on input_ids alone"
                         + ("" if layout is None else " (this one takes a Medusa tree mask)"))
    fixed = static_batch(compiled.graph_module, layout)
    if fixed is not None:
        raise InputError(f"this model was traced with its batch fixed to {fixed}: runtimes decode batches of "
                         f"any size. Compile it with example input_ids of batch >= 2 (e.g. ids.repeat(2, 1)).")
    if len(compiled.graph_module.graph.output_node().args[0]) != layout.num_outputs:
        raise InputError("export_decoder: the graph's outputs no longer match its KV layout")
    return layout


def write_decoder_onnx(compiled: "CompiledModel", path: Path, *, ort_fusions: bool = True,
                       rotary_length: int | None = None) -> Path:
    """Export the cached graph to `path` and give its I/O and dimensions the conventional names.

    `ort_fusions`: rewrite the file for ONNX Runtime's contrib kernels (`fuse_for_ort`): cached
    attention -> GroupQueryAttention, RMSNorm (+ residual) -> (Skip)SimplifiedLayerNormalization.
    False keeps the standard-ONNX lowering (the reference the fused file is tested against).
    `rotary_length`: positions the fused rotary caches cover (the context length); None keeps
    rotary out of GroupQueryAttention."""
    import onnx

    from fxforge.backends.onnx.backend import export_onnx
    from fxforge.backends.onnx.io_names import rename_values, set_shape
    from fxforge.backends.onnx.reshape_chains import collapse_reshapes, value_shapes
    from fxforge.runtime.decoding import example_cached_inputs

    gm = compiled.graph_module
    layout = kv_layout(gm.meta)
    export_onnx(gm, example_cached_inputs(gm, batch=2), path)
    model = onnx.load(str(path), load_external_data=False)  # names only: the weights stay where they are
    graph = model.graph
    inputs = {layout.input_ids: "input_ids", layout.mask: "attention_mask", layout.position_ids: "position_ids"}
    conventional_in = decoder_input_names(layout.num_layers)[3:]
    for (k, v), k_name, v_name in zip(layout.past, conventional_in[0::2], conventional_in[1::2]):
        inputs[k], inputs[v] = k_name, v_name
    if len(graph.input) != layout.num_inputs:
        raise ArtifactError(f"the exported decoder has {len(graph.input)} inputs, its layout {layout.num_inputs}")
    outputs = {layout.logits_output: "logits"}
    conventional_out = decoder_output_names(layout.num_layers)[1:]
    for (k, v), k_name, v_name in zip(layout.present, conventional_out[0::2], conventional_out[1::2]):
        outputs[k], outputs[v] = k_name, v_name
    names = {graph.input[i].name: new for i, new in inputs.items()}
    names.update({graph.output[i].name: new for i, new in outputs.items()})
    _drop_extra_outputs(graph, keep={graph.output[i].name for i in outputs})
    rename_values(model, names)
    by_name = {v.name: v for v in (*graph.input, *graph.output)}
    set_shape(by_name["input_ids"], ("batch_size", "sequence_length"))
    set_shape(by_name["position_ids"], ("batch_size", "sequence_length"))
    set_shape(by_name["attention_mask"], ("batch_size", "total_sequence_length"))
    set_shape(by_name["logits"], ("batch_size", "sequence_length", None))
    for i, (heads, key_dim, value_dim) in enumerate(layout.kv_shapes):
        for kind, dim in (("key", key_dim), ("value", value_dim)):
            set_shape(by_name[f"past_key_values.{i}.{kind}"], ("batch_size", heads, "past_sequence_length", dim))
            set_shape(by_name[f"present.{i}.{kind}"], ("batch_size", heads, "total_sequence_length", dim))
    shapes = value_shapes(graph)  # torch's symbolic shapes: what proves Reshape chains redundant
    _drop_inner_shapes(graph)
    if ort_fusions:
        model = fuse_for_ort(compiled, model, rotary_length=rotary_length, base_dir=str(path.parent), shapes=shapes)
    else:
        collapse_reshapes(model, shapes)
    onnx.save(model, str(path))
    return path


def fuse_for_ort(compiled: "CompiledModel", model: "onnx.ModelProto", *,
                 rotary_length: int | None = None, base_dir: str | None = None,
                 shapes: dict[str, tuple] | None = None) -> "onnx.ModelProto":
    """The renamed decoder ModelProto rewritten for ONNX Runtime's CPU contrib kernels.

    GroupQueryAttention for each layer whose fused attention reads only the padding mask
    (`backends.onnx.decoder_gqa`; other layers keep the standard Attention), with Hugging Face
    rotary inside it where it matches (cos/sin caches of `rotary_length` positions); the head
    split/merge Reshapes around it that cancel out dropped (`backends.onnx.reshape_chains`, from
    `shapes`, the exporter's symbolic value shapes); a q/k/v projection fused by
    `fuse_projections` fed to the op packed (no Split); then onnxscript's RMSNorm / skip-norm
    fusions (`backends.onnx.ort_norms`); a fused W8A8 gate/up GEMM split into one GEMM per block
    instead of a Split of its output (`backends.onnx.split_integer_gemm`). check_decoder_onnx runs
    after, on the written file, against the compiled graph.
    """
    from fxforge.backends.onnx.decoder_gqa import fuse_group_query_attention, pack_qkv_inputs
    from fxforge.backends.onnx.ort_norms import fuse_norms
    from fxforge.backends.onnx.reshape_chains import collapse_reshapes
    from fxforge.backends.onnx.split_integer_gemm import split_integer_gemms

    shapes = dict(shapes or {})
    layout = kv_layout(compiled.graph_module.meta)
    if layout.dtype not in ("float32", "float16"):
        collapse_reshapes(model, shapes)
        return model  # ORT's CPU GQA and skip-norm kernels take float32/float16: keep the standard ops
    fuse_group_query_attention(model, gqa_layers(compiled.graph_module, layout), dtype=layout.dtype,
                               rotary_length=rotary_length, base_dir=base_dir, shapes=shapes)
    collapse_reshapes(model, shapes)
    pack_qkv_inputs(model, shapes)
    model = fuse_norms(model)
    split_integer_gemms(model, shapes)
    return model


def gqa_layers(gm: Any, layout: KVCacheLayout) -> dict[str, Any]:
    """{past key input name: heads} of the cached layers GroupQueryAttention can take.

    A layer qualifies when its attention is an `fxforge::attention` over `cat(past, new)` whose
    mask is exactly add_kv_cache's padding mask (kv_cache/padding.py), causal, with no position
    bias: GQA rebuilds that mask from `attention_mask`. Eager (unfused) layers, ALiBi biases and
    Medusa tree masks keep the standard Attention lowering, which reads the mask as built.
    """
    from fxforge.backends.onnx.decoder_gqa import CachedAttention
    from fxforge.ir.ops import get_op
    from fxforge.passes.kv_cache.padding import MASK_TAG

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    layer_of = {placeholders[k]: i for i, (k, _) in enumerate(layout.past)}
    attention = get_op("attention").overload
    layers = {}
    for node in gm.graph.nodes:
        if node.target != attention:
            continue
        names = ("q", "k", "v", "attn_mask", "is_causal", "scale", "num_kv_groups", "bias")
        q, k, v, mask, causal, _, _, bias = (*node.args, *(node.kwargs.get(n) for n in names[len(node.args):]))
        if bias is not None or not causal or not getattr(mask, "meta", {}).get(MASK_TAG):
            continue
        if getattr(k, "target", None) != torch.ops.aten.cat.default or k.args[0][0] not in layer_of:
            continue
        q_val, v_val = q.meta["val"], v.meta["val"]
        if q_val.shape[3] != v_val.shape[3]:  # GQA: one head size for keys and values
            continue
        layers[f"past_key_values.{layer_of[k.args[0][0]]}.key"] = CachedAttention(
            q_heads=int(q_val.shape[1]), kv_heads=int(v_val.shape[1]), head_dim=int(q_val.shape[3]))
    return layers


def decoder_check_inputs(compiled: "CompiledModel") -> list[Any]:
    """The flat inputs `check_decoder_onnx` runs: batch 2, a past of 3, 4 new tokens, row 0
    left-padded (the padding path is checked too)."""
    from fxforge.runtime.decoding import example_cached_inputs

    gm = compiled.graph_module
    flat = example_cached_inputs(gm, batch=2)
    flat[kv_layout(gm.meta).mask][0, :2] = 0
    return flat


def check_decoder_onnx(compiled: "CompiledModel", path: Path, *, inputs: list[Any] | None = None,
                       expected: list[Any] | None = None) -> float:
    """Run the written file in ONNX Runtime, by its conventional names only, on a prefill and a
    left-padded cached step; VerificationError unless logits and cache match the graph within the
    backend tolerance of its lowerings. Returns the largest absolute error.

    inputs, expected: the flat inputs (`decoder_check_inputs`) and the graph's flat outputs there,
    when the caller computed them already; default both here."""
    import numpy as np
    import onnxruntime as ort

    from fxforge.api import DEFAULT_BACKEND_TOLERANCE
    from fxforge.backends import check_tolerance
    from fxforge.errors import VerificationError
    from fxforge.ir.verify import compare_outputs, run_graph

    gm = compiled.graph_module
    layout = kv_layout(gm.meta)
    flat = inputs if inputs is not None else decoder_check_inputs(compiled)
    names = {layout.input_ids: "input_ids", layout.mask: "attention_mask", layout.position_ids: "position_ids"}
    for i, (k, v) in enumerate(layout.past):
        names[k], names[v] = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {names[i]: x.detach().cpu().numpy() for i, x in enumerate(flat)}
    got = session.run(None, feeds)
    ref = expected if expected is not None else run_graph(gm, flat)
    order = [layout.logits_output, *(i for pair in layout.present for i in pair)]
    tolerance = check_tolerance(gm, "onnx", DEFAULT_BACKEND_TOLERANCE)
    comparison = compare_outputs([ref[i] for i in order], [torch.from_numpy(np.ascontiguousarray(g)) for g in got],
                                 tolerance, allow_extra_outputs=False)
    if not comparison.ok:
        raise VerificationError(f"the decoder ONNX file disagrees with the compiled graph: {comparison.describe()}")
    return comparison.max_error


def _drop_extra_outputs(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Outputs other than logits and the cache (a model's extra hidden states) are not part of
    the decoder interface; runtimes that bind every output by name would trip over them."""
    extra = [o for o in graph.output if o.name not in keep]
    for value in extra:
        graph.output.remove(value)


def _drop_inner_shapes(graph: onnx.GraphProto) -> None:
    """Intermediate value_info keeps torch's symbols (s15): drop them, ORT re-infers shapes."""
    del graph.value_info[:]


def _vocab_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    last = logits.type.tensor_type.shape.dim[-1]
    return last.dim_value if last.HasField("dim_value") else None


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise InputError(f"config must be a transformers config or a dict, got {type(config).__name__}")


def _model_settings(compiled: "CompiledModel", layout: KVCacheLayout, tokenizer: Any,
                    config: dict[str, Any]) -> dict[str, Any]:
    """Model type, sizes and special-token ids for genai_config.json (config first, then tokenizer)."""
    def token(name: str) -> int | None:
        value = config.get(name)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):  # several eos ids: genai_config takes the first
            value = value[0] if value else None
        return int(value) if value is not None else None

    heads = config.get("num_attention_heads", config.get("n_head"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    context = config.get("max_position_embeddings", config.get("n_positions"))
    return dict(
        model_type=_GENAI_TYPES.get(config.get("model_type", ""), "llama"),
        num_attention_heads=int(heads) if heads else layout.kv_heads,
        hidden_size=int(hidden) if hidden else None,
        context_length=int(context) if context else 2048,
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("pad_token_id"),
    )


def genai_config(layout: KVCacheLayout, *, model_type: str, num_attention_heads: int, hidden_size: int | None,
                 context_length: int, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None, vocab_size: int | None, max_length: int | None = None) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this decoder (its documented decoder-only form)."""
    eos = eos_token_id if eos_token_id is not None else -1
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": ONNX_FILE,
        "head_size": layout.head_dim,
        "hidden_size": hidden_size if hidden_size is not None else num_attention_heads * layout.head_dim,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": layout.num_layers,
        "num_key_value_heads": layout.kv_heads,
    }
    model = {"bos_token_id": bos_token_id if bos_token_id is not None else eos,
             "context_length": context_length, "decoder": decoder, "eos_token_id": eos,
             "pad_token_id": pad_token_id if pad_token_id is not None else eos,
             "type": model_type}
    if vocab_size is not None:
        model["vocab_size"] = vocab_size
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": max_length or context_length, "min_length": 0, "no_repeat_ngram_size": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


__all__ = ["GENAI_CONFIG", "ONNX_FILE", "check_decoder_onnx", "export_decoder", "genai_config",
           "write_decoder_onnx"]
