"""Static kernel profile without a GPU: what the compiler makes of every kernel at the models' shapes.

    python bench/static.py                 # all ops, sm_90 + sm_80 (a few minutes on 2 CPU cores)
    python bench/static.py --ops deform_attn,sdf_render --archs 90

For every public op at the model shapes of ``bench/<op>.py`` it runs one forward + backward with
``NANO4D_FORCE_TRITON=1`` inside ``tests.aot.capture_launches`` (nothing is launched, except the splat
projection, which the binning needs, run by the interpreter), counts host syncs per public call with
``tests.sync_count.count_host_syncs`` (Tensor.item / tolist / __bool__ / ... reads; each is a blocking
device->host copy on CUDA), and compiles each distinct launch exactly as the JIT would on the target
(``aot_compile_launch``: Triton's own specialization, the launch's num_warps / num_stages / constexprs).
Per kernel it prints ``ptxas -v`` registers, spill stores / loads, stack, shared memory; from the SASS
(``cuobjdump -sass``) the instruction count of the whole kernel and of its hottest loop (the largest
innermost loop; kernels with several innermost loops are listed after the table with each one's size) with, inside that loop, global loads (vector ones: 64/128-bit), local-memory accesses
(spills), atomics, MUFU (hardware transcendental) and 64-bit integer instructions (``.X`` carries and
``IMAD.WIDE``: index math in int64); from the PTX the atomics and how many of them are ``.relaxed``.
The first table also lists the torch-level copies and fills of at least 2^20 elements that a call makes
around its kernels (layout copies, zero-filled buffers; from the CPU profiler). Big inputs are ``torch.empty`` (never touched: the launches do not run), so model sizes cost little memory.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"          # kernels defined as interpreter functions: runnable on CPU
os.environ["NANO4D_FORCE_TRITON"] = "1"       # public ops take the kernel path on CPU tensors
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import kernels  # noqa: E402
from tests.aot import aot_compile_launch, capture_launches  # noqa: E402
from tests.sync_count import count_host_syncs  # noqa: E402


# ----------------------------------------------------------------------------- the model shapes

def _leaf(*shape, dtype=torch.float32, fill=None):
    t = torch.empty(*shape, dtype=dtype) if fill is None else fill(*shape).to(dtype)
    return t.requires_grad_()


def deform_attn_cases():
    """bench/deform_attn.py cases that the models run (GeoLRM reconstruction fp32 + bf16, proposal D=24,
    MIM4D temporal)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from deform_attn import CASES
    for name, dtype in (("a_geolrm_bv8", torch.float32), ("a_geolrm_bv8", torch.bfloat16),
                        ("b_geolrm_proposal", torch.float32), ("c_mim4d_temporal", torch.float32)):
        B, Q, H, D, shapes, P = CASES[name]
        S, M = sum(h * w for h, w in shapes), len(shapes)
        ss = torch.tensor(shapes, dtype=torch.int64)
        starts = torch.tensor([sum(h * w for h, w in shapes[:m]) for m in range(M)], dtype=torch.int64)
        value = _leaf(B, S, H, D, dtype=dtype)
        loc = _leaf(B, Q, H, M, P, 2, dtype=dtype, fill=torch.rand)
        w = _leaf(B, Q, H, M, P, dtype=dtype, fill=torch.rand)
        label = f"deform_attn {name} D={D} {str(dtype)[6:]}"
        yield label, "default (tensor shapes)", lambda: kernels.deform_attn(value, ss, starts, loc, w), (value, loc, w)
        if "validate" in kernels.deform_attn.__code__.co_varnames:
            yield label, "trusted (validate=False)", \
                lambda: kernels.deform_attn(value, ss, starts, loc, w, validate=False), (value, loc, w)
            yield label, "Python-int shapes", \
                lambda: kernels.deform_attn(value, shapes, None, loc, w), (value, loc, w)


