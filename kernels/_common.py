"""Small shared pieces of the kernel-op pattern: dispatch, launching, accumulation dtype, validation,
block sizes.

Every kernel file ``kernels/<op>.py`` has the same skeleton: module docstring (math, layouts, dtypes,
limits), ``@triton.jit`` kernels (pointer arguments named ``<name>_ptr``), the pure-torch ``<op>_ref``,
launchers that call :func:`launch`, the registered ops ``nano4d::<op>`` / ``nano4d::<op>_backward``, and
the public op:

    def op(x, ...):
        if use_triton(x):             # CUDA tensor, or NANO4D_FORCE_TRITON=1 on CPU
            return torch.ops.nano4d.op(x, ...)
        return op_ref(x, ...)         # pure-torch reference (the CPU path)

Validation helpers raise ``ValueError`` whose message names the offending argument.
This module must never import ``nano4d``.
"""
from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def force_triton() -> bool:
    """True when ``NANO4D_FORCE_TRITON=1``: CPU tensors go through the Triton interpreter."""
    return os.environ.get("NANO4D_FORCE_TRITON", "0") not in ("", "0", "false", "False")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch predicate: CUDA tensors -> Triton kernel; CPU tensors -> reference,
    unless ``NANO4D_FORCE_TRITON=1`` (then the interpreter runs the kernel on CPU)."""
    if any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
        return True
    return force_triton()


def tracing() -> bool:
    """True while torch.compile / export traces the caller: value checks that need a host sync are
    skipped then (the traced graph must not read tensor values on the host)."""
    return torch.compiler.is_compiling()


def acc_dtype(*xs) -> torch.dtype:
    """The accumulation dtype of a kernel over these tensors / dtypes: fp64 if any is fp64, else fp32."""
    return torch.float64 if any(getattr(x, "dtype", x) == torch.float64 for x in xs) else torch.float32


def tl_dtype(dt: torch.dtype):
    """Triton dtype of a torch float dtype (for ``ACC`` / compute-dtype constexprs)."""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dt]


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` the way every op in this package does.

    On CUDA it enters the device of the first CUDA tensor argument (tensors on ``cuda:1`` while
    ``cuda:0`` is current launch on ``cuda:1``). FMA contraction is requested explicitly
    (``TRITON_DEFAULT_FP_FUSION=1`` unless the user set it: Triton 3.10 turns it off by default, and the
    kernels' accuracy and speed were measured with it on). Under the CPU interpreter the kernel runs in
    a fresh thread with numpy's floating-point warnings off: (1) overflow to inf is the intended limit in
    several kernels (e.g. sigmoid of very negative x) and numpy would warn on every op; (2) CPython 3.11
    frees and re-maps a 16 KB frame-stack chunk on every call made right at a chunk boundary, and deep
    callers (pytest + hypothesis) put the interpreter's per-op calls there; a new thread starts with an
    empty frame stack.
    """
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
    if dev is not None:
        with torch.cuda.device(dev):
            kernel[grid](*args, **kwargs)
        return
    if not interpreting():
        kernel[grid](*args, **kwargs)
        return
    err = []

    def target():
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # numpy's "All-NaN slice" from a NaN max
                kernel[grid](*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)

    th = threading.Thread(target=target, name="nano4d-triton-interpreter")
    th.start()
    th.join()
    if err:
        raise err[0]


# ----------------------------------------------------------------------------- validation

def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, shape=None,
                 device: torch.device | None = None, last_contiguous: bool = False) -> torch.Tensor:
    """Validate one tensor argument; raise ``ValueError`` naming ``name``.

    ``shape`` is a tuple whose entries are ints or ``None`` (any size) and must match ``t.shape``.
    ``last_contiguous`` demands stride 1 along the last dim (what vectorized loads need).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} not supported (expected one of {names})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected {device} (all inputs must share one device)")
    if last_contiguous and t.ndim > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors must share one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k}: on device {v.device}, but {items[0][0]} is on {dev}")
    return dev


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (one reduction; use where cheap)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def check_index_range(name: str, n: int, limit: int = 2**31 - 1) -> int:
    """Raise ``ValueError`` if an index space of ``n`` elements overflows ``limit`` (int32 by default)."""
    if n > limit:
        raise ValueError(f"{name}: {n} elements exceed the kernel's index range ({limit})")
    return n


# ----------------------------------------------------------------------------- block sizes

def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
