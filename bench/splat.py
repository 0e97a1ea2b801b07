"""Benchmark kernels.rasterize_gaussians (3D Gaussian splatting) against its baselines.

    python bench/splat.py            # GPU: sizes (a)-(d) below, Triton vs reference vs gsplat
    python bench/splat.py --tiny     # CPU smoke run in seconds (reference paths + the interpreted kernel)
    python bench/splat.py --static   # no GPU needed: compile for sm_90 as the JIT would, read ptxas -v and SASS

Cases (GPU): (a) GeoLRM: B=1, N=131072, V=8, 448x448, C=3, Gaussians filling a unit cube seen from a
camera ring; (b) B=4 of the same; (c) one 1920x1080 view of 1M Gaussians (gsplat's benchmark size);
(d) (a) with C=32 feature channels. Baselines in the same run: the pair-pruned torch reference where it
fits in memory, and gsplat's ``rasterization`` (RGB+D, packed=False) when ``import gsplat`` works.
Reported: median ms (triton.testing.do_bench on GPU, perf_counter medians on CPU) of forward and
forward+backward (loss on colour, alpha and depth), peak extra memory, and Gaussian-pixel evaluations
per second (intersections x 256 pixels per tile, the work the tiled kernel does before early exit).

``--static`` (case (a), C = 3, or ``--channels``): the launchers' real block sizes and the JIT's argument
specialization (Triton's own binder on meta tensors: 16-byte-aligned pointers, ints divisible by 16),
compiled for sm_90 (``--arch``); per kernel: registers, spill bytes and stack from ``ptxas -v`` (the
ptxas shipped in the triton wheel), SASS instructions of the hottest (longest innermost) loop and per pixel-Gaussian
pair (loop length / pairs one thread handles per iteration), atomics in that loop and whether they are
relaxed (no fence). ``--json`` prints the same as JSON.
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


# ----------------------------------------------------------------------------- static profile (no GPU)

def _jit_compile(kernel, args, kwargs, arch):
    """Compile ``kernel`` as ``kernel[grid](*args, **kwargs)`` would on an sm_``arch`` GPU: Triton's binder
    computes the specialization from the (meta) arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_v(ptx, arch):
    import re
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_tool("ptxas-blackwell" if os.path.exists(_tool("ptxas-blackwell")) else "ptxas"),
               f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src, "-o", os.path.join(d, "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    num = lambda pat: int(re.search(pat, out).group(1)) if re.search(pat, out) else 0  # noqa: E731
    return {"regs": num(r"Used (\d+) registers"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _sass_loops(cubin):
    """SASS instructions and the backward-branch loops [(first, last instruction index)] of a cubin."""
    import re
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    ins, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = re.match(r"^\s*(\.L\w+):", line)
        if lab:
            pending.append(lab.group(1))
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            for lb in pending:
                labels[lb] = len(ins)
            pending = []
            ins.append(m.group(2))
    loops = []
    for i, t in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?(\.L\w+)", t)
        if m and m.group(1) in labels and labels[m.group(1)] < i:          # (not the BRA-to-self after EXIT)
            loops.append((labels[m.group(1)], i))
    return ins, loops


def static_profile(C=3, arch=90):
    """Per rasterizer/projection kernel at case (a): registers, spills, SASS per pair, atomics (see the
    module docstring). The launchers' own block-size functions give the configuration."""
    import triton.language as tl
    from kernels import splat as S
    B, V, N, H, W = 1, 8, 131072, 448, 448
    TW, NT, M = triton_cdiv(W, S.TILE), triton_cdiv(W, S.TILE) * triton_cdiv(H, S.TILE), 7_000_000
    f = lambda *s, dt=torch.float32: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    m2d, con, dep, opa, col, bg = f(B, V, N, 2), f(B, V, N, 3), f(B, V, N), f(B, N), f(B, N, C), f(B, V, C)
    off, ids, i32 = f(B * V * NT + 1, dt=torch.int32), f(M, dt=torch.int32), torch.int32
    CB, nw = S._raster_blocks(C)
    img = lambda c: f(B, V, H, W, c)  # noqa: E731
    pix_per_thread = S.TILE * S.TILE // (32 * nw)
    cases = {
        "raster fwd": (S._splat_raster_fwd_kernel,
                       [m2d, con, dep, opa, col, bg, off, ids, img(C), img(1), img(1), f(B, V, H, W), f(B, V, H, W, dt=i32),
                        N, V, C, H, W, TW, NT],
                       dict(TILE=S.TILE, R=1, CB=CB, CHUNK=S._CHUNK, ACC=tl.float32, num_warps=nw), pix_per_thread),
        "raster bwd": (S._splat_raster_bwd_kernel,
                       [m2d, con, dep, opa, col, bg, off, ids, f(B, V, H, W), f(B, V, H, W, dt=i32), f(B, V, C, H, W),
                        img(1), img(1), f(B, V, N, 2), f(B, V, N, 3), f(B, V, N), f(B, N), f(B, N, C), N, V, C, H, W, TW, NT],
                       dict(TILE=S.TILE, R=1, CB=CB, ONE_CB=C <= CB, ACC=tl.float32, num_warps=nw), pix_per_thread),
    }
    pts = [f(B, N, 3), f(B, N, 4), f(B, N, 3), f(B, V, 4, 4), f(B, V, 3, 3)]
    blk = 256
    cases["project fwd"] = (S._splat_project_fwd_kernel,
                            pts + [m2d, con, dep, f(B, V, N, dt=i32), N, V, W, H, 0.01, 1e10, 0.3],
                            dict(BLOCK=blk, ACC=tl.float32), None)
    cases["project bwd"] = (S._splat_project_bwd_kernel,
                            pts + [f(B, V, N, dt=i32), m2d, con, dep, f(B, V, N, 3), f(B, V, N, 4), f(B, V, N, 3), N, V, 0.3],
                            dict(BLOCK=blk, ACC=tl.float32), None)
    rows = {}
    for name, (kern, args, kw, ppt) in cases.items():
        c = _jit_compile(kern, args, kw, arch)
        r = _ptxas_v(c.asm["ptx"], arch)
        ins, loops = _sass_loops(c.asm["cubin"])
        inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
        lo, hi = max(inner, key=lambda ab: ab[1] - ab[0]) if inner else (0, len(ins) - 1)   # hottest: innermost
        body = ins[lo:hi + 1]
        opcode = lambda t: t.split()[1 if t.startswith("@") else 0].split(".")[0]  # noqa: E731
        atoms = [t for t in body if opcode(t) in ("RED", "REDG", "ATOM", "ATOMG")]
        r.update(sass_total=len(ins), loop=hi - lo + 1,
                 per_pair=round((hi - lo + 1) / ppt, 1) if ppt else None,
                 atomics_in_loop=len(atoms), fences_in_loop=sum("MEMBAR" in t or "FENCE" in t for t in body),
                 ptx_atomics_not_relaxed=sum(1 for ln in c.asm["ptx"].splitlines()
                                             if ln.strip().startswith(("atom.", "red.")) and ".relaxed" not in ln),
                 shared=int(c.metadata.shared), num_warps=kw.get("num_warps", 4))
        rows[name] = r
    return rows


def triton_cdiv(a, b):
    return -(-a // b)


def print_static(rows, C, arch, as_json=False):
    import json
    if as_json:
        print(json.dumps(rows))
        return
    print(f"sm_{arch}, case (a) GeoLRM: B=1, V=8, N=131072, 448x448, C={C}; JIT specialization, ptxas -v")
    print("| kernel | warps | regs | spill st/ld B | stack B | SASS hot loop | per pair | atomics in loop (fences) | non-relaxed PTX atomics |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        loop = r["loop"] if r["per_pair"] is not None else f"(no loop; {r['sass_total']} total)"
        print(f"| {name} | {r['num_warps']} | {r['regs']} | {r['spill_st']} / {r['spill_ld']} | {r['stack']} | {loop} | "
              f"{r['per_pair'] if r['per_pair'] is not None else '-'} | {r['atomics_in_loop']} ({r['fences_in_loop']}) | "
              f"{r['ptx_atomics_not_relaxed']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (seconds)")
    ap.add_argument("--cpu-train-size", action="store_true", help="with --tiny: also B=2, V=6, N=8000 (slow)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for --tiny (1: stable on a shared CPU)")
    ap.add_argument("--static", action="store_true", help="compile for a GPU target without one; registers, spills, SASS")
    ap.add_argument("--arch", type=int, default=90, help="with --static: CUDA arch (90 = H100, 80 = A100)")
    ap.add_argument("--channels", type=int, default=3, help="with --static: colour channels C")
    ap.add_argument("--json", action="store_true", help="with --static: print JSON")
    args = ap.parse_args()
    if args.static:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        print_static(static_profile(args.channels, args.arch), args.channels, args.arch, args.json)
        return
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
