"""Shared helpers for fxforge's Triton kernels.

- `interpreting()`: True under TRITON_INTERPRET=1 (CPU tests). Kernels there must cast bf16
  to fp32 right after loading (the interpreter computes bf16 wrongly) and autotune with one
  config (`autotune_configs` does that).
- `compile_for_hopper(...)`: compiles a kernel for sm_90 without a GPU, so CI checks the GPU
  compiler's rules (dot shapes, dtypes, layouts) that the interpreter does not.
- `run_outside_interpreter(script)`: runs a compile check in a fresh Python process with
  TRITON_INTERPRET=0. Under the interpreter, triton's own library functions (tl.sum, tl.max,
  ...) are replaced by interpreter objects the GPU compiler cannot take, for the rest of the
  process, so tests (which run interpreted) compile kernels this way.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first under the interpreter (tuning there is meaningless)."""
    return configs[:1] if interpreting() else configs


def compile_for_hopper(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int = 4,
    num_stages: int = 3,
) -> Any:
    """Compile `kernel` (a @triton.jit function, not an autotuned one) for an H100 target.

    `signature` maps every argument name to a Triton type ("*fp16", "i32", "constexpr", ...);
    `constexprs` gives the constexpr values. Returns the compiled kernel (its `.asm` holds
    ttir/ttgir/llir/ptx/cubin). Raises triton's CompilationError on a rule violation.
    """
    source = ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def _jit_function(kernel: Any) -> triton.runtime.JITFunction:
    """The JITFunction behind `kernel`, unwrapping autotuner/heuristics wrappers.

    Under TRITON_INTERPRET=1 `@triton.jit` yields an InterpretedFunction, which the compiler
    cannot take, so the plain Python function is jitted afresh.
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if isinstance(fn, triton.runtime.JITFunction):
        return fn
    return triton.runtime.JITFunction(fn)


def run_outside_interpreter(script: str, timeout: float = 600) -> str:
    """Run `script` in a new Python process with TRITON_INTERPRET=0; return its stdout.

    Raises RuntimeError with the child's stderr when it fails.
    """
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"compile check failed:\n{done.stderr[-4000:]}")
    return done.stdout
