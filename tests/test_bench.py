"""Smoke tests of the benchmark scripts: ``python bench/<op>.py --tiny`` exits 0 and prints its table.

Each script runs in a subprocess from the repository root, the way the README tells users to run it, on
CPU with the Triton interpreter (TRITON_INTERPRET=1, NANO4D_FORCE_TRITON=1, as tests/conftest.py sets).
The table rows must name the kernel and its reference with finite, positive timings; on CPU the memory
columns are n/a.
"""
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(op):
    env = dict(os.environ, TRITON_INTERPRET="1", NANO4D_FORCE_TRITON="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join("bench", f"{op}.py"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench/{op}.py --tiny failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _rows(out, ncols):
    """Table body rows (split into stripped cells) with ``ncols`` columns; header and rule excluded."""
    rows = []
    for line in out.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == ncols, f"row with {len(cells)} cells, expected {ncols}: {line}"
        rows.append(cells)
    assert rows, f"no table in output:\n{out}"
    return rows[1:]  # rows[0] is the header


def _pos(cell):
    v = float(cell)
    assert math.isfinite(v) and v > 0, cell
    return v


def _by_impl(rows, case_col, impl_col):
    return {(r[case_col], r[impl_col]): r for r in rows}


@pytest.mark.parametrize("op", ["deform_attn", "sdf_render"])
def test_bench_deform_attn_sdf_render(op):
    out = _run(op)
    ncols = {"deform_attn": 10, "sdf_render": 11}[op]
    rows = _by_impl(_rows(out, ncols), 0, 2)
    cases = {"deform_attn": ["tiny_geolrm", "tiny_mim4d"], "sdf_render": ["tiny_mim4d"]}[op]
    assert set(rows) == {(c, i) for c in cases for i in ("reference", "triton")}, sorted(rows)
    for (case, impl), r in rows.items():
        assert r[1] == "float32"
        for col in (3, 5, 6, 8):       # fwd ms, fwd throughput, fwd+bwd ms, fwd+bwd throughput
            _pos(r[col])
        assert r[4] == r[7] == "n/a"   # no CUDA allocator on CPU
        err = float(r[9])
        assert err == 0.0 if impl == "reference" else err < 1e-4, (case, impl, err)
    if op == "sdf_render":
        for r in rows.values():        # "<mean sections marched> / <S - 1>"
            marched, total = (float(x) for x in r[10].split("/"))
            assert total == 11 and 0 < marched <= total, r[10]


def test_bench_patch_attn():
    out = _run("patch_attn")
    rows = _by_impl(_rows(out, 12), 0, 5)
    for case in ("mum_dec_global", "mum_dec_framewise", "mum_enc", "geolrm_ragged", "fa_sweep_n64_d64"):
        assert (case, "nano4d") in rows and (case, "ref") in rows, (case, sorted(rows))
        assert (case, "sdpa") in rows or (case, "sdpa_mask") in rows, (case, sorted(rows))
    for (case, impl), r in rows.items():
        for col in (6, 7, 8, 9):       # fwd ms, fwd TFLOP/s, fwd+bwd ms, fwd+bwd TFLOP/s
            _pos(r[col])
        speedup = float(r[11].rstrip("x"))  # "0.00x" for baselines far faster than the interpreter
        assert r[11].endswith("x") and math.isfinite(speedup) and speedup >= 0, r[11]
        assert r[10] == "-"            # peak memory: n/a on CPU
        if impl == "nano4d":
            assert r[11] == "1.00x"
    assert "failed" not in out


def test_bench_splat():
    out = _run("splat")
    rows = _by_impl(_rows(out, 7), 0, 1)
    assert set(rows) == {("tiny-geolrm", "reference (pairs, CPU path)"), ("interp", "triton (interpreter)"),
                         ("interp", "reference (pairs)"), ("interp", "reference (dense)")}, sorted(rows)
    for r in rows.values():
        for col in (2, 3, 6):          # fwd ms, fwd+bwd ms, Gaussian-px evals/s
            _pos(r[col])
        assert r[4] == r[5] == "nan"   # peak memory: no CUDA allocator on CPU
    assert "intersections" in out


def test_static_profile_reads_loops_loads_and_atomics():
    """bench/static.py's SASS/PTX reading on a kernel with a known shape: one loop holding vector loads
    and relaxed atomics, no local memory."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import static
    from tests.aot import aot_compile_launch, capture_launches
    from tests.test_aot import _scale_kernel
    x = torch.empty(16384, device="meta")
    with capture_launches() as launches:
        _scale_kernel[(16,)](x, x, 16384, BLOCK=1024)
    c = aot_compile_launch(launches[0], targets=(90,), stats=True)[90]
    s = static.sass_stats(c.asm["cubin"])
    assert s["sass"] > 0 and s["ldg_vec"] >= 1 and s["local"] == 0
    assert static.ptx_atomics(c.asm["ptx"]) == (0, 0)
    assert static.ptx_atomics("\t@%p1 red.relaxed.gpu.global.add.f32 [%rd1], %r1;\n\tatom.global.add.f32 %r2, [%rd2], %r3;"
                              ) == (2, 1)
