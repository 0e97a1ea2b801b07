"""train_mum.py: flags, exact resume (incl. a kill between the checkpoint files), refusals, DDP + accumulation,
rank equality and the NaN stop under a 2-process torchrun."""
import importlib.util
import json
import os
import shutil

import pytest

from tests._scripts import (assert_nonfinite_stop, assert_ranks_equal, assert_same_run, kill_between_files,
                            log_records, torchrun)

import train_mum  # noqa: E402  (tests._scripts puts the repository root on sys.path)

TINY = ["--cache_dir", "", "--num_train", "2", "--num_val", "1", "--min_views", "2", "--max_views", "3",
        "--eval_views", "2", "--src_res", "32", "--res", "32", "--batch_size", "6", "--warmup", "1", "--blr", "0.05",
        "--log_every", "1", "--match_eval", "false", "--model.embed_dim", "32", "--model.num_heads", "2",
        "--model.depth", "1", "--model.decoder_dim", "32", "--model.decoder_heads", "2", "--model.decoder_depth", "2"]


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")          # CPU references: no kernel is under test here


def test_resume_is_bit_identical_and_refusals(tmp_path, monkeypatch, torch_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--steps", "6", "--ckpt_every", "2", "--eval_every", "0"]
    train_mum.main(args + ["--run_dir", a])
    kill_between_files(monkeypatch, train_mum.main, args + ["--run_dir", b], step=4)
    open(os.path.join(b, ".tmp_x_resume.pt"), "wb").write(b"torn")           # debris of a killed write
    with open(os.path.join(b, "log.jsonl"), "a") as f:                        # a record of a step that is redone
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 9.0}) + "\n")
    train_mum.main(args + ["--run_dir", b])
    out = capsys.readouterr().out
    assert "resumed at step 4" in out and "model.safetensors was at step 2 (interrupted checkpoint write)" in out
    assert not os.path.exists(os.path.join(b, ".tmp_x_resume.pt"))
    assert_same_run(a, b)
    recs = log_records(a)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    ev = [r for r in recs if r["kind"] == "eval"]                           # --eval_every 0: start and end only
    assert [r["step"] for r in ev] == [0, 6] and ev[0]["split"] == "val"
    assert ev[-1]["metrics"]["loss"] < ev[0]["metrics"]["loss"]             # held-out loss falls
    assert os.path.exists(os.path.join(a, "preview_000006.png"))
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["model"]["embed_dim"] == 32 and cfg["train"]["steps"] == 6
    # a changed schedule is refused, naming the difference; nothing is overwritten
    before = open(os.path.join(a, "model.safetensors"), "rb").read()
    with pytest.raises(SystemExit, match=r"train.steps: checkpoint=6 vs run=8.*--resume fresh"):
        train_mum.main(args + ["--run_dir", a, "--steps", "8"])
    with pytest.raises(SystemExit):
        train_mum.main(args + ["--run_dir", a, "--step", "8"])               # no abbreviations
    # a corrupt resume.pt: one error naming the file
    os.makedirs(tmp_path / "d")
    for f in ("model.safetensors", "resume.pt"):
        shutil.copy(os.path.join(a, f), tmp_path / "d")
    data = open(tmp_path / "d" / "resume.pt", "rb").read()
    open(tmp_path / "d" / "resume.pt", "wb").write(data[:len(data) // 2])
    with pytest.raises(SystemExit, match=r"error: .*d/resume.pt: cannot read the resume state .*corrupt or truncated"):
        train_mum.main(args + ["--run_dir", str(tmp_path / "d")])
    # weights without resume.pt: refused
    os.makedirs(tmp_path / "c")
    shutil.copy(os.path.join(a, "model.safetensors"), tmp_path / "c")
    with pytest.raises(SystemExit, match=r"resume.pt is missing next to .*--resume weights"):
        train_mum.main(args + ["--run_dir", str(tmp_path / "c")])
    assert open(os.path.join(a, "model.safetensors"), "rb").read() == before
    # --resume weights: the trained weights at step 0 (their held-out loss is the finished run's last one)
    train_mum.main(args + ["--run_dir", str(tmp_path / "c"), "--resume", "weights", "--steps", "1"])
    first = [r for r in log_records(str(tmp_path / "c")) if r["kind"] == "eval"][0]
    assert first["step"] == 0 and first["metrics"] == ev[-1]["metrics"]
    if importlib.util.find_spec("skimage"):                                  # the checkpoint feeds the eval
        from nano4d.mum_eval import compare
        res = compare(os.path.join(a, "model.safetensors"), scale=0.25, seeds=(0, 1))
        assert len(res["random_init_seeds"]) == 2 and res["trained"]["n_valid"] == res["raw_pixels"]["n_valid"]


def test_image_sequence_folders_through_workers(tmp_path, torch_path):
    """--data with image-sequence folders: dynamic batches ((index, V) from DynamicBatchSampler) read by a
    DataLoader worker; the progress records carry the data-wait time."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    for s in range(4):
        os.makedirs(tmp_path / "seqs" / f"s{s}")
        for k in range(4):
            Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "seqs" / f"s{s}" / f"{k}.png")
    run = str(tmp_path / "run")
    train_mum.main(TINY + ["--data", str(tmp_path / "seqs"), "--run_dir", run, "--steps", "2", "--eval_every", "0",
                           "--num_workers", "1"])
    train = [r for r in (json.loads(line) for line in open(os.path.join(run, "log.jsonl"))) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["data_wait_s"] >= 0 for r in train)


def test_torchrun_grad_accum_rank_equality_and_nan_stop(tmp_path):
    """2 processes (gloo), --grad_accum 2: two good steps (ranks identical at each checkpoint), then NaN on rank 1
    at step 2: both ranks stop together, exit non-zero, the last checkpoint stays the finite step-2 one."""
    run = str(tmp_path / "run")
    r = torchrun("train_mum", TINY + ["--run_dir", run, "--steps", "4", "--grad_accum", "2", "--ckpt_every", "1",
                                      "--eval_every", "0", "--batch_size", "4"], str(tmp_path),
                 env={"NANO4D_INJECT_NAN_STEP": "2", "NANO4D_INJECT_NAN_RANK": "1"})
    assert_nonfinite_stop(r, run, str(tmp_path))
    assert "rank 1: non-finite at step 2: loss nan" in r.stdout + r.stderr


def test_random_resized_crop_shapes_and_range():
    import torch
    img = torch.rand(3, 40, 56)
    for _ in range(20):
        out = train_mum.random_resized_crop(img, 32)
        assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_paper_recipe_resolves_prints_and_runs(tmp_path, torch_path, capsys):
    """--recipe paper gives the official run's values (effective batch and lr printed); one step runs with the
    recipe and a shrunken model / batch (the full ViT-L is checked on the meta device)."""
    import dataclasses

    import torch

    from nano4d import utils as U
    from nano4d.mum import PRESETS, MuM, MuMConfig
    tc, mc = U.parse_config(train_mum.TrainConfig, MuMConfig, PRESETS, argv=["--recipe", "paper"],
                            recipes=train_mum.RECIPES)
    assert mc == dataclasses.replace(PRESETS["large"], official_init=True, decay_tokens=True)
    assert (tc.res, tc.min_views, tc.max_views, tc.batch_size, tc.grad_accum) == (224, 2, 12, 128, 32)
    assert (tc.steps, tc.warmup, tc.blr, tc.lr, tc.min_lr_ratio, tc.grad_clip, tc.amp) == \
        (500_000, 25_000, 1.5e-4, 0.0, 0.0, 0.0, "bf16")
    assert tc.blr * tc.batch_size * tc.grad_accum / 256 == pytest.approx(2.4e-3)     # the official lr
    with torch.device("meta"):
        n = sum(p.numel() for p in MuM(mc).parameters())
    assert n == 303_099_904 + 86_434_560                                     # ViT-L/16 + 768-d x 12 decoder
    pairs = dict(zip(TINY[::2], TINY[1::2]))
    small = [a for k, v in pairs.items() if k not in ("--src_res", "--res", "--blr", "--warmup", "--batch_size")
             for a in (k, v)]
    train_mum.main(["--recipe", "paper", "--run_dir", str(tmp_path / "p"), "--steps", "1", "--grad_accum", "2",
                    "--batch_size", "4", "--src_res", "40", "--res", "32"] + small)
    out = capsys.readouterr().out
    assert "recipe='paper'" in out and "official_init=True" in out and "warmup=25000" in out
    assert "4 images/micro-step x 2 accumulated x 1 process(es) = 8 images/step" in out
    assert f"lr = blr 0.00015 x 8 / 256 = {1.5e-4 * 8 / 256:.3e}" in out
    ev = [r for r in log_records(str(tmp_path / "p")) if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [0, 1] and all(r["metrics"]["loss"] > 0 for r in ev)


def test_random_resized_crop_fallback_is_torchvisions_centre_crop(monkeypatch):
    import torch
    monkeypatch.setattr(train_mum.random, "uniform", lambda a, b: b)          # area 1, ratio 4/3: never fits
    monkeypatch.setattr(train_mum.random, "random", lambda: 1.0)              # no flip
    img = torch.arange(10 * 40, dtype=torch.float32).view(1, 10, 40).expand(3, -1, -1) / 400
    out = train_mum.random_resized_crop(img, 10)                              # W/H = 4 > 4/3: w = round(10 * 4/3) = 13, j = 27 // 2
    want = torch.nn.functional.interpolate(img[None, :, :, 13:26], size=(10, 10), mode="bicubic",
                                           align_corners=False, antialias=True)[0].clamp(0, 1)
    assert torch.allclose(out, want)


def test_two_nodes_c10d_rendezvous(tmp_path):
    """Two "nodes" x 1 process on localhost, launched separately as on a cluster (torchrun --nnodes 2
    --rdzv_backend c10d --rdzv_endpoint HOST:PORT): they meet, train 2 steps, and hold identical states."""
    import socket
    import subprocess
    import sys
    from tests._scripts import ROOT
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""), "NANO4D_FORCE_TRITON": "0",
                "OMP_NUM_THREADS": "1"})
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "--rdzv_id", "nano4d-test", os.path.join(ROOT, "tests", "_train_worker.py"), "train_mum",
                               str(tmp_path), *TINY, "--run_dir", run, "--steps", "2", "--ckpt_every", "1",
                               "--eval_every", "0", "--batch_size", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "world 2" in "".join(outs)
    assert_ranks_equal(str(tmp_path), [1, 2])
    assert [r["step"] for r in log_records(run) if r["kind"] == "train"] == [1, 2]
