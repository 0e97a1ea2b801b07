"""train_mim4d.py: exact resume (mask/ray generator and data position included, incl. a kill between the
checkpoint files), refusals, metrics.json, and DDP + accumulation, rank equality and the NaN stop under a
2-process torchrun."""
import json
import os

import pytest

from tests._scripts import (assert_finite_checkpoint, assert_ranks_equal, assert_same_run, kill_between_files,
                            log_records, torchrun)

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
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "rank 1: non-finite at step 2:" in out and "loss nan" in out, out
    assert "stopping: non-finite loss or gradient norm at step 2" in out, out
    assert_ranks_equal(str(tmp_path), [1, 2])
    assert_finite_checkpoint(run, 2)
    assert [r["step"] for r in log_records(run) if r["kind"] == "train"] == [1, 2]
