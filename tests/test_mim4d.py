"""MIM4D model: frames and boxes, masking, lifting, warp, decoder, weights loaders, checkpoints, optimizer,
autocast, EMA, training script."""
import ast
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nano4d import mim4d as M
from nano4d import cameras as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # Model-level tests run the kernels' pure-torch references (the kernels have their own tests);
    # test_forward_through_triton_kernels runs the Triton path.
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def small_cfg(**kw):
    base = dict(img_size=(64, 96), depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), fpn_dim=8, depth_bins=8,
                pc_range=(-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), grid=(9, 9, 3), vox_dim=8, short_dim=16,
                long_dim=8, field_hidden=8, render_feat=4, rays_per_cam=8, num_uniform=8, num_importance=4,
                num_cams=2, num_frames=3, ray_radius=(1.0, 50.0))
    base.update(kw)
    return M.MIM4DConfig(**base)


def rig(B, N, T, H, W, speed=1.5):
    """A toy surround rig: N cameras around the ego z axis, ego driving along world x; LiDAR 1.84 m up."""
    K = torch.tensor([[W * 0.8, 0, W / 2], [0, W * 0.8, H / 2], [0, 0, 1.0]]).expand(B, N, 3, 3).clone()
    cams = []
    for i in range(N):
        yaw = i * 2 * math.pi / N
        R = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1.0]])
        T4 = torch.eye(4)
        T4[:3, :3] = R @ torch.tensor([[0, 0, 1.0], [-1, 0, 0], [0, -1, 0]])   # OpenCV cam axes in ego
        T4[:3, 3] = torch.tensor([0.0, 0.0, 1.5])
        cams.append(T4)
    cam2ego = torch.stack(cams).expand(B, N, 4, 4).clone()
    e2w = torch.eye(4).repeat(B, T, 1, 1)
    e2w[:, :, 0, 3] = torch.arange(T).float() * speed
    l2e = torch.eye(4).repeat(B, 1, 1)
    l2e[:, 2, 3] = 1.84
    return K, cam2ego, e2w, l2e


