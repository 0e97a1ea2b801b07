"""Benchmark trilinear volume sampling: the Triton kernel vs the 8-corner gather reference and
``F.grid_sample`` on a 5-D volume, forward, forward+backward, and the second-order pass of an SDF field.

    python bench/trilinear.py            # real sizes (needs a GPU)
    python bench/trilinear.py --tiny     # CPU smoke run in seconds (the kernel runs in Triton's interpreter)

Cases: (a) MIM4D / UniPAD render field: 96 samples x 2048 rays x 6 cameras (1,179,648 points) into one
frame's 32 x 5 x 128 x 128 volume; (b) the same rays rendered for the 4 volumes of one MIM4D step
(2 targets x {encoded, predicted}, batch 4); (c) a dense 64^3 16-channel volume with 2^20 points.

Passes: ``fwd`` (no grad), ``fwd+bwd`` (gradients w.r.t. volume and points), and ``2nd`` = what the
official SDF field does per step: ``gp = autograd.grad(out, points, g, create_graph=True)``, then a loss on
``gp`` backpropagated to the volume (the double backward). Recent PyTorch differentiates 5-D grid_sample
twice; where a version cannot, the ``2nd`` cell says "unsupported".
Reported: median ms (``triton.testing.do_bench`` on GPU; a perf_counter median on CPU), peak memory above
the inputs (MiB; CPU: n/a), forward throughput in G samples/s (points x channels) and the max error of
the forward output vs the reference. Inputs are random: volume ~ N(0, 1), points uniform in [-1.05, 1.05]^3.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402,F401  (registers torch.ops.nano4d.trilinear)
from kernels.trilinear import trilinear_ref  # noqa: E402
if __package__:  # imported as bench.<op>
    from ._common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402
else:  # run as `python bench/<op>.py`: bench/ is sys.path[0]
    from _common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402

# name: (B, C, Z, Y, X, N)
CASES = {
    "a_mim4d_frame": (1, 32, 5, 128, 128, 96 * 2048 * 6),
    "b_mim4d_step": (4, 32, 5, 128, 128, 96 * 2048 * 6),
    "c_dense64": (1, 16, 64, 64, 64, 2**20),
}
TINY = {"tiny_mim4d": (1, 32, 5, 8, 8, 300)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grid_sample_3d(volume, points):
    """The PyTorch peer: F.grid_sample on (B, C, Z, Y, X) with the points as a (B, 1, 1, N, 3) grid."""
    B, C = volume.shape[:2]
    out = F.grid_sample(volume, points.view(B, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out.view(B, C, -1).transpose(1, 2)


def make(case, dtype, device, seed=0):
    B, C, Z, Y, X, N = case
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vol = torch.randn(B, C, Z, Y, X, generator=gen).to(device=device, dtype=dtype)
    pts = (torch.rand(B, N, 3, generator=gen) * 2.1 - 1.05).to(device)
    g = torch.randn(B, N, C, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(B, N, 3, generator=gen).to(device)
    return vol, pts, g, q


def bench_one(name, case, dtype, device, impls, reps):
    cuda = device.type == "cuda"
    vol, pts, g, q = make(case, dtype, device)
    B, C, Z, Y, X, N = case
    rows, ref_out = [], None
    for impl, f in impls.items():
        V = vol.detach().requires_grad_()
        P = pts.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                return f(vol, pts)

        def fwd_bwd():
            return torch.autograd.grad(f(V, P), (V, P), g)

        def second():
            (gp,) = torch.autograd.grad(f(V, P), P, g, create_graph=True)
            return torch.autograd.grad((gp * q).sum(), V)

        try:
            out = fwd()
            if ref_out is None:
                ref_out = out.float()
            err = (out.float() - ref_out).abs().max().item()
            t_f, m_f = median_ms(fwd, cuda, reps), peak_mib(fwd, cuda)
            t_fb, m_fb = median_ms(fwd_bwd, cuda, reps), peak_mib(fwd_bwd, cuda)
            try:
                t_2, m_2 = median_ms(second, cuda, reps), peak_mib(second, cuda)
                cells_2 = f"{t_2:.3f} | {fmt_mib(m_2)}"
            except (RuntimeError, NotImplementedError) as e:   # grid_sample: no double backward
                cells_2 = f"unsupported ({type(e).__name__}) | -"
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | OOM | | | | | | | |")
            torch.cuda.empty_cache()
            continue
        rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | {t_f:.3f} | {fmt_mib(m_f)} | {t_fb:.3f} | "
                    f"{fmt_mib(m_fb)} | {cells_2} | {B * N * C / t_f / 1e6:.3g} | {err:.1e} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default fp32,bf16)")
    ap.add_argument("--reps", type=int, default=2, help="CPU timing repetitions")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        ap.error("real sizes need a GPU; use --tiny on CPU")
    cases = TINY if args.tiny else CASES
    if args.cases:
        cases = {k: cases[k] for k in args.cases.split(",")}
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32" if args.tiny else "fp32,bf16")).split(",")]
    impls = {"reference": trilinear_ref, "triton": torch.ops.nano4d.trilinear, "grid_sample": grid_sample_3d}

    print_header("trilinear", cuda)
    print("| case | dtype | impl | fwd ms | fwd MiB | fwd+bwd ms | fwd+bwd MiB | 2nd ms | 2nd MiB "
          "| fwd Gsamples/s | max err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        for dtype in dtypes:
            for row in bench_one(name, case, dtype, device, impls, args.reps):
                print(row, flush=True)


if __name__ == "__main__":
    main()
