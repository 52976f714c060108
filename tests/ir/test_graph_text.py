"""graph_text / assert_graph: the text form tests use to show a graph before and after a pass."""
import pytest
import torch
from graph_text import assert_graph, graph_text


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        y = torch.ops.aten.linear.default(x, self.w, None)
        return torch.ops.aten.pow.Tensor_Scalar(y, 2), y.sum(dim=-1)


def test_one_line_per_node_with_op_names_constants_and_attributes():
    gm = torch.fx.symbolic_trace(Small())
    assert graph_text(gm) == "\n".join([
        "x = input()",
        "linear_default = aten.linear(x, @w, None)",
        "pow_tensor_scalar = aten.pow.Tensor_Scalar(linear_default, 2)",
        "sum_1 = .sum(linear_default, dim=-1)",
        "return (pow_tensor_scalar, sum_1)",
    ])


def test_indentation_and_blank_lines_do_not_matter():
    gm = torch.fx.symbolic_trace(Small())
    assert_graph(gm, """

        x = input()
        linear_default = aten.linear(x, @w, None)
            pow_tensor_scalar = aten.pow.Tensor_Scalar(linear_default, 2)
        sum_1 = .sum(linear_default, dim=-1)
        return (pow_tensor_scalar, sum_1)
    """)


def test_mismatch_fails_with_a_diff_naming_the_changed_line():
    gm = torch.fx.symbolic_trace(Small())
    with pytest.raises(AssertionError) as failure:
        assert_graph(gm, """
            x = input()
            linear_default = aten.linear(x, @w, None)
            pow_tensor_scalar = aten.pow.Tensor_Scalar(linear_default, 3)
            sum_1 = .sum(linear_default, dim=-1)
            return (pow_tensor_scalar, sum_1)
        """)
    message = str(failure.value)
    assert "-pow_tensor_scalar = aten.pow.Tensor_Scalar(linear_default, 3)" in message
    assert "+pow_tensor_scalar = aten.pow.Tensor_Scalar(linear_default, 2)" in message
