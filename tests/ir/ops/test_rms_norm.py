"""fxforge::rms_norm against its definition, on eager, ONNX Runtime and the Triton interpreter."""
import pytest
import torch

from fxforge.ir.ops import get_op, lowering_for


def definition(x, w, eps):
    x32 = x.double()
    return (w.double() * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)))


@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 48), (1, 1, 7)])
def test_reference_matches_definition(shape):
    x, w = torch.randn(shape), torch.randn(shape[-1])
    got = torch.ops.fxforge.rms_norm(x, w, 1e-6)
    assert torch.allclose(got.double(), definition(x, w, 1e-6), atol=1e-5)


def test_reference_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight has 8 channels but x has 16"):
        torch.ops.fxforge.rms_norm(torch.randn(2, 16), torch.randn(8), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_reference(dtype):
    from fxforge.kernels import load_all

    load_all()
    kernel = lowering_for("triton", "rms_norm")
    x, w = torch.randn(5, 3, 40).to(dtype), torch.randn(40)
    expected = torch.ops.fxforge.rms_norm(x, w, 1e-5)
    got = kernel(x, w, 1e-5)
    assert got.dtype == expected.dtype
    assert torch.allclose(got.float(), expected.float(), atol=2e-3 if dtype == torch.float16 else 1e-5)


def test_onnx_lowering_matches_reference(tmp_path):
    import onnxruntime as ort

    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.ops.fxforge.rms_norm(x, self.w, 1e-6)

    model, x = Norm(), torch.randn(2, 5, 24)
    program = torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=translation_table(),
                                opset_version=OPSET_VERSION,
                                dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    program.save(str(tmp_path / "norm.onnx"))
    session = ort.InferenceSession(str(tmp_path / "norm.onnx"), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 9, 24)
    got, = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    assert abs(got - model(x2).detach().numpy()).max() <= 1e-5
    assert get_op("rms_norm").lowerings.keys() >= {"onnx"}


@pytest.mark.slow
def test_kernel_compiles_for_hopper():
    # Outside the interpreter: under TRITON_INTERPRET=1, tl.sum is an interpreter object the
    # GPU compiler cannot take.
    script = """
        from fxforge.kernels._common import compile_for_hopper
        from fxforge.kernels.rms_norm import rms_norm_kernel
        for dt in ("fp16", "bf16", "fp32"):
            k = compile_for_hopper(rms_norm_kernel, {"x_ptr": "*" + dt, "w_ptr": "*fp32", "out_ptr": "*fp32",
                                   "n_cols": "i32", "row_stride": "i32", "eps": "fp32", "BLOCK": "constexpr"},
                                   {"BLOCK": 4096})
            assert k.asm["cubin"]
            print(dt)
    """
    from fxforge.kernels._common import run_outside_interpreter

    assert run_outside_interpreter(script).split() == ["fp16", "bf16", "fp32"]