def batch_for(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.img_size
    K, c2e, e2w, l2e = rig(B, cfg.num_cams, cfg.num_frames, H, W)
    return dict(images=torch.rand(B, cfg.num_frames, cfg.num_cams, 3, H, W, generator=g),
                depths=torch.rand(B, cfg.num_frames, cfg.num_cams, 1, H, W, generator=g) * 10,
                K=K, cam2ego=c2e, ego2world=e2w, lidar2ego=l2e)


# ----------------------------------------------------------------------------- frames and boxes (bugs 1, 2)

def test_paper_volume_is_in_the_lidar_frame():
    cfg = M.PRESETS["paper"]
    K, c2e, _, l2e = rig(1, 1, 1, 450, 800)                     # camera 0 looks along ego +x from 1.5 m
    # a surface point just below the official volume's top face (LiDAR z = 3 m), 20 m ahead: ego z = 4.83 m
    p_lidar = torch.tensor([21.0, 0.0, 2.99])
    p_ego = p_lidar + torch.tensor([0.0, 0.0, 1.84])
    assert M.in_volume(cfg, p_lidar) and not M.in_volume(cfg, p_ego)    # the old ego-frame box missed it
    uv, z = C.project_points(p_ego[None], C.invert_pose(c2e[0, 0]), K[0, 0])
    depths = torch.zeros(1, 1, 1, 450, 800)
    depths[0, 0, 0, int(uv[0, 1]), int(uv[0, 0])] = z[0]
    rays = M.sample_rays(cfg, depths, K, c2e, l2e)               # every pixel
    assert rays.valid.sum() == 1                                 # the point is picked as supervision ...
    i = rays.valid[0].nonzero()[0, 0]
    surf = rays.origins[0, i] + rays.depth[0, i] * rays.dirs[0, i]
    assert (surf - p_lidar).abs().max() < 0.05                   # ... at its LiDAR-frame position
    ego_box = M.sample_rays(cfg, depths, K, c2e, torch.eye(4)[None])   # volume taken in the ego frame
    assert ego_box.valid.sum() == 0
    # the lifted volume's top layer sits at the official top face, and projects where that face is seen
    top = M.voxel_points(cfg)[-1]
    assert torch.allclose(top[..., 2], torch.tensor(3.0))
    uv_m, z_m = M.project_voxels(cfg, K, c2e, l2e)
    q = (cfg.grid[2] - 1) * cfg.grid[1] * cfg.grid[0] + 64 * cfg.grid[0] + 90   # node (x=90, y=64, z top)
    p = M.voxel_points(cfg).reshape(-1, 3)[q] + torch.tensor([0.0, 0.0, 1.84])
    uv_r, z_r = C.project_points(p[None], C.invert_pose(c2e[0, 0]), K[0, 0])
    torch.testing.assert_close(uv_m[0, 0, q], uv_r[0], atol=1e-2, rtol=1e-4)


def test_one_box_for_ray_picking_lifting_and_rendering():
    cfg = small_cfg()
    lo, hi = torch.tensor(cfg.pc_range[:3]), torch.tensor(cfg.pc_range[3:])
    nodes = M.voxel_points(cfg)
    assert torch.equal(nodes[0, 0, 0], lo) and torch.equal(nodes[-1, -1, -1], hi)   # lifted box = pc_range
    torch.testing.assert_close(M.metric_to_unit(cfg, torch.stack([lo, hi])), torch.tensor([[-1.0] * 3, [1.0] * 3]))
    b = batch_for(cfg, 1)
    b["depths"] = torch.rand(1, 3, 2, 1, 64, 96, generator=torch.Generator().manual_seed(1)) * 14
    rays = M.sample_rays(cfg, b["depths"][:, 0], b["K"], b["cam2ego"], b["lidar2ego"])
    near, far = M.ray_box(M.metric_to_unit(cfg, rays.origins), M.metric_to_unit(cfg, rays.dirs, direction=True))
    v = rays.valid[0]
    assert v.sum() > 100 and (~v).sum() > 100
    gt = rays.depth[0, v]
    assert (gt >= near[0, v].clamp_min(cfg.near_min) - 1e-4).all() and (gt <= far[0, v] + 1e-4).all()
    # a ray whose surface lies outside the box is not picked
    surf = rays.origins[0] + rays.depth[0, :, None] * rays.dirs[0]
    out_of_box = ~M.in_volume(cfg, surf)
    assert out_of_box.any() and not (v & out_of_box).any()


# ----------------------------------------------------------------------------- encoder

def test_masking_never_leaks():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg)
    x = torch.rand(3, 3, 64, 96)
    keep = model.random_masking(3, (64, 96))
    assert keep.shape == (3, 1, 2, 3)
    assert (keep.flatten(1).sum(1) == 6 - round(0.3 * 6)).all()                # same ratio per image
    pix_keep = F.interpolate(keep, size=(64, 96))
    x2 = x + (1 - pix_keep) * torch.randn_like(x) * 5                         # change only masked pixels
    outs1, outs2 = model.backbone(x, keep), model.backbone(x2, keep)
    for a, b in zip(outs1, outs2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        k = F.interpolate(keep, size=a.shape[-2:])
        assert (a * (1 - k)).abs().max() == 0                                 # masked regions stay zero
    ones = torch.ones_like(keep)                                              # without the mask it leaks
    assert not torch.equal(model.backbone(x, ones)[-1], model.backbone(x2, ones)[-1])


def test_backbone_and_fpn_structure():
    cfg = small_cfg(depths=(1, 2, 1, 1), drop_path=0.2, frozen_stages=1)
    model = M.MIM4D(cfg)
    bb = model.backbone
    blocks = [b for s in bb.stages for b in s]
    assert [b.drop_path for b in blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    lns = [m for m in bb.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert lns and all(m.eps == 1e-6 for m in lns) and all(hasattr(bb, f"norm{i}") for i in (1, 2, 3))
    frozen = {id(p) for p in bb.frozen_parameters()}
    assert frozen == {id(p) for m in (bb.downsample_layers[0], bb.stages[0]) for p in m.parameters()}
    assert all(not p.requires_grad for p in bb.frozen_parameters())
    model.train()
    assert not bb.stages[0][0].training and bb.stages[1][0].training       # frozen stage stays in eval
    # FPN: 4 levels at strides 8..64; the extra level is a stride-2 conv on the last output (no ReLU)
    feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(cfg.dims[1:], (8, 16, 32))]
    outs = model.fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    f = model.fpn
    lat = [F.conv2d(x, c.weight, c.bias) for c, x in zip(f.lateral_convs, feats)]
    lat[1] = lat[1] + F.interpolate(lat[2], size=lat[1].shape[-2:])
    lat[0] = lat[0] + F.interpolate(lat[1], size=lat[0].shape[-2:])
    ref = [F.conv2d(x, c.weight, c.bias, padding=1) for c, x in zip(f.fpn_convs, lat)]
    ref.append(F.conv2d(ref[-1], f.fpn_convs[3].weight, f.fpn_convs[3].bias, stride=2, padding=1))
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)


def test_voxel_points_project_like_the_camera_utilities():
    cfg = small_cfg()
    K, c2e, _, l2e = rig(1, 2, 1, 64, 96)
    uv, z = M.project_voxels(cfg, K, c2e, l2e)
    pts = M.voxel_points(cfg).reshape(-1, 3) + torch.tensor([0.0, 0.0, 1.84])   # LiDAR -> ego
    for n in range(2):
        uv_ref, z_ref = C.project_points(pts, C.invert_pose(c2e[0, n]), K[0, n])
        front = z_ref > 0.1
        torch.testing.assert_close(uv[0, n][front], uv_ref[front], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(z[0, n], z_ref, atol=1e-4, rtol=1e-5)
    drift = M.voxel_points(small_cfg(official_voxel_drift=True))
    assert drift[0, 0, 1, 0] == -8.0 + 16 / 9 and M.voxel_points(cfg)[0, 0, 1, 0] == -6.0


# ----------------------------------------------------------------------------- warp and decoder (bugs 3, 4)

def test_metric_warp_moves_a_point_to_the_right_voxel():
    cfg = small_cfg()                                                          # 2 m node spacing in x / y
    vol = torch.zeros(1, 1, 3, 9, 9)
    vol[0, 0, 1, 4, 5] = 1.0                                                  # source node (x=5, y=4, z=1)
    src_pt = M.voxel_points(cfg)[1, 4, 5]
    tgt2src = torch.eye(4)                                                    # target = source moved 4 m
    tgt2src[:3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])      # forward, turned 90 deg left
    tgt2src[:3, 3] = torch.tensor([4.0, 0.0, 0.0])
    src2tgt = torch.linalg.inv(tgt2src)
    out = M.warp_volume(cfg, vol, src2tgt[None])
    tgt_pt = (src2tgt @ torch.cat([src_pt, torch.ones(1)]))[:3]
    idx = torch.nonzero(out[0, 0] > 0.5)
    assert idx.shape[0] == 1
    z, y, x = idx[0].tolist()
    torch.testing.assert_close(M.voxel_points(cfg)[z, y, x], tgt_pt)
    off = M.warp_volume(small_cfg(official_index_warp=True), vol, src2tgt[None])
    assert off[0, 0, z, y, x] < 0.5                                           # metres read as voxel indices


def test_frame_motion_is_between_lidar_frames():
    _, _, e2w, l2e = rig(1, 1, 3, 8, 8, speed=2.0)
    e2w[0, 2, :3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])   # frame 2 turned 90 deg
    T = M.MIM4D.frame_motion(e2w, l2e, 2, 0)
    p_l2 = torch.tensor([3.0, 1.0, 0.5])                                      # a point in frame 2's LiDAR frame
    world = e2w[0, 2] @ l2e[0] @ torch.cat([p_l2, torch.ones(1)])
    want = torch.linalg.inv(e2w[0, 0] @ l2e[0]) @ world
    torch.testing.assert_close((T[0] @ torch.cat([p_l2, torch.ones(1)]))[:3], want[:3])


