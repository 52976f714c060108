"""The `fxforge` command line.

    fxforge compile MODEL [--passes SPEC] [--backend onnx] -o DIR   compile and save an artifact
    fxforge inspect MODEL|DIR                                        graph summary
    fxforge passes                                                   every pass with its options
    fxforge export DIR -o model.onnx                                 saved artifact -> ONNX file

MODEL is a zoo name (`zoo:tiny-llama`), a local Hugging Face model directory, or
`package.module:factory` (a function returning a model, or (model, args[, kwargs])).

Arguments are checked before anything is compiled (the factory imports and is callable, the
output path is not a file, the backend and pipeline are valid). Every error a user can cause
prints one line, `fxforge: error: ...`, and exits with status 2; `--debug` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fxforge.errors import CLIUsageError, FxforgeError


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
        return _call_factory(spec, resolve_factory(spec))
    raise CLIUsageError(f"cannot interpret MODEL {spec!r}: use zoo:NAME (see `fxforge inspect zoo:`), a "
                        f"Hugging Face model directory, or package.module:factory")


def resolve_factory(spec: str) -> Callable[[], Any]:
    """`package.module:factory` -> the callable, or a CLIUsageError saying which part is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CLIUsageError(f"MODEL {spec!r} must be package.module:factory, with both parts")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise CLIUsageError(f"MODEL {spec!r}: cannot import module '{module_name}' "
                            f"({type(exc).__name__}: {exc}); check the name and that it is on "
                            f"PYTHONPATH") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise CLIUsageError(f"MODEL {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise CLIUsageError(f"MODEL {spec!r}: '{attr}' is a {type(factory).__name__}, not a function; "
                            f"it must return (model, args) or (model, args, kwargs)")
    return factory


def _call_factory(spec: str, factory: Callable[[], Any]) -> tuple[torch.nn.Module, tuple, dict]:
    try:
        made = factory()
    except Exception as exc:
        raise CLIUsageError(f"MODEL {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, torch.nn.Module):
        raise CLIUsageError(f"{spec} returned a model without example inputs; return (model, args) "
                            f"or (model, args, kwargs) so fxforge can trace it")
    if not (isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)
            and (len(made) == 2 or isinstance(made[2], dict))):
        raise CLIUsageError(f"{spec} must return (model, args) or (model, args, kwargs) with model an "
                            f"nn.Module and kwargs a dict; got {type(made).__name__}")
    model, args, *rest = made
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    return model, args, dict(rest[0]) if rest else {}


def check_compile_arguments(ns: argparse.Namespace) -> None:
    """Everything `compile` can check before building the model: a mistake must not cost a compile."""
    from fxforge.backends.validate import resolve_backend
    from fxforge.passes.pipeline import Pipeline

    out = Path(ns.output)
    if out.exists() and not out.is_dir():
        raise CLIUsageError(f"output {str(out)!r} is an existing file; -o names the artifact directory to "
                            f"write: pick a new path")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CLIUsageError(f"output {str(out)!r} cannot be created: {str(blocking)!r} is a file")
    ns.backend = resolve_backend(ns.backend)
    Pipeline(ns.passes or "")  # PassSpecError for an unknown pass, option or value
    if ns.model.startswith("zoo:"):
        from fxforge.models import list_models

        if ns.model[4:] not in list_models():
            raise CLIUsageError(f"unknown zoo model {ns.model[4:]!r}; known: {', '.join(list_models())}")
    elif ":" in ns.model and not Path(ns.model).is_dir():
        resolve_factory(ns.model)


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

    check_compile_arguments(ns)
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
    from fxforge.passes.registry import registered_passes
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
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    # --debug after the command too; SUPPRESS keeps a subcommand from resetting the top-level flag
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="trace, run passes, lower, and save an artifact", parents=[debug])
    p.add_argument("model", help="zoo:NAME, a Hugging Face model directory, or package.module:factory")
    p.add_argument("--passes", default="", help='pipeline, e.g. "quantize(bits=4,group_size=128),fuse_attention"')
    # checked (case-insensitively) by check_compile_arguments, not argparse's `choices`, so a typo
    # gets the same message as in the Python API
    p.add_argument("--backend", default="eager", help="eager | onnx | triton | inductor")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="summarize a model's graph or a saved artifact (zoo: lists the zoo)",
                       parents=[debug])
    p.add_argument("target", help="MODEL or artifact DIR")
    p.add_argument("--max-sites", type=int, default=20)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list every registered pass with its options", parents=[debug])
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("export", help="export a saved artifact to ONNX", parents=[debug])
    p.add_argument("artifact")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 for an error the user can fix (one line on stderr)."""
    ns = build_parser().parse_args(argv)
    debug = getattr(ns, "debug", False)
    try:
        return ns.func(ns)
    except FxforgeError as exc:
        return _report(exc, debug, status=2)
    except KeyboardInterrupt:
        print("fxforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, in fxforge or in the user's model: still one line unless --debug
        return _report(exc, debug, status=1, hint=" (unexpected: rerun with --debug for the traceback)")


def _report(exc: BaseException, debug: bool, status: int, hint: str = "") -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    prefix = "" if isinstance(exc, FxforgeError) else f"{type(exc).__name__}: "
    print(f"fxforge: error: {prefix}{text}{hint}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())


