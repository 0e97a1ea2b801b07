"""Benchmark: masked patch attention (kernels/patch_attn.py) vs PyTorch SDPA and FlexAttention.

    python bench/patch_attn.py            # GPU: the model sizes and FlashAttention's sweep, bf16
    python bench/patch_attn.py --tiny     # CPU: tiny shapes through the Triton interpreter (CI smoke run)

Cases (issue 5):
  (a) MuM decoder: 8 samples x 12 views x 197 tokens, H=16, D=48, global (one id per sample) and
      frame-wise (id = view index);
  (b) MuM encoder: 96 images x 50 visible tokens, H=16, D=64 (dense, no ids);
  (c) GeoLRM: 4 objects with 8192/6000/3000/500 anchors padded to 8192, H=16, D=48 (-1 on padding);
  (d) FlashAttention's sweep: 16k tokens per batch, seq 512..16k, D=64 and 128 (H = 2048 / D), no mask.
Baselines in the same run: F.scaled_dot_product_attention (dense; with a boolean mask built from the
ids where the case has ids) and FlexAttention with a block mask from the ids (compiled), plus the pure
torch reference where its N x N memory fits. Reported: median ms (triton.testing.do_bench on GPU),
peak memory delta (MB) and TFLOP/s in FlashAttention's convention, fwd = 4*H*D*(attended pairs),
fwd+bwd = 3.5 x fwd, where **attended pairs counts only unmasked (i, j) pairs** (for a dense case,
B*N^2). SDPA with a boolean mask does the full N^2 work; its TFLOP/s uses the same unmasked count, so
the numbers compare time-to-solution. SDPA gives NaN on fully masked (padding) rows; it is timed anyway.
"""
from __future__ import annotations

import argparse
import os
import sys

TINY = "--tiny" in sys.argv
if TINY:
    try:
        import torch as _t
        _cuda = _t.cuda.is_available()
    except ImportError:
        _cuda = False
    if not _cuda:  # must be set before triton / kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("NANO4D_FORCE_TRITON", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.patch_attn import patch_attention, patch_attention_ref  # noqa: E402
if __package__:  # imported as bench.<op>
    from ._common import fmt_mib, median_ms, peak_mib  # noqa: E402
else:  # run as `python bench/<op>.py`: bench/ is sys.path[0]
    from _common import fmt_mib, median_ms, peak_mib  # noqa: E402


# ----------------------------------------------------------------------------- cases

def _views(B, V, n):
    return torch.arange(V).repeat_interleave(n).repeat(B, 1)


