"""GeoLRM model, .ply IO and training script (CPU; the model runs through the Triton interpreter in one test)."""
import ast
import dataclasses
import math
import re
import os
import subprocess
import sys

import pytest
import torch

import nano4d.geolrm as G
from nano4d import cameras as C

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
    assert len(open(os.path.join(ROOT, "nano4d", "geolrm.py")).readlines()) <= 1050
    src = open(os.path.join(ROOT, "train_geolrm.py")).read()
    assert len(src.splitlines()) <= 480
    main = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50                                      # main fits on a screen


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
    # official: precision/recall/specificity pooled over the batch (differs when objects differ in size)
    logits = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    occ2 = occ.clone()
    occ2[1, :4] = 1
    p, t = torch.sigmoid(logits).flatten(), occ2.flatten()
    prec, rec, spec = (p * t).sum() / p.sum(), (p * t).sum() / t.sum(), ((1 - p) * (1 - t)).sum() / (1 - t).sum()
    want = -(prec.log() + rec.log() + spec.log())
    torch.testing.assert_close(G.occupancy_loss(logits, occ2, pooled=True)["affinity"], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(G.occupancy_loss(logits, occ2)["affinity"], want, rtol=1e-3)


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
    assert shapes == ((6, 6), (6, 6)) and feats.shape == (2, 72, 12) and starts == (0, 36)
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


# ----------------------------------------------------------------------------- official behaviours (one test per flag)


def test_official_attention_is_head_softmax_then_token_mixing_and_ignores_rope():
    """The official fp32 branch, written out with loops: softmax over the heads of one token, then the
    (H, N, D) result re-sliced into tokens. RoPE cannot change it; it does change token attention."""
    g = torch.Generator().manual_seed(0)
    B, N, H, D = 2, 5, 3, 6
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    o = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            for h in range(H):
                w = torch.softmax(torch.stack([q[b, n, h] @ k[b, n, j] for j in range(H)]) / math.sqrt(D), 0)
                o[b, h, n] = sum(w[j] * v[b, n, j] for j in range(H))
    want = o.reshape(B, H * N * D).view(B, N, H * D)                                    # memory order (H, N, D)
    torch.testing.assert_close(G.official_head_attention(q, k, v), want)
    # in a block: positions have no effect with the flag, and do without it
    for flag, same in ((True, True), (False, False)):
        torch.manual_seed(0)
        blk = G.GeoBlock(12, 2, 6, micro_cfg(official_fp32_attention=flag)).double()
        x = torch.randn(1, 4, 12, dtype=torch.float64)
        feats, shapes, starts = torch.randn(1, 20, 6, dtype=torch.float64), ((4, 4), (2, 2)), (0, 16)
        ref, vis = torch.rand(1, 1, 4, 2, dtype=torch.float64), torch.ones(1, 1, 4, dtype=torch.bool)
        p1, p2 = torch.randint(0, 128, (1, 4, 3), generator=g), torch.randint(0, 128, (1, 4, 3), generator=g)
        with torch.no_grad():
            a, b = (blk(x, p, None, ref, vis, feats, shapes, starts) for p in (p1, p2))
        assert torch.allclose(a, b, atol=1e-12) == same


def test_official_view_fusion_is_plain_softmax_over_views(torch_path):
    torch.manual_seed(0)
    args = dict(dim=12, feat_dim=6, heads=2, points=2)
    masked, plain = G.DeformCrossAttention(**args), G.DeformCrossAttention(**args, mask_views=False)
    plain.load_state_dict(masked.state_dict())
    x, feats = torch.randn(1, 4, 12), torch.randn(2, 20, 6)
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    ref = torch.rand(1, 2, 4, 2)
    vis = torch.tensor([[[True, True, False, True], [True, False, False, True]]])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, ref, vis, feats, shapes, starts),
                                   masked(x, ref, torch.ones_like(vis), feats, shapes, starts))
        assert not torch.allclose(plain(x, ref, vis, feats, shapes, starts), masked(x, ref, vis, feats, shapes, starts))
    # the official projection divides by z as is: a point behind the camera lands mirrored, not clamped
    c2w, K = cameras(1, res=10)
    behind = (1.5 * c2w[0, :3, 3])[None, None]
    ref_o, _ = G.project_anchors(behind, c2w[None], K[None], 10, 10, near=None)
    ref_n, vis_n = G.project_anchors(behind, c2w[None], K[None], 10, 10)
    assert not vis_n.any() and torch.isfinite(ref_o).all() and not torch.allclose(ref_o, ref_n)
    assert G.GeoTransformer(12, 1, 2, micro_cfg(official_no_visibility_mask=True)).near is None


