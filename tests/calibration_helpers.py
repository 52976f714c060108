"""Helpers of the calibration tests: random calibration batches, and one rank of the 2-process
tests (spawned by tests/calibration/test_distributed.py, gloo on CPU).

Each rank calibrates on its own share of the batches; the engine all-reduces the statistics,
so every rank must end with the statistics (and quantized codes) of the whole data set.
"""
import os

import torch
import torch.distributed as dist


def random_batches(zoo, gm, count, seed=1):
    """`count` model inputs shaped like the zoo model's example, with random token ids."""
    from fxforge.ir.graph import get_attr

    embedding = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    vocab = get_attr(gm, embedding.args[0].target).shape[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        item = dict(zoo.kwargs)
        item["input_ids"] = torch.randint(0, vocab, zoo.kwargs["input_ids"].shape, generator=g)
        out.append(item)
    return out


def batches_for(gm, zoo, count):
    return random_batches(zoo, gm, count)


def run(rank: int, world: int, init_file: str, out_dir: str, mode: str, count: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = calibrate_share(rank, world, mode, count)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def calibrate_share(rank: int, world: int, mode: str, count: int) -> dict:
    """Calibrate tiny-llama on batches [rank·count/world, (rank+1)·count/world) of `count`."""
    from testing_utils import traced_zoo

    results = {}
    for one in (("stats", "gptq") if mode == "both" else (mode,)):
        zoo, gm = traced_zoo("tiny-llama")  # a fresh copy each: gptq rewrites it
        every = batches_for(gm, zoo, count)
        share = every[rank * count // world:(rank + 1) * count // world]
        results[one] = run_mode(gm, zoo, share, one)
    return results if mode == "both" else results[mode]


def run_mode(gm, zoo, batches, mode: str) -> dict:
    from fxforge.calibration.engine import calibrate
    from fxforge.ir.graph import linear_sites
    from fxforge.passes.context import PassContext

    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=batches,
                      progress=lambda it=None, **kw: it)
    if mode == "stats":
        sites = linear_sites(gm)
        result = calibrate(gm, ctx, {s.node: ("gram", "moments", "samples") for s in sites}, pass_name="test")
        return {name: {"gram": s.gram, "total": s["moments"].total, "rows": s.rows, "samples": s.sample()}
                for name, s in result.statistics.items()}
    from fxforge.passes.quantize import Quantize

    hessians = {}
    import fxforge.passes.quantize.gptq as gptq

    original = gptq.quantize_weights_gptq

    def recording(matrices, spec, hessian, *args, **kwargs):  # what GPTQ was given, per layer
        for _ in matrices:  # q/k/v (gate/up) come in one call: one Hessian each all the same
            hessians[len(hessians)] = hessian.clone()
        return original(matrices, spec, hessian, *args, **kwargs)

    gptq.quantize_weights_gptq = recording
    try:
        Quantize(bits=4, group_size=32, method="gptq", include_lm_head=False).run(gm, ctx)
    finally:
        gptq.quantize_weights_gptq = original
    codes = {n.target: gm.get_buffer(n.target).clone() for n in gm.graph.nodes
             if n.op == "get_attr" and n.target.endswith("qweight")}
    return {"codes": codes, "hessians": hessians}
