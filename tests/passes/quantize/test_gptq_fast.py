"""The fast (lazy-batch, Wᵀ-layout) GPTQ against the per-column implementation it replaced
(tests/gptq_reference.py), and the shared inverse-Hessian factor."""
import pytest
import torch
from gptq_reference import inverse_hessian_factor_reference, quantize_weight_gptq_reference

from fxforge.passes.quantize.gptq import block_bounds, quantize_weight_gptq, quantize_weights_gptq
from fxforge.passes.quantize.hessian import (damped_hessian, feedback_factor, flip_in_place, inverse_hessian_factor,
                                             transpose_in_place)
from fxforge.passes.quantize.rtn import QuantSpec


def _problem(n: int, k: int, rows: int, seed: int, dead: int = 0, mixing: float = 1.0):
    """(W (n, k), H = XᵀX/rows) with uneven, correlated input features; `dead` inputs never fire."""
    g = torch.Generator().manual_seed(seed)
    mix = mixing * torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=g) * torch.linspace(0.1, 3.0, k)) @ mix
    if dead:
        x[:, torch.randperm(k, generator=g)[:dead]] = 0.0
    return torch.randn(n, k, generator=g), x.T @ x / rows


def _output_error(w, qm, h, group_axis="in"):
    """tr((W−Ŵ) H (W−Ŵ)ᵀ) = ‖(W−Ŵ)X‖²/rows."""
    w_hat = qm.dequantize() if group_axis == "in" else qm.dequantize().T
    delta = w - w_hat
    return float(((delta @ h) * delta).sum())


@pytest.mark.parametrize("dead", [0, 7])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [3, 4])
def test_reconstruction_error_within_one_percent_of_reference(bits, group_size, dead):
    for seed in range(2):
        w, h = _problem(48, 256, 384, seed=seed + 10 * bits, dead=dead)  # rows > k: a full-rank problem
        spec = QuantSpec(bits, 256 if group_size == -1 else group_size)
        fast = _output_error(w, quantize_weight_gptq(w, spec, h), h)
        reference = _output_error(w, quantize_weight_gptq_reference(w, spec, h), h)
        assert abs(fast / reference - 1) <= 0.01, (seed, fast, reference)


@pytest.mark.parametrize("group_axis,group_size,sym", [("in", 32, False), ("in", 32, True), ("out", 16, False)])
def test_codes_identical_on_a_well_conditioned_problem(group_axis, group_size, sym):
    """Same codes, zero points and scales (to float rounding): the two differ only in summation order."""
    w, h = _problem(32, 128, 2048, seed=3, mixing=0.3)
    m = w if group_axis == "in" else w.T
    spec = QuantSpec(4, group_size, sym=sym)
    fast = quantize_weight_gptq(m, spec, h, group_axis, block_size=64)
    reference = quantize_weight_gptq_reference(m, spec, h, group_axis, block_size=64)
    assert torch.equal(fast.codes, reference.codes)
    assert torch.equal(fast.zeros, reference.zeros)
    torch.testing.assert_close(fast.scales, reference.scales, rtol=1e-5, atol=0)


@pytest.mark.parametrize("group_axis,group_size", [("in", 32), ("in", 96), ("out", 8)])
def test_block_size_that_does_not_divide_the_columns(group_axis, group_size):
    """96 columns in blocks of 40 (and a group of 96 cut into 40 + 40 + 16)."""
    w, h = _problem(16, 96, 512, seed=4, dead=3)
    m = w if group_axis == "in" else w.T
    spec = QuantSpec(4, group_size)
    fast = quantize_weight_gptq(m, spec, h, group_axis, block_size=40)
    reference = quantize_weight_gptq_reference(m, spec, h, group_axis, block_size=40)
    assert torch.equal(fast.codes, reference.codes)
    assert abs(_output_error(w, fast, h, group_axis) / _output_error(w, reference, h, group_axis) - 1) <= 0.01


@pytest.mark.parametrize("k,group_size,block_size,along", [(96, 32, 40, True), (96, 96, 40, True), (256, 128, 48, True),
                                                            (96, 8, 40, False), (100, 100, 128, True)])
