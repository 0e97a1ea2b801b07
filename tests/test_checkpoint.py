"""nano4d.checkpoint: atomic writes, weights + config, the self-contained resume state, corrupt files."""
import os
import random

import numpy as np
import pytest
import torch

from nano4d import checkpoint as C
from nano4d import files as F


def _model_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_round_trip_restores_everything(tmp_path):
    model, opt = _model_opt()
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(5), torch.rand(3, generator=gen)                      # a generator mid-stream
    cfg = {"model": {"dim": 4, "res": [64, 64]}, "train": {"lr": 0.01}}
    C.save_checkpoint(str(tmp_path), model, cfg, opt, step=17, extra={"pos": 5}, generators={"g": gen},
                      rank_extra={"sampler": [3, 1]})
    expect = (torch.rand(3), np.random.rand(), random.random(), torch.rand(3, generator=gen))  # streams after save
    model2, opt2 = _model_opt(seed=1)
    gen2 = torch.Generator().manual_seed(99)
    torch.manual_seed(123), np.random.seed(1), random.seed(2)
    res = C.load_checkpoint(str(tmp_path), model2, opt2, expect_config=cfg, generators={"g": gen2})
    assert res.step == 17 and res.extra == {"pos": 5} and res.config == cfg and not res.weights_only
    assert res.rank_extra == {"sampler": [3, 1]}
    got = (torch.rand(3), np.random.rand(), random.random(), torch.rand(3, generator=gen2))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and got[2] == expect[2]
    assert torch.equal(got[3], expect[3])
    _same_state(model, model2)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # resume.pt alone is complete and reads with weights_only=True; the weights carry config + step
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 17 and set(state["model"]) == set(model.state_dict())
    sd, stored = C.load_weights(str(tmp_path / "model.safetensors"))
    assert stored == {**cfg, "step": 17} and torch.equal(sd["0.weight"], model[0].weight.detach())
    # files get open()'s mode (0644 under umask 022), not mkstemp's 0600
    F.save_json(str(tmp_path / "m.json"), {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    for f in ("resume.pt", "model.safetensors", "m.json"):
        assert (os.stat(tmp_path / f).st_mode & 0o777) == (0o666 & ~mask), f
    if mask == 0o022:
        assert (os.stat(tmp_path / "resume.pt").st_mode & 0o777) == 0o644


def test_config_mismatch_and_modes(tmp_path):
    model, opt = _model_opt()
    cfg = {"model": {"dim": 4}, "train": {"steps": 10, "lr": 0.1}}
    C.save_checkpoint(str(tmp_path), model, cfg, opt, step=3)
    m2, o2 = _model_opt(seed=1)
    with pytest.raises(C.CheckpointError, match=r"train.steps: checkpoint=10 vs run=20.*--resume fresh"):
        C.load_checkpoint(str(tmp_path), m2, o2, expect_config={**cfg, "train": {"steps": 20, "lr": 0.1}})
    assert C.load_checkpoint(str(tmp_path), m2, o2, mode="fresh") is None
    assert C.load_checkpoint(str(tmp_path / "empty"), m2, o2) is None
    r = C.load_checkpoint(str(tmp_path), m2, o2, mode="weights", expect_config={**cfg, "train": {"steps": 20}})
    assert r.step == 0 and r.weights_only and o2.state_dict()["state"][0]["step"] == 1   # optimizer untouched
    _same_state(model, m2)
    with pytest.raises(C.CheckpointError, match="model.dim: checkpoint=4 vs run=8"):
        C.load_checkpoint(str(tmp_path), m2, o2, mode="weights", expect_config={"model": {"dim": 8}})
    with pytest.raises(ValueError, match="auto, fresh or weights"):
        C.load_checkpoint(str(tmp_path), m2, o2, mode="resume")


def test_kill_between_the_two_files(tmp_path, monkeypatch, capsys):
    """resume.pt is written first and is the checkpoint: a kill before model.safetensors is (re)written leaves a
    stale or missing export, which load_checkpoint rewrites from resume.pt; the step is never applied twice."""
    model, opt = _model_opt()
    C.save_checkpoint(str(tmp_path), model, {"v": 1}, opt, step=2)
    with torch.no_grad():
        model[0].weight += 1
    real = C.save_weights

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(str(tmp_path), model, {"v": 1}, opt, step=4)
    monkeypatch.setattr(C, "save_weights", real)
    assert C.read_weights_config(str(tmp_path / "model.safetensors"))["step"] == 2          # stale export
    m2, o2 = _model_opt(seed=1)
    assert C.load_checkpoint(str(tmp_path), m2, o2).step == 4
    _same_state(model, m2)
    assert "was at step 2 (interrupted checkpoint write); rewritten" in capsys.readouterr().out
    sd, cfg = C.load_weights(str(tmp_path / "model.safetensors"))
    assert cfg["step"] == 4 and torch.equal(sd["0.weight"], model[0].weight.detach())
    # the first checkpoint killed between the files: only resume.pt -> resumed, export rebuilt
    os.remove(tmp_path / "model.safetensors")
    assert C.load_checkpoint(str(tmp_path), m2, o2).step == 4 and (tmp_path / "model.safetensors").exists()
    # only model.safetensors: refused, naming the missing file and the ways out
    os.remove(tmp_path / "resume.pt")
    with pytest.raises(C.CheckpointError, match=r"resume.pt is missing next to .*model.safetensors \(step 4\).*"
                                                r"--resume weights.*--resume fresh"):
        C.load_checkpoint(str(tmp_path), m2, o2)
    assert C.load_checkpoint(str(tmp_path), m2, o2, mode="weights").step == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_raise_one_error_naming_the_file(tmp_path, damage):
    model, opt = _model_opt()
    C.save_checkpoint(str(tmp_path), model, {"v": 1}, opt, step=1)
    for name in ("resume.pt", "model.safetensors"):
        run = tmp_path / f"{name}_{damage}"
        run.mkdir()
        for f in ("resume.pt", "model.safetensors"):
            (run / f).write_bytes((tmp_path / f).read_bytes())
        data = (run / name).read_bytes()
        (run / name).write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x00nonsense" * 50,
                                  "empty": b""}[damage])
        with pytest.raises(C.CheckpointError, match=f"{run / name}.*(corrupt|restore)") as e:
            C.load_checkpoint(str(run), model, opt)
        assert isinstance(e.value, ValueError)
        if name == "model.safetensors":
            with pytest.raises(C.CheckpointError, match=str(run / name)):
                C.load_weights(str(run / name))
    # a weights_only-loadable file that is not a resume state
    torch.save({"x": torch.zeros(1)}, tmp_path / "resume.pt")
    with pytest.raises(C.CheckpointError, match="not a nano4d resume file"):
        C.load_checkpoint(str(tmp_path), model, opt)


