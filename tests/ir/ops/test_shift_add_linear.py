"""fxforge::shift_add_linear: packing round trip, power-of-two and ±1 invariants, reference semantics."""
import pytest
import torch

from fxforge.ir.ops.shift_add_linear import (
    MAX_EXP_SPAN,
    apot_value,
    check_invariants,
    dequantize_shift_add,
    naf_weight,
    pack_signs,
    round_to_apot,
    unpack_bits,
    unpack_signs,
)

op = torch.ops.fxforge.shift_add_linear


def _random_form(n=6, k=64, q=3, g=32, terms=3):
    planes = (torch.randint(0, 2, (q, n, k)) * 2 - 1).to(torch.int8)
    exps, signs = round_to_apot(torch.randn(n, k // g, q) * 0.05, terms)
    return planes, exps, signs


@pytest.mark.parametrize("k", [32, 40, 64, 72])
def test_pack_round_trip_and_layout(k):
    planes = (torch.randint(0, 2, (3, 5, k)) * 2 - 1).to(torch.int8)
    packed = pack_signs(planes)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-k // 32), 3)
    assert torch.equal(unpack_signs(packed, k), planes)
    # lat layout: bit j of word w of plane p is column 32·w + j of that plane
    n, col, p = 2, k - 1, 1
    word = int(packed[n, col // 32, p]) & 0xFFFFFFFF
    assert ((word >> (col % 32)) & 1) == int(planes[p, n, col] > 0)
    assert not unpack_bits(packed, k)[..., k:].any()


def test_pack_uses_the_sign_bit_of_int32():
    planes = -torch.ones(1, 1, 32, dtype=torch.int8)
    planes[0, 0, 31] = 1
    assert int(pack_signs(planes)[0, 0, 0]) == -(1 << 31)


def test_pack_rejects_non_signs():
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        pack_signs(torch.zeros(1, 2, 8, dtype=torch.int8))


def test_apot_rounding_is_near_and_uses_at_most_terms():
    alpha = torch.rand(1000) * 0.1 + 1e-4
    for terms, bound in ((1, 1 / 3), (2, 1 / 9), (3, 1 / 27)):
        exps, signs = round_to_apot(alpha, terms)
        assert int((signs != 0).sum(-1).max()) <= terms
        rel = ((apot_value(exps, signs) - alpha).abs() / alpha).max().item()
        # greedy nearest power of two leaves at most a third of the remainder each step
        assert rel <= bound + 1e-6, (terms, rel)


def test_apot_exact_values_and_zero():
    exps, signs = round_to_apot(torch.tensor([0.75, -0.375, 0.0, 5.0]), 2)
    assert apot_value(exps, signs).tolist() == [0.75, -0.375, 0.0, 5.0]
    assert signs[2].abs().sum() == 0


def test_naf_weight_is_minimal_signed_digit_count():
    # brute force: fewest ±2^i (i < 10) summing to m, for m < 256
    best = {0: 0}
    frontier = {0}
    for count in range(1, 6):
        frontier = {v + s * (1 << i) for v in frontier for i in range(10) for s in (1, -1)} - set(best)
        for v in frontier:
            best.setdefault(v, count)
    m = torch.arange(256)
    assert naf_weight(m).tolist() == [best[v] for v in range(256)]


def test_invariants_hold_for_valid_forms():
    planes, exps, signs = _random_form()
    check_invariants(pack_signs(planes), exps, signs, 32, 64)


def test_invariants_catch_bad_term_signs_and_exponents():
    planes, exps, signs = _random_form()
    packed = pack_signs(planes)
    bad = signs.clone()
    bad[0, 0, 0, 0] = 2
    with pytest.raises(ValueError, match="not -1, 0 or \\+1"):
        check_invariants(packed, exps, bad, 32, 64)
    wide = exps.clone()
    wide[0, 0, 0, :] = torch.tensor([0, -MAX_EXP_SPAN - 1, -1], dtype=torch.int8)
    spread = signs.clone()
    spread[0, 0, 0, :] = 1
    with pytest.raises(ValueError, match="span more than"):
        check_invariants(packed, wide, spread, 32, 64)


def test_invariants_catch_padding_bits():
    planes = (torch.randint(0, 2, (2, 3, 40)) * 2 - 1).to(torch.int8)
    exps, signs = round_to_apot(torch.rand(3, 5, 2), 2)
    packed = pack_signs(planes)
    packed[0, 1, 0] |= 1 << 20  # column 52 does not exist
    with pytest.raises(ValueError, match="padding"):
        check_invariants(packed, exps, signs, 8, 40)


def test_reference_is_sum_of_scaled_sign_planes():
    planes, exps, signs = _random_form(n=5, k=64, q=2, g=16)
    packed = pack_signs(planes)
    x = torch.randn(3, 7, 64)
    bias = torch.randn(5)
    alpha = apot_value(exps, signs)  # (N, G, q)
    weight = torch.zeros(5, 64, dtype=torch.float64)
    for n in range(5):
        for k in range(64):
            for p in range(2):
                weight[n, k] += float(alpha[n, k // 16, p]) * int(planes[p, n, k])
    expected = (x.double() @ weight.T + bias.double()).float()
    got = op(x, packed, exps, signs, bias, 16)
    assert got.shape == (3, 7, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(dequantize_shift_add(packed, exps, signs, 16, 64), weight.float())


def test_reference_keeps_input_dtype():
    planes, exps, signs = _random_form()
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert op(x, pack_signs(planes), exps, signs, None, 32).dtype == torch.bfloat16


def test_shape_errors_name_the_problem():
    planes, exps, signs = _random_form()
    packed = pack_signs(planes)
    with pytest.raises(ValueError, match="int32 words per row"):
        op(torch.randn(2, 96), packed, exps, signs, None, 32)
    with pytest.raises(ValueError, match="multiple of 8 that divides"):
        op(torch.randn(2, 64), packed, exps, signs, None, 12)
    with pytest.raises(ValueError, match="exps must be int8"):
        op(torch.randn(2, 64), packed, exps.to(torch.int32), signs, None, 32)
    with pytest.raises(ValueError, match="bias has shape"):
        op(torch.randn(2, 64), packed, exps, signs, torch.zeros(3), 32)


def test_fake_impl_gives_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    planes, exps, signs = _random_form()
    packed = pack_signs(planes)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(4, 3, 64))
        out = op(x, packed, exps, signs, None, 32)
    assert out.shape == (4, 3, 6)
