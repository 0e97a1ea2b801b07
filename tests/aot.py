"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and does not prove they compile for a
GPU: layouts, tl.dot shapes, register and shared-memory pressure are only checked by the real
compiler. ``aot_compile`` runs that compiler for sm_90 (H100) and sm_80 (A100) and checks the result.

    from tests.aot import aot_compile
    aot_compile(_my_fwd_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128})

Why a worker process: under the interpreter, ``@triton.jit`` (ours and Triton's own standard library,
e.g. ``tl.sum``) yields interpreter objects that the compiler cannot take, and importing Triton's
code generator in that state fails. So compilation runs in one long-lived child process started
*without* TRITON_INTERPRET, which imports the kernel's module afresh (real ``JITFunction``s) and answers
compile requests (pickled over its stdin/stdout). It starts on first use (~2-3 s) and serves every test.
Kernels must be defined at module level (importable by module name or file path).
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import pickle
import select
import subprocess
import sys
import types

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in max dynamic shared memory per block (bytes)
TARGETS = (90, 80)


class AOTError(AssertionError):
    pass


class Compiled:
    """What the worker sends back: ``asm`` (ptx text, cubin bytes) and ``metadata`` (shared bytes,
    num_warps, num_stages, registers/spills when the compiler reports them)."""

    def __init__(self, asm: dict, metadata: dict):
        self.asm = asm
        self.metadata = types.SimpleNamespace(**metadata)

    def __repr__(self):
        return f"Compiled(shared={self.metadata.shared}, cubin={len(self.asm.get('cubin') or b'')} B)"


def _kernel_location(fn):
    """(module name, file path, attribute name) of a ``@triton.jit`` function, unwrapping
    InterpretedFunction / heuristics / autotune wrappers."""
    for _ in range(4):
        if hasattr(fn, "__module__") and hasattr(fn, "__qualname__") and isinstance(fn, types.FunctionType):
            break
        fn = getattr(fn, "fn")
    mod = sys.modules.get(fn.__module__)
    path = getattr(mod, "__file__", None) or fn.__code__.co_filename
    return fn.__module__, path, fn.__name__


def _serve():  # runs in the child process: ``python -c "import tests.aot as a; a._serve()"``
    os.environ.pop("TRITON_INTERPRET", None)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")                          # replies go to the real stdout...
    os.dup2(2, 1)                                             # ...anything printed goes to stderr
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    modules = {}
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:
            return
        modname, path, name, signature, constexprs, arch, opts = req
        try:
            if modname not in modules:
                try:
                    modules[modname] = importlib.import_module(modname)
                except ImportError:
                    spec = importlib.util.spec_from_file_location(modname, path)
                    mod = importlib.util.module_from_spec(spec)
                    sys.modules[modname] = mod
                    spec.loader.exec_module(mod)
                    modules[modname] = mod
            fn = getattr(modules[modname], name)
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn                                    # heuristics / autotune wrappers
            src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs))
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
            md = {"shared": int(c.metadata.shared), "num_warps": int(c.metadata.num_warps),
                  "num_stages": int(c.metadata.num_stages)}
            for k in ("n_regs", "n_spills"):
                if hasattr(c, k):
                    md[k] = int(getattr(c, k))
            reply = ("ok", {"ptx": c.asm.get("ptx", ""), "cubin": bytes(c.asm.get("cubin") or b"")}, md)
        except Exception as e:  # noqa: BLE001 - every compiler failure is reported to the caller
            reply = ("error", f"{type(e).__name__}: {e}", None)
        pickle.dump(reply, out)
        out.flush()


_WORKER = {}


def _get_worker():
    proc = _WORKER.get("proc")
    if proc is not None and proc.poll() is None:
        return proc
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", "import tests.aot as a; a._serve()"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=here)
    _WORKER["proc"] = proc
    atexit.register(_stop_worker)
    return proc


def _stop_worker():
    proc = _WORKER.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def aot_compile(fn, signature: dict, constexprs: dict | None = None, targets=TARGETS, num_warps: int = 4,
                num_stages: int = 3, timeout: float = 300.0, shared_limit: dict | None = None):
    """Compile ``fn`` (a module-level ``@triton.jit`` function) for each CUDA arch in ``targets``.

    ``signature`` maps every argument name to a Triton type string ("*fp32", "*bf16", "i32", "i64",
    "fp32", ...) or "constexpr"; ``constexprs`` gives the values of the constexpr arguments.
    Returns ``{arch: Compiled}``; each has ``asm["cubin"]`` (bytes), ``asm["ptx"]`` and
    ``metadata.shared`` (bytes). Raises ``AOTError`` when compilation fails, no cubin is produced, or
    shared memory exceeds the target's per-block limit (``shared_limit`` overrides ``SHARED_LIMIT``).
    """
    limits = {**SHARED_LIMIT, **(shared_limit or {})}
    modname, path, name = _kernel_location(fn)
    constexprs = dict(constexprs or {})
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    out = {}
    for arch in targets:
        proc = _get_worker()
        pickle.dump((modname, path, name, dict(signature), constexprs, arch, opts), proc.stdin)
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], timeout)[0]:
            proc.kill()
            raise AOTError(f"{name}: compile for sm_{arch} timed out after {timeout} s")
        try:
            status, asm, md = pickle.load(proc.stdout)
        except EOFError:                                      # the compiler crashed the worker
            raise AOTError(f"{name}: compiler process died compiling for sm_{arch} "
                           f"(exit code {proc.wait()})") from None
        if status != "ok":
            raise AOTError(f"{name}: compile for sm_{arch} failed with constexprs={constexprs}: {asm}")
        compiled = Compiled(asm, md)
        if not asm["cubin"]:
            raise AOTError(f"{name}: no cubin for sm_{arch}")
        if md["shared"] > limits[arch]:
            raise AOTError(f"{name}: sm_{arch} needs {md['shared']} B shared memory > limit "
                           f"{limits[arch]} B (constexprs={constexprs}, num_stages={num_stages})")
        out[arch] = compiled
    return out
