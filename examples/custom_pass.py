"""Write your own pass, register it, and use it by name in a pipeline string.

The pass below folds a constant scale into the weights of chosen linear layers (y = s·(xWᵀ + b)
becomes x(sW)ᵀ + sb) and then multiplies their outputs by 1/s, so the model's output is
unchanged: a toy, but it shows every piece a real pass has — options as dataclass fields,
site selection by module path, parameter edits through fxforge's IR helpers, a match count,
and the pipeline's automatic verification.
"""
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

import fxforge
from fxforge import Pass, PassContext, PassResult, register_pass
from fxforge.ir.graph import get_attr, set_attr
from fxforge.models import get_model
from fxforge.passes.selection import select_linear_sites

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class ScaleLinears(Pass):
    """Scale chosen linear layers' weights by `scale` and undo it on their outputs (exact)."""

    name = "scale_linears"
    scale: float = 2.0
    targets: tuple[str, ...] = ("*.mlp.*",)

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError("scale must be non-zero")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        # a pattern matching no layer is an error; layers an earlier pass rewrote are `skipped`
        selection = select_linear_sites(gm, self.name, targets=self.targets)
        for site in selection.sites:
            set_attr(gm, site.weight_name, get_attr(gm, site.weight_name) * self.scale)
            if site.bias_name:
                set_attr(gm, site.bias_name, get_attr(gm, site.bias_name) * self.scale)
            with gm.graph.inserting_after(site.node):
                undo = gm.graph.call_function(aten.mul.Tensor, (site.node, 1.0 / self.scale))
            # every reader of the linear now reads the rescaled value (except `undo` itself)
            site.node.replace_all_uses_with(undo, delete_user_cb=lambda user: user is not undo)
        return PassResult(gm, sites=len(selection.sites), skipped=selection.skipped)


def main() -> None:
    zoo = get_model("tiny-llama")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs,
                               passes="scale_linears(scale=4.0),fuse_rms_norm")
    print(compiled.report)
    print(f"\nscale_linears rewrote {compiled.report['scale_linears'].sites} linear layers")


if __name__ == "__main__":
    main()
