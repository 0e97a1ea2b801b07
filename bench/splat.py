"""Benchmark kernels.rasterize_gaussians (3D Gaussian splatting) against its baselines.

    python bench/splat.py            # GPU: the issue's sizes (a)-(d), Triton vs reference vs gsplat
    python bench/splat.py --tiny     # CPU smoke run in seconds (reference paths + the interpreted kernel)

Cases (GPU): (a) GeoLRM: B=1, N=131072, V=8, 448x448, C=3, Gaussians filling a unit cube seen from a
camera ring; (b) B=4 of the same; (c) one 1920x1080 view of 1M Gaussians (gsplat's benchmark size);
(d) (a) with C=32 feature channels. Baselines in the same run: the pair-pruned torch reference where it
fits in memory, and gsplat's ``rasterization`` (RGB+D, packed=False) when ``import gsplat`` works.
Reported: median ms (triton.testing.do_bench on GPU, perf_counter medians on CPU) of forward and
forward+backward (loss on colour, alpha and depth), peak extra memory, and Gaussian-pixel evaluations
per second (intersections x 256 pixels per tile, the work the tiled kernel does before early exit).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if __package__:  # imported as bench.<op>
    from ._common import median_ms, peak_mib  # noqa: E402
else:  # run as `python bench/<op>.py`: bench/ is sys.path[0]
    from _common import median_ms, peak_mib  # noqa: E402


def camera_ring(B, V, W, H, radius=2.2, fov_deg=40.0, device="cpu"):
    vms, Ks = [], []
    f = 0.5 * H / math.tan(math.radians(fov_deg) / 2)
    for b in range(B):
        for v in range(V):
            a = 2 * math.pi * (v + 0.5 * b) / V
            eye = torch.tensor([radius * math.cos(a), radius * math.sin(a), 0.5], dtype=torch.float64)
            z = torch.nn.functional.normalize(-eye, dim=0)
            x = torch.nn.functional.normalize(torch.linalg.cross(z, torch.tensor([0, 0, 1.0], dtype=torch.float64)), dim=0)
            y = torch.linalg.cross(z, x)
            w2c = torch.eye(4, dtype=torch.float64)
            w2c[:3, :3] = torch.stack([x, y, z])
            w2c[:3, 3] = -w2c[:3, :3] @ eye
            vms.append(w2c)
            Ks.append(torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64))
    return (torch.stack(vms).reshape(B, V, 4, 4).float().to(device),
            torch.stack(Ks).reshape(B, V, 3, 3).float().to(device))


def make_gaussians(B, N, C, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    spacing = 1.0 / max(N, 1) ** (1 / 3)                      # Gaussians fill a unit cube
    means = torch.rand(B, N, 3, generator=g) - 0.5
    quats = torch.randn(B, N, 4, generator=g)
    scales = spacing * 0.6 * torch.exp(0.3 * torch.randn(B, N, 3, generator=g))
    opac = 0.1 + 0.8 * torch.rand(B, N, generator=g)
    colors = torch.rand(B, N, C, generator=g)
    return [t.to(device) for t in (means, quats, scales, opac, colors)]


def intersections(gs, vm, K, W, H):
    from kernels import splat as S
    m2d, con, dep, rad = S.project_gaussians(gs[0], gs[1], gs[2], vm, K, W, H)
    offsets, ids, _ = S._bin_gaussians(m2d, dep, rad, W, H)
    return ids.numel()


def run_case(name, B, V, N, C, W, H, impls, device, reps=3):
    gs = make_gaussians(B, N, C, device)
    vm, K = camera_ring(B, V, W, H, device=device)
    bg = torch.rand(B, V, C, device=device)
    n_isect = intersections(gs, vm, K, W, H)
    evals = n_isect * 256
    rows = []
    for label, fn in impls:
        params = [t.detach().clone().requires_grad_(True) for t in gs]

        def fwd():
            with torch.no_grad():
                return fn(*params, vm, K, W, H, bg)

        def fwd_bwd():
            c, a, d = fn(*params, vm, K, W, H, bg)
            (c.square().mean() + a.mean() + 1e-2 * d.mean()).backward()
        try:
            cuda = device == "cuda"
            # peak memory first (its call doubles as the GPU warm-up), then the median time
            mem_f = peak_mib(fwd, cuda)
            ms_f = median_ms(fwd, cuda, reps, warmup=5, rep=50)
            mem_b = peak_mib(fwd_bwd, cuda)
            ms_b = median_ms(fwd_bwd, cuda, reps, warmup=5, rep=50)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. the reference out of memory
            rows.append(f"| {name} | {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:60]} | | | | |")
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(f"| {name} | {label} | {ms_f:.2f} | {ms_b:.2f} | {mem_f:.0f} | {mem_b:.0f} | "
                    f"{evals / (ms_f * 1e-3):.3g} |")
    return rows, n_isect


def gsplat_impl():
    try:
        from gsplat import rasterization
    except Exception:  # noqa: BLE001 - optional baseline
        return None

    bg_with_depth = [True]   # whether gsplat wants a background channel for the depth output too

    def fn(means, quats, scales, opac, colors, vm, K, W, H, bg):
        kw = dict(near_plane=0.01, far_plane=1e10, eps2d=0.3, render_mode="RGB+D", packed=False)
        if bg_with_depth[0]:
            try:
                out, alpha, _ = rasterization(means, quats, scales, opac, colors, vm, K, W, H,
                                              backgrounds=torch.cat([bg, torch.zeros_like(bg[..., :1])], -1), **kw)
                return out[..., :-1], alpha, out[..., -1:]
            except (RuntimeError, ValueError, AssertionError):
                bg_with_depth[0] = False
        out, alpha, _ = rasterization(means, quats, scales, opac, colors, vm, K, W, H, backgrounds=bg, **kw)
        return out[..., :-1], alpha, out[..., -1:]
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (seconds)")
    ap.add_argument("--cpu-train-size", action="store_true", help="with --tiny: also B=2, V=6, N=8000 (slow)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for --tiny (1: stable on a shared CPU)")
    args = ap.parse_args()
    if args.tiny or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"   # before triton kernels are defined
    import kernels
    from kernels._splat_ref import rasterize_gaussians_ref

    def kern(m, q, s, o, c, vm, K, W, H, bg):
        return kernels.rasterize_gaussians(m, q, s, o, c, vm, K, W, H, background=bg)

    def ref(m, q, s, o, c, vm, K, W, H, bg):
        return rasterize_gaussians_ref(m, q, s, o, c, vm, K, W, H, background=bg)

    def ref_dense(m, q, s, o, c, vm, K, W, H, bg):
        return rasterize_gaussians_ref(m, q, s, o, c, vm, K, W, H, background=bg, dense=True)

    header = ["| case | impl | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | Gaussian-px evals/s (fwd) |",
              "|---|---|---|---|---|---|---|"]
    rows = []
    if args.tiny or not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
        print(f"CPU run (torch {torch.__version__}, {torch.get_num_threads()} threads); kernel = Triton interpreter")
        cpu_cases = {"tiny-geolrm": (1, 4, 2000, 3, 64, 64)}
        if args.cpu_train_size:
            cpu_cases["cpu-train"] = (2, 6, 8000, 3, 64, 64)
        for name, (B, V, N, C, W, H) in cpu_cases.items():
            r, n = run_case(name, B, V, N, C, W, H, [("reference (pairs, CPU path)", ref)], "cpu", reps=1)
            rows += r
            print(f"{name}: B={B} V={V} N={N} C={C} {W}x{H}, {n} intersections")
        B, V, N, C, W, H = 1, 1, 300, 3, 32, 32
        os.environ["NANO4D_FORCE_TRITON"] = "1"
        r, n = run_case("interp", B, V, N, C, W, H, [("triton (interpreter)", kern), ("reference (pairs)", ref),
                                                      ("reference (dense)", ref_dense)], "cpu", reps=1)
        rows += r
        print(f"interp: B={B} V={V} N={N} C={C} {W}x{H}, {n} intersections")
    else:
        import triton
        print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
        gsp = gsplat_impl()
        cases = {"(a) GeoLRM": (1, 8, 131072, 3, 448, 448), "(b) GeoLRM B=4": (4, 8, 131072, 3, 448, 448),
                 "(c) 1080p 1M": (1, 1, 1_000_000, 3, 1920, 1080), "(d) GeoLRM C=32": (1, 8, 131072, 32, 448, 448)}
        for name, (B, V, N, C, W, H) in cases.items():
            impls = [("triton", kern)]
            if gsp is not None:
                impls.append(("gsplat", gsp))
            if B * V * W * H <= 8 * 448 * 448 and N <= 131072:
                impls.append(("reference (pairs)", ref))
            r, n = run_case(name, B, V, N, C, W, H, impls, "cuda")
            rows += r
            print(f"{name}: B={B} V={V} N={N} C={C} {W}x{H}, {n} intersections", flush=True)
        if gsp is None:
            print("gsplat not importable: no gsplat baseline in this run")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