def test_official_plucker_direction_is_the_z1_camera_ray():
    c2w, K = cameras(2, seed=3, res=8)
    unit, raw = G.plucker_rays(c2w[None], K[None], 8, 8), G.plucker_rays(c2w[None], K[None], 8, 8, unit=False)
    d_cam = torch.einsum("vji,vjhw->vihw", c2w[:, :3, :3], raw[0, :, :3])              # R^T d
    torch.testing.assert_close(d_cam[:, 2], torch.ones(2, 8, 8))                       # z = 1 in the camera
    torch.testing.assert_close(d_cam[:, 0, 0, 0], ((0.5 - K[:, 0, 2]) / K[:, 0, 0]))   # pixel centre +0.5
    torch.testing.assert_close(torch.nn.functional.normalize(raw[0, :, :3], dim=1), unit[0, :, :3])
    torch.testing.assert_close(torch.linalg.cross(c2w[:, None, None, :3, 3].expand(2, 8, 8, 3),
                                                  raw[0, :, :3].permute(0, 2, 3, 1), dim=-1),
                               raw[0, :, 3:].permute(0, 2, 3, 1))
    enc = G.ImageEncoder(micro_cfg(official_plucker=True, official_conv_no_bias=True))
    assert enc.up.bias is None and enc.low.bias is None and enc.cfg.official_plucker


def test_official_proposal_positions_order_and_shared_query():
    """16^3 anchors of a 128 grid: RoPE positions are the official truncated indices, tokens x-slowest,
    head rows (dx, dy, dz), one shared query token."""
    cfg = micro_cfg(occ_res=128, prop_grid=16, official_rope_positions=True, official_xyz_order=True,
                    official_shared_query=True, official_cell_positions=True)
    net = G.ProposalNet(cfg)
    idx = torch.tensor([0, 8, 16, 25, 33, 42, 50, 59, 67, 76, 84, 93, 101, 110, 118, 127])
    ix, iy, iz = torch.meshgrid(idx, idx, idx, indexing="ij")
    assert torch.equal(net.pos, torch.stack([ix, iy, iz], -1).reshape(-1, 3))
    assert net.embed.shape == (1, cfg.prop_dim - 3)
    step = net.anchors[1] - net.anchors[0]
    assert step[0] == step[1] == 0 and step[2] > 0                                      # z fastest
    torch.testing.assert_close(net.anchors[0], torch.full((3,), -0.5))
    assert net.anchors[16 * 16, 0] > net.anchors[0, 0]                                  # x slowest
    # default: integer positions 0..G-1, z slowest
    d = G.ProposalNet(micro_cfg())
    assert d.pos.max() == 1 and torch.equal(d.pos[1], torch.tensor([1, 0, 0])) and d.embed.shape[0] == 8


