"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and does not prove they compile for a
GPU: layouts, tl.dot shapes, register and shared-memory pressure are only checked by the real
compiler. ``aot_compile`` runs that compiler for sm_90 (H100) and sm_80 (A100) and checks the result.

    from tests.aot import aot_compile
    aot_compile(_my_fwd_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128})
"""
from __future__ import annotations

import os
import types

# The AOT path needs the real compiler, not the interpreter; it does not need a device.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in max dynamic shared memory per block (bytes)
TARGETS = (90, 80)


class AOTError(AssertionError):
    pass


def aot_compile(fn, signature: dict, constexprs: dict | None = None, targets=TARGETS, num_warps: int = 4,
                num_stages: int = 3):
    """Compile ``fn`` (a ``@triton.jit`` function) for each CUDA arch in ``targets``.

    ``signature`` maps every argument name to a Triton type string ("*fp32", "*bf16", "i32", "i64",
    "fp32", ...) or "constexpr"; ``constexprs`` gives the values of the constexpr arguments.
    Returns ``{arch: compiled}``; each compiled object has a cubin and ``metadata.shared`` (bytes).
    Raises ``AOTError`` when compilation fails, no cubin is produced, or shared memory exceeds the
    target's per-block limit.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    out = {}
    prev = os.environ.pop("TRITON_INTERPRET", None)  # the compiler path must not be interpreted
    fn, restore = _as_jit(fn)
    try:
        for arch in targets:
            src = ASTSource(fn=fn, signature=dict(signature), constexprs=constexprs)
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": num_warps, "num_stages": num_stages})
            except Exception as e:  # noqa: BLE001 - report any compiler failure as a test failure
                raise AOTError(f"{getattr(fn, '__name__', fn)}: compile for sm_{arch} failed with "
                               f"constexprs={constexprs}: {type(e).__name__}: {e}") from e
            if not compiled.asm.get("cubin"):
                raise AOTError(f"{fn.__name__}: no cubin for sm_{arch}")
            shared = int(compiled.metadata.shared)
            if shared > SHARED_LIMIT[arch]:
                raise AOTError(f"{fn.__name__}: sm_{arch} needs {shared} B shared memory > limit "
                               f"{SHARED_LIMIT[arch]} B (constexprs={constexprs}, num_stages={num_stages})")
            out[arch] = compiled
    finally:
        restore()
        if prev is not None:
            os.environ["TRITON_INTERPRET"] = prev
    return out


def _as_jit(fn):
    """Return a compilable ``JITFunction`` for ``fn`` and a function that undoes any patching.

    Under ``TRITON_INTERPRET=1`` (set by tests/conftest.py on CPU) ``@triton.jit`` yields
    ``InterpretedFunction`` objects, which the compiler cannot take. We rebuild a ``JITFunction`` from
    the Python source and, for the duration of the compile, swap the interpreted ``@triton.jit``
    helpers the kernel calls (in its module, and in modules that module imports) for JIT ones.
    ``@triton.heuristics`` / ``@triton.autotune`` wrappers are unwrapped to the kernel they wrap.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, (JITFunction, InterpretedFunction)) and hasattr(fn, "fn"):
        fn = fn.fn  # Heuristics / Autotuner

    def convert(f):
        return JITFunction(f.fn, **{k: v for k, v in f.kwargs.items() if k in _JIT_KWARGS})

    if not isinstance(fn, InterpretedFunction):
        return fn, lambda: None
    jit = convert(fn)
    patched = []  # (namespace dict, key, old value)
    spaces = [jit.fn.__globals__]
    spaces += [v.__dict__ for v in jit.fn.__globals__.values() if isinstance(v, types.ModuleType)
               and getattr(v, "__name__", "").split(".")[0] not in ("triton", "torch", "numpy")]
    for ns in spaces:
        for k, v in list(ns.items()):
            if isinstance(v, InterpretedFunction):
                patched.append((ns, k, v))
                ns[k] = convert(v)

    def restore():
        for ns, k, v in patched:
            ns[k] = v
    return jit, restore


_JIT_KWARGS = ("version", "do_not_specialize", "do_not_specialize_on_alignment", "debug", "noinline",
               "repr", "launch_metadata")
