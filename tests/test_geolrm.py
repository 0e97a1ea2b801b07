"""GeoLRM model, .ply IO and training script (CPU; the model runs through the Triton interpreter in one test)."""
import ast
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import nano4d.geolrm as G
from nano4d import cameras as C
from nano4d.ply import load_ply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine is small and shared: intra-op threads only add contention at these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_path(monkeypatch):
    """Model-level tests where no kernel is under test: CPU references instead of the interpreter."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def micro_cfg(**kw):
    base = dict(img_size=16, patch_size=8, enc_dim=24, enc_depth=1, enc_heads=2, enc_pos_grid=2, feat_dim=12,
                occ_res=8, prop_grid=2, prop_dim=24, prop_depth=1, prop_heads=1, dim=24, depth=2, heads=1,
                max_tokens=16, max_tokens_infer=32, gaussians_per_token=2, offset_max=0.1, scale_max=0.1,
                n_points=2, ffn_multiple_of=8)
    base.update(kw)
    return G.GeoLRMConfig(**base)


def cameras(n, seed=0, res=16):
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=g) * 2 * math.pi
    el = torch.rand(n, generator=g) * 0.8 - 0.2
    eye = 2.0 * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    return C.look_at(eye, torch.zeros(3)), C.fov_to_K(math.radians(40), res, res).expand(n, 3, 3)


# ----------------------------------------------------------------------------- structure


def test_model_file_imports_only_torch_kernels_stdlib():
    tree = ast.parse(open(os.path.join(ROOT, "nano4d", "geolrm.py")).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"torch", "kernels", "__future__", "dataclasses", "json", "math", "os", "re", "typing"}, mods
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('g', 'nano4d/geolrm.py'); "
            "m = importlib.util.module_from_spec(s); sys.modules['g'] = m; s.loader.exec_module(m); "
            "bad = [k for k in sys.modules if k == 'nano4d' or k.startswith('nano4d.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_line_budgets():
    assert len(open(os.path.join(ROOT, "nano4d", "geolrm.py")).readlines()) <= 1000
    assert len(open(os.path.join(ROOT, "train_geolrm.py")).readlines()) <= 450


def test_paper_parameter_counts_on_meta():
    cfg = G.PRESETS["paper"]
    with torch.device("meta"):
        m = G.GeoLRM(cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    # DINOv2-base ViT (patch 14, 37x37 + CLS position table, 12 blocks, LayerScale) + the two feature heads
    E = 768
    block = 2 * 2 * E + 4 * (E * E + E) + 2 * E + (E * 4 * E + 4 * E) + (4 * E * E + E)
    vit = (E * 3 * 14 * 14 + E) + E + 1370 * E + 12 * block + 2 * E
    heads = (E * 384 * 16 + 384) + 2 * 384 + (9 * 384 * 16 + 384) + 2 * 384
    assert vit + E == 86_580_480                      # dinov2-base incl. its mask token (a buffer here)
    assert count(m.recon.encoder) == vit + heads
    # geometry-aware block at width d: attention 4d^2, cross-attention (value 384->d, 16 heads x 2 levels x 8
    # points offsets and weights, view logit, output), SwiGLU 3 d h, 3 RMSNorms
    def geo_block(d, heads, hidden):
        cross = (384 * d + d) + (d * heads * 32 + heads * 32) + (d * heads * 16 + heads * 16) + (d + 1) + (d * d + d)
        return 4 * d * d + cross + 3 * d * hidden + 3 * d
    assert count(m.recon.transformer) == 16 * geo_block(768, 16, 2048) + 768
    assert count(m.recon.head) == (768 * 448 + 448) + (448 * 448 + 448)               # 32 Gaussians x 14
    assert count(m.proposal.transformer) == 6 * geo_block(384, 16, 1024) + 384
    assert count(m.proposal.head) == 384 * 512 + 512                                  # 8^3 cells per token
    assert m.proposal.embed.shape == (16 ** 3, 381)
    assert count(m.recon) == vit + heads + 16 * geo_block(768, 16, 2048) + 768 + 765 + 545_664


# ----------------------------------------------------------------------------- geometry


def test_rope_3d_relative_position_property():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 12, generator=g, dtype=torch.float64), torch.randn(1, 2, 5, 12, generator=g, dtype=torch.float64)
    p = torch.randint(0, 50, (1, 5, 3), generator=g)
    shift = torch.tensor([7, -3, 11])
    dots = lambda a: torch.einsum("bhnd,bhmd->bhnm", G.rope_3d(q, a), G.rope_3d(k, a))  # noqa: E731
    torch.testing.assert_close(dots(p), dots(p + shift))                              # only p - p' matters
    assert not torch.allclose(dots(p), dots(p * 2))                                   # ... and it does matter
    torch.testing.assert_close(G.rope_3d(q, torch.zeros_like(p)), q)                  # position 0: identity
    torch.testing.assert_close(G.rope_3d(q, p).norm(dim=-1), q.norm(dim=-1))          # a rotation
    # the x index only rotates the first third of the head dim
    px = p.clone()
    px[..., 0] += 5
    a, b = G.rope_3d(q, p), G.rope_3d(q, px)
    torch.testing.assert_close(a[..., 4:], b[..., 4:])
    assert not torch.allclose(a[..., :4], b[..., :4])


def test_projection_and_plucker_match_camera_utils():
    c2w, K = cameras(3, seed=1, res=20)
    xyz = (torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(2)) - 0.5) * 3   # some off-image
    ref, vis = G.project_anchors(xyz, c2w[None], K[None], 20, 20)
    uv, z = C.project_points(xyz[0], C.invert_pose(c2w), K)                           # (V, N, 2), (V, N)
    torch.testing.assert_close(ref[0] * 20, uv, rtol=1e-4, atol=1e-4)
    inside = (z > 0) & (uv >= 0).all(-1) & (uv <= 20).all(-1)
    assert torch.equal(vis[0], inside) and inside.any() and not inside.all()
    behind = 1.5 * c2w[:1, :3, 3]                                                      # past the camera centre
    assert not G.project_anchors(behind[None], c2w[None, :1], K[None, :1], 20, 20)[1].any()
    torch.testing.assert_close(G.plucker_rays(c2w[None], K[None], 6, 5), C.plucker_rays(c2w[None], K[None], 6, 5))


def test_unfold_cells_and_anchor_selection_layout():
    Gs, u = 2, 3
    R = Gs * u
    gz, gy, gx, dz, dy, dx = torch.meshgrid(*[torch.arange(n) for n in (Gs, Gs, Gs, u, u, u)], indexing="ij")
    flat = ((gz * u + dz) * R + (gy * u + dy)) * R + (gx * u + dx)                     # expected cell id
    grid = G.unfold_cells(flat.reshape(1, Gs ** 3, u ** 3).float(), Gs, u)
    assert torch.equal(grid[0], torch.arange(R ** 3).view(R, R, R).float())
    occ = torch.full((2, R, R, R), -1.0)
    occ[0, 1, 4, 2] = 1.0                                                              # z=1, y=4, x=2
    xyz, pos, seg = G.select_anchors(occ, 8)
    assert xyz.shape == (2, 1, 3) and seg.tolist() == [[0], [-1]]
    assert pos[0, 0].tolist() == [2, 4, 1]
    torch.testing.assert_close(xyz[0, 0], -0.5 + (torch.tensor([2, 4, 1]) + 0.5) / R)
    assert torch.equal(xyz[1], torch.zeros(1, 3))                                      # padding at the origin
    many = torch.ones(1, R, R, R)
    assert G.select_anchors(many, 10)[0].shape == (1, 10, 3)                            # subsampled


def test_occupancy_loss_and_iou():
    occ = (torch.rand(2, 8, 8, 8) > 0.7).float()
    good, bad = (occ * 2 - 1) * 20, -(occ * 2 - 1) * 20
    lg, lb = G.occupancy_loss(good, occ), G.occupancy_loss(bad, occ)
    assert lg["loss"] < 1e-3 < 10 < lb["loss"]
    assert torch.equal(G.occupancy_iou(good, occ), torch.ones(2))
    assert torch.equal(G.occupancy_iou(bad, occ), torch.zeros(2))


def test_view_fusion_ignores_invisible_views(torch_path):
    torch.manual_seed(0)
    att = G.DeformCrossAttention(dim=12, feat_dim=6, heads=2, points=2)
    x = torch.randn(1, 4, 12)
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    feats = torch.randn(2, 20, 6)
    ref = torch.rand(1, 2, 4, 2)
    vis = torch.tensor([[[True, True, False, True], [True, False, False, True]]])
    out = att(x, ref, vis, feats, shapes, starts)
    feats2 = feats.clone()
    feats2[1] = torch.randn(20, 6) * 5                                                 # change view 1 only
    out2 = att(x, ref, vis, feats2, shapes, starts)
    torch.testing.assert_close(out[:, 1], out2[:, 1])                                  # token 1 sees only view 0
    assert not torch.allclose(out[:, 0], out2[:, 0])
    torch.testing.assert_close(out[0, 2], att.out_proj.bias.detach())                  # no view: zero message


# ----------------------------------------------------------------------------- DINOv2 (Hugging Face layout)


def hf_dinov2_state_dict(E=24, depth=2, p=8, grid=2, mlp=4):
    """A randomly initialized state dict with exactly the key names and shapes of HF ``Dinov2Model``."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"embeddings.cls_token": r(1, 1, E), "embeddings.mask_token": r(1, E),
          "embeddings.position_embeddings": r(1, 1 + grid * grid, E),
          "embeddings.patch_embeddings.projection.weight": r(E, 3, p, p),
          "embeddings.patch_embeddings.projection.bias": r(E),
          "layernorm.weight": r(E), "layernorm.bias": r(E)}
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = r(E), r(E)
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = r(E, E), r(E)
        sd[pre + "layer_scale1.lambda1"], sd[pre + "layer_scale2.lambda1"] = r(E), r(E)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = r(mlp * E, E), r(mlp * E)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = r(E, mlp * E), r(E)
    return sd