def test_bev_position_encoding_is_detr_sine():
    Y, X, nf = 5, 7, 8
    pos = M.sine_position_encoding(Y, X, nf)
    # DETR's PositionEmbeddingSine(normalize=True) on an all-valid mask, written independently
    not_mask = torch.ones(1, Y, X)
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(nf) // 2) / nf)
    px, py = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], 4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], 4).flatten(3)
    ref = torch.cat([py, px], 3)[0].reshape(Y * X, 2 * nf)
    torch.testing.assert_close(pos, ref)
    # no aliasing on the paper's 128 x 128 grid: every channel's phase step per cell is below pi
    big = M.sine_position_encoding(128, 128, 64).reshape(128, 128, 128)
    step = (big[1:] - big[:-1]).abs().amax()
    assert step < 2 * math.pi / 128 + 1e-4


def test_frame_order_is_official_newest_first():
    assert M.frame_order(3, 0) == [1, 2] and M.frame_order(3, 1) == [0, 2] and M.frame_order(3, 2) == [0, 1]
    assert M.nearest_frame(3, 0) == 1 and M.nearest_frame(3, 2) == 1 and M.nearest_frame(3, 1) == 0
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg).train()
    b = batch_for(cfg, 1)
    b["depths"][:, :-1] = 0                                    # ground truth only in the newest frame
    _, out = model(b)
    assert out["targets"][0] == 2 and out["targets"][1] in (0, 1)
    assert out["rays"][0].valid.any() and not out["rays"][1].valid.any()
    # the decoder's short branch reads the first frame of frame_order: the newest other frame
    vols = torch.stack([torch.full((1, 8, 3, 9, 9), float(j)) for j in range(3)], 1)
    seen = []
    model.decoder.forward = lambda w: seen.append(w[0, :, 0, 1, 4, 4].tolist()) or w[:, 0]
    _, base = model.predict_frame(vols, b["ego2world"].flip(1), b["lidar2ego"], 2)
    assert seen == [[0.0, 1.0]] and base[0, 0, 1, 4, 4] == 1.0               # baseline: nearest frame


