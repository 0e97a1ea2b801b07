"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and does not prove they compile for a
GPU: layouts, tl.dot shapes, register and shared-memory pressure are only checked by the real
compiler. This module runs that compiler for sm_90 (H100) and sm_80 (A100) on the code the JIT runs.

Compile exactly what a launch runs (preferred): capture the launches an op makes, without running them,
then compile each with the JIT's own specialization (pointers and ints divisible by 16, ints equal to 1
turned into constants, bools, dtypes), computed by Triton's binder from the captured arguments:

    from tests.aot import aot_compile_launch, capture_launches
    with capture_launches() as launches:
        my_op(x_meta, ...)                  # meta / CPU / CUDA tensors; nothing is launched
    for launch in launches:
        aot_compile_launch(launch)          # {arch: Compiled}

Or compile one kernel from an explicit signature (all pointers taken as 16-byte aligned, as fresh
allocations are; no int specialization unless ``attrs`` says so):

    aot_compile(_my_fwd_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128})

Why a worker process: under the interpreter, ``@triton.jit`` (ours and Triton's own standard library,
e.g. ``tl.sum``) yields interpreter objects that the compiler cannot take, and importing Triton's
code generator in that state fails. So compilation runs in one long-lived child process started
*without* TRITON_INTERPRET, which imports the kernel's module afresh (real ``JITFunction``s) and answers
compile requests (pickled over its stdin/stdout). It starts on first use (~2-3 s) and serves every test.
Kernels must be defined at module level (importable by module name or file path). Captured tensors
travel as (dtype, data pointer) only, so meta tensors capture model-sized launches for free.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import pickle
import select
import subprocess
import sys
import types
from typing import NamedTuple

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


class Launch(NamedTuple):
    """One captured ``kernel[grid](*args, **kwargs)``: the kernel's location and picklable argument
    descriptions (tensors become ``("tensor", dtype, data_ptr)``, Triton dtypes ``("tldtype", name)``)."""
    module: str
    path: str
    name: str
    grid: tuple
    args: tuple
    kwargs: dict

    def __repr__(self):
        return f"Launch({self.name}, grid={self.grid})"


def _describe(x):
    import torch
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype).replace("torch.", ""), int(x.data_ptr()))
    if type(x).__name__ in ("dtype", "pointer_type") and hasattr(x, "name") and type(x).__module__.startswith("triton"):
        return ("tldtype", x.name)
    if isinstance(x, (bool, int, float, str, type(None))):
        return x
    if hasattr(x, "value") and type(x).__name__ == "constexpr":
        return _describe(x.value)
    raise TypeError(f"cannot describe kernel argument of type {type(x).__name__}")


@contextlib.contextmanager
def capture_launches(gpu_config: bool = True, run=None):
    """Inside the block every ``kernel[grid](...)`` launch (JIT or interpreter) is recorded, not run.
    Yields the list the ``Launch`` records are appended to. ``gpu_config``: launchers pick the block
    sizes they use on a GPU even in an interpreted session (``TRITON_INTERPRET`` reads as off inside
    the block; Triton itself only reads it when a kernel is defined). ``run``: optional predicate on the
    kernel name; those kernels are recorded and also run (e.g. one whose results host code reads)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = []

    saved = [(cls, cls.__dict__["run"]) for cls in (JITFunction, InterpretedFunction)]
    originals = dict(saved)
    env = os.environ.get("TRITON_INTERPRET")

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        mod, path, name = _kernel_location(self)
        g = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        launches.append(Launch(mod, path, name, tuple(int(v) for v in g), tuple(_describe(a) for a in args),
                               {k: _describe(v) for k, v in kwargs.items()}))
        if run is not None and run(name):
            inner = os.environ.get("TRITON_INTERPRET")
            if env is None:                    # the kernel runs under the session's own setting
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = env
            try:
                return originals[type(self) if type(self) in originals else JITFunction](
                    self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                if inner is not None:
                    os.environ["TRITON_INTERPRET"] = inner
        return None

    try:
        for cls, _ in saved:
            cls.run = record
        if gpu_config:
            os.environ["TRITON_INTERPRET"] = "0"
        yield launches
    finally:
        for cls, fn in saved:
            cls.run = fn
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


class _FakeTensor:
    """What the JIT's binder reads from a tensor argument: its dtype and data pointer."""

    def __init__(self, dtype, ptr):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self):
        return self._ptr


def _rebuild(x):
    if isinstance(x, tuple) and len(x) == 3 and x[0] == "tensor":
        import torch
        return _FakeTensor(getattr(torch, x[1]), x[2])
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "tldtype":
        import triton.language as tl
        return tl.dtype(x[1])
    return x


def _load_fn(modules, modname, path, name):
    import triton
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
        fn = fn.fn                                            # heuristics / autotune wrappers
    return fn


