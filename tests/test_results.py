"""nano4d.results: the held-out split rule, matching scores, a real pair's ground truth, plots of a run."""
import json

import pytest
import torch

from nano4d import results as R
from nano4d.data.meshes import load_obj
from nano4d.mim4d import PRESETS


def test_split_is_by_name_hash_only():
    ids = [f"cat__obj{i}" for i in range(400)]
    a = R.split_ids(ids, n_train=50)
    b = R.split_ids(list(reversed(ids))[:300] + ["zzz"], n_train=50)
    assert 20 < len(a["val"]) < 70 and len(a["train"]) == 50 and not set(a["val"]) & set(a["train"])
    # membership of an id never depends on the other ids present
    assert set(b["val"]) - {"zzz"} == {i for i in a["val"] if i in set(ids[100:])}
    assert R.split_ids(ids, n_train=50) == a


def test_match_scores_identity_and_shuffled():
    torch.manual_seed(0)
    h, w, p = 6, 8, 4
    f = torch.randn(h * w, 16)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = torch.stack([(xs.flatten() + 0.5) * p, (ys.flatten() + 0.5) * p], 1).float()
    valid = torch.ones(h * w, dtype=torch.bool)
    s = R.match_scores(f, f, centre, valid, p, w)
    assert s["pck@1"] == 1.0 and s["mnn_precision@1"] == 1.0 and s["mnn_count"] == h * w
    s = R.match_scores(f, f[torch.randperm(h * w)], centre, valid, p, w)
    assert s["pck@1"] < 0.3


def test_motorcycle_ground_truth_beats_shifted():
    pytest.importorskip("skimage")
    imgs, centre, valid, w = R.prepare_pair("motorcycle", 192, 16)
    assert imgs.shape[-2] % 16 == 0 and valid.float().mean() > 0.5
    px = R._pixel_features(imgs, 16)
    good = R.match_scores(px[0], px[1], centre, valid, 16, w)
    bad = R.match_scores(px[0], px[1], centre + torch.tensor([48.0, 0.0]), valid, 16, w)
    assert good["pck@1"] > bad["pck@1"] + 0.1


def _fake_run(d):
    recs = [{"kind": "train", "step": s, "total": 20, "stage": st, "loss": 1.0 / s, "bce": 0.5 / s, "lr": 1e-3,
             "grad_norm": 1.0, "step_time": 0.1, "obj_per_s": 3.0, "eta_s": 1.0, "time": 0.0}
            for st, steps in (("proposal", range(1, 11)), ("recon", range(11, 21))) for s in steps]
    recs += [{"kind": "eval", "step": s, "split": "val", "metrics": {"psnr": 10.0 + s, "ssim": 0.5}} for s in (10, 20)]
    (d / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "metrics.json").write_text(json.dumps({"psnr_vs_views": {"2": 14.0, "4": 15.0, "8": 15.5}}))


def test_read_run_and_bad_line(tmp_path):
    _fake_run(tmp_path)
    run = R.read_run(tmp_path)
    assert len(run["train"]) == 20 and len(run["eval"]) == 2 and run["metrics"]["psnr_vs_views"]["4"] == 15.0
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="log.jsonl:23"):
        R.read_run(tmp_path)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path)
    assert R.main(["plot", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        f"{tmp_path.name}_{k}.png" for k in ("eval", "loss", "psnr_vs_views")]
    stat = {"mean": 1.0, "std": 0.1, "n": 4}
    geo = {"kind": "geolrm_heldout", "objects": 4, "by_views": {n: {k: stat for k in ("psnr", "base_psnr", "lpips",
                                                                                       "base_lpips")} for n in "24"}}
    runs = {"runs": [{"pck@1": 0.2, "pck@5": 0.6}], "mean": {"pck@1": 0.2, "pck@5": 0.6}, "std": {"pck@1": 0, "pck@5": 0}}
    mum = {"kind": "mum_matching", "pairs": {"graf": {"features": {"trained": runs, "raw_pixels": runs}}}}
    for name, res in (("geo", geo), ("mum", mum)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
        out = R.plot_any(tmp_path / f"{name}.json", tmp_path / "plots")
        assert len(out) == 1 and open(out[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "x.json").write_text("{}")
    assert R.main(["plot", str(tmp_path / "x.json"), "--out", str(tmp_path)]) == 2


def test_off_to_obj_and_bev_probe_grid(tmp_path):
    (tmp_path / "t.off").write_text("OFF\n# a tetrahedron\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n")
    assert R.off_to_obj(tmp_path / "t.off", tmp_path / "t" / "t.obj") == 4
    m = load_obj(tmp_path / "t" / "t.obj")
    assert len(m.faces) == 4 and m.vertices.shape == (4, 3)
    # the probe's label grid puts cell centres exactly on the voxel nodes
    cfg = PRESETS["tiny"]
    (x0, _, _, x1, _, _), (NX, _, _) = cfg.pc_range, cfg.grid
    R_ = x1 * NX / (NX - 1)
    centres = -R_ + (torch.arange(NX) + 0.5) * (2 * R_ / NX)
    assert torch.allclose(centres, torch.linspace(x0, x1, NX), atol=1e-5)


def test_probe_learns_separable_labels():
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (6, 8, 8))
    feats = torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float() + 0.05 * torch.randn(6, 3, 8, 8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)             # tiny ops: intra-op threads only add barrier waits on a busy machine
    try:
        r = R.train_probe(feats[:4], lab[:4], feats[4:], lab[4:], 3, steps=30, lr=0.2)
    finally:
        torch.set_num_threads(n)
    assert min(r["iou"].values()) > 0.95