def test_temporal_attention_init_matches_bevformer():
    a = M.TemporalSelfAttention(16, heads=4, points=4, queue=2)
    bias = a.sampling_offsets.bias.reshape(4, 2, 4, 2)                        # (heads, queue, points, xy)
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))      # head 0: +x, point 3 -> 3
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert a.attention_weights.weight.abs().sum() == 0 and a.sampling_offsets.weight.abs().sum() == 0


# ----------------------------------------------------------------------------- model front door

def test_batch_of_two_equals_two_batches_of_one():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg).eval()
    batch = batch_for(cfg, 2)
    keep = model.random_masking(2 * cfg.num_frames * cfg.num_cams, cfg.img_size)
    rays = [model.sample_rays(batch["depths"][:, t], batch["K"], batch["cam2ego"], batch["lidar2ego"], 8)
            for t in (2, 0)]
    with torch.no_grad():
        _, out2 = model(dict(batch, keep=keep, rays=rays, targets=[2, 0]))
        n = cfg.num_frames * cfg.num_cams
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            _, out1 = model(dict(one, keep=keep[b * n:(b + 1) * n], targets=[2, 0],
                                 rays=[M.Rays(*(x[b:b + 1] for x in r)) for r in rays]))
            torch.testing.assert_close(out1["per_sample"][0], out2["per_sample"][b], rtol=1e-4, atol=1e-5)


