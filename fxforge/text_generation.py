"""Task `text-generation-with-past`: a Hugging Face causal-LM directory -> a decoder artifact.

    fxforge.compile_decoder("hf-llama/", "out/", passes="quantize(bits=4)")
    # = fxforge compile hf-llama/ --task text-generation-with-past --backend onnx --passes "quantize(bits=4)" -o out/

`fxforge.from_pretrained(dir, task=TASK)` loads the model (logits only, no HF cache) with
batch-2 token ids, so the traced batch stays dynamic. The user's passes run first, then the
task's: `fuse_projections` and `fuse_attention` (each unless named) and
`add_kv_cache(attention_mask=True)`. The graph is
exported once, by `export_decoder`, which checks the ONNX file against the compiled graph
before the artifact replaces anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

TASK = "text-generation-with-past"


def with_passes(passes: str, task_passes: Sequence[str]) -> str:
    """`passes` with each of `task_passes` appended unless a pass of that name is already there."""
    from fxforge.passes.pipeline import Pipeline

    present = {p.name for p in Pipeline(passes or "").passes}
    extra = [spec for spec in task_passes if Pipeline(spec).passes[0].name not in present]
    return ",".join(part for part in [(passes or "").strip(), *extra] if part)


def dynamic_batch_example(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Example kwargs whose input_ids have at least 2 rows, and a note when they were widened.

    torch.export fixes a dimension of size 1, so a batch-1 trace would give a decoder that
    serves batch 1 only; every row is a valid example, so repeating the row costs nothing.
    """
    ids = kwargs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        return kwargs, None
    note = "traced on the example row repeated to batch 2, so the decoder's batch stays dynamic"
    return {**kwargs, "input_ids": ids.repeat(2, 1)}, note


def compile_decoder(model_dir: str | Path, output: str | Path, *, passes: str = "", seq: int = 8,
                    dtype: str | None = None, calibration: Any = None, max_length: int | None = None) -> Any:
    """Compile a HF causal-LM directory into a decoder artifact at `output`; returns the CompiledModel.

    `seq`: tokens per example row (batch 2) the model is traced and every pass verified on;
    `calibration`: batches for calibrated passes, as `fxforge.compile` takes them.
    """
    import fxforge

    loaded = fxforge.from_pretrained(model_dir, task=TASK, dtype=dtype, seq=seq, batch=2)
    compiled = fxforge.compile(loaded.model, loaded.args, loaded.kwargs, passes=with_passes(passes, loaded.task_passes),
                               backend="eager", calibration=calibration)
    fxforge.export_decoder(compiled, output, tokenizer=loaded.tokenizer, config=loaded.model.config,
                           max_length=max_length)
    return compiled


__all__ = ["TASK", "compile_decoder", "with_passes"]