def test_official_occupancy_head_row_order(torch_path):
    """Head row r of token (gx, gy, gz) fills cell (gx u + dx, gy u + dy, gz u + dz) with r = (dx u + dy) u + dz
    (official), or (dz u + dy) u + dx of token (gz, gy, gx) (default). Grids are (Z, Y, X) either way."""
    for flag in (False, True):
        net = G.ProposalNet(micro_cfg(official_xyz_order=flag)).eval()
        u = net.u
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.copy_(torch.arange(u ** 3).float())
            images, c2w, K = _recon_inputs(micro_cfg())
            grid = net(images, c2w, K)[0]                                               # (Z, Y, X)
        z, y, x = torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij")
        dz, dy, dx = z % u, y % u, x % u
        want = (dx * u + dy) * u + dz if flag else (dz * u + dy) * u + dx
        assert torch.equal(grid, want.float())
    occ = torch.full((1, 4, 4, 4), -1.0)
    occ[0, 1, 2, 3] = occ[0, 2, 0, 0] = 1                                               # (z, y, x)
    assert G.select_anchors(occ, 8).pos[0].tolist() == [[3, 2, 1], [0, 0, 2]]           # z slowest
    assert G.select_anchors(occ, 8, xyz_order=True).pos[0].tolist() == [[0, 0, 2], [3, 2, 1]]  # x slowest
    assert G.select_anchors(occ, 8, pad_to_max=True).xyz.shape == (1, 8, 3)


def test_proposal_dropout_only_in_training(torch_path):
    torch.manual_seed(0)
    net = G.ProposalNet(micro_cfg(prop_dropout=0.5, official_fp32_attention=True))
    ref = G.ProposalNet(micro_cfg())
    ref.load_state_dict(net.state_dict())
    images, c2w, K = _recon_inputs(micro_cfg())
    with torch.no_grad():
        net.eval(), ref.eval()
        assert not torch.equal(net(images, c2w, K), ref(images, c2w, K))              # official attention differs
        net.train()
        assert not torch.equal(net(images, c2w, K), net(images, c2w, K))              # dropout active
    net2 = G.ProposalNet(micro_cfg(prop_dropout=0.5)).eval()
    ref.load_state_dict(net2.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net2(images, c2w, K), ref(images, c2w, K))         # eval: no dropout


def test_official_loss_flags():
    g = torch.Generator().manual_seed(0)
    out = {"rgb": torch.rand(1, 1, 3, 4, 4, generator=g) * 1.4 - 0.2, "alpha": torch.rand(1, 1, 1, 4, 4, generator=g),
           "depth": torch.rand(1, 1, 1, 4, 4, generator=g)}
    tgt = {"rgb": torch.rand(1, 1, 3, 4, 4, generator=g), "alpha": torch.zeros(1, 1, 1, 4, 4),
           "depth": torch.rand(1, 1, 1, 4, 4, generator=g)}
    tgt["alpha"][..., 0, 1] = 1                                                         # one pixel in the mask
    cfg, off = micro_cfg(), micro_cfg(official_rgb_clamp=True, official_depth_mask_left=True)
    rgb = out["rgb"].clone().requires_grad_()
    G.recon_loss({**out, "rgb": rgb}, tgt, off)["rgb"].backward()
    outside = (out["rgb"] < 0) | (out["rgb"] > 1)
    assert outside.any() and (rgb.grad[outside] == 0).all() and (rgb.grad[~outside] != 0).all()
    a, b = G.recon_loss(out, tgt, cfg), G.recon_loss(out, tgt, off)
    assert a["depth"] == 0 and b["depth"] > 0                                           # pair with only its left pixel in
    assert not torch.allclose(a["rgb"], b["rgb"])
    # the left-only pair, by hand: pixel (0, 1) with its right neighbour, and with the one below
    err = torch.log1p((out["depth"] - tgt["depth"]).abs())[0, 0, 0]
    im = tgt["rgb"][0, 0]
    wx, wy = torch.exp(-(im[:, 0, 2] - im[:, 0, 1]).abs().mean()), torch.exp(-(im[:, 1, 1] - im[:, 0, 1]).abs().mean())
    torch.testing.assert_close(b["depth"], err[0, 1] * wx + err[0, 1] * wy)


