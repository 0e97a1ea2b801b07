"""Frozen-feature stereo matching eval of MuM encoders (nano4d/mum_eval.py)."""
import json

import pytest
import torch

from tests.test_mum import _model, official_layout


@pytest.fixture
def torch_path(monkeypatch):
    """The pure-torch attention path (the kernel is tested in tests/test_patch_attn.py)."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def test_match_pck_on_synthetic_shift():
    from nano4d.mum_eval import match_pck
    p, h, w = 4, 3, 6
    disp = torch.full((h * p, w * p), float(p))                              # every pixel moves one patch left
    f = torch.randn(h, w + 1, 8)
    fl, fr = f[:, :w].reshape(-1, 8), f[:, 1:w + 1].reshape(-1, 8)         # right (r, c) holds left (r, c + 1)
    res = match_pck(fl, fr, disp, p, w)
    # left (r, c) (c >= 1) truly maps to right (r, c-1), where features equal left (r, c): exact matches
    assert res["n_valid"] == h * (w - 1)
    assert res["pck@1"] == 1.0 and res["dense_pck@1"] == 1.0
    res_bad = match_pck(fl, torch.randn_like(fr), disp, p, w)
    assert res_bad["dense_pck@1"] < 1.0


def test_motorcycle_eval_runs_on_random_model(torch_path):
    pytest.importorskip("skimage")
    from nano4d.mum_eval import evaluate_model, load_motorcycle, reference_scores
    imgs, disp = load_motorcycle(scale=0.25)
    assert imgs.shape[-2] % 16 == 0 and imgs.shape[-1] % 16 == 0 and disp.shape == imgs.shape[-2:]
    res = evaluate_model(_model(), scale=0.25)
    assert 0 <= res["pck@1"] <= res["pck@2"] <= 1 and res["n_valid"] > 0
    ref = reference_scores(scale=0.25)
    assert ref["zero_motion"]["pck@2"] >= ref["zero_motion"]["pck@1"]


def test_official_cli_evaluates_a_released_layout_file(tmp_path, torch_path):
    """`python -m nano4d.mum_eval --official PATH` on a synthetic file in the official key layout (the
    encoder-only release form, bf16 RoPE periods), wrapped as an official training checkpoint {"model": sd}."""
    pytest.importorskip("skimage")
    from nano4d.mum import MuM
    from nano4d.mum_eval import main
    sd = official_layout(encoder_only=True, rope_dtype=torch.bfloat16)
    torch.save({"model": sd}, tmp_path / "official.pth")
    out = tmp_path / "match.json"
    res = main(["--official", str(tmp_path / "official.pth"), "--scale", "0.25", "--out", str(out)])
    assert res["official"] and json.loads(out.read_text())["trained"] == res["trained"]
    # the "trained" numbers are those of the converted weights, evaluated like our own checkpoints
    from nano4d.mum_eval import evaluate_model
    assert evaluate_model(MuM.from_official(sd), scale=0.25) == res["trained"]
    with pytest.raises(SystemExit):
        main([])                                                              # neither a checkpoint nor --official