def test_load_dinov2_hf_state_dict(tmp_path, torch_path):
    from safetensors.torch import load_file, save_file
    sd = hf_dinov2_state_dict()
    save_file({"dinov2." + k if i % 2 else k: v for i, (k, v) in enumerate(sd.items())}, tmp_path / "model.safetensors")
    enc = G.ImageEncoder(micro_cfg(enc_dim=24, enc_depth=2, enc_heads=2))
    loaded = G.load_dinov2_hf(enc, load_file(tmp_path / "model.safetensors"))
    own = enc.state_dict()
    assert len(loaded) == len(sd)
    torch.testing.assert_close(own["blocks.1.q.weight"], sd["encoder.layer.1.attention.attention.query.weight"])
    torch.testing.assert_close(own["blocks.0.proj.bias"], sd["encoder.layer.0.attention.output.dense.bias"])
    torch.testing.assert_close(own["blocks.0.ls2"], sd["encoder.layer.0.layer_scale2.lambda1"])
    torch.testing.assert_close(own["pos_embed"], sd["embeddings.position_embeddings"])
    torch.testing.assert_close(own["norm.weight"], sd["layernorm.weight"])
    # the loaded ViT runs, and its position table is interpolated to a larger input (3x3 patches)
    c2w, K = cameras(2, res=24)
    feats, shapes, starts = enc(torch.rand(1, 2, 3, 24, 24), c2w[None], K[None])
    assert shapes.tolist() == [[6, 6], [6, 6]] and feats.shape == (2, 72, 12) and starts.tolist() == [0, 36]
    with pytest.raises(ValueError, match="unexpected key"):
        G.load_dinov2_hf(enc, {**sd, "pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks"):
        G.load_dinov2_hf(enc, {k: v for k, v in sd.items() if "layer.1." not in k})
    with pytest.raises(ValueError, match="shape"):
        G.load_dinov2_hf(G.ImageEncoder(micro_cfg(enc_dim=48, enc_depth=2, enc_heads=2)), sd)


# ----------------------------------------------------------------------------- model


def _recon_inputs(cfg, V=2, seed=0):
    c2w, K = cameras(V, seed=seed, res=cfg.img_size)
    return torch.rand(1, V, 3, cfg.img_size, cfg.img_size), c2w[None], K[None]


def _check_padding_invariance(cfg):
    torch.manual_seed(0)
    net = G.ReconNet(cfg).eval()
    images, c2w, K = _recon_inputs(cfg)
    occ = torch.full((1, cfg.occ_res, cfg.occ_res, cfg.occ_res), -1.0)
    occ[0, 3:5, 2:6, 4] = 1.0                                                          # 8 occupied cells
    xyz, pos, seg = G.select_anchors(occ, 64)
    pad = 5
    xyz_p = torch.cat([xyz, torch.zeros(1, pad, 3)], 1)
    pos_p = torch.cat([pos, torch.zeros(1, pad, 3, dtype=pos.dtype)], 1)
    seg_p = torch.cat([seg, torch.full((1, pad), -1, dtype=seg.dtype)], 1)
    with torch.no_grad():
        a, b = net(xyz, pos, seg, images, c2w, K), net(xyz_p, pos_p, seg_p, images, c2w, K)
    M = xyz.shape[1] * cfg.gaussians_per_token
    for ta, tb in zip(a, b):
        torch.testing.assert_close(tb[:, :M], ta, rtol=1e-5, atol=1e-5)
    assert torch.all(b.opacities[:, M:] == 0) and torch.all(a.opacities > 0)
    return net, (xyz_p, pos_p, seg_p), (images, c2w, K)


def test_padding_tokens_do_not_change_real_tokens_triton():
    """Runs the reconstruction network through the Triton kernels (interpreter on CPU)."""
    _check_padding_invariance(micro_cfg(depth=1))


def test_padding_quirk_flag_keeps_padding(torch_path):
    cfg = micro_cfg(official_keep_padding=True)
    net = G.ReconNet(cfg).eval()
    images, c2w, K = _recon_inputs(cfg)
    occ = torch.full((1, 8, 8, 8), -1.0)
    occ[0, 2, 2, 2:5] = 1
    xyz, pos, seg = G.select_anchors(occ, 64)
    xyz_p, pos_p = torch.cat([xyz, torch.zeros(1, 2, 3)], 1), torch.cat([pos, torch.zeros(1, 2, 3, dtype=pos.dtype)], 1)
    seg_p = torch.cat([seg, torch.full((1, 2), -1, dtype=seg.dtype)], 1)
    with torch.no_grad():
        a, b = net(xyz, pos, seg, images, c2w, K), net(xyz_p, pos_p, seg_p, images, c2w, K)
    assert (b.opacities[:, 6:] > 0).all()                                              # padding became Gaussians
    assert not torch.allclose(a.means, b.means[:, :6])                           # ... and leaked into attention


def test_gaussian_head_ranges_and_render(torch_path):
    cfg = micro_cfg()
    model = G.GeoLRM(cfg)
    images, c2w, K = _recon_inputs(cfg, V=3)
    tc2w, tK = cameras(2, seed=5, res=12)
    occ = torch.zeros(1, 8, 8, 8)
    occ[0, 3:5, 3:5, 3:5] = 1
    anchors = model.gt_anchors(occ)
    g = model.recon(*anchors, images, c2w, K)
    out = G.render(g, tc2w[None], tK[None], 12, 12, background=torch.ones(1, 2, 3))
    off = g.means.view(1, 8, 2, 3) - anchors.xyz[:, :, None]
    assert off.abs().max() <= cfg.offset_max and (g.scales > 0).all() and (g.scales <= cfg.scale_max).all()
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(1, 16))
    assert out["rgb"].shape == (1, 2, 3, 12, 12) and out["alpha"].shape == out["depth"].shape == (1, 2, 1, 12, 12)
    assert out["alpha"].max() > 0.05                                                   # the Gaussians are in view
    cfg2 = dataclasses.replace(cfg, official_positive_offsets=True)
    g2 = G.ReconNet(cfg2)(*anchors, images, c2w, K)
    assert (g2.means.view(1, 8, 2, 3) - anchors.xyz[:, :, None]).min() >= 0


