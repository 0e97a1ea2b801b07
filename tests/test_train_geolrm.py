"""train_geolrm.py: both stages, exact resume across the stage switch (incl. a kill between the checkpoint files),
refusals, complete metrics.json, inference CLI, GObjaverse folders, and DDP + accumulation, rank equality (BatchNorm
buffers included) and the NaN stop under a 2-process torchrun."""
import json
import math
import os
import re

import pytest
import torch

from nano4d.geolrm import GeoLRMConfig
from nano4d.ply import load_ply
from nano4d.view import load_cameras
from tests._scripts import (assert_nonfinite_stop, assert_same_run, kill_between_files, log_records, torchrun)

import train_geolrm as T  # noqa: E402  (tests._scripts puts the repository root on sys.path)

TINY = ["--model.img_size", "16", "--res", "16", "--num_train", "2", "--num_val", "1", "--views_per_object", "4",
        "--eval_views", "3", "--novel_views", "1", "--eval_inputs", "2", "--max_inputs", "2", "--num_targets", "2",
        "--warmup", "1", "--lpips", "false", "--turntable", "2", "--log_every", "1", "--model.enc_depth", "1",
        "--model.prop_depth", "1", "--model.depth", "1", "--model.max_tokens", "32"]


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")          # CPU references: no kernel is under test here


def test_both_stages_exact_resume_refusals_and_inference(tmp_path, monkeypatch, torch_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--prop_steps", "2", "--recon_steps", "2", "--ckpt_every", "1", "--export_ply", "1"]
    m = T.main(args + ["--run_dir", a])
    assert 0 <= m["proposal"]["occ_iou"] <= 1 and math.isfinite(m["recon"]["psnr"])
    assert math.isfinite(m["recon"]["base_psnr"]) and set(m["psnr_vs_views"]) == {2}
    for f in ("model.safetensors", "resume.pt", "preview.png", "metrics.json", "heldout_0.ply",
              "heldout_0_turntable.png", "log.jsonl"):
        assert os.path.exists(os.path.join(a, f)), f
    assert load_ply(os.path.join(a, "heldout_0.ply"))["means"].shape[0] > 0
    assert load_cameras(os.path.join(a, "heldout_0.cameras.npz"))["images"].shape[0] == 2   # the viewer's input views
    # killed inside the checkpoint of step 3 (the first recon step) and resumed: the same run, bit for bit
    kill_between_files(monkeypatch, T.main, args + ["--run_dir", b], step=3)
    m2 = T.main(args + ["--run_dir", b])
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(a, b)
    recs = log_records(b)
    assert [(r["step"], r["stage"]) for r in recs if r["kind"] == "train"] == [
        (1, "proposal"), (2, "proposal"), (3, "recon"), (4, "recon")]
    assert [(r["step"], r["stage"]) for r in recs if r["kind"] == "eval"] == [(2, "proposal"), (4, "recon")]
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, b))
    ma.pop("time_s"), mb.pop("time_s")
    assert ma == mb and set(mb) == {"proposal", "recon", "psnr_vs_views"}    # never a partial dict
    assert m2["proposal"] == m["proposal"]
    # refusals: a changed schedule; weights without resume.pt
    with pytest.raises(SystemExit, match=r"train.recon_steps: checkpoint=2 vs run=4"):
        T.main(args + ["--run_dir", a, "--recon_steps", "4"])
    os.remove(os.path.join(b, "resume.pt"))
    with pytest.raises(SystemExit, match=r"resume.pt is missing next to"):
        T.main(args + ["--run_dir", b])
    # inference CLI on a .pt of posed images (any number of views)
    from nano4d.data.objects import ProceduralObjects
    d = ProceduralObjects(1, num_views=3, res=16, seed=9, split="test", occ_res=0, num_surface_points=0)[0]
    torch.save({"images": d["images"], "c2w": d["c2w"], "K": d["K"]}, tmp_path / "obj.pt")
    T.main(["--infer", str(tmp_path / "obj.pt"), "--ckpt", os.path.join(a, "model.safetensors"),
            "--run_dir", str(tmp_path / "inf"), "--turntable", "3"])
    assert load_ply(str(tmp_path / "inf" / "infer.ply"))["means"].shape[1] == 3
    assert os.path.exists(tmp_path / "inf" / "infer_turntable.png")


