"""What each process of the DDP `fit` test runs (tests/test_train_ddp.py), and the same training
in one process for the reference: the model, the data and the loss are built here once.

    build(case) -> (compiled, batches, loss_fn)      # deterministic: every process builds the same
    worker(rank, world, init_file, case, out_dir)    # torch.multiprocessing.spawn target (gloo, CPU)

Each worker trains twice from the same start: with `split_batches=True` (every rank given the
full batches) and with the data sharded by the caller (each rank given only its half).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fxforge
from fxforge.train import fit

STEPS, LR, BATCH = 4, 0.05, 8


def build(case: str):
    """(compiled model, full-size batches, loss_fn) for "adapters" (an MLP with LoRA) or "medusa"
    (a tiny Llama with two Medusa heads)."""
    g = torch.Generator().manual_seed(0)
    if case == "adapters":
        from fxforge.models import get_model

        zoo = get_model("mlp")
        compiled = fxforge.compile(zoo.model, zoo.args, passes="add_adapters(rank=4,alpha=8,targets=['fc1','fc2'])",
                                  verify=False)  # the pass is verified in its own tests; this one is about fit
        with torch.no_grad():  # B = 0 at init: make both factors train from the first step
            for p in compiled.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        in_features = zoo.args[0].shape[-1]
        teacher = torch.randn(10, in_features, generator=g)
        batches = []
        for _ in range(STEPS):
            x = torch.randn(BATCH, in_features, generator=g)
            batches.append((x, (x @ teacher.t()).argmax(-1)))
        return compiled, batches, F.cross_entropy
    if case == "medusa":
        from fxforge.medusa import medusa_loss

        sys.path.insert(0, str(Path(__file__).parent))
        from hf_dirs import build_model

        model, _ = build_model("llama")
        ids = torch.randint(0, 300, (BATCH, 12), generator=g)
        compiled = fxforge.compile(model, (ids,), passes="add_medusa_heads(num_heads=2)", verify=False)
        batches = [(ids, ids) for ids in (torch.randint(0, 300, (BATCH, 12), generator=g) for _ in range(STEPS))]
        return compiled, batches, lambda outputs, ids: medusa_loss(outputs[1], ids)
    raise ValueError(case)


def trainable_state(compiled) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in compiled.graph_module.named_parameters() if p.requires_grad}


def train(compiled, batches, loss_fn, **kwargs) -> list[float]:
    return fit(compiled, batches, loss_fn, steps=STEPS, lr=LR, optimizer="sgd", progress=False, **kwargs)


def worker(rank: int, world: int, init_file: str, case: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        compiled, batches, loss_fn = build(case)
        start = trainable_state(compiled)
        losses = train(compiled, batches, loss_fn, split_batches=True)
        state = trainable_state(compiled)
        state["__losses__"] = torch.tensor(losses, dtype=torch.float64)
        # the other way to shard: the caller hands each rank its own half of every batch
        half = BATCH // world
        own = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in batches]
        with torch.no_grad():  # the same start again
            for name, p in compiled.graph_module.named_parameters():
                if name in start:
                    p.copy_(start[name])
        train(compiled, own, loss_fn)
        state.update({f"sharded:{name}": value for name, value in trainable_state(compiled).items()})
        save_file(state, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()
