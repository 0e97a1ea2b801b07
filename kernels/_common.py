"""Small shared pieces of the kernel-op pattern: dispatch, input validation, block sizes.

Every public op in ``kernels/`` follows the same shape (see README / docs/kernels.md):

    def op(x, ...):
        if use_triton(x):             # CUDA tensor, or NANO4D_FORCE_TRITON=1 on CPU
            return torch.ops.nano4d.op(x, ...)
        return op_ref(x, ...)         # pure-torch reference (the CPU path)

Validation helpers raise ``ValueError`` whose message names the offending argument.
This module must never import ``nano4d``.
"""
from __future__ import annotations

import os

import torch

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


def pick_block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two block covering ``n`` clamped to [lo, hi]; under the interpreter the largest
    block is preferred (each program costs ~0.4 ms there, so fewer, bigger programs win)."""
    b = next_pow2(max(int(n), 1))
    if interpreting():
        b = max(b, lo)
    return max(lo, min(hi, b))