def test_gobjaverse_folder_loading_and_depth_occupancy(tmp_path):
    """``--data DIR``: objects in the GObjaverse layout are read, resized, and without occupancy.npy their
    occupancy is binned from the depth maps; those cells lie on the true surface (|SDF| <= half a cell
    diagonal at the centre), and cover most of it."""
    from nano4d.data.gobjaverse import write_gobjaverse_object
    from nano4d.data.objects import ProceduralObjects, occupancy_grid
    ds = ProceduralObjects(3, num_views=6, res=24, occ_res=0, num_surface_points=0, background="white")
    for i in range(3):
        d = ds._render(i)
        rgba = torch.cat([d["rgb"], d["alphas"]], 1).permute(0, 2, 3, 1)
        write_gobjaverse_object(str(tmp_path), f"obj{i}", rgba, d["c2w"], d["K"], depth=d["depths"][:, 0])
    tc = T.TrainConfig(data=str(tmp_path), num_val=1, res=16, views_per_object=4, eval_views=6)
    mc = GeoLRMConfig(img_size=16, patch_size=8, occ_res=16)
    train, held = T.make_objects(tc, mc, "train"), T.make_objects(tc, mc, "test")
    assert len(train) == 2 and len(held) == 1 and train[1]["images"].shape == (4, 3, 16, 16)
    o = held[0]
    assert o["images"].shape == (6, 3, 16, 16) and o["occupancy"].shape == (16, 16, 16)
    torch.testing.assert_close(o["K"][0, 0, 0], ds._render(2)["K"][0, 0, 0] * 16 / 24)
    assert o["images"].min() >= 0 and o["images"].max() <= 1
    surface = occupancy_grid(ds.get_object(2), 16, "surface")
    occ = o["occupancy"].bool()
    assert occ.sum() > 0.3 * surface.sum()
    assert (occ & surface.bool()).sum() >= 0.98 * occ.sum()


def test_torchrun_grad_accum_rank_equality_and_nan_stop(tmp_path):
    """2 processes (gloo), --grad_accum 2: a proposal step and a recon step (ranks identical at each checkpoint,
    BatchNorm statistics included), then NaN on rank 1 at step 2: both ranks stop together, exit non-zero, the
    last checkpoint stays the finite step-2 one."""
    run = str(tmp_path / "run")
    r = torchrun("train_geolrm", TINY + ["--run_dir", run, "--prop_steps", "1", "--recon_steps", "3",
                                         "--grad_accum", "2", "--ckpt_every", "1", "--export_ply", "0"], str(tmp_path),
                 env={"NANO4D_INJECT_NAN_STEP": "2", "NANO4D_INJECT_NAN_RANK": "1"})
    assert_nonfinite_stop(r, run, str(tmp_path))
    assert not os.path.exists(os.path.join(run, "metrics.json"))


# ----------------------------------------------------------------------------- the released model, the paper recipe, the guard


