"""FlashAttention-style tolerance check, used by every kernel test.

A kernel output ``out`` in some dtype is compared against the fp64 reference ``ref64`` with a bound set
by how far the *reference itself*, run in the same low dtype (``ref_lo``), strays from fp64:

    max|out - ref64| <= k * max|ref_lo - ref64| + atol(dtype)

k = 2 for forward outputs, 3 for gradients.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def err_report(name: str, out: torch.Tensor, ref: torch.Tensor) -> str:
    d = (out.double() - ref.double()).abs()
    if d.numel() == 0:
        return f"{name}: empty"
    bad = int(torch.argmax(torch.nan_to_num(d, nan=float("inf"))).item())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), d.shape))
    return (f"{name}: max err {d.max().item():.3e}, mean err {d.mean().item():.3e}, worst at {idx}: "
            f"got {out.reshape(-1)[bad].item():.6g}, expected {ref.reshape(-1)[bad].item():.6g}")


def assert_close_fa(out: torch.Tensor, ref64: torch.Tensor, ref_lo: torch.Tensor | None = None, *,
                    k: float = 2.0, atol: float | None = None, dtype: torch.dtype | None = None,
                    name: str = "output") -> None:
    """Assert ``max|out - ref64| <= k * max|ref_lo - ref64| + atol`` (``ref_lo`` defaults to ``ref64``)."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    dtype = dtype or out.dtype
    atol = ATOL.get(dtype, 1e-5) if atol is None else atol
    if out.numel() == 0:
        return
    if not torch.isfinite(out).all() and torch.isfinite(ref64).all():
        raise AssertionError(f"{name}: non-finite values where the reference is finite\n"
                             + err_report(name, out, ref64))
    base = 0.0 if ref_lo is None else (ref_lo.double() - ref64.double()).abs().max().item()
    err = (out.double() - ref64.double()).abs().max().item()
    bound = k * base + atol
    if not err <= bound:
        raise AssertionError(f"{name}: kernel err {err:.3e} > {k}*ref_lo err {base:.3e} + atol {atol:.1e} "
                             f"= {bound:.3e}\n" + err_report(name, out, ref64))
