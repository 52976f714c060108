"""The training loop of the `code-lm` zoo model: AdamW, warmup + cosine, time-boxed.

Plain PyTorch on purpose (no Trainer): the loop samples random windows of the train token
stream, and stops at a step count or a wall-clock budget, whichever comes first. The cosine
schedule follows whichever of the two limits is nearer, so a time-boxed run still decays its
learning rate to the floor by the time it stops.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainSettings:
    """Options of one training run; stored in the cache JSON next to the weights."""

    max_steps: int
    minutes: float | None  # wall-clock budget of the loop; None = step count only
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    train_bytes: int | None = None  # cap on train corpus size (None = every train file)
    # torch CPU threads while training (None = leave as is). Tiny models gain nothing from a
    # second thread, and on a busy machine OpenMP threads spinning for a core cost ~10x.
    threads: int | None = None

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(f"max_steps and batch_size must be >= 1 (got {self.max_steps}, "
                             f"{self.batch_size}).")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None (got {self.threads}).")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive or None (got {self.minutes}).")


@dataclass
class TrainReport:
    """What a run did: steps taken, time spent and the per-step training losses."""

    steps: int
    seconds: float
    tokens_seen: int
    losses: list[float] = field(default_factory=list)

    def mean_loss(self, first: bool, count: int = 10) -> float:
        """Mean of the first (or last) ``count`` step losses."""
        chunk = self.losses[:count] if first else self.losses[-count:]
        return sum(chunk) / len(chunk)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run a block with ``count`` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def learning_rate(settings: TrainSettings, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``.

    ``progress`` in [0, 1] is how far the run is towards its nearer limit (steps or time).
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    # Decay matrices only: decaying norm gains pulls them towards 0 for no benefit.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]``."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                           input_ids[:, 1:].reshape(-1).to(logits.device))


def train_causal_lm(model: torch.nn.Module, stream: torch.Tensor, seq_len: int,
                    settings: TrainSettings, *, progress: bool = True) -> TrainReport:
    """Train ``model`` (input_ids -> object with ``.logits``) on random windows of ``stream``.

    Leaves the model in eval mode. Returns a ``TrainReport`` with every step's loss.
    """
    if stream.numel() <= seq_len:
        raise ValueError(f"the train stream has {stream.numel()} tokens, fewer than one window "
                         f"of {seq_len}; train on more text (raise train_bytes).")
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = _optimizer(model, settings)
    budget_s = settings.minutes * 60 if settings.minutes is not None else math.inf
    offsets = torch.arange(seq_len)
    report = TrainReport(steps=0, seconds=0.0, tokens_seen=0)
    model.train()
    start = time.monotonic()
    bar = tqdm(total=settings.max_steps, desc="code-lm train", disable=not progress)
    smoothed = None
    for step in range(settings.max_steps):
        elapsed = time.monotonic() - start
        run_progress = max(step / settings.max_steps, elapsed / budget_s)
        if run_progress >= 1.0:
            break
        lr = learning_rate(settings, step, run_progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - seq_len, (settings.batch_size,),
                               generator=generator)
        batch = stream[starts[:, None] + offsets[None, :]]
        loss = next_token_loss(model(batch).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()

        value = loss.item()
        report.losses.append(value)
        report.steps += 1
        report.tokens_seen += batch.numel()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
    bar.close()
    report.seconds = time.monotonic() - start
    model.eval()
    return report
