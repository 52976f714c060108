"""`fit` under torch.distributed: 2 gloo processes on CPU, each training on half of every batch
(split by `fit(split_batches=True)` or handed over already split), end with the trainable
tensors of single-process full-batch training (SGD), within 1e-5."""
import pytest
import torch
import torch.multiprocessing as mp
from ddp_fit_worker import build, train, trainable_state, worker
from safetensors.torch import load_file

from fxforge.errors import FxforgeError

WORLD = 2


@pytest.mark.parametrize("case", ["adapters", pytest.param("medusa", marks=pytest.mark.slow)])
def test_two_process_fit_equals_full_batch_fit(case, tmp_path):
    mp.spawn(worker, args=(WORLD, str(tmp_path / "rendezvous"), case, str(tmp_path)), nprocs=WORLD, join=True)
    compiled, batches, loss_fn = build(case)
    start = trainable_state(compiled)
    losses = train(compiled, batches, loss_fn)
    expected = trainable_state(compiled)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for got in ranks:
        assert set(got) == {"__losses__", *expected, *(f"sharded:{name}" for name in expected)}
        for name, value in expected.items():
            assert not torch.allclose(value, start[name]), f"{name} did not train"  # the check below can fail
            for key in (name, f"sharded:{name}"):
                torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        # the reported loss is the mean over ranks: the full batch's loss
        torch.testing.assert_close(got["__losses__"], torch.tensor(losses, dtype=torch.float64), atol=1e-5,
                                   rtol=1e-5)


def test_split_batches_without_a_process_group_is_refused():
    compiled, batches, loss_fn = build("adapters")
    with pytest.raises(FxforgeError, match="no process group is initialized"):
        train(compiled, batches, loss_fn, split_batches=True)
