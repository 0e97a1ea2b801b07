"""Helpers for the training-script tests (tests/test_train_*.py): interrupted runs, run comparison, torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nano4d import checkpoint as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_VOLATILE = {"step_time", "eta_s", "time", "time_s", "train_time_s", "data_wait_s"}


def kill_between_files(monkeypatch, main, args, step: int):
    """Run ``main(args)`` and 'kill' it inside the checkpoint of ``step``: resume.pt is written, model.safetensors
    is not (a KeyboardInterrupt where a kill -9 would land)."""
    real = C.save_weights

    def save_weights(path, model, config, **kw):
        if kw.get("step") == step:
            raise KeyboardInterrupt(f"killed between the checkpoint files at step {step}")
        return real(path, model, config, **kw)

    monkeypatch.setattr(C, "save_weights", save_weights)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(C, "save_weights", real)


def log_records(run_dir: str) -> list:
    """log.jsonl without the wall-clock fields."""
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    return [{k: v for k, v in r.items() if k not in _VOLATILE and not k.endswith("_per_s")} for r in recs]


def assert_same_run(a: str, b: str):
    """Two run dirs hold bit-identical checkpoints (weights, optimizer, every RNG stream, extras) and logs."""
    (wa, ca), (wb, cb) = (C.load_weights(os.path.join(d, C.WEIGHTS)) for d in (a, b))
    assert_equal_tree(wa, wb, "weights")
    ra, rb = (torch.load(os.path.join(d, C.RESUME), weights_only=True) for d in (a, b))
    for cfg, r, d in ((ca, ra, a), (cb, rb, b)):               # the configs differ only in the run dir
        assert cfg["train"].pop("run_dir") == d
        r["config"] = json.dumps({**json.loads(r["config"]), "train": cfg["train"]})
    assert ca == cb
    assert_equal_tree(ra, rb)
    assert log_records(a) == log_records(b)


def assert_equal_tree(x, y, path="state"):
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), f"{path}: {sorted(x)} vs {sorted(y)}"
        for k in x:
            assert_equal_tree(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            assert_equal_tree(u, v, f"{path}[{i}]")
    elif torch.is_tensor(x):
        assert torch.equal(x, y), f"{path}: max diff {(x.double() - y.double()).abs().max().item()}"
    elif isinstance(x, str) and x.startswith("{"):
        x, y = json.loads(x), json.loads(y)
        assert_equal_tree({k: v for k, v in x.items() if k not in _VOLATILE},
                          {k: v for k, v in y.items() if k not in _VOLATILE}, path)
    else:
        assert x == y, f"{path}: {x!r} vs {y!r}"


def torchrun(script: str, args: list, out_dir: str, env: dict | None = None, timeout: int = 300):
    """Run ``script``'s main under a 2-process torchrun (gloo on CPU) through tests/_train_worker.py, which dumps
    every rank's model/optimizer state at each checkpoint into ``out_dir``. Returns the CompletedProcess."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    e.update({"PYTHONPATH": ROOT + os.pathsep + e.get("PYTHONPATH", ""), "NANO4D_FORCE_TRITON": "0",
              "OMP_NUM_THREADS": "1", **(env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_train_worker.py"), script, out_dir, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def assert_ranks_equal(out_dir: str, steps: list):
    """Rank 0 and rank 1 held identical model state (parameters AND buffers) and optimizer state at each
    checkpoint of ``steps``."""
    for s in steps:
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}_step{s}.pt"), weights_only=True) for r in (0, 1))
        assert_equal_tree(r0, r1, f"step {s}")


def assert_finite_checkpoint(run_dir: str, step: int):
    state = torch.load(os.path.join(run_dir, C.RESUME), weights_only=True)
    assert state["step"] == step
    for k, v in state["model"].items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
    sd, cfg = C.load_weights(os.path.join(run_dir, C.WEIGHTS))
    assert cfg["step"] == step and all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def assert_nonfinite_stop(r, run_dir: str, out_dir: str):
    """A 2-rank run with NaN injected on rank 1 at step 2 (``NANO4D_INJECT_NAN_*``): both ranks stopped together
    with a message, exit non-zero, identical state, and the last checkpoint is the finite step-2 one."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "rank 1: non-finite at step 2:" in out and "loss nan" in out, out
    assert "stopping: non-finite loss or gradient norm at step 2" in out, out
    assert_ranks_equal(out_dir, [1, 2])
    assert_finite_checkpoint(run_dir, 2)
    assert [r["step"] for r in log_records(run_dir) if r["kind"] == "train"] == [1, 2]