def test_forward_backward_and_features():
    cfg = small_cfg()
    model = M.MIM4D(cfg).train()
    batch = batch_for(cfg, 1)
    loss, out = model(batch)
    assert torch.isfinite(loss) and set(out["terms"]) == {"rgb_pred", "depth_pred", "rgb_direct", "depth_direct"}
    assert set(out["renders"]) == {"pred", "direct"} and isinstance(out["renders"]["pred"][0], M.Render)
    loss.backward()
    assert model.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0   # gradients reach the images side
    assert model.render_head.variance.grad is not None
    model.eval()
    with torch.no_grad():
        loss_e, out_e = model(batch)
    assert out_e["targets"] == [2, 1, 0] and len(out_e["renders"]["warp"]) == 3 and torch.isfinite(loss_e)
    vols, bev = model.extract_features(batch["images"], batch["K"], batch["cam2ego"], batch["lidar2ego"])
    assert vols.shape == (1, 3, 8, 3, 9, 9) and bev.shape == (1, 3, 24, 9, 9)
    with pytest.raises(ValueError, match="lidar2ego"):
        model({k: v for k, v in batch.items() if k != "lidar2ego"})
    with pytest.raises(ValueError, match="field"):
        M.MIM4D(small_cfg(field="nope"))


def test_forward_through_triton_kernels(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    cfg = small_cfg(rays_per_cam=4, num_uniform=6, num_importance=2, grid=(6, 6, 2))
    torch.manual_seed(0)
    model = M.MIM4D(cfg).eval()
    batch = batch_for(cfg, 1)
    rays = [model.sample_rays(batch["depths"][:, 2], batch["K"], batch["cam2ego"], batch["lidar2ego"], 4)]
    with torch.no_grad():
        loss, _ = model(dict(batch, rays=rays, targets=[2]))
        monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
        ref, _ = model(dict(batch, rays=rays, targets=[2]))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("z", [2, 3])
def test_training_step_under_bf16_autocast(z):
    cfg = small_cfg(grid=(9, 9, z))                              # z = 2 hits a oneDNN bf16 Conv3d bug (worked around)
    torch.manual_seed(0)
    model = M.MIM4D(cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model(batch_for(cfg, 1))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert model.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0


def test_inv_s_never_reaches_zero_or_inf():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg).train()
    batch = batch_for(cfg, 1)
    assert model.render_head.inv_s().item() == pytest.approx(math.exp(3.0), rel=1e-5)   # official init 0.3
    for v in (-1e6, 1e6):
        with torch.no_grad():
            model.render_head.variance.fill_(v)
        s = model.render_head.inv_s().item()
        assert 0 < s < math.inf
        loss, _ = model(batch)                                # no renderer ValueError
        assert torch.isfinite(loss)
    # a huge learning rate: the run may diverge, but only into a non-finite loss, never an op error
    model = M.MIM4D(cfg).train()
    opt = model.configure_optimizer(lr=1e4)
    for _ in range(3):
        loss, _ = model(batch)
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_configure_optimizer_groups():
    cfg = small_cfg(frozen_stages=1)
    model = M.MIM4D(cfg)
    opt = model.configure_optimizer(lr=4e-4, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert all(id(p) not in by_id for p in model.backbone.frozen_parameters())
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(by_id) == n_trainable
    for n, p in names.items():
        if id(p) not in by_id:
            continue
        g = by_id[id(p)]
        assert g["lr"] == pytest.approx(4e-4 * (0.1 if n.startswith("backbone.") else 1.0))
        assert g["lr_mult"] == (0.1 if n.startswith("backbone.") else 1.0)
        no_decay = p.ndim < 2 or "queries" in n or "frame_embeds" in n
        assert g["weight_decay"] == (0.0 if no_decay else 0.01), n
    opt_all = M.MIM4D(small_cfg(official_decay_all=True)).configure_optimizer(lr=1e-3, weight_decay=0.01)
    assert all(g["weight_decay"] == 0.01 for g in opt_all.param_groups)


# ----------------------------------------------------------------------------- weights and checkpoints

def fb_convnext_keys(depths, dims):
    """facebookresearch/ConvNeXt state-dict names and shapes (classifier included)."""
    out = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
           "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        out.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],), f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                    f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                    f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (n, c) in enumerate(zip(depths, dims)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            out.update({p + "gamma": (c,), p + "dwconv.weight": (c, 1, 7, 7), p + "dwconv.bias": (c,),
                        p + "norm.weight": (c,), p + "norm.bias": (c,), p + "pwconv1.weight": (4 * c, c),
                        p + "pwconv1.bias": (4 * c,), p + "pwconv2.weight": (c, 4 * c), p + "pwconv2.bias": (c,)})
    out.update({"norm.weight": (dims[3],), "norm.bias": (dims[3],), "head.weight": (10, dims[3]), "head.bias": (10,)})
    return out


