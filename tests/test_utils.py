"""nano4d.utils: run plumbing (config flags, recipes, distributed helpers, LR schedule, progress logging, image
grids)."""
import dataclasses
import json
import os

import pytest
import torch

from nano4d import utils as U
from nano4d.files import save_image_grid


@dataclasses.dataclass
class _Train:
    lr: float = U.flag(1e-3, "peak lr")
    steps: int = 10            # optimizer steps
                               # (continued)
    name: str = U.flag("run", "run name", choices=("run", "other"), resume_may_change=True)
    amp: bool = True           # autocast
    res: tuple = (64, 64)      # resolution (H, W)
    recipe: str = "default"    # recipe name


@dataclasses.dataclass
class _Model:
    dim: int = 8               # width
    depth: int = 2
    drop: float = 0.0


def test_parse_config_flags_and_presets():
    presets = {"tiny": _Model(dim=16), "big": _Model(dim=512, depth=24)}
    tr, mo = U.parse_config(_Train, _Model, presets, argv=["--lr", "0.5", "--amp", "false", "--res", "32,48",
                                                          "--preset", "big", "--model.depth", "3"])
    assert tr == _Train(lr=0.5, steps=10, name="run", amp=False, res=(32, 48))
    assert mo == _Model(dim=512, depth=3)
    tr, mo = U.parse_config(_Train, _Model, presets, argv=[])
    assert mo == _Model(dim=16) and tr == _Train()
    assert U.parse_config(_Train, argv=["--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        U.parse_config(_Train, argv=["--steps", "seven"])
    with pytest.raises(SystemExit):                                  # no abbreviations: --ste is not --steps
        U.parse_config(_Train, argv=["--ste", "7"])
    with pytest.raises(SystemExit):
        U.parse_config(_Train, argv=["--name", "x"])                 # choices
    d = U.config_to_dict(tr, model=mo)
    assert json.loads(json.dumps(d))["model"]["dim"] == 16
    assert U.resume_config(tr) == {"lr": 1e-3, "steps": 10, "amp": True, "res": [64, 64], "recipe": "default"}


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        U.parse_config(_Train, _Model, {"tiny": _Model()}, argv=["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--lr LR peak lr (default: 0.001)", "--steps STEPS optimizer steps (continued) (default: 10)",
                 "--name {run,other} run name", "--amp {true,false} autocast", "--model.dim DIM width",
                 "--model.depth DEPTH _Model.depth (described in the docstring of", "--recipe {default} recipe name"):
        assert text in out, text


def test_model_flag_help_from_the_model_docstring(monkeypatch, capsys):
    import sys
    import types
    mod = types.ModuleType("fake_model", "Official flags:\n- ``drop``: dropout on every\n  block. Other text.\n")
    monkeypatch.setitem(sys.modules, "fake_model", mod)
    M = dataclasses.make_dataclass("M", [("drop", float, 0.0), ("width", int, 4)])
    M.__module__ = "fake_model"
    with pytest.raises(SystemExit):
        U.parse_config(_Train, M, {"tiny": M()}, argv=["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.drop DROP drop: dropout on every block. (default" in out
    assert "--model.width WIDTH M.width (described in the docstring of fake_model)" in out


def test_recipes_apply_and_explicit_flags_win():
    presets = {"tiny": _Model(dim=16), "big": _Model(dim=512, depth=24)}
    recipes = {"paper": {"lr": 0.25, "steps": 99, "preset": "big", "model.drop": 0.1}}
    tr, mo = U.parse_config(_Train, _Model, presets, argv=["--recipe", "paper", "--steps", "5", "--model.depth", "7"],
                            recipes=recipes)
    assert (tr.lr, tr.steps, tr.recipe) == (0.25, 5, "paper") and mo == _Model(dim=512, depth=7, drop=0.1)
    tr, mo = U.parse_config(_Train, _Model, presets, argv=["--recipe", "paper", "--preset", "tiny"], recipes=recipes)
    assert mo == _Model(dim=16, drop=0.1)
    tr, mo = U.parse_config(_Train, _Model, presets, argv=["--recipe", "default"], recipes=recipes)
    assert tr == _Train() and mo == _Model(dim=16)
    with pytest.raises(ValueError, match=r"recipe 'bad': unknown key\(s\) \['lrr'\]"):
        U.parse_config(_Train, _Model, presets, argv=[], recipes={"bad": {"lrr": 1}})
    text = U.format_config(train=tr, model=mo)
    assert "train: lr=0.001 steps=10" in text and "model: dim=16 depth=2 drop=0.0" in text


def test_single_process_plumbing(monkeypatch):
    model = torch.nn.Linear(2, 2)
    assert type(U.grad_sync(model, 0, 2)).__name__ == "nullcontext"       # no DDP: nothing to skip
    assert U.finite_step({"a": torch.tensor(1.5), "b": 2.0}, torch.tensor(0.3), 0) == {"a": 1.5, "b": 2.0}
    with pytest.raises(SystemExit) as e:
        U.finite_step({"a": 1.0}, float("nan"), 3)
    assert e.value.code == 1
    with pytest.raises(SystemExit):
        U.finite_step({"a": float("inf")}, 1.0, 3)
    monkeypatch.setenv("NANO4D_INJECT_NAN_STEP", "2")
    assert U.inject_nan(torch.tensor(1.0), 1) == 1 and torch.isnan(U.inject_nan(torch.tensor(1.0), 2))
    monkeypatch.setenv("NANO4D_INJECT_NAN_RANK", "1")
    assert U.inject_nan(torch.tensor(1.0), 2) == 1

    def draws(isolate_first: bool):
        torch.manual_seed(0), U.random.seed(0), U.np.random.seed(0)
        if isolate_first:
            with U.rng_isolated():                                      # an eval that draws from every stream
                torch.rand(3), U.random.random(), U.np.random.rand()
        return torch.rand(1).item(), U.random.random(), U.np.random.rand()
    assert draws(True) == draws(False)
    assert type(U.autocast(torch.device("cpu"))).__name__ == "nullcontext"
    assert isinstance(U.autocast(torch.device("cpu"), "bf16"), torch.autocast)


def test_grad_sync_is_a_fresh_no_sync_for_all_but_the_last_micro_step(tmp_path):
    """Under DDP (a 1-process gloo group here) every non-final micro-step gets its own ``no_sync()`` context; the
    same idiom runs twice in a row (entering one context object twice was a crash)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(3, 1))
        for _ in range(2):
            ctxs = []
            for micro in range(3):
                ctx = U.grad_sync(ddp, micro, 3)
                ctxs.append(ctx)
                with ctx:
                    ddp(torch.randn(4, 3)).sum().backward()
                    assert ddp.require_backward_grad_sync == (micro == 2)
            assert type(ctxs[2]).__name__ == "nullcontext" and ctxs[0] is not ctxs[1]
    finally:
        dist.destroy_process_group()


def test_lr_schedule():
    lrs = [U.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_progress_logger_lines_and_jsonl(tmp_path, capsys):
    log = U.ProgressLogger(str(tmp_path), total_steps=6, interval=3)
    log.eval(0, {"loss": 2.0})
    for s in range(6):
        log.log(s, {"loss": 1.0 / (s + 1), "mse": 0.5}, lr=1e-3, grad_norm=0.7, items=4)
        if s == 2:
            log.eval(3, {"loss": 1.0, "psnr": 20}, stage="a")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[1].startswith("step      3/6 | loss") and "eta" in out[1] and "img/s" in out[1]
    assert out[2] == "eval val step 3 stage a | loss 1.0000 | psnr 20.0000"
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["kind"], r["step"]) for r in recs] == [("eval", 0), ("train", 3), ("eval", 3), ("train", 6)]
    assert recs[0] == {"kind": "eval", "step": 0, "split": "val", "metrics": {"loss": 2.0}}
    assert recs[2] == {"kind": "eval", "step": 3, "split": "val", "stage": "a", "metrics": {"loss": 1.0, "psnr": 20.0}}
    assert recs[1]["loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert recs[3]["eta_s"] == 0
    # a resumed run drops the records of the steps it redoes (and a line torn by a kill)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    log.truncate(3)
    assert [r["step"] for r in map(json.loads, open(tmp_path / "log.jsonl"))] == [0, 3, 3]
    log.truncate(0)
    assert open(tmp_path / "log.jsonl").read() == ""


def test_tensorboard_logging(tmp_path):
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            U.ProgressLogger(str(tmp_path), 2, tensorboard=True)
        return
    log = U.ProgressLogger(str(tmp_path), 2, interval=1, tensorboard=True)
    log.log(0, {"loss": 1.0}, lr=0.1, grad_norm=0.5)
    log.eval(1, {"psnr": 20.0})
    log.image("preview", torch.rand(2, 3, 8, 8), 1)
    log.image("preview_png", save_image_grid(str(tmp_path / "p.png"), torch.rand(2, 3, 8, 8)), 1)
    log.tb.flush()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))
