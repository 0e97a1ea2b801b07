"""train_geolrm.py: both stages, exact resume across the stage switch (incl. a kill between the checkpoint files),
refusals, complete metrics.json, inference CLI, GObjaverse folders, and DDP + accumulation, rank equality (BatchNorm
buffers included) and the NaN stop under a 2-process torchrun."""
import json
import math
import os

import pytest
import torch

from nano4d.geolrm import GeoLRMConfig
from nano4d.ply import load_ply
from tests._scripts import (assert_finite_checkpoint, assert_ranks_equal, assert_same_run, kill_between_files,
                            log_records, torchrun)

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
    tc = T.TrainConfig(data=str(tmp_path), num_val=1, res=16)
    mc = GeoLRMConfig(img_size=16, patch_size=8, occ_res=16)
    train, held = T.load_objects(tc, mc, "train", 0, 0, 0, 1), T.load_objects(tc, mc, "test", 0, 0, 0, 1)
    assert len(train) == 2 and len(held) == 1
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
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "rank 1: non-finite at step 2:" in out and "loss nan" in out, out
    assert "stopping: non-finite loss or gradient norm at step 2" in out, out
    assert_ranks_equal(str(tmp_path), [1, 2])
    assert_finite_checkpoint(run, 2)
    assert [r["step"] for r in log_records(run) if r["kind"] == "train"] == [1, 2]
    assert not os.path.exists(os.path.join(run, "metrics.json"))