def timm_name(k):
    """facebookresearch name -> timm ConvNeXt name (written from timm's layout: stem, stages.i.downsample,
    stages.i.blocks.j.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}, head.norm, head.fc)."""
    p = k.split(".")
    if p[0] == "downsample_layers":
        return (f"stem.{p[2]}" if p[1] == "0" else f"stages.{p[1]}.downsample.{p[2]}") + "." + p[3]
    if p[0] == "stages":
        leaf = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2", "gamma": "gamma"}[p[3]]
        return f"stages.{p[1]}.blocks.{p[2]}.{leaf}" + ("." + p[4] if len(p) > 4 else "")
    return {"norm": "head.norm", "head": "head.fc"}[p[0]] + "." + p[1]


def test_load_imagenet_convnext_facebook_and_timm_layouts():
    cfg = small_cfg(depths=(1, 2, 1, 1))
    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(s, generator=g) for k, s in fb_convnext_keys(cfg.depths, cfg.dims).items()}
    for layout in ("facebook", "timm"):
        sd = dict(ref) if layout == "facebook" else {timm_name(k): v for k, v in ref.items()}
        model = M.MIM4D(cfg)
        before = model.backbone.norm2.weight.clone()
        model.load_imagenet_convnext({"model": sd} if layout == "facebook" else sd)
        own = model.state_dict()
        for k, v in ref.items():
            if not k.startswith(("norm.", "head.")):
                assert torch.equal(own["backbone." + k], v), (layout, k)
        assert torch.equal(model.backbone.norm2.weight, before)              # output norms keep their init
        bad = dict(sd)
        bad.pop(next(k for k in bad if "pwconv2.bias" in k or "mlp.fc2.bias" in k))
        with pytest.raises(ValueError, match="missing key"):
            M.MIM4D(cfg).load_imagenet_convnext(bad)
        bad = dict(sd)
        k = next(k for k in bad if k.endswith("gamma"))
        bad[k] = torch.zeros(3)
        with pytest.raises(ValueError, match="has shape"):
            M.MIM4D(cfg).load_imagenet_convnext(bad)
        with pytest.raises(ValueError, match="unexpected key"):
            M.MIM4D(cfg).load_imagenet_convnext(dict(sd, **{"stages.9.extra": torch.zeros(1)}))


