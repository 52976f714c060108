"""Pass `add_adapters`: insert a parameter-efficient adapter (the LoRA family) into linear layers.

    aten.linear(x, W, b)  ->  fxforge.lora_linear(x, W', b, A, B, s)      (most methods)
                          ->  fxforge.dora_linear(x, W, b, A, B, m, s)    (dora)
                          ->  fxforge.miss_linear / bone_linear(...)     (bone)

The adapter's computation is an fxforge op with a registered backward (so the graph trains
with torch.optim and exports to ONNX as MatMuls); factors that are products of trainable
pieces (SORSA's B·diag(S)·A, LoRA-SB's B·R·A, LoLDU's P·L·diag(z)·U) are composed from aten
ops on the graph's parameters in front of the op, which keeps one op per low-rank form
instead of one per method. After the pass, exactly the adapter tensors require grad.

On a quantized base (`fxforge::linear_wq`, after the `quantize` pass) the low-rank methods add
their branch beside the integer op instead, QLoRA style (quantized_base.py).

The methods live one per file (lora.py, pissa.py, eva.py, ...); each leaves the initial output
unchanged up to float rounding (B = 0, or a residual base weight W - s·B·A), so the pass keeps
a tight tolerance. Bad targets, ranks and missing data fail before anything is changed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, get_attr, linear_sites
from fxforge.ir.verify import Tolerance
from fxforge.passes.adapters import all_methods  # noqa: F401  (every method registers itself)
from fxforge.passes.adapters.common import (
    FAMILY,
    AdapterMethod,
    LayerContext,
    add_adapter_to_site,
    adapter_records,
    freeze_all_but_adapters,
    known_methods,
    quantized_capable_methods,
)
from fxforge.passes.adapters.quantized_base import (
    QUANTIZED_LINEARS,
    dequantized_weight,
    ensure_linear_wq_input_grad,
    is_quantized_linear,
    quantized_sites,
)
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.methods import pass_method
from fxforge.passes.selection import LayerSelection


@register_pass
@dataclass(frozen=True)
class AddAdapters(Pass):
    """Add adapters of `method` with rank `rank` and scaling `alpha` to the layers `targets` match.

    method: lora, rslora, dora, pissa, olora, eva, lora_ga, lora_sb, bone, svfit, sorsa, loldu
        (one class each, registered in the "add_adapters" family of fxforge.passes.methods).
    targets / exclude: module-path patterns (fnmatch, a bare name matches as a suffix);
        None targets every linear layer except the LM head, skipping (with a reason) layers
        narrower than `rank` (MoE routers, small gates); a layer named in targets that is too
        narrow is an error.
    The remaining options belong to one method each; setting one for another method is an error:
    eva_rho, eva_tau, calibration_limit: EVA's rank budget factor, convergence cosine, batches.
    ga_batches: LoRA-GA's and LoRA-SB's gradient batches (from calibration); ga_gamma: LoRA-GA's
        stable-scale γ.
    bone_form: "miss" (MiSS, the default) or "bat" (Bone's block-affine form).
    """

    name = "add_adapters"
    consumes = frozenset({"linear", *QUANTIZED_LINEARS})  # passes/compatibility.py
    produces = "adapter"
    method: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    calibration_limit: int = 16
    ga_batches: int = 4
    ga_gamma: float = 16.0
    bone_form: Literal["miss", "bat"] = "miss"

    def __post_init__(self) -> None:
        if self.method not in known_methods():
            close = difflib.get_close_matches(self.method, known_methods(), n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown adapter method '{self.method}'.{hint} Known: {', '.join(known_methods())}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        LayerSelection.normalize_fields(self)
        self.method_object()  # its own options are checked, options of another method refused

    def method_object(self) -> AdapterMethod:
        """The method object, built from the options that are its own."""
        return pass_method(FAMILY, self)  # type: ignore[return-value]

    def tolerance(self) -> Tolerance:
        # Every init is exact in real numbers. Zero-update inits (B = 0, D = 0, R = 0)
        # change nothing but float rounding; residual ones (W - s·B·A) round W once more, which in
        # bf16 moves outputs by ~2⁻⁸ relative per rounding (measured 0.6% on a 2-layer MLP), so
        # they are held to a relative bound instead.
        method = self.method_object()
        if method.changes_base_weight or method.rounds_at_init:
            return Tolerance(max_abs=None, max_rel=2e-2, min_cosine=0.9995)
        return Tolerance(max_abs=1e-4, rtol=1e-4)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        method = self.method_object()
        sites = self._sites(gm)
        skipped: list[tuple[str, str]] = []
        adapted = adapter_records(gm)
        kept: list[LinearSite] = []
        quantized = {s.node.name for s in sites if is_quantized_linear(s.node)}
        for site in sites:
            if site.node.name in quantized and not method.adapts_quantized:
                skipped.append((site.module_path, f"quantized layer: {self.method} needs the float base weight "
                                                  f"(methods that adapt quantized layers: {', '.join(quantized_capable_methods())})"))
            elif site.module_path in adapted:
                skipped.append((site.module_path, "already has an adapter"))
            elif method.changes_base_weight and _weight_used_elsewhere(site, sites):
                skipped.append((site.module_path, f"{self.method} rewrites the base weight, which is shared "
                                                  f"with other nodes (tied weights)"))
            else:
                kept.append(site)
        narrow: set[str] = set()  # node names of layers left out for being narrower than the rank
        for site in kept:  # validate everything before touching the graph
            limit = method.max_rank(site.in_features, site.out_features)
            if self.rank > limit and self.targets is None:
                # chosen by default (every linear), not by name: a layer narrower than the rank
                # (a MoE router, a 4-wide gate) is left alone with a reason, not a failure
                narrow.add(site.node.name)
                skipped.append((site.module_path, f"narrower than the rank: {self.method} allows rank <= {limit} "
                                                  f"here (weight {site.out_features}x{site.in_features}), "
                                                  f"rank={self.rank}; name it in targets with a smaller rank to adapt it"))
            elif self.rank > limit:
                raise PassError(
                    f"add_adapters: rank {self.rank} is larger than layer '{site.module_path}' allows for "
                    f"{self.method} ({limit}, its weight is {site.out_features}x{site.in_features}). Use "
                    f"rank <= {limit} or exclude the layer with exclude=['{site.module_path}'].",
                    pass_name=self.name)
        kept = [s for s in kept if s.node.name not in narrow]
        if any(s.node.target == torch.ops.fxforge.linear_wq.default for s in kept):
            ensure_linear_wq_input_grad()  # gradients must pass through the frozen int layers
        data = method.prepare(gm, kept, ctx, self.rank)
        generator = torch.Generator().manual_seed(ctx.seed)
        count = 0
        groups: dict[str, list[LinearSite]] = {}
        for site in kept:  # a module called twice: one adapter shared by its call sites, like its weight
            groups.setdefault(site.module_path, []).append(site)
        for group in groups.values():
            site = group[0]
            weight = dequantized_weight(gm, site.node) if site.node.name in quantized else \
                get_attr(gm, site.weight_name).detach()
            layer = LayerContext(site=site, weight=weight, rank=self.rank,
                                 alpha=self.alpha, generator=generator, data=data.get(site.module_path))
            init = method.init(layer)
            if init.rank == 0:
                skipped.append((site.module_path, f"{self.method} assigned this layer rank 0"))
                continue
            options = {name: getattr(method, name) for name in method.recorded_options}
            adapted[site.module_path] = add_adapter_to_site(gm, group, method, init, self.alpha, options)
            count += len(group)
        trainable = freeze_all_but_adapters(gm)
        ranks = {path: rec["rank"] for path, rec in adapted.items() if rec["method"] == self.method}
        return PassResult(gm, sites=count, skipped=skipped,
                          notes={"method": self.method, "ranks": ranks, "trainable_tensors": len(trainable),
                                 "trainable_parameters": sum(get_attr(gm, n).numel() for n in trainable)})

    def _sites(self, gm: GraphModule) -> list[LinearSite]:
        every = linear_sites(gm, include_lm_head=True) + quantized_sites(gm, None, None)
        candidates = linear_sites(gm, include_lm_head=self.include_lm_head) + quantized_sites(gm, None, None)
        paths = [s.module_path for s in every] + list(adapter_records(gm))  # adapted layers count too
        selection = LayerSelection.of(self)
        selection.require_matches(self.name, paths)
        sites = [s for s in candidates if selection.chooses(s.module_path)]
        if not sites and not adapter_records(gm):
            raise PassError(f"add_adapters: no linear layer to adapt (targets={self.targets}, exclude="
                            f"{self.exclude}, include_lm_head={self.include_lm_head}). Linear layers: "
                            f"{', '.join(paths[:12])}", pass_name=self.name)
        return sites


def _weight_used_elsewhere(site: LinearSite, sites: list[LinearSite]) -> bool:
    """Whether the weight feeds nodes other than this layer's linears (tied to an embedding, ...)."""
    own = {s.node for s in sites if s.weight_name == site.weight_name}
    return any(user not in own for user in site.node.args[1].users)