def test_never_writes_non_finite_weights(tmp_path):
    model, opt = _model_opt()
    C.save_checkpoint(str(tmp_path), model, {"v": 1}, opt, step=1)
    before = {f: (tmp_path / f).read_bytes() for f in ("resume.pt", "model.safetensors")}
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf.*0.weight"):
        C.save_checkpoint(str(tmp_path), model, {"v": 1}, opt, step=2)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_unwrap():
    inner = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    assert C.unwrap(Wrap(Wrap(inner))) is inner


def test_save_checkpoint_streams_the_resume_state(tmp_path):
    """resume.pt is written straight to its file: the peak memory a checkpoint adds stays well below the size of
    the state it writes (a ViT-L run's 4.7 GB state was once copied twice in memory)."""
    import subprocess
    import sys
    code = (
        "import resource, sys, torch\n"
        "from nano4d.checkpoint import save_checkpoint\n"
        "m = torch.nn.Linear(4096, 4096)\n"
        "opt = torch.optim.AdamW(m.parameters()); m(torch.randn(1, 4096)).sum().backward(); opt.step()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "save_checkpoint(sys.argv[1], m, {'model': {}}, opt, step=1)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, check=True).stdout
    state_mib = 3 * 4096 * 4097 * 4 / 2 ** 20                  # weights + two Adam moments: 192 MiB
    assert float(out.split()[-1]) < 0.6 * state_mib, out     # before: ~2.3x (BytesIO + getvalue copy)
