"""Benchmark NeuS SDF ray marching: the fused Triton kernel vs the grid_sample + cumprod reference and
torch.compile(reference), forward and forward+backward.

    python bench/sdf_render.py            # real sizes (needs a GPU)
    python bench/sdf_render.py --tiny     # CPU smoke run (the kernel runs in Triton's interpreter)

Cases (issue 6): (a) MIM4D / UniPAD: volume C = 33 (SDF + 32 features), Z x Y x X = 5 x 128 x 128, B = 2,
R = 6 cameras x 2048 rays, S = 96 samples; (b) a dense 64^3 volume, C = 33, B = 1, R = 65536, S = 128.

Scene: the SDF is a ground plane (z = -0.3 in the volume frame) plus a few spheres plus small noise;
features are N(0, 1). Rays start near the centre (the ego vehicle), directions uniform on the sphere with
|z| <= 0.5 before normalising, t stratified in [0.02, 0.9] (inside the box). About half of the rays hit something and stop
early (the kernel marches until T < 1e-4; the reference always evaluates every sample); the table reports
the mean number of sections the kernel marched.

Reported per implementation: median ms (``triton.testing.do_bench`` on GPU, perf_counter median on CPU),
peak memory above the inputs (``torch.cuda.max_memory_allocated`` delta; CPU: n/a) and samples/s
(B*R*S / time, samples counted whether or not the kernel skipped them).
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

import kernels  # noqa: E402,F401  (registers torch.ops.nano4d.render_sdf)
from kernels.sdf_render import render_sdf_ref  # noqa: E402
if __package__:  # imported as bench.<op>
    from ._common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402
else:  # run as `python bench/<op>.py`: bench/ is sys.path[0]
    from _common import fmt_mib, median_ms, peak_mib, print_header  # noqa: E402

# name: (B, C, Z, Y, X, R, S)
CASES = {
    "a_mim4d": (2, 33, 5, 128, 128, 6 * 2048, 96),
    "b_dense64": (1, 33, 64, 64, 64, 65536, 128),
}
TINY = {
    "tiny_mim4d": (1, 9, 3, 8, 8, 64, 12),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make(case, vol_dtype, device, seed=0):
    B, C, Z, Y, X, R, S = case
    gen = torch.Generator(device="cpu").manual_seed(seed)
    zs, ys, xs = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (Z, Y, X)], indexing="ij")
    sdf = zs + 0.3                                                     # ground plane
    for _ in range(6):                                                 # a few spheres
        c = torch.rand(3, generator=gen) * 1.6 - 0.8
        r = 0.05 + 0.2 * torch.rand(1, generator=gen)
        sdf = torch.minimum(sdf, ((xs - c[0]) ** 2 + (ys - c[1]) ** 2 + (zs - c[2]) ** 2).sqrt() - r)
    vol = torch.randn(B, C, Z, Y, X, generator=gen)
    vol[:, 0] = sdf + 0.02 * vol[:, 0]
    origins = torch.randn(B, R, 3, generator=gen) * 0.05
    dirs = torch.randn(B, R, 3, generator=gen)
    dirs[..., 2] = dirs[..., 2].clamp(-0.5, 0.5)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    edges = torch.linspace(0.02, 0.9, S + 1)
    t = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(B, R, S, generator=gen)
    inv_s = torch.tensor(20.0)
    g = [torch.randn(B, R, C - 1, generator=gen), torch.randn(B, R, generator=gen), torch.randn(B, R, generator=gen)]
    inputs = [vol.to(device=device, dtype=vol_dtype)] + [x.to(device) for x in (origins, dirs, t, inv_s)]
    return inputs, [x.to(device) for x in g]


def triton_op(*args):
    return torch.ops.nano4d.render_sdf(*args)[:3]


def bench_one(name, case, dtype, device, impls, reps):
    cuda = device.type == "cuda"
    inputs, gouts = make(case, dtype, device)
    B, C, Z, Y, X, R, S = case
    samples = B * R * S
    with torch.no_grad():
        nsec = torch.ops.nano4d.render_sdf(*inputs)[3].float().mean().item()
    rows = []
    ref_out = None
    for impl, f in impls.items():
        def fwd():
            with torch.no_grad():
                return f(*inputs)

        leaves = [x.detach().requires_grad_(i != 1) for i, x in enumerate(inputs)]  # origins: no grad

        def fwd_bwd():
            out = f(*leaves)
            return torch.autograd.grad(out, [x for x in leaves if x.requires_grad],
                                       [g.to(o.dtype) for g, o in zip(gouts, out)])

        try:
            out = fwd()
            if ref_out is None:
                ref_out = [o.float() for o in out]
            err = max((o.float() - r).abs().max().item() for o, r in zip(out, ref_out))
            t_f, m_f = median_ms(fwd, cuda, reps), peak_mib(fwd, cuda)
            t_fb, m_fb = median_ms(fwd_bwd, cuda, reps), peak_mib(fwd_bwd, cuda)
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | OOM | | | | | | |")
            torch.cuda.empty_cache()
            continue
        rows.append(f"| {name} | {str(dtype)[6:]} | {impl} | {t_f:.3f} | {fmt_mib(m_f)} | {samples / t_f / 1e6:.3g} | "
                    f"{t_fb:.3f} | {fmt_mib(m_fb)} | {samples / t_fb / 1e6:.3g} | {err:.1e} | {nsec:.1f} / {S - 1} |")
        del leaves
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default=None, help="volume dtypes, comma-separated of fp32,bf16,fp16 "
                    "(default fp32,bf16; rays stay fp32)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    ap.add_argument("--compile", action="store_true", help="with --tiny: include torch.compile(reference)")
    ap.add_argument("--reps", type=int, default=2, help="CPU timing repetitions")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        ap.error("real sizes need a GPU; use --tiny on CPU")
    if not cuda:
        os.environ["NANO4D_FORCE_TRITON"] = "1"
    cases = TINY if args.tiny else CASES
    if args.cases:
        cases = {k: cases[k] for k in args.cases.split(",")}
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32" if args.tiny else "fp32,bf16")).split(",")]
    impls = {"reference": render_sdf_ref, "triton": triton_op}
    if not args.no_compile and (args.compile or not args.tiny):
        impls["compile(ref)"] = torch.compile(render_sdf_ref, dynamic=False)

    print_header("sdf_render", cuda)
    print("| case | vol dtype | impl | fwd ms | fwd MiB | fwd Msamples/s | fwd+bwd ms | fwd+bwd MiB "
          "| fwd+bwd Msamples/s | max err vs ref | sections marched |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        for dtype in dtypes:
            for row in bench_one(name, case, dtype, device, impls, args.reps):
                print(row, flush=True)


if __name__ == "__main__":
    main()
