"""Data-parallel calibration: 2 gloo processes, each on half the batches, equal 1 process on all."""
import os

import pytest
import torch
import torch.multiprocessing as mp

import calibration_helpers as distributed_worker

BATCHES = 4


def spawn(tmp_path, mode: str) -> list[dict]:
    init_file = tmp_path / "init"
    mp.spawn(distributed_worker.run, args=(2, str(init_file), str(tmp_path), mode, BATCHES), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def single(mode: str) -> dict:
    from testing_utils import traced_zoo

    zoo, gm = traced_zoo("tiny-llama")
    return distributed_worker.run_mode(gm, zoo, distributed_worker.batches_for(gm, zoo, BATCHES), mode)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of one 2-process run (statistics, then GPTQ), spawned once: it is slow."""
    return spawn(tmp_path_factory.mktemp("dist"), "both")


def relative(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_sum_the_statistics_of_one(two_ranks):
    ranks = [r["stats"] for r in two_ranks]
    whole = single("stats")
    assert set(ranks[0]) == set(whole)
    for name, expected in whole.items():
        for rank in ranks:  # every rank holds the statistics of all the data
            assert rank[name]["rows"] == expected["rows"]
            assert relative(rank[name]["gram"], expected["gram"]) <= 1e-5
            assert relative(rank[name]["total"], expected["total"]) <= 1e-5
        assert torch.equal(ranks[0][name]["gram"], ranks[1][name]["gram"])
        # samples are gathered, not summed: every rank holds every rank's rows
        assert torch.equal(ranks[0][name]["samples"], ranks[1][name]["samples"])
        assert ranks[0][name]["samples"].shape == expected["samples"].shape
        if expected["samples"].shape[0] == expected["rows"]:  # every row kept: the same rows, drawn in another order
            torch.testing.assert_close(ranks[0][name]["samples"].sum(1).sort().values,
                                       expected["samples"].sum(1).sort().values)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_gptq_gives_the_codes_of_one_process(two_ranks):
    ranks = [r["gptq"] for r in two_ranks]
    whole = single("gptq")
    assert whole["codes"] and len(whole["hessians"]) == 14  # 7 layers x 2 blocks
    for rank in ranks:
        assert set(rank["codes"]) == set(whole["codes"])
        for name, codes in whole["codes"].items():
            assert torch.equal(rank["codes"][name], codes), name
        for i, hessian in whole["hessians"].items():  # block 1's Hessians come after block 0 was quantized
            assert relative(rank["hessians"][i], hessian) <= 1e-5