def _front_door_batches(seed=0, cfg=None):
    """One procedural object as a proposal batch and a reconstruction batch for ``GeoLRM.forward``."""
    from nano4d.data.objects import ProceduralObjects
    d = ProceduralObjects(1, num_views=4, res=16, occ_res=8, occ_mode="surface", num_surface_points=0, seed=seed)[0]
    inp = {"images": d["images"][None, :2], "c2w": d["c2w"][None, :2], "K": d["K"][None, :2]}
    prop = {**inp, "occupancy": d["occupancy"][None]}
    rec = {**inp, "target_rgb": d["images"][None, 2:], "target_alpha": d["alphas"][None, 2:],
           "target_depth": d["depths"][None, 2:], "target_c2w": d["c2w"][None, 2:], "target_K": d["K"][None, 2:],
           "background": torch.ones(1, 2, 3), "occupancy": d["occupancy"][None]}
    return prop, rec


def test_losses_decrease_when_fitting_one_object(torch_path):
    """A few optimizer steps through the front door on one fixed batch lower both stage losses."""
    torch.manual_seed(0)
    cfg = micro_cfg()
    prop_b, rec_b = _front_door_batches()
    model = G.GeoLRM(cfg)
    opt = model.configure_optimizer(3e-3, weight_decay=0.0)
    rec_b["anchors"] = model.gt_anchors(rec_b["occupancy"])
    prop, rec = [], []
    for _ in range(12):
        lp, out_p = model(prop_b, stage="proposal")
        lr, out_r = model(rec_b, stage="recon")
        assert set(out_p["terms"]) == {"bce", "affinity", "loss"} and 0 <= out_p["occ_iou"] <= 1
        assert {"rgb", "alpha", "depth", "tv", "loss"} <= set(out_r["terms"]) and out_r["rgb"].shape == (1, 2, 3, 16, 16)
        opt.zero_grad()
        (lp + lr).backward()
        opt.step()
        prop.append(lp.item()), rec.append(lr.item())
    assert prop[-1] < 0.9 * prop[0] and rec[-1] < 0.9 * rec[0], (prop, rec)