def patch_attention_cases():
    """MuM decoder (frame-wise and global ids), MuM encoder (no ids), GeoLRM ragged; bf16 as trained."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from patch_attn import cases
    for name, B, H, N, D, seg in cases(tiny=False):
        if name.startswith("fa_sweep"):
            continue
        q, k, v = (_leaf(B, H, N, D, dtype=torch.bfloat16) for _ in range(3))
        yield f"patch_attention {name} N={N} D={D} bf16", "default", \
            lambda q=q, k=k, v=v, seg=seg: kernels.patch_attention(q, k, v, seg), (q, k, v)


def render_sdf_cases():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from sdf_render import CASES
    B, C, Z, Y, X, R, S = CASES["a_mim4d"]
    vol = _leaf(B, C, Z, Y, X)
    o = _leaf(B, R, 3, fill=torch.zeros)
    d = _leaf(B, R, 3, fill=torch.ones)
    t = torch.linspace(0, 1, S).expand(B, R, S).contiguous().requires_grad_()
    inv_s = torch.tensor(20.0, requires_grad=True)
    kw = {"validate": False} if "validate" in kernels.render_sdf.__code__.co_varnames else None
    yield f"render_sdf a_mim4d C={C} {Z}x{Y}x{X} R={R} S={S}", "default", \
        lambda: kernels.render_sdf(vol, o, d, t, inv_s), (vol, o, d, t, inv_s)
    if kw:
        yield f"render_sdf a_mim4d C={C} {Z}x{Y}x{X} R={R} S={S}", "trusted (validate=False)", \
            lambda: kernels.render_sdf(vol, o, d, t, inv_s, **kw), (vol, o, d, t, inv_s)


def splat_cases():
    """GeoLRM render: 1 scene, 8 views of 448x448, 131072 Gaussians, RGB (bench/splat.py case (a))."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from splat import camera_ring, make_gaussians
    B, V, N, C, W, H = 1, 8, 131072, 3, 448, 448
    gs = [t.requires_grad_() for t in make_gaussians(B, N, C)]
    vm, K = camera_ring(B, V, W, H)
    yield f"rasterize_gaussians GeoLRM B={B} V={V} N={N} C={C} {W}x{H}", "default", \
        lambda: kernels.rasterize_gaussians(*gs, vm, K, W, H), gs


OPS = {"deform_attn": deform_attn_cases, "patch_attention": patch_attention_cases, "render_sdf": render_sdf_cases,
       "splat": splat_cases}
RUN_FOR_REAL = ("_splat_project_fwd_kernel",)     # results feed host-side binning: run in the interpreter


# ----------------------------------------------------------------------------- capture

BIG = 1 << 20          # elements: a torch-level copy / fill at least this big is listed per call
_MOVES = ("aten::copy_", "aten::cat", "aten::zero_")   # zero_ = a zero-filled buffer


def big_moves(prof) -> str:
    """Whole-tensor copies / fills (>= BIG elements) that the launchers make with torch ops, e.g. a layout
    copy of the input or a zero-filled output, as ``name xcount``."""
    counts = {}
    for e in prof.events():
        if e.name in _MOVES and e.input_shapes and e.input_shapes[0]:
            n = 1
            for d in e.input_shapes[0]:
                n *= d
            if n >= BIG:
                counts[e.name[6:]] = counts.get(e.name[6:], 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"


def capture(fn, leaves):
    """(launches, host syncs fwd, host syncs bwd, big torch copies/fills fwd, bwd) of one public call."""
    from torch.profiler import ProfilerActivity, profile
    with capture_launches(run=lambda name: name in RUN_FOR_REAL) as launches:
        with count_host_syncs() as fwd_syncs, profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pf:
            out = fn()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        grads = [torch.ones_like(o) for o in outs]
        with count_host_syncs() as bwd_syncs, profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pb:
            torch.autograd.backward(outs, grads)
    for t in leaves:
        t.grad = None
    return launches, fwd_syncs, bwd_syncs, big_moves(pf), big_moves(pb)


# ----------------------------------------------------------------------------- SASS / PTX analysis

def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_stats(cubin: bytes) -> dict:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(sass)]
    ins = [(a, t) for a, t in ins if not t.startswith("NOP")]
    addr = [a for a, _ in ins]
    loops = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:          # (the kernel's trailing `BRA self` is no loop)
            lo = min(range(len(addr)), key=lambda j: abs(addr[j] - int(m.group(1), 16)))
            loops.append((lo, i))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    hot = max(inner, key=lambda lp: lp[1] - lp[0], default=(0, len(ins) - 1))
    body = [t for _, t in ins[hot[0]:hot[1] + 1]]

    def count(pat, seq):
        return sum(1 for t in seq if re.search(pat, t))
    return {
        "sass": len(ins), "loop": len(body) if loops else 0,
        "inner": sorted((hi - lo + 1 for lo, hi in inner), reverse=True) if loops else [],   # every innermost loop
        "ldg": count(r"\bLDG\b|\bLDG\.", body), "ldg_vec": count(r"\bLDG\.E\.(64|128)", body),
        "local": count(r"\b(LDL|STL)\b", body), "atomics": count(r"\b(REDG?|ATOMG?)(\.|\b)", body),
        "mufu": count(r"\bMUFU\.", body), "i64": count(r"\.X\b|IMAD\.WIDE", body),
    }


