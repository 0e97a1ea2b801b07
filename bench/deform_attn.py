"""Benchmark multi-scale deformable attention: the Triton kernel vs the grid_sample reference and
torch.compile(reference), forward and forward+backward.

    python bench/deform_attn.py            # real sizes (needs a GPU)
    python bench/deform_attn.py --tiny     # CPU smoke run in seconds (the kernel runs in Triton's interpreter)

Cases (issue 4): (a) GeoLRM reconstruction cross-attention, views folded into batch (B*V = 8 and 21);
(b) GeoLRM proposal network (D = 24); (c) MIM4D / BEVFormer temporal decoder (queue of 2 folded into
batch); (d) Deformable-DETR encoder (~20k queries = the 4 maps' pixels); (e) the msda-triton README
shape (RTX 2060 numbers published there: CUDA 5.37 / Triton 3.78 ms fwd, 28.04 / 22.78 ms fwd+bwd).

Reported per implementation: median ms (``triton.testing.do_bench`` on GPU, a perf_counter median on
CPU), peak memory above the inputs (``torch.cuda.max_memory_allocated`` delta; CPU: n/a) and GB/s of
sampled data: every sample reads 4 corners x D channels of ``value``, so forward moves
``B*Q*H*M*P*4*D*itemsize`` bytes; the backward reads them again and adds as many fp32 atomics into
grad_value, so fwd+bwd counts ``3x`` that (an accounting convention, not a hardware counter).
Inputs are random: value ~ N(0, 1), locations uniform in [-0.1, 1.1], softmax weights.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402,F401  (registers torch.ops.nano4d.deform_attn)
from kernels.deform_attn import deform_attn_ref  # noqa: E402
if __package__:  # imported as bench.<op>
    from ._common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402
else:  # run as `python bench/<op>.py`: bench/ is sys.path[0]
    from _common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402

# name: (B, Q, H, D, [(H_m, W_m)], P)
CASES = {
    "a_geolrm_bv8": (8, 8192, 16, 48, [(112, 112), (64, 64)], 8),
    "a_geolrm_bv21": (21, 8192, 16, 48, [(112, 112), (64, 64)], 8),
    "b_geolrm_proposal": (8, 4096, 16, 24, [(112, 112), (64, 64)], 8),
    "c_mim4d_temporal": (2 * 2, 128 * 128, 4, 32, [(128, 128)], 4),
    "d_detr_encoder": (2, 19947, 8, 32, [(100, 150), (50, 75), (25, 38), (13, 19)], 4),
    "e_msda_triton_readme": (4, 10000, 8, 32, [(64, 64), (32, 32), (16, 16), (8, 8)], 4),
}
TINY = {
    "tiny_geolrm": (2, 32, 2, 48, [(7, 9), (4, 5)], 4),
    "tiny_mim4d": (2, 32, 1, 32, [(8, 8)], 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make(case, dtype, device, seed=0):
    B, Q, H, D, shapes, P = case
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, M = int(sizes.sum()), len(shapes)
    value = torch.randn(B, S, H, D, generator=gen)
    loc = torch.rand(B, Q, H, M, P, 2, generator=gen) * 1.2 - 0.1
    w = torch.randn(B, Q, H, M * P, generator=gen).softmax(-1).view(B, Q, H, M, P)
    gout = torch.randn(B, Q, H * D, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), ss.to(device), starts.to(device), loc.to(**to), w.to(**to)), gout.to(**to)


def bench_one(name, case, dtype, device, impls, reps):
    cuda = device.type == "cuda"
    (value, ss, starts, loc, w), gout = make(case, dtype, device)
    B, Q, H, D, shapes, P = case
    sampled = B * Q * H * len(shapes) * P * 4 * D * value.element_size()
    rows = []
    ref_out = None
    for impl, f in impls.items():
        def fwd():
            with torch.no_grad():
                return f(value, ss, starts, loc, w)

        leaves = [t.detach().requires_grad_() for t in (value, loc, w)]

        def fwd_bwd():
            out = f(leaves[0], ss, starts, leaves[1], leaves[2])
            return torch.autograd.grad(out, leaves, gout)

        try:
            out = fwd()
            if ref_out is None:
                ref_out = out.float()
            err = (out.float() - ref_out).abs().max().item()
            t_f, m_f = median_ms(fwd, cuda, reps), peak_mib(fwd, cuda)
            t_fb, m_fb = median_ms(fwd_bwd, cuda, reps), peak_mib(fwd_bwd, cuda)
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | OOM | | | | | | |")
            torch.cuda.empty_cache()
            continue
        rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | {t_f:.3f} | {fmt_mib(m_f)} | {sampled / t_f / 1e6:.3g} | "
                    f"{t_fb:.3f} | {fmt_mib(m_fb)} | {3 * sampled / t_fb / 1e6:.3g} | {err:.1e} |")
        del leaves
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default fp32,bf16)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    ap.add_argument("--compile", action="store_true", help="with --tiny: include torch.compile(reference) "
                    "(CPU inductor compile takes about a minute)")
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
    impls = {"reference": deform_attn_ref, "triton": torch.ops.nano4d.deform_attn}
    # torch.compile on CPU needs a C++ toolchain and ~a minute per shape: --tiny leaves it out
    if not args.no_compile and (args.compile or not args.tiny):
        impls["compile(ref)"] = torch.compile(deform_attn_ref, dynamic=False)

    print_header("deform_attn", cuda)
    print("| case | dtype | impl | fwd ms | fwd MiB | fwd GB/s | fwd+bwd ms | fwd+bwd MiB | fwd+bwd GB/s "
          "| max err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        for dtype in dtypes:
            for row in bench_one(name, case, dtype, device, impls, args.reps):
                print(row, flush=True)


if __name__ == "__main__":
    main()