def _jit_source(fn, backend, args, kwargs):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _ptxas_stats(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """Registers, spill stores/loads, stack and local bytes from ``ptxas -v`` (the flags Triton uses)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
               src, "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    out = {}
    for key, pat in (("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame"),
                     ("lmem", r"(\d+) bytes lmem")):
        m = re.search(pat, log)
        out[key] = int(m.group(1)) if m else 0
    return out


def _serve():  # runs in the child process: ``python -c "import tests.aot as a; a._serve()"``
    os.environ.pop("TRITON_INTERPRET", None)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")                          # replies go to the real stdout...
    os.dup2(2, 1)                                             # ...anything printed goes to stderr
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    modules = {}
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:
            return
        kind, (modname, path, name), payload, arch, opts, stats = req
        try:
            fn = _load_fn(modules, modname, path, name)
            target = GPUTarget("cuda", arch, 32)
            if kind == "launch":                              # the JIT's own specialization
                args, kwargs = payload
                src, options = _jit_source(fn, make_backend(target), [_rebuild(a) for a in args],
                                           {k: _rebuild(v) for k, v in kwargs.items()})
                copts = options.__dict__
            else:                                             # explicit signature
                signature, constexprs, attrs = payload
                constexprs = {k: _rebuild(v) for k, v in constexprs.items()}
                src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
                copts = opts
            c = triton.compile(src, target=target, options=copts)
            md = {"shared": int(c.metadata.shared), "num_warps": int(c.metadata.num_warps),
                  "num_stages": int(c.metadata.num_stages), "name": c.metadata.name}
            if stats:
                md.update(_ptxas_stats(c.asm["ptx"], arch, bool(getattr(c.metadata, "enable_fp_fusion", True))))
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


def _request(kind, where, payload, arch, opts, stats, timeout, name):
    proc = _get_worker()
    pickle.dump((kind, where, payload, arch, opts, stats), proc.stdin)
    proc.stdin.flush()
    if not select.select([proc.stdout], [], [], timeout)[0]:
        proc.kill()
        raise AOTError(f"{name}: compile for sm_{arch} timed out after {timeout} s")
    try:
        return pickle.load(proc.stdout)
    except EOFError:                                          # the compiler crashed the worker
        raise AOTError(f"{name}: compiler process died compiling for sm_{arch} "
                       f"(exit code {proc.wait()})") from None


def _check_reply(reply, name, arch, what, limits, hint):
    status, asm, md = reply
    if status != "ok":
        raise AOTError(f"{name}: compile for sm_{arch} failed with {what}: {asm}")
    if not asm["cubin"]:
        raise AOTError(f"{name}: no cubin for sm_{arch}")
    if md["shared"] > limits[arch]:
        raise AOTError(f"{name}: sm_{arch} needs {md['shared']} B shared memory > limit "
                       f"{limits[arch]} B ({hint})")
    return Compiled(asm, md)


def aot_compile_launch(launch: Launch, targets=TARGETS, timeout: float = 300.0, shared_limit: dict | None = None,
                       stats: bool = False):
    """Compile one captured launch for each arch in ``targets`` exactly as ``JITFunction.run`` would on
    such a device: same specialization (Triton's binder on the captured dtypes, pointers and ints), same
    options (num_warps / num_stages / constexprs passed at the launch). ``stats=True`` adds ``ptxas -v``
    numbers to ``metadata`` (regs, spill_stores, spill_loads, stack, lmem). Returns ``{arch: Compiled}``."""
    limits = {**SHARED_LIMIT, **(shared_limit or {})}
    where = (launch.module, launch.path, launch.name)
    out = {}
    for arch in targets:
        reply = _request("launch", where, (launch.args, launch.kwargs), arch, None, stats, timeout, launch.name)
        out[arch] = _check_reply(reply, launch.name, arch, "the launch's arguments", limits,
                                 f"kwargs={launch.kwargs}")
    return out


def aot_compile(fn, signature: dict, constexprs: dict | None = None, targets=TARGETS, num_warps: int = 4,
                num_stages: int = 3, timeout: float = 300.0, shared_limit: dict | None = None,
                attrs: dict | None = None, stats: bool = False):
    """Compile ``fn`` (a module-level ``@triton.jit`` function) for each CUDA arch in ``targets``.

    ``signature`` maps every argument name to a Triton type string ("*fp32", "*bf16", "i32", "i64",
    "fp32", ...) or "constexpr"; ``constexprs`` gives the values of the constexpr arguments.
    Every pointer argument is compiled as 16-byte aligned (what the JIT sees for fresh allocations);
    ``attrs`` ({arg name: [["tt.divisibility", 16]], ...}) replaces that. Prefer ``capture_launches`` +
    ``aot_compile_launch``, which also specializes ints the way the JIT does.
    Returns ``{arch: Compiled}``; each has ``asm["cubin"]`` (bytes), ``asm["ptx"]`` and
    ``metadata.shared`` (bytes). Raises ``AOTError`` when compilation fails, no cubin is produced, or
    shared memory exceeds the target's per-block limit (``shared_limit`` overrides ``SHARED_LIMIT``).
    """
    limits = {**SHARED_LIMIT, **(shared_limit or {})}
    modname, path, name = _kernel_location(fn)
    constexprs = {k: _describe(v) for k, v in (constexprs or {}).items()}
    names = list(signature)
    if attrs is None:
        attrs = {n: [["tt.divisibility", 16]] for n, t in signature.items() if str(t).startswith("*")}
    attr_idx = {(names.index(k),): v for k, v in attrs.items()}
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    out = {}
    for arch in targets:
        reply = _request("signature", (modname, path, name), (dict(signature), constexprs, attr_idx), arch, opts,
                         stats, timeout, name)
        out[arch] = _check_reply(reply, name, arch, f"constexprs={constexprs}", limits,
                                 f"constexprs={constexprs}, num_stages={num_stages}")
    return out