def ptx_atomics(ptx: str):
    ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, flags=re.M)
    return len(ops), sum(1 for o in ops if ".relaxed" in o)


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated of {','.join(OPS)}")
    ap.add_argument("--archs", default="90,80", help="comma-separated CUDA archs (default 90,80)")
    ap.add_argument("--no-compile", action="store_true", help="only the host-sync / copy table (seconds)")
    args = ap.parse_args()
    archs = tuple(int(a) for a in args.archs.split(","))
    import triton
    print(f"# static kernel profile  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"torch {torch.__version__}; triton {triton.__version__}; archs {archs}; no GPU needed\n")
    print("Host syncs per public call (forward / backward):\n")
    print("| case | path | fwd syncs | bwd syncs | where | torch copies/fills >= 1M elements fwd | bwd |")
    print("|---|---|---|---|---|---|---|")
    launches_by_case = {}
    for op in args.ops.split(","):
        for label, path, fn, leaves in OPS[op]():
            launches, fs, bs, mf, mb = capture(fn, leaves)
            where = "; ".join(sorted({c.split(" at ")[-1].replace(ROOT + "/", "") for c in fs.calls + bs.calls}))
            print(f"| {label} | {path} | {fs.count} | {bs.count} | {where or '-'} | {mf} | {mb} |", flush=True)
            launches_by_case.setdefault(label, launches)
    if args.no_compile:
        return
    print("\nKernels (sm_90 unless a column says sm_80; loop = the largest innermost SASS loop):\n")
    cols = ["case", "kernel", "warps", "regs", "spill st/ld B", "stack B", "shared B", "SASS", "loop",
            "LDG (vec)", "LDL/STL", "atomics (relaxed PTX)", "MUFU", "64-bit int"]
    if 80 in archs:
        cols += ["sm_80 regs", "sm_80 spill st/ld B"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    several = []      # kernels with more than one innermost loop (e.g. patch_attn's masked + unmasked tiles)
    for label, launches in launches_by_case.items():
        seen = set()
        for launch in launches:
            key = (launch.name, launch.args, tuple(sorted(launch.kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                comp = aot_compile_launch(launch, targets=archs, stats=True)
            except AssertionError as e:
                print(f"| {label} | {launch.name} | compile failed: {str(e).splitlines()[0][:120]} |")
                continue
            c = comp[archs[0]]
            md = c.metadata
            ss = sass_stats(c.asm["cubin"])
            n_at, n_rel = ptx_atomics(c.asm["ptx"])
            row = [label, launch.name, md.num_warps, md.regs, f"{md.spill_stores}/{md.spill_loads}", md.stack,
                   md.shared, ss["sass"], ss["loop"], f"{ss['ldg']} ({ss['ldg_vec']})", ss["local"],
                   f"{ss['atomics']} ({n_rel}/{n_at})", ss["mufu"], ss["i64"]]
            if 80 in archs:
                m8 = comp[80].metadata
                row += [m8.regs, f"{m8.spill_stores}/{m8.spill_loads}"]
            print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
            if len(ss["inner"]) > 1:
                several.append(f"- {label}, {launch.name}: {' / '.join(str(n) for n in ss['inner'])}")
    if several:
        print(f"\nKernels with several innermost loops (SASS instructions of each, sm_{archs[0]}):\n")
        print("\n".join(dict.fromkeys(several)))


if __name__ == "__main__":
    main()
