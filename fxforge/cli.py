"""The `fxforge` command line.

    fxforge compile MODEL [--passes SPEC] [--backend onnx] -o DIR   compile and save an artifact
    fxforge inspect MODEL|DIR                                        graph summary
    fxforge passes                                                   every pass with its options
    fxforge export DIR -o model.onnx                                 saved artifact -> ONNX file

MODEL is a zoo name (`zoo:tiny-llama`), a local Hugging Face model directory, or
`package.module:factory` (a function returning a model, or (model, args[, kwargs])).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

import torch


def resolve_model(spec: str, seq: int = 16) -> tuple[torch.nn.Module, tuple, dict]:
    """MODEL argument -> (model, example args, example kwargs)."""
    if spec.startswith("zoo:"):
        from fxforge.models import get_model

        zm = get_model(spec[4:])
        return zm.model, zm.args, zm.kwargs
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_directory(path, seq)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        made = factory()
        if isinstance(made, torch.nn.Module):
            raise SystemExit(f"{spec} returned a model without example inputs; return (model, args) "
                             f"or (model, args, kwargs) so fxforge can trace it")
        model, args, *rest = made
        return model, tuple(args), dict(rest[0]) if rest else {}
    raise SystemExit(f"cannot interpret MODEL {spec!r}: use zoo:NAME (see `fxforge inspect zoo:`), a "
                     f"Hugging Face model directory, or package.module:factory")


def _load_hf_directory(path: Path, seq: int) -> tuple[torch.nn.Module, tuple, dict]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    loader = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    model = loader.from_pretrained(path, attn_implementation="eager").eval()
    vocab = getattr(config, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (2, seq))
    return model, (ids,), {"attention_mask": torch.ones_like(ids)}


def cmd_compile(ns: argparse.Namespace) -> int:
    import fxforge

    model, args, kwargs = resolve_model(ns.model)
    compiled = fxforge.compile(model, args, kwargs, passes=ns.passes, backend=ns.backend)
    print(compiled.report)
    out = Path(ns.output)
    compiled.save(out, onnx=ns.backend == "onnx")  # model.onnx inside, listed in the manifest
    if ns.backend == "onnx":
        print(f"wrote {out / 'model.onnx'}")
    print(f"saved to {out}")
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.graph import linear_sites, summarize
    from fxforge.ir.trace import trace

    if ns.target == "zoo:":
        from fxforge.models import list_models

        print("\n".join(f"zoo:{name}" for name in list_models()))
        return 0
    path = Path(ns.target)
    # Any directory that is not a Hugging Face model is read as an artifact, through the same
    # checked loader as fxforge.load (so a broken one is an ArtifactError, not a guess).
    if path.is_dir() and not (path / "config.json").is_file():
        import fxforge

        compiled = fxforge.load(path, backend="eager")
        gm = compiled.graph_module
        print(f"artifact {path}: pipeline {compiled.pipeline_spec!r}")
    else:
        model, args, kwargs = resolve_model(ns.target)
        gm = trace(model, args, kwargs)
        canonicalize(gm)
    print(summarize(gm))
    sites = linear_sites(gm, include_lm_head=True)
    print(f"linear sites: {len(sites)}")
    for site in sites[: ns.max_sites]:
        print(f"  {site.module_path:<50} {site.in_features:>6} -> {site.out_features}")
    if len(sites) > ns.max_sites:
        print(f"  ... and {len(sites) - ns.max_sites} more")
    return 0


def cmd_passes(ns: argparse.Namespace) -> int:
    from fxforge.passes.base import registered_passes
    from fxforge.passes.spec import describe_options

    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
        print(f"    {describe_options(cls)}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    import fxforge

    compiled = fxforge.load(ns.artifact, backend="eager")
    path = compiled.export_onnx(ns.output)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxforge", description="Compile PyTorch models through composable passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="trace, run passes, lower, and save an artifact")
    p.add_argument("model", help="zoo:NAME, a Hugging Face model directory, or package.module:factory")
    p.add_argument("--passes", default="", help='pipeline, e.g. "quantize(bits=4,group_size=128),fuse_attention"')
    p.add_argument("--backend", default="eager", choices=["eager", "onnx", "triton", "inductor"])
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="summarize a model's graph or a saved artifact (zoo: lists the zoo)")
    p.add_argument("target", help="MODEL or artifact DIR")
    p.add_argument("--max-sites", type=int, default=20)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list every registered pass with its options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("export", help="export a saved artifact to ONNX")
    p.add_argument("artifact")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fxforge.errors import FxforgeError

    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except FxforgeError as exc:
        print(f"fxforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


