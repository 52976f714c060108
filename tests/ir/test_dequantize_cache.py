"""Dequantized weights reused across the graph runs of a verification (fxforge/ir/dequantize_cache.py):
bit for bit what a fresh dequantization gives, recomputed when a tensor changes in place, bounded
by its budget, active only inside the block, and what an exact pass's verification uses."""
import pytest
import torch

import fxforge.ir.ops.linear_wq as linear_wq_module
from fxforge.ir.dequantize_cache import reuse_dequantized
from fxforge.ir.ops.linear_wq import pack_bits

linear_wq = torch.ops.fxforge.linear_wq


@pytest.fixture
def counted(monkeypatch):
    """The number of real dequantizations linear_wq performs."""
    calls = [0]
    original = linear_wq_module.dequantize_wq

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_wq_module, "dequantize_wq", counting)
    return calls


def _packed(n=16, k=64, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g)
    return pack_bits(codes, 4), scales, zeros


def test_reused_inside_the_block_bit_for_bit_and_dropped_after(counted):
    q, s, z = _packed()
    x = torch.randn(3, 64)
    fresh = linear_wq(x, q, s, z, None, 4, 32)
    with reuse_dequantized() as cache:
        first = linear_wq(x, q, s, z, None, 4, 32)
        second = linear_wq(x * 2, q, s, z, None, 4, 32)
        assert cache.misses == 1 and cache.hits == 1 and cache.used == 16 * 64 * 4
    assert counted[0] == 2  # the call before the block, and one inside it
    assert torch.equal(first, fresh) and torch.equal(second, linear_wq(x * 2, q, s, z, None, 4, 32))
    assert counted[0] == 3 and not cache.entries  # outside the block: computed per call again


def test_an_in_place_change_or_another_tensor_is_not_served_stale(counted):
    q, s, z = _packed()
    x = torch.randn(2, 64)
    with reuse_dequantized():
        before = linear_wq(x, q, s, z, None, 4, 32)
        s.mul_(2)  # bumps the version counter
        doubled = linear_wq(x, q, s, z, None, 4, 32)
        other = linear_wq(x, q, s.clone(), z, None, 4, 32)  # same values, another tensor
    assert counted[0] == 3
    torch.testing.assert_close(doubled, 2 * before)
    assert torch.equal(other, doubled)


def test_the_budget_bounds_what_is_kept(counted):
    q, s, z = _packed()
    x = torch.randn(2, 64)
    with reuse_dequantized(budget_bytes=16 * 64 * 4 - 1) as cache:
        linear_wq(x, q, s, z, None, 4, 32)
        linear_wq(x, q, s, z, None, 4, 32)
    assert counted[0] == 2 and cache.used == 0


def test_an_exact_pass_verification_dequantizes_each_weight_once(counted):
    """fuse_attention on a 4-bit graph: the graph before and after run at two shapes (four
    runs of every packed linear), yet each weight is dequantized once."""
    from verification_helpers import traced_tinyllama

    from fxforge.ir.graph import nodes_by_op
    from fxforge.passes.pipeline import run_pass
    from fxforge.passes.quantize import Quantize
    from fxforge.passes.registry import get_pass_class

    _, _, gm, ctx = traced_tinyllama(128)
    quantized = run_pass(Quantize(bits=4), gm, ctx)
    sites = len(list(nodes_by_op(quantized, torch.ops.fxforge.linear_wq.default)))
    assert sites == 15
    counted[0] = 0
    run_pass(get_pass_class("fuse_attention")(), quantized, ctx)
    assert counted[0] == sites


def test_row_slices_of_a_large_weight_are_kept_each(counted, monkeypatch):
    """A weight larger than DENSE_CHUNK_BYTES (an LM head) is dequantized a slice of rows at a
    time; inside the block each slice is kept, bit for bit what the uncached call gives."""
    monkeypatch.setattr(linear_wq_module, "DENSE_CHUNK_BYTES", 4 * 64 * 5)  # 5 rows a slice: 4 slices
    q, s, z = _packed()
    x = torch.randn(3, 64)
    fresh = linear_wq(x, q, s, z, None, 4, 32)
    assert counted[0] == 4
    with reuse_dequantized() as cache:
        first = linear_wq(x, q, s, z, None, 4, 32)
        second = linear_wq(x, q, s, z, None, 4, 32)
        assert cache.misses == 4 and cache.hits == 4 and cache.used == 16 * 64 * 4
    assert counted[0] == 8 and torch.equal(first, fresh) and torch.equal(second, fresh)


def test_a_quantizing_pass_verification_keeps_no_dequantized_copies(counted):
    """quantize's result runs at two shapes against its claim: no cache there (it would hold every
    dequantized weight at once, over the issue-15 memory bound at L=8); the two shapes run
    together (fxforge/ir/lockstep.py), so each packed weight is dequantized once, for both."""
    from verification_helpers import traced_tinyllama

    from fxforge.ir.graph import nodes_by_op
    from fxforge.passes.pipeline import run_pass
    from fxforge.passes.quantize import Quantize

    _, _, gm, ctx = traced_tinyllama(128)
    quantized = run_pass(Quantize(bits=4), gm, ctx)
    sites = len(list(nodes_by_op(quantized, torch.ops.fxforge.linear_wq.default)))
    assert sites == 15 and counted[0] == sites
