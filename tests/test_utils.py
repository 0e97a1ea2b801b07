"""nano4d.utils: config flags, checkpoints, LR schedule, progress logging, image grids."""
import dataclasses
import json
import os

import pytest
import torch

from nano4d import utils as U


@dataclasses.dataclass
class _Train:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    amp: bool = True
    res: tuple = (64, 64)


@dataclasses.dataclass
class _Model:
    dim: int = 8
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
    d = U.config_to_dict(tr, model=mo)
    assert json.loads(json.dumps(d))["model"]["dim"] == 16


def test_lr_schedule():
    lrs = [U.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_resume_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    cfg = {"dim": 4, "name": "x"}
    U.save_checkpoint(str(tmp_path), model, cfg, opt, step=17, extra={"epoch": 2, "pos": 5})
    expected_next = torch.rand(3)  # RNG stream right after the save
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    step, extra = U.load_resume(str(tmp_path), model2, opt2, expect_config=cfg)
    assert step == 17 and extra == {"epoch": 2, "pos": 5}
    torch.testing.assert_close(torch.rand(3), expected_next)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # weights-only load works, and the config travels with the weights
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 17
    _, stored = U.load_weights(str(tmp_path / "model.safetensors"))
    assert stored == cfg
    with pytest.raises(ValueError, match="config mismatch: dim: checkpoint=4 vs run=8"):
        U.load_resume(str(tmp_path), model2, opt2, expect_config={"dim": 8})
    assert U.load_resume(str(tmp_path / "empty"), model2) == (0, {})


def test_atomic_write_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    U.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 1})
    before = (tmp_path / "w.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)  # fail after the temp file was partly written
    with torch.no_grad():
        model.weight += 1
    with pytest.raises(OSError, match="disk full"):
        U.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 2})
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind


def test_progress_logger_lines_and_jsonl(tmp_path, capsys):
    log = U.ProgressLogger(str(tmp_path), total_steps=6, interval=3)
    for s in range(6):
        log.log(s, {"loss": 1.0 / (s + 1), "mse": 0.5}, lr=1e-3, grad_norm=0.7, items=4)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("step      3/6 | loss") and "eta" in out[0] and "img/s" in out[0]
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in recs] == [3, 6]
    assert recs[0]["loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert recs[1]["eta_s"] == 0


def test_save_image_grid(tmp_path):
    from PIL import Image
    p = U.save_image_grid(str(tmp_path / "g.png"), [torch.rand(3, 3, 8, 10), torch.rand(2, 1, 6, 6)])
    im = Image.open(p)
    assert im.size == (2 + 3 * 12, 2 + 2 * 10) and im.mode == "RGB"