def official_pretrain_state_dict(cfg, g):
    """A MIM4D pretrain checkpoint's keys (mmdet3d UVTRSSL): img_backbone (MaskConvNeXt with norm_out),
    img_neck (mmdet FPN: ConvModule -> .conv), input_proj, depth_net, plus parts the loader ignores."""
    sd = {"img_backbone." + k: torch.randn(s, generator=g)
          for k, s in fb_convnext_keys(cfg.depths, cfg.dims).items() if not k.startswith(("norm.", "head."))}
    for i, c in enumerate(cfg.dims):
        sd[f"img_backbone.norm{i}.weight"] = torch.randn(c, generator=g)
        sd[f"img_backbone.norm{i}.bias"] = torch.randn(c, generator=g)
    f = cfg.fpn_dim
    for i, c in enumerate(cfg.dims[1:]):
        sd[f"img_neck.lateral_convs.{i}.conv.weight"] = torch.randn(f, c, 1, 1, generator=g)
        sd[f"img_neck.lateral_convs.{i}.conv.bias"] = torch.randn(f, generator=g)
    for i in range(4):
        sd[f"img_neck.fpn_convs.{i}.conv.weight"] = torch.randn(f, f, 3, 3, generator=g)
        sd[f"img_neck.fpn_convs.{i}.conv.bias"] = torch.randn(f, generator=g)
    sd.update({"input_proj.weight": torch.randn(f, f, 1, 1, generator=g), "input_proj.bias": torch.randn(f, generator=g),
               "depth_net.weight": torch.randn(cfg.depth_bins, f, 1, 1, generator=g),
               "depth_net.bias": torch.randn(cfg.depth_bins, generator=g),
               "render_conv.0.weight": torch.randn(32, f, 3, 3, 3, generator=g),
               "history_decoder.frame_embeds": torch.randn(3, 128, generator=g),
               "pts_bbox_head.render_model.field.deviation_network.variance": torch.randn(1, generator=g)})
    sd.update({"ema_" + k.replace(".", "_"): v + 1 for k, v in list(sd.items())})   # mmcv EMAHook buffers
    return sd


def test_load_official_backbone():
    cfg = small_cfg()
    sd = official_pretrain_state_dict(cfg, torch.Generator().manual_seed(0))
    model = M.MIM4D(cfg).load_official_backbone({"state_dict": sd, "meta": {}})
    own = model.state_dict()

    def ours(k):
        k = k.replace("img_backbone.", "backbone.").replace("img_neck.", "fpn.").replace(".conv.", ".")
        return k
    checked = 0
    for k, v in sd.items():
        if k.startswith(("img_backbone.", "img_neck.", "input_proj.", "depth_net.")) and "norm0" not in k:
            assert torch.equal(own[ours(k)], v), k
            checked += 1
    assert checked == sum(1 for n in own if n.split(".")[0] in ("backbone", "fpn", "input_proj", "depth_net"))
    ema = M.MIM4D(cfg).load_official_backbone(sd, ema=True).state_dict()
    assert torch.equal(ema["fpn.fpn_convs.3.weight"], sd["img_neck.fpn_convs.3.conv.weight"] + 1)
    bad = dict(sd)
    del bad["img_neck.fpn_convs.3.conv.bias"]
    with pytest.raises(ValueError, match="missing key 'img_neck.fpn_convs.3.conv.bias'"):
        M.MIM4D(cfg).load_official_backbone(bad)
    bad = dict(sd, **{"depth_net.weight": torch.zeros(5, cfg.fpn_dim, 1, 1)})
    with pytest.raises(ValueError, match="depth_net.weight' has shape"):
        M.MIM4D(cfg).load_official_backbone(bad)
    with pytest.raises(ValueError, match="unexpected key 'img_backbone.mtoken0'"):
        M.MIM4D(cfg).load_official_backbone(dict(sd, **{"img_backbone.mtoken0": torch.zeros(1)}))


def test_from_checkpoint_reads_safetensors_with_config(tmp_path):
    from safetensors.torch import save_file
    cfg = small_cfg(field_hidden=6)
    model = M.MIM4D(cfg)
    meta = {"config": json.dumps({"model": dataclasses.asdict(cfg), "train": {"lr": 1e-3}, "step": 7})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata=meta)
    back = M.MIM4D.from_checkpoint(str(tmp_path))
    assert back.cfg == cfg and isinstance(back.cfg.pc_range, tuple) and isinstance(back.cfg.img_size, tuple)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="bad.safetensors"):
        M.MIM4D.from_checkpoint(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="unknown MIM4DConfig fields"):
        M.config_from_dict({"nope": 1})


