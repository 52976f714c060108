"""Train LoRA adapters data-parallel with `fxforge.train.fit` under torchrun, then save them for PEFT.

    torchrun --nproc-per-node 2 examples/ddp_fit.py --out /tmp/lora-peft     # gloo, CPU
    python examples/ddp_fit.py --out /tmp/lora-peft                          # one process, same result

Every process builds the same compiled model and the same global batches; `fit(...,
split_batches=True)` gives each rank its slice of every batch, DistributedDataParallel averages
the gradients, so N processes train exactly what one process does on the full batches. Rank 0
writes the adapters as a PEFT directory (`PeftModel.from_pretrained(model, out)` loads it).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fxforge
from fxforge.adapters_io import save_adapters
from fxforge.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the PEFT adapter (written by rank 0)")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if distributed else 0

    torch.manual_seed(0)  # every rank builds the same model and data
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compiled = fxforge.compile(model, (torch.randn(8, 32),), passes="add_adapters(rank=4,alpha=8)")
    teacher = torch.randn(10, 32)
    batches = [(x, (x @ teacher.t()).argmax(-1)) for x in torch.randn(8, 16, 32)]
    losses = fit(compiled, batches, F.cross_entropy, steps=args.steps, lr=3e-2, split_batches=distributed,
                 progress=rank == 0)
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps"
              f"{f' on {torch.distributed.get_world_size()} processes' if distributed else ''}")
        print(f"PEFT adapter: {save_adapters(compiled, args.out, format='peft')}")
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
