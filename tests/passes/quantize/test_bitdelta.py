"""bitdelta: sign packing, the op on eager and ONNX, the pass on tiny-llama (structure, numbers,
match count, one base serving two deltas, scale distillation) and the other-architecture error."""
import copy

import pytest
import torch
from testing_utils import export_op_module, run_ort


from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, linear_sites
from fxforge.ir.ops.linear_bitdelta import pack_signs, unpack_signs
from fxforge.ir.verify import run_graph
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize.bitdelta import BitDelta, delta_state, load_delta
from fxforge.passes.quantize.common import relative_error

OP = torch.ops.fxforge.linear_bitdelta.default


def _fine_tune(gm, seed, scale=0.004):
    """A 'fine-tuned' copy: every linear weight moved by a random delta."""
    g = torch.Generator().manual_seed(seed)
    fine = copy.deepcopy(gm)
    for site in linear_sites(fine):
        w = get_attr(fine, site.weight_name)
        w.data += scale * torch.randn(w.shape, generator=g)
    return fine


def test_sign_packing_round_trips():
    delta = torch.randn(5, 24)
    signs = pack_signs(delta)
    assert signs.shape == (5, 3) and signs.dtype == torch.uint8
    assert torch.equal(unpack_signs(signs, 24), torch.where(delta > 0, 1.0, -1.0))


def test_op_eager_and_onnx(tmp_path):
    class Delta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Parameter(torch.randn(12, 16))
            self.register_buffer("signs", pack_signs(torch.randn(12, 16)))
            self.register_buffer("alpha", torch.tensor([0.05]))

        def forward(self, x):
            return torch.ops.fxforge.linear_bitdelta(x, self.base, self.signs, self.alpha, None)

    module, x = Delta(), torch.randn(2, 16)
    expected = x @ (module.base + 0.05 * unpack_signs(module.signs, 16)).T
    torch.testing.assert_close(module(x), expected)
    _, session = export_op_module(module, x, tmp_path / "d.onnx")
    torch.testing.assert_close(run_ort(session, x), expected, rtol=1e-5, atol=1e-5)


def test_pass_compresses_fine_tune_and_one_base_serves_two_deltas(llama):
    base, ctx = llama
    fine_a, fine_b = _fine_tune(base, 1), _fine_tune(base, 2)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    a = run_pass(BitDelta(base=base_state), fine_a, ctx)
    b = run_pass(BitDelta(base=base_state), fine_b, ctx)
    nodes = [n for n in a.graph.nodes if n.target == OP]
    assert len(nodes) == 14
    # the base weights are the base model's, under their original names
    torch.testing.assert_close(get_attr(a, "model.layers.0.mlp.up_proj.weight"),
                               base_state["model.layers.0.mlp.up_proj.weight"])
    x = ctx.example_inputs
    ref_a, ref_base = run_graph(fine_a, x)[0], run_graph(base, x)[0]
    got_a = run_graph(a, x)[0]
    # sign(Δ) of a Gaussian delta keeps 2/π of its energy: error ≈ 0.6 of the base's
    assert relative_error(ref_a, got_a) < 0.75 * relative_error(ref_a, ref_base)
    load_delta(a, delta_state(b))  # the same base graph now serves fine-tune b
    torch.testing.assert_close(run_graph(a, x)[0], run_graph(b, x)[0])


def test_scale_distillation_reduces_the_output_mse(llama):
    base, ctx = llama
    fine = _fine_tune(base, 3)
    plain = run_pass(BitDelta(base=base), fine, ctx)
    distilled = run_pass(BitDelta(base=base, distill_steps=30, lr=1e-3), fine, ctx)
    x, ref = ctx.example_inputs, run_graph(fine, ctx.example_inputs)[0]
    assert relative_error(ref, run_graph(distilled, x)[0]) < relative_error(ref, run_graph(plain, x)[0])


def test_base_of_another_architecture_is_refused(llama):
    from fxforge.models import get_model

    fine, ctx = llama
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    with pytest.raises(PassError, match=r"no parameter 'model.layers.0.self_attn.q_proj.weight'.*same architecture"):
        run_pass(BitDelta(base=get_model("tiny-gpt2").model), fine, ctx)
    wrong_shape = {k: v.clone() for k, v in before.items()}
    wrong_shape["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 96)
    with pytest.raises(PassError, match=r"'model.layers.1.mlp.down_proj' is \(64, 128\).*\(64, 96\)"):
        run_pass(BitDelta(base=wrong_shape), fine, ctx)
    assert all(torch.equal(before[k], v) for k, v in fine.state_dict().items())