def test_infer_official_checkpoint_is_deterministic_given_the_seed(tmp_path, torch_path):
    """--infer --official on a synthetic checkpoint in the released layout: .ply (INRIA f_rest) + turntable from a
    .pt and from a GObjaverse folder; two runs with one --seed write identical bytes, another seed does not."""
    from nano4d.data.gobjaverse import write_gobjaverse_object
    from nano4d.data.objects import ProceduralObjects
    from nano4d.ply import read_ply_raw
    from tests.test_geolrm import SMALL, official_state_dict
    torch.save(official_state_dict(), tmp_path / "geolrm.ckpt")
    ds = ProceduralObjects(1, num_views=3, res=16, seed=9, split="test", occ_res=0, num_surface_points=0)
    d = ds[0]
    torch.save({"images": d["images"], "c2w": d["c2w"], "K": d["K"]}, tmp_path / "obj.pt")
    over = [a for k, v in SMALL.items() for a in ("--model." + k, str(v))]
    blobs = []
    for i, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"inf{i}"
        g = T.main(["--infer", str(tmp_path / "obj.pt"), "--official", str(tmp_path / "geolrm.ckpt"), "--run_dir",
                    str(out), "--seed", str(seed), "--turntable", "2", "--res", "16", "--ply_sh_degree", "3"] + over)
        assert g.means.shape == (SMALL["max_tokens_infer"] * 2, 3)                       # official: padding kept
        assert os.path.exists(out / "infer_turntable.png")
        blobs.append(open(out / "infer.ply", "rb").read())
    assert blobs[0] == blobs[1] and blobs[0] != blobs[2]
    assert sum(n.startswith("f_rest_") for n in read_ply_raw(str(tmp_path / "inf0" / "infer.ply"))) == 45
    r = ds._render(0)
    write_gobjaverse_object(str(tmp_path / "gob"), "obj", torch.cat([r["rgb"], r["alphas"]], 1).permute(0, 2, 3, 1),
                            r["c2w"], r["K"])
    T.main(["--infer", str(tmp_path / "gob" / "obj"), "--official", str(tmp_path / "geolrm.ckpt"), "--run_dir",
            str(tmp_path / "gob_out"), "--turntable", "2", "--res", "16"] + over)
    assert load_ply(str(tmp_path / "gob_out" / "infer.ply"))["means"].shape[0] > 0
    with pytest.raises(SystemExit, match="exactly one of --ckpt"):
        T.main(["--infer", str(tmp_path / "obj.pt"), "--run_dir", str(tmp_path / "x")])
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.ckpt: cannot read it"):
        T.main(["--infer", str(tmp_path / "obj.pt"), "--official", str(tmp_path / "bad.ckpt"), "--run_dir", str(tmp_path / "x")])


def test_paper_recipe_numbers_and_two_cpu_steps(tmp_path, torch_path, capsys):
    """The recipe matches configs/srl-bf16.yaml and configs/geolrm-train.yaml; with CPU-sized overrides it builds
    and takes one step per stage, printing each stage's lr and effective batch."""
    import dataclasses
    from nano4d import utils as U
    tc, mc = U.parse_config(T.TrainConfig, GeoLRMConfig, T.PRESETS, argv=["--recipe", "paper"], recipes=T.RECIPES)
    assert mc == dataclasses.replace(T.PRESETS["paper"], grad_checkpoint=True)
    assert T.stage_plan(tc, "proposal", 8) == dict(steps=50_000, lr=2e-4, warmup=500, clip=10.0, max_inputs=8,
                                                  accum=2, batch=16)                   # 2 objects x 8 GPUs
    assert T.stage_plan(tc, "recon", 32) == dict(steps=100_000, lr=1e-4, warmup=12_000, clip=4.0, max_inputs=7,
                                                accum=8, batch=256)                    # 1 x 8 accumulation x 32 GPUs
    assert (tc.res, tc.num_targets, tc.views_per_object, tc.min_inputs, tc.min_lr_ratio, tc.weight_decay) == \
        (448, 8, 8, 1, 0.001, 0.05)
    run = str(tmp_path / "paper")
    m = T.main(["--recipe", "paper", "--preset", "tiny"] + TINY + [
        "--run_dir", run, "--prop_steps", "1", "--recon_steps", "1", "--prop_objects_per_step", "2",
        "--recon_objects_per_step", "2", "--num_targets", "2", "--export_ply", "0"])
    out = capsys.readouterr().out
    assert "stage proposal: 1 steps, lr 0.0002 (warmup 500, cosine to x0.001), clip 10, 1-8 inputs, " \
           "effective batch 2 objects = 1 x 2 accumulation x 1 ranks" in out, out
    assert "stage recon: 1 steps, lr 0.0001 (warmup 12000, cosine to x0.001), clip 4, 1-7 inputs, " \
           "effective batch 2 objects = 1 x 2 accumulation x 1 ranks" in out, out
    assert "grad_checkpoint=True" in out and "recipe='paper'" in out
    assert math.isfinite(m["recon"]["psnr"])
    assert [r["step"] for r in log_records(run) if r["kind"] == "train"] == [1, 2]