# ----------------------------------------------------------------------------- training script


def test_train_script_both_stages_resume_and_inference(tmp_path, torch_path):
    sys.path.insert(0, ROOT)
    import train_geolrm as T
    run = str(tmp_path / "run")
    args = ["--run_dir", run, "--model.img_size", "16", "--res", "16", "--num_train", "2", "--num_eval", "1",
            "--views_per_object", "4", "--eval_views", "6", "--novel_views", "2", "--eval_inputs", "2",
            "--max_inputs", "2", "--num_targets", "2", "--prop_steps", "2", "--recon_steps", "2", "--warmup", "1",
            "--lpips", "false", "--export_ply", "1", "--turntable", "2", "--log_every", "1",
            "--model.enc_depth", "1", "--model.depth", "1", "--model.max_tokens", "32"]
    m = T.main(args)
    assert 0 <= m["proposal"]["occ_iou"] <= 1 and math.isfinite(m["recon"]["psnr"])
    assert math.isfinite(m["recon"]["base_psnr"]) and set(m["psnr_vs_views"]) == {2, 4}
    for f in ("model.safetensors", "resume.pt", "preview.png", "metrics.json", "heldout_0.ply",
              "heldout_0_turntable.png", "log.jsonl"):
        assert os.path.exists(os.path.join(run, f)), f
    assert load_ply(os.path.join(run, "heldout_0.ply"))["means"].shape[0] > 0
    # resume: two more recon steps continue from step 4
    m2 = T.main(args + ["--recon_steps", "4"])
    import json
    steps = [json.loads(ln) for ln in open(os.path.join(run, "log.jsonl"))]
    recon = [r["step"] for r in steps if "loss" in r and "bce" not in r]
    assert recon[-2:] == [3, 4] and "recon" in m2
    # inference CLI on a .pt of posed images (any number of views)
    from nano4d.data.objects import ProceduralObjects
    d = ProceduralObjects(1, num_views=3, res=16, seed=9, split="test", occ_res=0, num_surface_points=0)[0]
    torch.save({"images": d["images"], "c2w": d["c2w"], "K": d["K"]}, tmp_path / "obj.pt")
    T.main(["--infer", str(tmp_path / "obj.pt"), "--ckpt", os.path.join(run, "model.safetensors"),
            "--run_dir", str(tmp_path / "inf"), "--turntable", "3"])
    assert load_ply(str(tmp_path / "inf" / "infer.ply"))["means"].shape[1] == 3
    assert os.path.exists(tmp_path / "inf" / "infer_turntable.png")


def test_gobjaverse_folder_loading_and_depth_occupancy(tmp_path):
    """``--data DIR``: objects in the GObjaverse layout are read, resized, and without occupancy.npy their
    occupancy is binned from the depth maps; those cells lie on the true surface (|SDF| <= half a cell
    diagonal at the centre), and cover most of it."""
    sys.path.insert(0, ROOT)
    import train_geolrm as T
    from nano4d.data.gobjaverse import write_gobjaverse_object
    from nano4d.data.objects import ProceduralObjects, occupancy_grid
    ds = ProceduralObjects(3, num_views=6, res=24, occ_res=0, num_surface_points=0, background="white")
    for i in range(3):
        d = ds._render(i)
        rgba = torch.cat([d["rgb"], d["alphas"]], 1).permute(0, 2, 3, 1)
        write_gobjaverse_object(str(tmp_path), f"obj{i}", rgba, d["c2w"], d["K"], depth=d["depths"][:, 0])
    tc = T.TrainConfig(data=str(tmp_path), num_eval=1, res=16)
    mc = micro_cfg(occ_res=16)
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