def test_official_position_interpolation():
    enc, off = G.ImageEncoder(micro_cfg(enc_pos_grid=3)), G.ImageEncoder(micro_cfg(enc_pos_grid=3, official_pos_interp=True))
    off.load_state_dict(enc.state_dict())
    torch.testing.assert_close(off.pos_embed_for(3, 3), enc.pos_embed_for(3, 3))       # native size: the table
    a, b = enc.pos_embed_for(2, 2), off.pos_embed_for(2, 2)
    assert a.shape == b.shape == (1, 5, 24) and (a - b).abs().max() > 1e-3
    grid = enc.pos_embed[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(2.1 / 3, 2.1 / 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(b[0, 1:], want.flatten(2)[0].T)


# ----------------------------------------------------------------------------- the released checkpoint's layout


def official_state_dict(E=24, enc_depth=1, p=8, grid=2, F=12, d=24, depth=(1, 2), heads=2, points=2, u=2, k=2):
    """Random tensors under exactly the key names and shapes of the released GeoLRM Lightning checkpoint's
    ``state_dict`` (``serializer.*`` proposal, ``lrm_generator.*`` reconstruction, ``lpips.*``), small sizes."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hid = 256 * math.ceil(int(8 * d / 3) / 256)
    sd = {}
    for pre, layers in (("serializer.", depth[0]), ("lrm_generator.", depth[1])):
        sd.update({pre + "encoder.model." + key: r(*v.shape) for key, v in hf_dinov2_state_dict(E, enc_depth, p, grid).items()})
        sd[pre + "encoder.deconv.0.weight"], sd[pre + "encoder.low_level_encoder.0.weight"] = r(E, F, 4, 4), r(F, 9, 4, 4)
        for bn in ("encoder.deconv.1.", "encoder.low_level_encoder.1."):
            sd.update({pre + bn + "weight": r(F), pre + bn + "bias": r(F), pre + bn + "running_mean": r(F),
                       pre + bn + "running_var": r(F).abs() + 0.5, pre + bn + "num_batches_tracked": torch.tensor(7)})
        sd[pre + "transformer.query_token"] = r(1, 1, d - 3)
        for i in range(layers):
            L = f"{pre}transformer.layers.{i}."
            for w in "qkvo":
                sd[L + f"self_attention.w{w}.weight"] = r(d, d)
            for n in ("self_attention_norm", "cross_attention_norm", "ffn_norm"):
                sd[L + n + ".weight"] = r(d)
            da = L + "cross_attention.deformable_attention."
            sd[da + "sampling_offsets.weight"], sd[da + "sampling_offsets.bias"] = r(heads * 2 * points * 2, d), r(heads * 2 * points * 2)
            sd[da + "attention_weights.weight"], sd[da + "attention_weights.bias"] = r(heads * 2 * points, d), r(heads * 2 * points)
            sd[da + "value_proj.weight"], sd[da + "value_proj.bias"] = r(d, F), r(d)
            sd[L + "cross_attention.output_proj.weight"], sd[L + "cross_attention.output_proj.bias"] = r(d, d), r(d)
            sd[L + "cross_attention.cross_view_weight.weight"], sd[L + "cross_attention.cross_view_weight.bias"] = r(1, d), r(1)
            sd[L + "feed_forward.w1.weight"], sd[L + "feed_forward.w3.weight"] = r(hid, d), r(hid, d)
            sd[L + "feed_forward.w2.weight"] = r(d, hid)
        sd[pre + "transformer.norm.weight"] = r(d)
    sd["serializer.upsample.weight"], sd["serializer.upsample.bias"] = r(u ** 3, d), r(u ** 3)
    for i, shape in (("0", (14 * k, d)), ("2", (14 * k, 14 * k))):
        sd[f"lrm_generator.renderer.latent_decoder.{i}.weight"] = r(*shape)
        sd[f"lrm_generator.renderer.latent_decoder.{i}.bias"] = r(shape[0])
    sd["lpips.net.slice1.0.weight"], sd["lpips.lin0.model.1.weight"] = r(4, 3, 3, 3), r(1, 4, 1, 1)
    return sd


SMALL = dict(prop_heads=2, heads=2, n_points=2, occ_res=8, img_size=16, max_tokens=16, max_tokens_infer=24)


def test_from_official_loads_every_tensor_of_the_released_layout(torch_path):
    sd = official_state_dict()
    model = G.GeoLRM.from_official({"state_dict": sd, "epoch": 3}, **SMALL)             # a Lightning checkpoint
    cfg = model.cfg
    assert (cfg.enc_dim, cfg.enc_depth, cfg.patch_size, cfg.enc_pos_grid, cfg.feat_dim) == (24, 1, 8, 2, 12)
    assert (cfg.prop_dim, cfg.prop_depth, cfg.prop_grid, cfg.dim, cfg.depth, cfg.gaussians_per_token) == (24, 1, 4, 24, 2, 2)
    assert all(getattr(cfg, k) == v for k, v in G.OFFICIAL_FLAGS.items()) and cfg.prop_dropout == 0.1
    own = model.state_dict()
    # every official number (lpips aside) is in the model and the model holds nothing else
    flat = lambda ts: torch.sort(torch.cat([t.double().flatten() for t in ts])).values  # noqa: E731
    assert torch.equal(flat(v for k, v in sd.items() if not k.startswith("lpips.")), flat(own.values()))
    # ... at the right place (one key of each kind)
    S, L = "serializer.", "lrm_generator."
    q, k_, v = (sd[f"{L}transformer.layers.1.self_attention.w{w}.weight"] for w in "qkv")
    assert torch.equal(own["recon.transformer.blocks.1.qkv.weight"], torch.cat([q, k_, v]))
    assert torch.equal(own["recon.transformer.blocks.1.proj.weight"], sd[f"{L}transformer.layers.1.self_attention.wo.weight"])
    assert torch.equal(own["proposal.embed"], sd[S + "transformer.query_token"][0])
    assert torch.equal(own["recon.embed"], sd[L + "transformer.query_token"].flatten())
    assert torch.equal(own["proposal.head.weight"], sd[S + "upsample.weight"])
    assert torch.equal(own["recon.head.2.bias"], sd[L + "renderer.latent_decoder.2.bias"])
    assert torch.equal(own["proposal.encoder.up.weight"], sd[S + "encoder.deconv.0.weight"])
    assert torch.equal(own["recon.encoder.low_bn.running_var"], sd[L + "encoder.low_level_encoder.1.running_var"])
    assert torch.equal(own["recon.encoder.blocks.0.q.weight"], sd[L + "encoder.model.encoder.layer.0.attention.attention.query.weight"])
    assert torch.equal(own["proposal.encoder.mask_token"], sd[S + "encoder.model.embeddings.mask_token"])
    for a, b in (("norm1", "self_attention_norm"), ("norm2", "cross_attention_norm"), ("norm3", "ffn_norm"),
                 ("w2", "feed_forward.w2"), ("cross.offsets", "cross_attention.deformable_attention.sampling_offsets"),
                 ("cross.weights", "cross_attention.deformable_attention.attention_weights"),
                 ("cross.value_proj", "cross_attention.deformable_attention.value_proj"),
                 ("cross.out_proj", "cross_attention.output_proj"), ("cross.view_logit", "cross_attention.cross_view_weight")):
        assert torch.equal(own[f"proposal.transformer.blocks.0.{a}.weight"], sd[f"{S}transformer.layers.0.{b}.weight"]), a
    # the released model runs: official padding -> max_tokens_infer anchors x 2 Gaussians, all kept
    images, c2w, K = _recon_inputs(cfg, V=2)
    gs = model.reconstruct(images[0], c2w[0], K[0])
    assert gs.means.shape == (24 * 2, 3) and torch.isfinite(gs.means).all()


def test_from_official_names_bad_keys():
    sd = official_state_dict()
    key = "lrm_generator.transformer.layers.1.feed_forward.w3.weight"
    with pytest.raises(ValueError, match=re.escape(key)):
        G.GeoLRM.from_official({k: v for k, v in sd.items() if k != key}, **SMALL)
    key = "serializer.transformer.layers.0.self_attention.wk.weight"
    with pytest.raises(ValueError, match=re.escape(key)):
        G.GeoLRM.from_official({k: v for k, v in sd.items() if k != key}, **SMALL)
    with pytest.raises(ValueError, match=r"unexpected key 'serializer\.extra\.weight'"):
        G.GeoLRM.from_official({**sd, "serializer.extra.weight": torch.zeros(1)}, **SMALL)
    with pytest.raises(ValueError, match=r"unexpected key 'other\.weight'"):
        G.GeoLRM.from_official({**sd, "other.weight": torch.zeros(1)}, **SMALL)
    bad = dict(sd)
    bad["lrm_generator.transformer.layers.0.cross_attention.output_proj.weight"] = torch.zeros(24, 23)
    with pytest.raises(ValueError, match=r"lrm_generator\.transformer\.layers\.0\.cross_attention\.output_proj\.weight.*\(24, 23\)"):
        G.GeoLRM.from_official(bad, **SMALL)
    with pytest.raises(ValueError, match="missing key .lrm_generator.encoder.low_level_encoder.1.running_mean."):
        G.GeoLRM.from_official({k: v for k, v in sd.items() if k != "lrm_generator.encoder.low_level_encoder.1.running_mean"},
                               **SMALL)


def test_dinov2_loader_accepts_transformers_5_names(torch_path):
    old = hf_dinov2_state_dict()
    ren = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    new = {}
    for key, v in old.items():
        for a, b in ren.items():
            key = key.replace(a, b)
        new[key] = v
    assert "encoder.layer.0.attention.q_proj.weight" in new
    cfg = micro_cfg(enc_dim=24, enc_depth=2, enc_heads=2)
    e1, e2 = G.ImageEncoder(cfg), G.ImageEncoder(cfg)
    G.load_dinov2_hf(e1, old), G.load_dinov2_hf(e2, new)
    for k, v in e1.state_dict().items():
        if not k.startswith(("up", "low")):
            assert torch.equal(v, e2.state_dict()[k]), k


# ----------------------------------------------------------------------------- front door, robustness, API


def test_training_step_under_cpu_bf16_autocast(torch_path):
    torch.manual_seed(0)
    model = G.GeoLRM(micro_cfg())
    prop_b, rec_b = _front_door_batches()
    for stage, batch in (("proposal", prop_b), ("recon", {**rec_b, "anchors": model.gt_anchors(rec_b["occupancy"])})):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, out = model(batch, stage=stage)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and len(grads) > 10, stage
        assert all(torch.isfinite(g).all() for g in grads), stage
    with torch.autocast("cpu", dtype=torch.bfloat16):                                  # the geometry stays fp32
        c2w, K = cameras(1)
        assert G.plucker_rays(c2w[None], K[None], 4, 4).dtype == torch.float32


def test_nan_inputs_give_a_nonfinite_loss_and_empty_proposals_a_connected_one(torch_path):
    torch.manual_seed(0)
    model = G.GeoLRM(micro_cfg())
    prop_b, rec_b = _front_door_batches()
    for stage, batch in (("proposal", prop_b), ("recon", rec_b)):
        bad = {**batch, "images": batch["images"].clone()}
        bad["images"][0, 0, 0, 0, 0] = float("nan")
        loss, out = model(bad, stage=stage)                                             # no exception
        assert not torch.isfinite(loss), stage
    empty = {**rec_b, "anchors": model.gt_anchors(torch.zeros_like(rec_b["occupancy"]))}
    assert (empty["anchors"].seg < 0).all()
    loss, out = model(empty, stage="recon")
    loss.backward()                                                                     # connected to the graph
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.recon.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)
    with pytest.raises(ValueError, match="stage"):
        model(rec_b, stage="both")


def test_reconstruct_is_deterministic_given_the_seed(torch_path, tmp_path):
    from nano4d.ply import save_ply
    torch.manual_seed(0)
    model = G.GeoLRM(micro_cfg(max_tokens_infer=5))
    images, c2w, K = _recon_inputs(micro_cfg(), V=3)
    with torch.no_grad():
        assert (model.proposal.eval()(images, c2w, K) > 0).sum() > 5                    # so it subsamples
    runs = [model.reconstruct(images[0], c2w[0], K[0], seed=s) for s in (0, 0, 1)]
    assert isinstance(runs[0], G.Gaussians) and runs[0].means.shape == (10, 3)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0].means, runs[2].means)
    for i in (0, 1):
        save_ply(str(tmp_path / f"{i}.ply"), *runs[i])
    assert open(tmp_path / "0.ply", "rb").read() == open(tmp_path / "1.ply", "rb").read()
    assert model.training                                                               # mode restored


def test_from_checkpoint_reads_a_safetensors_file(tmp_path, torch_path):
    import json
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = micro_cfg(official_color_clamp=True)
    model = G.GeoLRM(cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps({"model": dataclasses.asdict(cfg), "train": {"lr": 1e-4}, "step": 3})}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata=meta)
    back = G.GeoLRM.from_checkpoint(str(tmp_path))                                      # the run directory
    assert back.cfg == cfg
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype, k
    bad = json.loads(meta["config"])
    bad["model"]["no_such_field"] = 1
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(bad)})
    with pytest.raises(ValueError, match="no_such_field"):
        G.GeoLRM.from_checkpoint(str(tmp_path / "bad.safetensors"))
    blob = open(tmp_path / "model.safetensors", "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        G.GeoLRM.from_checkpoint(str(tmp_path / "cut.safetensors"))


def test_configure_optimizer_groups():
    model = G.GeoLRM(micro_cfg())
    opt = model.configure_optimizer(1e-3, weight_decay=0.05, stage="proposal")
    decay, no = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("proposal.") for g in opt.param_groups for p in g["params"])
    assert decay["weight_decay"] == 0.05 and no["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)] == "proposal.embed" for p in no["params"])
    assert len(decay["params"]) + len(no["params"]) == sum(1 for n, _ in model.named_parameters() if n.startswith("proposal."))
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)
    off = G.GeoLRM(micro_cfg(official_decay_all=True)).configure_optimizer(1e-3)
    assert len(off.param_groups[1]["params"]) == 0


def test_reconstruction_step_makes_no_host_syncs_on_the_kernel_path():
    """The recon stage's hot path (encoder, deformable cross-attention, token attention, rasterizer, loss) never
    reads a tensor value on the host with ``render_capacity`` set: capturable by CUDA graphs (the kernels run
    through the interpreter here; the count is the same code path as on a GPU)."""
    from tests.sync_count import count_host_syncs
    torch.manual_seed(0)
    model = G.GeoLRM(dataclasses.replace(micro_cfg(), render_capacity=1 << 16))
    _, rec_b = _front_door_batches()
    batch = {**rec_b, "anchors": model.gt_anchors(rec_b["occupancy"])}
    with count_host_syncs() as syncs:
        loss, out = model(batch, stage="recon")
        loss.backward()
    assert syncs.count == 0, syncs.calls


def test_recon_front_door_compiles_without_graph_breaks(torch_path):
    """With the anchors given (occupancy selection is data-dependent and stays outside), the reconstruction
    front door compiles as one graph (fullgraph=True) and gives the eager loss."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = G.GeoLRM(micro_cfg())
    _, rec_b = _front_door_batches()
    batch = {**rec_b, "anchors": model.gt_anchors(rec_b["occupancy"])}
    compiled = torch.compile(lambda b: model(b, stage="recon")[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(batch), model(batch, stage="recon")[0], rtol=1e-5, atol=1e-6)