def test_huge_lr_and_nan_inputs_stop_at_the_finite_guard(tmp_path, torch_path, monkeypatch, capsys):
    """A huge lr (finite loss, non-finite gradients or weights a step later) and NaN input pixels (no exception in
    the losses) both end in the shared guard: exit 1, no update, no non-finite checkpoint."""
    run = str(tmp_path / "lr")
    with pytest.raises(SystemExit) as e:
        T.main(TINY + ["--run_dir", run, "--stage", "proposal", "--prop_steps", "6", "--prop_lr", "1e30",
                       "--ckpt_every", "0"])
    assert e.value.code == 1 and "stopping: non-finite loss or gradient norm" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(run, "resume.pt"))
    real = T.make_objects

    class Poisoned(T.Objects):
        def __getitem__(self, i):
            o = super().__getitem__(i)
            o["images"][:, 0, 0, 0] = float("nan")
            return o

    def poisoned(tc, mc, split):
        objs = real(tc, mc, split)
        return Poisoned(objs.ds) if split == "train" else objs

    monkeypatch.setattr(T, "make_objects", poisoned)
    for stage in ("proposal", "recon"):
        run = str(tmp_path / stage)
        with pytest.raises(SystemExit) as e:
            T.main(TINY + ["--run_dir", run, "--stage", stage, "--prop_steps", "1", "--recon_steps", "1",
                           "--anchors", "gt"])
        out = capsys.readouterr().out
        assert e.value.code == 1 and re.search(r"non-finite at step 0: .*loss nan", out), (stage, out)
        assert not os.path.exists(os.path.join(run, "resume.pt"))


_RSS_RUN = r"""
import sys, train_geolrm
train_geolrm.main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_RSS_MIB", int(line.split()[1]) / 1024)
"""


def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    """train_geolrm on a GObjaverse-layout folder 10x larger (12 vs 120 objects of 8 views at 48 px) reaches the
    same peak RSS: objects are read per step, never loaded whole."""
    import subprocess
    import sys

    import torch

    from nano4d.data.gobjaverse import write_gobjaverse_object
    from nano4d.data.objects import orbit_cameras
    from tests._scripts import ROOT
    c2w, K = orbit_cameras(8, 48, seed=0)
    g = torch.Generator().manual_seed(0)
    peaks = {}
    for n in (12, 120):
        for i in range(n):
            rgba = torch.rand(8, 48, 48, 4, generator=g)
            write_gobjaverse_object(str(tmp_path / f"d{n}"), f"{i:04d}", rgba, c2w, K,
                                    depth=1.5 + torch.rand(8, 48, 48, generator=g))
        env = dict(os.environ, PYTHONPATH=ROOT, NANO4D_FORCE_TRITON="0", OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", _RSS_RUN, *TINY, "--data", str(tmp_path / f"d{n}"), "--res", "48",
                            "--views_per_object", "8", "--stage", "proposal", "--prop_steps", "4", "--eval_every", "0",
                            "--export_ply", "0", "--run_dir", str(tmp_path / f"run{n}")],
                           capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        peaks[n] = float(r.stdout.split("PEAK_RSS_MIB")[1].split()[0])
    assert peaks[120] < peaks[12] + 12.0, peaks          # loading them whole would add ~40 MiB
