"""train_mim4d.py: exact resume (mask/ray generator and data position included, incl. a kill between the
checkpoint files), refusals, metrics.json, and DDP + accumulation, rank equality and the NaN stop under a
2-process torchrun."""
import json
import os

import pytest
import torch

from tests._scripts import (assert_nonfinite_stop, assert_same_run, kill_between_files, log_records, torchrun)

import train_mim4d  # noqa: E402  (tests._scripts puts the repository root on sys.path)

TINY = ["--num_train", "2", "--num_val", "1", "--log_every", "1", "--warmup", "1", "--model.img_size", "32,64",
        "--model.rays_per_cam", "8", "--model.num_uniform", "8", "--model.num_importance", "2",
        "--model.grid", "8,8,2", "--model.depths", "1,1,1,1", "--model.dims", "8,16,16,16", "--model.fpn_dim", "8",
        "--model.short_dim", "16", "--model.long_dim", "8"]


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")          # CPU references: no kernel is under test here


def test_exact_resume_and_refusals(tmp_path, monkeypatch, torch_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--steps", "3", "--ckpt_every", "1", "--eval_every", "2"]
    train_mim4d.main(args + ["--run_dir", a])
    kill_between_files(monkeypatch, train_mim4d.main, args + ["--run_dir", b], step=2)
    train_mim4d.main(args + ["--run_dir", b])
    assert "resumed from step 2" in capsys.readouterr().out
    assert_same_run(a, b)
    recs = log_records(b)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert {"pred_absrel", "warp_absrel", "pred_psnr"} <= set(evals[-1]["metrics"])
    assert json.load(open(os.path.join(b, "metrics.json"))) == {"step": 3, "val": evals[-1]["metrics"]}
    assert any(p.startswith("preview_") for p in os.listdir(a))
    with pytest.raises(SystemExit, match=r"train.lr: checkpoint=0.0004 vs run=0.001"):
        train_mim4d.main(args + ["--run_dir", a, "--lr", "1e-3"])
    os.remove(os.path.join(a, "resume.pt"))
    with pytest.raises(SystemExit, match=r"resume.pt is missing next to"):
        train_mim4d.main(args + ["--run_dir", a])


def test_torchrun_grad_accum_rank_equality_and_nan_stop(tmp_path):
    """2 processes (gloo), --grad_accum 2: two good steps (ranks identical at each checkpoint), then NaN on rank 1
    at step 2: both ranks stop together, exit non-zero, the last checkpoint stays the finite step-2 one."""
    run = str(tmp_path / "run")
    r = torchrun("train_mim4d", TINY + ["--run_dir", run, "--steps", "4", "--grad_accum", "2", "--ckpt_every", "1",
                                        "--eval_every", "0"], str(tmp_path),
                 env={"NANO4D_INJECT_NAN_STEP": "2", "NANO4D_INJECT_NAN_RANK": "1"})
    assert_nonfinite_stop(r, run, str(tmp_path))


def test_paper_recipe_two_steps_with_ema_exact_resume(tmp_path, monkeypatch, torch_path, capsys):
    """--recipe paper resolves to the official vs0.1 recipe and trains (sizes overridden to fit a CPU test);
    the EMA saved beside the checkpoint survives a kill between the checkpoint files bit for bit."""
    from nano4d.mim4d import MIM4D, read_safetensors
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--recipe", "paper", "--epochs", "0", "--steps", "2", "--ckpt_every", "1", "--eval_every", "0",
            "--model.depth_bins", "8", "--model.frozen_stages", "0"] + TINY
    train_mim4d.main(args + ["--run_dir", a])
    out = capsys.readouterr().out
    for want in ("lr=0.0004", "backbone_lr_mult=0.1", "weight_decay=0.01", "grad_clip=35.0", "warmup=1",
                 "warmup_from=0.333", "min_lr_ratio=0.001", "amp='bf16'", "ema_decay=0.999", "ema_ramp=2000.0",
                 "drop_path=0.2", "pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)", "recipe='paper'"):
        assert want in out, want
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["train"]["epochs"] == 0 and cfg["model"]["dims"] == [8, 16, 16, 16]
    assert [r["step"] for r in log_records(a) if r["kind"] == "train"] == [1, 2]
    ema_model = MIM4D.from_checkpoint(a, ema=True)
    raw = MIM4D.from_checkpoint(a)
    assert ema_model.cfg == raw.cfg
    diff = [k for k, v in raw.state_dict().items() if not torch.equal(v, ema_model.state_dict()[k])]
    assert diff                                                  # the averaged weights are not the raw ones
    kill_between_files(monkeypatch, train_mim4d.main, args + ["--run_dir", b], step=1)
    train_mim4d.main(args + ["--run_dir", b])
    assert "EMA restored" in capsys.readouterr().out
    assert_same_run(a, b)
    (ea, ma), (eb, mb) = (read_safetensors(os.path.join(d, "ema.safetensors")) for d in (a, b))
    assert ma["ema"] == mb["ema"] and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not os.path.exists(os.path.join(b, "ema.next.safetensors"))


def test_paper_recipe_lr_schedule():
    tc = train_mim4d.TrainConfig(lr=4e-4, warmup=500, warmup_from=1 / 3, min_lr_ratio=1e-3)
    assert train_mim4d.lr_at(tc, 0, 10000) == pytest.approx(4e-4 * (1 / 3 + 2 / 3 / 500))
    assert train_mim4d.lr_at(tc, 499, 10000) == pytest.approx(4e-4)
    assert train_mim4d.lr_at(tc, 9999, 10000) == pytest.approx(4e-7, rel=1e-2)


def test_nuscenes_data_with_workers(tmp_path, torch_path):
    """--data nuscenes:ROOT trains from a tree in the nuScenes schema (scenes named into the v1.0-mini train and
    val splits) through DataLoader workers; the progress records carry the data-wait time."""
    from nano4d.data.driving import ProceduralDriving
    from nano4d.data.nuscenes import write_nuscenes
    ds = ProceduralDriving(2, num_frames=3, res=(32, 64), lidar_azimuths=32, bev_res=8, frame_dt=1 / 12)
    write_nuscenes(str(tmp_path / "nusc"), [ds[0], ds[1]], key_every=1, scene_names=["scene-0061", "scene-0103"])
    run = str(tmp_path / "run")
    train_mim4d.main(TINY + ["--data", f"nuscenes:{tmp_path / 'nusc'}", "--run_dir", run, "--steps", "2",
                             "--eval_every", "0", "--num_workers", "1"])
    recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["data_wait_s"] >= 0 for r in train)
    assert os.path.isfile(os.path.join(run, "model.safetensors"))