def test_ema_ramp_and_roundtrip():
    lin = torch.nn.Linear(2, 1)
    ema = M.EMA(lin, decay=0.999, ramp=2000)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    d = 0.999 * (1 - math.exp(-1 / 2000))
    torch.testing.assert_close(ema.shadow["weight"], d * w0 + (1 - d) * lin.weight.detach())
    for _ in range(3):
        ema.update(lin)
    assert ema.updates == 4 and ema.rate() == pytest.approx(0.999 * (1 - math.exp(-4 / 2000)))
    other = M.EMA(torch.nn.Linear(2, 1), decay=0.5, ramp=0)
    assert other.rate() == 0.5
    other.load_state_dict(ema.state_dict())
    assert other.updates == 4 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with torch.no_grad():
        lin.weight.add_(1.0)
    avg = ema.averaged(lin)
    assert torch.equal(avg.weight, ema.shadow["weight"]) and not torch.equal(lin.weight, avg.weight)


# ----------------------------------------------------------------------------- size and isolation

def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = M.MIM4D(M.PRESETS["paper"])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 87e6 < n(model.backbone) < 88.5e6                # ConvNeXt-B trunk (87.6M) + 3 output LayerNorms
    assert 1e6 < n(model.decoder) < 30e6
    assert 90e6 < n(model) < 120e6


def test_model_file_imports_only_torch_kernels_and_stdlib():
    path = os.path.join(ROOT, "nano4d", "mim4d.py")
    tree = ast.parse(open(path).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"torch", "kernels", "math", "dataclasses", "__future__", "copy", "json", "os", "struct",
                    "typing"}, mods
    code = ("import importlib.util, sys; sys.modules['nano4d'] = None; "
            f"s = importlib.util.spec_from_file_location('mim4d_alone', {path!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); "
            "print(m.MIM4D.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "MIM4D" in r.stdout, r.stderr


def test_training_step_makes_no_host_syncs_on_the_kernel_path(monkeypatch):
    """Lifting (deform_attn with Python-int level shapes), the temporal decoder and the voxel field's renderer
    (render_sdf on its trusted path) never read a tensor value on the host, forward and backward, given the rays
    (ray picking draws from the LiDAR-valid pixels, which sizes its output on the host)."""
    from tests.sync_count import count_host_syncs
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    cfg = small_cfg(rays_per_cam=4, num_uniform=6, num_importance=2, grid=(6, 6, 2))
    torch.manual_seed(0)
    model = M.MIM4D(cfg).train()
    batch = batch_for(cfg, 1)
    rays = [model.sample_rays(batch["depths"][:, 2], batch["K"], batch["cam2ego"], batch["lidar2ego"], 4)]
    with count_host_syncs() as syncs:
        loss, _ = model(dict(batch, rays=rays, targets=[2]))
        loss.backward()
    assert syncs.count == 0, syncs.calls


def test_front_door_compiles_without_graph_breaks():
    """With the rays given (ray picking draws a data-dependent number of LiDAR pixels and stays outside), the
    training front door compiles as one graph (fullgraph=True) and gives the eager loss."""
    torch._dynamo.reset()
    cfg = small_cfg(rays_per_cam=4, num_uniform=6, num_importance=2, grid=(6, 6, 2))
    torch.manual_seed(0)
    model = M.MIM4D(cfg).eval()
    batch = batch_for(cfg, 1)
    rays = [model.sample_rays(batch["depths"][:, 2], batch["K"], batch["cam2ego"], batch["lidar2ego"], 4)]
    b = dict(batch, rays=rays, targets=[2])
    compiled = torch.compile(lambda x: model(x)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(b), model(b)[0], rtol=1e-5, atol=1e-6)