def test_block_bounds_cover_the_columns_and_never_split_a_group_start(k, group_size, block_size, along):
    bounds = block_bounds(k, group_size, block_size, along)
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    assert all(0 < stop - start <= max(block_size, group_size if group_size <= block_size else 0)
               for start, stop in bounds)
    if along:  # a group starting inside a block must end inside it too (its columns are all current)
        for start, stop in bounds:
            assert all(g0 + group_size <= stop for g0 in range(start + 1, stop) if g0 % group_size == 0)


def test_dead_inputs_get_zero_weight():
    w, h = _problem(8, 64, 256, seed=5, dead=4)
    dead = torch.diagonal(h) == 0
    qm = quantize_weight_gptq(w, QuantSpec(4, 32), h)
    assert torch.all(qm.dequantize()[:, dead].abs() <= qm.scales.repeat_interleave(32, dim=1)[:, dead] / 2 + 1e-6)


@pytest.mark.parametrize("dead", [0, 5])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(dead):
    _, h = _problem(1, 128, 96, seed=6, dead=dead)  # fewer rows than features: only damping makes H invertible
    upper, dead_mask = inverse_hessian_factor(h, 0.01)
    reference, reference_dead = inverse_hessian_factor_reference(h, 0.01)
    assert torch.equal(dead_mask, reference_dead) and int(dead_mask.sum()) == dead
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    damped, _ = damped_hessian(h, 0.01, torch.float64)
    identity = upper.double().T @ upper.double() @ damped
    torch.testing.assert_close(identity, torch.eye(128, dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(upper, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))
    upper64, _ = inverse_hessian_factor(h, 0.01, dtype=torch.float64)  # shift_add's precision
    torch.testing.assert_close(upper64, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("k,chunk,tile", [(7, 3, 2), (64, 1 << 20, 512), (129, 100, 16)])
def test_in_place_flip_and_transpose_equal_the_copying_ones(k, chunk, tile):
    m = torch.randn(k, k)
    assert torch.equal(flip_in_place(m.clone(), chunk=chunk), m.flip(0, 1))
    assert torch.equal(transpose_in_place(m.clone(), tile=tile), m.T)
    with pytest.raises(ValueError, match="contiguous"):
        flip_in_place(m.T)


@pytest.mark.parametrize("dead", [0, 5])
def test_in_place_factor_is_bit_identical_to_the_copying_chain(dead):
    """The factor built in place (H from the Gram matrix inside its own buffer, Cholesky and
    triangular solve overwriting their inputs) equals the out-of-place chain it replaced bit for
    bit, on a Gram matrix that is not exactly symmetric (GEMM rounding makes that possible)."""
    _, h = _problem(1, 200, 300, seed=7, dead=dead)
    rows = 300
    gram = h * rows
    gram[3, 9] = torch.nextafter(gram[3, 9], torch.tensor(float("inf")))  # asymmetric in the last bit
    damped, dead_mask = damped_hessian(gram / rows, 0.01)
    lower = torch.linalg.cholesky(damped.flip(0, 1))
    expected = torch.linalg.solve_triangular(lower, torch.eye(200), upper=False).flip(0, 1)
    upper, mask = inverse_hessian_factor(gram, 0.01, rows=rows)
    assert torch.equal(upper, expected) and torch.equal(mask, dead_mask)
    w = torch.randn(16, 200)
    spec = QuantSpec(4, 40)
    by_gram = quantize_weight_gptq(w, spec, gram, rows=rows)
    by_hessian = quantize_weight_gptq(w, spec, gram / rows)
    assert torch.equal(by_gram.codes, by_hessian.codes) and torch.equal(by_gram.scales, by_hessian.scales)


@pytest.mark.parametrize("dead,block", [(0, 48), (5, 48), (5, 256)])
def test_feedback_factor_is_the_inverse_of_the_reference_factor_with_a_unit_diagonal(dead, block, monkeypatch):
    """F = V·diag(V)⁻¹ with V = U⁻¹ (U the float64 reference factor of H⁻¹), built block by block
    from the last column: 200 columns in blocks of 48 (the first one short) and in one block."""
    import fxforge.passes.quantize.hessian as hessian

    monkeypatch.setattr(hessian, "FACTOR_BLOCK", block)
    _, h = _problem(1, 200, 300, seed=11, dead=dead)
    factor, dead_mask = feedback_factor(h * 300, 0.01, rows=300)
    upper, reference_dead = inverse_hessian_factor_reference(h, 0.01)
    v = torch.linalg.inv(upper.double())
    assert torch.equal(dead_mask, reference_dead) and int(dead_mask.sum()) == dead
    assert torch.equal(factor, factor.triu()) and torch.equal(factor.diagonal(), torch.ones(200))
    torch.testing.assert_close(factor.double(), v / v.diagonal(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("block", [3, 256])
def test_a_feedback_factor_of_a_matrix_that_is_not_positive_definite_names_damp(block, monkeypatch):
    import fxforge.passes.quantize.hessian as hessian

    monkeypatch.setattr(hessian, "FACTOR_BLOCK", block)
    h = torch.eye(8)
    h[1, 1] = -4.0  # a negative pivot: in the last of three blocks taken (block 3), or in the only one
    with pytest.raises(torch.linalg.LinAlgError, match="damp"):
        feedback_factor(h, 0.0)


def test_a_hessian_that_is_not_positive_definite_names_damp():
    with pytest.raises(torch.linalg.LinAlgError, match="damp"):
        inverse_hessian_factor(-torch.eye(8), 0.0)


@pytest.mark.parametrize("group_axis", ["in", "out"])
def test_a_bf16_weight_gives_the_codes_of_its_float32_copy(group_axis):
    """The pass hands GPTQ a bf16 weight as it is (no float32 copy of its own): the codes,
    staged a block at a time as bytes, equal those of the float32 copy."""
    w, h = _problem(32, 128, 256, seed=8)
    m = (w if group_axis == "in" else w.T.contiguous()).bfloat16()
    spec = QuantSpec(4, 32 if group_axis == "in" else 16)
    got = quantize_weight_gptq(m, spec, h, group_axis, block_size=48)
    want = quantize_weight_gptq(m.float(), spec, h, group_axis, block_size=48)
    assert got.codes.dtype == torch.uint8 and torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales, want.scales) and torch.equal(got.zeros, want.zeros)


@pytest.mark.parametrize("group_axis,group_size,dead,stack_rows", [("in", 32, 0, 4096), ("in", 32, 5, 4096),
                                                                    ("in", 96, 0, 4096), ("in", 32, 0, 24),
                                                                    ("out", 8, 3, 4096)])
def test_layers_sharing_an_input_stacked_equal_each_alone(group_axis, group_size, dead, stack_rows, monkeypatch):
    """q/k/v (and gate/up) read one input: quantized together (one factorization, rows stacked,
    in runs of at most STACK_ROWS rows: 24 makes [24], [8, 16]) they get exactly the codes, scales
    and zero points each gets alone."""
    import fxforge.passes.quantize.gptq as gptq

    monkeypatch.setattr(gptq, "STACK_ROWS", stack_rows)
    _, h = _problem(1, 96, 512, seed=9, dead=dead)
    g = torch.Generator().manual_seed(10)
    weights = [torch.randn(n, 96, generator=g) for n in (24, 8, 16)]
    matrices = [w if group_axis == "in" else w.T.contiguous() for w in weights]
    spec = QuantSpec(4, group_size)
    together = quantize_weights_gptq(matrices, spec, h, group_axis, block_size=40)
    for matrix, got in zip(matrices, together):
        alone = quantize_weight_gptq(matrix, spec, h, group_axis, block_size=40)
        assert got.codes.shape == alone.codes.shape and torch.equal(got.codes, alone.codes)
        assert torch.equal(got.scales, alone.scales) and torch.equal(got.zeros, alone.zeros)