def cases(tiny: bool):
    """(name, B, H, N, D, segment_ids or None)."""
    if tiny:
        return [
            ("mum_dec_global", 1, 2, 2 * 20, 48, torch.zeros(1, 40, dtype=torch.long)),
            ("mum_dec_framewise", 1, 2, 2 * 20, 48, _views(1, 2, 20)),
            ("mum_enc", 4, 1, 10, 64, None),
            ("geolrm_ragged", 2, 2, 64, 48, torch.tensor([[0] * 64, [0] * 23 + [-1] * 41])),
            ("fa_sweep_n64_d64", 1, 2, 64, 64, None),
        ]
    out = [
        ("mum_dec_global", 8, 16, 12 * 197, 48, torch.zeros(8, 12 * 197, dtype=torch.long)),
        ("mum_dec_framewise", 8, 16, 12 * 197, 48, _views(8, 12, 197)),
        ("mum_enc", 96, 16, 50, 64, None),
    ]
    seg = torch.full((4, 8192), -1, dtype=torch.long)
    for b, L in enumerate((8192, 6000, 3000, 500)):
        seg[b, :L] = 0
    out.append(("geolrm_ragged", 4, 16, 8192, 48, seg))
    for D in (64, 128):
        for N in (512, 1024, 2048, 4096, 8192, 16384):
            out.append((f"fa_sweep_n{N}_d{D}", 16384 // N, 2048 // D, N, D, None))
    return out


def attended_pairs(B, N, seg):
    if seg is None:
        return B * N * N
    allowed = 0
    for b in range(B):
        s = seg[b]
        s = s[s >= 0]
        _, counts = torch.unique(s, return_counts=True)
        allowed += int((counts.double() ** 2).sum())
    return allowed


# ----------------------------------------------------------------------------- implementations

def make_impls(B, H, N, D, seg, device, dtype, tiny):
    impls = {"nano4d": lambda q, k, v: patch_attention(q, k, v, seg)}
    if seg is None:
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    else:
        mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0))[:, None]
        impls["sdpa_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_bytes = B * H * N * N * 4 * 3
    if tiny or ref_bytes < 8e9:
        impls["ref"] = lambda q, k, v: patch_attention_ref(q, k, v, seg)
        if device == "cuda":
            ref_c = torch.compile(patch_attention_ref)
            impls["ref_compiled"] = lambda q, k, v: ref_c(q, k, v, seg)
    if device == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
            if seg is None:
                impls["flex"] = lambda q, k, v: flex(q, k, v)
            else:
                ids = seg

                def mask_mod(b, h, qi, kj):
                    return (ids[b, qi] == ids[b, kj]) & (ids[b, kj] >= 0)

                bm = create_block_mask(mask_mod, B, None, N, N, device=device, _compile=True)
                impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
        except Exception as e:  # noqa: BLE001 - a missing baseline is reported, not fatal
            print(f"# FlexAttention unavailable: {type(e).__name__}: {e}")
    return impls


def bench_fn(fn, device, reps):
    return median_ms(fn, device == "cuda", reps, warmup=25, rep=reps * 10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (interpreter), seconds")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt_name]
    reps = args.reps or (2 if args.tiny else 20)
    if device == "cuda":
        import triton
        print(f"# device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    else:
        print(f"# device: CPU ({'Triton interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else 'eager'}),"
              f" torch {torch.__version__}; timings are NOT GPU numbers")
    print(f"# dtype {dt_name}; TFLOP/s count only unmasked (i, j) pairs; fwd+bwd FLOPs = 3.5 x fwd")
    print("| case | B | H | N | D | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MB (f+b) | "
          "nano4d f+b speedup vs this |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    only = [s for s in args.only.split(",") if s]
    torch.manual_seed(0)
    for name, B, H, N, D, seg in cases(args.tiny):
        if only and not any(s in name for s in only):
            continue
        seg = None if seg is None else seg.to(device)
        q, k, v = [torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        do = torch.randn(B, H, N, D, device=device, dtype=dtype)
        flops_fwd = 4.0 * H * D * attended_pairs(B, N, None if seg is None else seg.cpu())
        rows = []
        for impl, fn in make_impls(B, H, N, D, seg, device, dtype, args.tiny).items():
            try:
                with torch.no_grad():
                    t_f = bench_fn(lambda: fn(q, k, v), device, reps)

                def fb():
                    o = fn(q, k, v)
                    torch.autograd.grad(o, (q, k, v), do)
                t_fb = bench_fn(fb, device, reps)
                mem = peak_mib(fb, device == "cuda")
            except Exception as e:  # noqa: BLE001 - OOM / unsupported baseline: report and continue
                print(f"| {name} | {B} | {H} | {N} | {D} | {impl} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]} | | | | | |")
                continue
            rows.append((impl, t_f, t_fb, mem))
        base = {r[0]: r for r in rows}.get("nano4d")
        for impl, t_f, t_fb, mem in rows:
            ratio = (t_fb / base[2]) if base else float("nan")
            print(f"| {name} | {B} | {H} | {N} | {D} | {impl} | {t_f:.3f} | {flops_fwd / t_f * 1e-9:.3g} | "
                  f"{t_fb:.3f} | {3.5 * flops_fwd / t_fb * 1e-9:.3g} | {fmt_mib(mem, '-')} | {ratio:.2f}x |")
        del q, k, v, do
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
