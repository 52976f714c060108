"""What the quantization passes share: option checks, weight orientation and
the rewrite of one `aten.linear` into a packed weight-only op.

Orientation: every integer method quantizes a matrix M in groups of consecutive columns.
group_axis="in" (the default) uses M = W (out, in), which is fxforge::linear_wq's layout;
group_axis="out" (per-IC grouping) uses M = Wᵀ (in, out), emitted as fxforge::linear_wq_ic.
"""
from __future__ import annotations

from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, add_attr, get_attr, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.ir.ops.linear_wq import pack_bits
from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec

GROUP_AXES = ("in", "out")


def check_option(condition: bool, message: str) -> None:
    """`__post_init__` helper: raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


def weight_of(gm: GraphModule, site: LinearSite) -> Tensor:
    return get_attr(gm, site.weight_name).detach()


def orient(weight: Tensor, group_axis: str) -> Tensor:
    """The matrix whose rows are quantized in column groups: W for "in", Wᵀ for "out"."""
    return weight if group_axis == "in" else weight.T.contiguous()


def resolve_group_size(pass_name: str, site: LinearSite, group_size: int, group_axis: str) -> int:
    """group_size for this layer (-1 -> the whole axis); a PassError naming the layer if it does not divide."""
    axis_len = site.in_features if group_axis == "in" else site.out_features
    axis_name = "in_features" if group_axis == "in" else "out_features"
    if group_size == -1:
        return axis_len
    if axis_len % group_size:
        raise PassError(
            f"pass '{pass_name}': layer '{site.module_path}' has {axis_name}={axis_len}, which "
            f"group_size={group_size} (group_axis='{group_axis}') does not divide. Use a group size that "
            f"divides {axis_len} (e.g. {largest_divisor(axis_len, group_size)}), group_size=-1 for one group "
            f"per channel, or exclude=['{site.module_path}']. The model was not changed.",
            pass_name=pass_name,
        )
    return group_size


def largest_divisor(n: int, at_most: int) -> int:
    """The largest power-of-two divisor of n not above `at_most` (a group size to suggest)."""
    g = 1
    while g * 2 <= at_most and n % (g * 2) == 0:
        g *= 2
    return g


def check_packable(pass_name: str, site: LinearSite, spec: QuantSpec, group_axis: str) -> None:
    """The packed axis must hold a whole number of bytes (two int4 codes a byte, four int2)."""
    axis_len = site.in_features if group_axis == "in" else site.out_features
    per_byte = 8 // spec.container_bits
    if axis_len % per_byte:
        raise PassError(
            f"pass '{pass_name}': layer '{site.module_path}' has {axis_len} features along the packed axis, "
            f"which {spec.bits}-bit codes ({per_byte} per byte) cannot fill whole bytes; use bits=8, "
            f"or exclude=['{site.module_path}']. The model was not changed.",
            pass_name=pass_name,
        )


def bias_node(site: LinearSite) -> Node | None:
    node = site.node.args[2] if len(site.node.args) > 2 else site.node.kwargs.get("bias")
    return node if isinstance(node, Node) else None


def emit_weight_only(gm: GraphModule, site: LinearSite, qm: QuantizedMatrix, spec: QuantSpec,
                     group_axis: str) -> Node:
    """Replace the site's aten.linear by linear_wq / linear_wq_ic reading packed buffers."""
    weight = weight_of(gm, site)
    base = site.module_path
    qweight = add_attr(gm, f"{base}.qweight", pack_bits(qm.codes, spec.container_bits), buffer=True,
                       before=site.node)
    scales = add_attr(gm, f"{base}.scales", qm.scales.to(weight.dtype), buffer=True, before=site.node)
    zeros = add_attr(gm, f"{base}.qzeros", qm.zeros, buffer=True, before=site.node)
    op = get_op("linear_wq" if group_axis == "in" else "linear_wq_ic").overload
    args = (site.input, qweight, scales, zeros, bias_node(site), spec.container_bits, qm.group_size)
    return replace_with_call(gm, site.node, op, args)


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """‖approx - reference‖ / ‖reference‖ (0 for an all-zero reference).

    The one quality number the reports use (verify's rel_l2, LossBound's max_rel). torchao's
    SQNR is the same number in other units, -20·log10 of it, so no second function computes it.
    """
    denom = float(reference.norm())
    return float((approx - reference).norm()) / denom if denom > 0 else 0.0
