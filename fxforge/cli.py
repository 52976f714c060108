"""The `fxforge` command line.

    fxforge compile MODEL [--passes SPEC] [--backend onnx] -o DIR   compile and save an artifact
        for a Hugging Face directory also: [--task T] [--dtype D] [--seq L] [--batch B]
                                           [--calibration FILE [--calibration-samples N] [--calibration-seq L]]
    fxforge inspect MODEL|DIR                                        graph summary
    fxforge passes                                                   every pass with its options
    fxforge export DIR -o model.onnx                                 saved artifact -> ONNX file

MODEL is a zoo name (`zoo:tiny-llama`), a local Hugging Face model directory, or
`package.module:factory` (a function returning a model, or (model, args[, kwargs])).
A Hugging Face directory is loaded by `fxforge.from_pretrained` for its task (the default read
from config.json) with example inputs from its tokenizer, and its tokenizer files are saved in
the artifact, so the artifact directory is all a runtime needs.

Arguments are checked before anything is compiled (the factory imports and is callable, the
output path is not a file, the backend and pipeline are valid). Every error a user can cause
prints one line, `fxforge: error: ...`, and exits with status 2; `--debug` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fxforge.errors import CLIUsageError, FxforgeError
from fxforge.text_generation import TASK as DECODER_TASK


def resolve_model(spec: str) -> tuple[torch.nn.Module, tuple, dict]:
    """MODEL argument -> (model, example args, example kwargs)."""
    if spec.startswith("zoo:"):
        from fxforge.models import get_model

        zm = get_model(spec[4:])
        return zm.model, zm.args, zm.kwargs
    if is_hf_directory(spec):
        from fxforge.models.hf import from_pretrained

        loaded = from_pretrained(spec)
        return loaded.model, loaded.args, loaded.kwargs
    if ":" in spec:
        return _call_factory(spec, resolve_factory(spec))
    raise CLIUsageError(f"cannot interpret MODEL {spec!r}: use zoo:NAME (see `fxforge inspect zoo:`), a "
                        f"Hugging Face model directory, or package.module:factory")


def is_hf_directory(spec: str) -> bool:
    """A directory holding config.json: what save_pretrained writes."""
    path = Path(spec)
    return path.is_dir() and (path / "config.json").is_file()


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
    from fxforge.backends import resolve_backend
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
    _check_hf_options(ns)
    if ns.model.startswith("zoo:"):
        from fxforge.models import list_models

        if ns.model[4:] not in list_models():
            raise CLIUsageError(f"unknown zoo model {ns.model[4:]!r}; known: {', '.join(list_models())}")
    elif ":" in ns.model and not Path(ns.model).is_dir():
        resolve_factory(ns.model)


_HF_OPTIONS = ("task", "dtype", "seq", "batch", "calibration", "calibration_samples", "calibration_seq")


def _check_hf_options(ns: argparse.Namespace) -> None:
    """Options that need a Hugging Face directory; dtype against the backend; the calibration file."""
    from fxforge.backends.validate import UNSUPPORTED_DTYPES
    from fxforge.models.hf import DTYPES, TASKS

    given = [name for name in _HF_OPTIONS if getattr(ns, name, None) is not None]
    if given and not is_hf_directory(ns.model):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CLIUsageError(f"{flags} need(s) a Hugging Face model directory (with config.json and a tokenizer); "
                            f"{ns.model!r} is not one")
    if ns.task is not None and ns.task not in TASKS:
        raise CLIUsageError(f"unknown --task {ns.task!r}; tasks: {', '.join(TASKS)}")
    if ns.dtype is not None:
        reason = UNSUPPORTED_DTYPES.get(ns.backend, {}).get(DTYPES[ns.dtype])
        if reason:
            raise CLIUsageError(f"--dtype {ns.dtype} cannot run on --backend {ns.backend}: {reason.split('. ')[0]}; "
                                f"use --backend eager for {ns.dtype}, or --dtype float32")
    for name in ("seq", "batch", "calibration_samples", "calibration_seq"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise CLIUsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if ns.calibration is None and (ns.calibration_samples is not None or ns.calibration_seq is not None):
        raise CLIUsageError("--calibration-samples/--calibration-seq shape the --calibration FILE, which is missing")
    if ns.calibration is not None:
        from fxforge.calibration.text import read_calibration_file

        ns.calibration_texts = read_calibration_file(ns.calibration)  # before the model loads
    else:
        calibrated = calibrated_passes(ns.passes)
        if calibrated:
            raise missing_calibration_error(calibrated[0], ns.model)


def missing_calibration_error(pass_label: str, model: str) -> CLIUsageError:
    """What to do when a pass needs data and none was given: --calibration, where the CLI can tokenize."""
    if is_hf_directory(model):
        return CLIUsageError(f"{pass_label} needs calibration data: pass --calibration FILE (text, one sample "
                             f"per line, or .jsonl with a \"text\" field)")
    return CLIUsageError(f"{pass_label} needs calibration data; the CLI reads it (--calibration FILE) for Hugging "
                         f"Face directories only, since it needs their tokenizer: compile {model} from Python "
                         f"with fxforge.compile(..., calibration=[batch, ...])")


def calibrated_passes(passes: str) -> list[str]:
    """The passes of `passes` whose method declares it reads calibration data ("quantize (method=gptq)").

    Read from the method registry (`Method.needs_calibration`), so a missing --calibration is
    reported before the model loads; a pass that asks for data without declaring it still gets
    the same message, from cmd_compile, once it asks.
    """
    from fxforge.passes.pipeline import Pipeline
    from fxforge.passes.methods import methods_of

    found = []
    for p in Pipeline(passes or "").passes:
        method = methods_of(p.name).get(str(getattr(p, "method", "")))
        if method is not None and method.needs_calibration:
            found.append(f"{p.name} (method={method.name})")
    return found


def with_task_passes(passes: str, task_passes: Sequence[str]) -> str:
    """The user's pipeline with the task's passes appended (unless it already names them)."""
    from fxforge.text_generation import with_passes

    return with_passes(passes, task_passes)


def _calibration_batches(ns: argparse.Namespace, loaded: Any) -> list[dict[str, torch.Tensor]] | None:
    if ns.calibration is None:
        return None
    from fxforge.calibration.text import from_texts

    if loaded.tokenizer is None:
        raise CLIUsageError(f"--calibration needs a tokenizer and {ns.model} has none; save one there with "
                            f"tokenizer.save_pretrained(...)")
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 512
    seq = ns.calibration_seq or min(512, limit)
    if seq > limit:
        raise CLIUsageError(f"--calibration-seq {seq} exceeds the model's position limit {limit}")
    batches = from_texts(loaded.tokenizer, ns.calibration_texts, samples=ns.calibration_samples or 128, seq=seq)
    windows = sum(len(b["input_ids"]) for b in batches)
    print(f"calibration: {windows} window(s) of {batches[0]['input_ids'].shape[1]} tokens from {ns.calibration}")
    return batches


def cmd_compile(ns: argparse.Namespace) -> int:
    import fxforge
    from fxforge.errors import CalibrationError

    check_compile_arguments(ns)
    passes, calibration, companions = ns.passes, None, None
    if is_hf_directory(ns.model):
        loaded = fxforge.from_pretrained(ns.model, task=ns.task, dtype=ns.dtype, seq=ns.seq or 16,
                                         batch=ns.batch or 2)
        for note in loaded.notes:
            print(f"note: {note}")
        print(f"task {loaded.task}: {type(loaded.model).__name__} in {str(loaded.dtype).replace('torch.', '')}")
        model, args, kwargs = loaded.model, loaded.args, loaded.kwargs
        passes = with_task_passes(ns.passes, loaded.task_passes)
        calibration = _calibration_batches(ns, loaded)
        companions = loaded.tokenizer_files()
        if loaded.task == DECODER_TASK:
            return _compile_decoder(ns, loaded, passes, calibration)
    else:
        model, args, kwargs = resolve_model(ns.model)
    out = Path(ns.output)
    # --backend onnx: the backend keeps the file it exported (`path=`, in a directory of ours), and
    # the save copies it into the artifact: one export, whatever the model's size
    with tempfile.TemporaryDirectory(prefix="fxforge-cli-") as work:
        options = {"path": str(Path(work) / "model.onnx")} if ns.backend == "onnx" else None
        try:
            compiled = fxforge.compile(model, args, kwargs, passes=passes, backend=ns.backend,
                                       calibration=calibration, backend_options=options)
        except CalibrationError as exc:
            if calibration is None:  # the pass's own message speaks of Python's calibration=
                raise missing_calibration_error(getattr(exc, "pass_name", None) or "a pass", ns.model) from exc
            raise
        print(compiled.report)
        # model.onnx and the tokenizer inside, listed in the manifest
        compiled.save(out, onnx=ns.backend == "onnx", companions=companions)
    if ns.backend == "onnx":
        print(f"wrote {out / 'model.onnx'}")
    print(f"saved to {out}")
    return 0


def _compile_decoder(ns: argparse.Namespace, loaded: Any, passes: str, calibration: Any) -> int:
    """--task text-generation-with-past: the decoder artifact (model.onnx with conventional
    names, genai_config.json, tokenizer; `fxforge.decoder_artifact`), exported once."""
    import fxforge

    if ns.backend.lower() != "onnx":
        raise CLIUsageError(f"--task {DECODER_TASK} writes an ONNX decoder artifact: pass --backend onnx")
    from fxforge.text_generation import dynamic_batch_example

    kwargs, note = dynamic_batch_example(loaded.kwargs)
    if note:
        print(f"note: {note}")
    # eager here: export_decoder exports the file once and checks it against the graph itself
    compiled = fxforge.compile(loaded.model, loaded.args, kwargs, passes=passes, backend="eager",
                               calibration=calibration)
    print(compiled.report)
    fxforge.export_decoder(compiled, ns.output, tokenizer=loaded.tokenizer, config=loaded.model.config)
    print(f"wrote decoder artifact {ns.output} (model.onnx, genai_config.json, tokenizer); "
          f"decode it with: fxforge generate {ns.output} --prompt \"...\"")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from fxforge.runtime.onnx_decoder import OnnxDecoder

    decoder = OnnxDecoder(ns.artifact, threads=ns.threads)
    texts = decoder.generate_text(ns.prompt, max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample,
                                  temperature=ns.temperature, top_k=ns.top_k, seed=ns.seed)
    for prompt, text in zip(ns.prompt, texts):
        print(f"{prompt}{text}")
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
    hf = p.add_argument_group("Hugging Face directories")
    # choices are checked by _check_hf_options, so a typo gets fxforge's one-line error
    hf.add_argument("--task", help="text-generation | text-generation-with-past | feature-extraction | fill-mask "
                                   "| text-classification (default: from config.json's architectures); "
                                   "text-generation-with-past writes a decoder artifact (model.onnx with "
                                   "conventional names, genai_config.json, tokenizer) for --backend onnx")
    hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights' dtype (default float32)")
    hf.add_argument("--seq", type=int, help="tokens per example input row (default 16)")
    hf.add_argument("--batch", type=int, help="example input rows (default 2; 1 fixes the batch to 1)")
    hf.add_argument("--calibration", help="text file (one sample per line) or .jsonl with a \"text\" field, "
                                          "for calibrated passes (gptq, awq, ...)")
    hf.add_argument("--calibration-samples", type=int, help="windows of text to calibrate on (default 128)")
    hf.add_argument("--calibration-seq", type=int, help="tokens per window (default 512, at most the model's limit)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("generate", help="decode a decoder artifact (fxforge compile --task "
                                        "text-generation-with-past) with ONNX Runtime", parents=[debug])
    p.add_argument("artifact", help="decoder artifact directory (model.onnx, genai_config.json, tokenizer)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_generate)

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


def entry() -> None:
    """The `fxforge` program: `main` on the command line's arguments, then exit with its status.

    The exit skips the interpreter's teardown: the objects left alive when the command is done
    (a traced model, its fake-tensor metadata, an ONNX graph: millions of them) took its final
    garbage collection 1.8 s after a 4-layer TinyLlama-shaped compile had written its artifact,
    and freezing them instead (`gc.freeze`) made triton's bindings (imported by torch) print a
    page of "nanobind: leaked ..." warnings. What a normal exit does for others still happens
    (`_exit_after_handlers`). Only `main` is meant for in-process callers.
    """
    _exit_after_handlers(main())


def _exit_after_handlers(status: int | None) -> None:
    """Exit like `sys.exit(status)` up to the interpreter's teardown, which is skipped: non-daemon
    threads are joined, exit handlers run (weakref finalizers such as temporary directories,
    logging's flush), stdout and stderr are flushed."""
    import atexit
    import threading

    code = 0 if status is None else int(status)
    shutdown = getattr(threading, "_shutdown", None)  # what a normal exit calls first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()


