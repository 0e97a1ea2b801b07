"""MIM4D's official (per-sample) render field vs an independent pure-torch computation; normals, double
backward through the trilinear sampler, a training step."""
import pytest
import torch
import torch.nn.functional as F

from nano4d import mim4d as M
from tests.test_mim4d import batch_for, small_cfg


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # model-level tests run the kernels' pure-torch references; the field test below also runs the Triton op
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def perturbed_field(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    field = M.OfficialField(cfg).to(dtype)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return field


def scene(cfg, B=2, R=5, S=7, seed=1, dtype=torch.float64):
    """Random volume and rays through the box (metres): o, d (B, R, 3), sorted t (B, R, S)."""
    g = torch.Generator().manual_seed(seed)
    X, Y, Z = cfg.grid
    vol = torch.randn(B, cfg.vox_dim, Z, Y, X, generator=g, dtype=dtype)
    lo, hi = torch.tensor(cfg.pc_range[:3], dtype=dtype), torch.tensor(cfg.pc_range[3:], dtype=dtype)
    o = lo + (hi - lo) * (0.25 + 0.5 * torch.rand(B, R, 3, generator=g, dtype=dtype))
    d = F.normalize(torch.randn(B, R, 3, generator=g, dtype=dtype), dim=-1)
    t = torch.sort(0.2 + 4.0 * torch.rand(B, R, S, generator=g, dtype=dtype), -1).values
    return vol, o, d, t


def decoder(params, prefix, p, c, act):
    """The UniPAD decoder written out: x = W_p p + b_p; per layer x = W_l (x + W_c c + b_c) + b_l."""
    x = p @ params[f"{prefix}.fc_p.weight"].T + params[f"{prefix}.fc_p.bias"]
    n = sum(1 for k in params if k.startswith(f"{prefix}.lins.") and k.endswith(".weight"))
    for i in range(n):
        x = x + c @ params[f"{prefix}.fc_c.{i}.weight"].T + params[f"{prefix}.fc_c.{i}.bias"]
        x = x @ params[f"{prefix}.lins.{i}.weight"].T + params[f"{prefix}.lins.{i}.bias"]
        if i < n - 1:
            x = act(x)
    return x


def independent_render(cfg, params, vol, o, d, t, inv_s):
    """Official field math with F.grid_sample for the features and explicit decoders."""
    B, R, S = t.shape
    scale = 1.0 / max(abs(v) for v in cfg.pc_range)
    lo, hi = torch.tensor(cfg.pc_range[:3], dtype=o.dtype), torch.tensor(cfg.pc_range[3:], dtype=o.dtype)
    p = (o[:, :, None] + t[..., None] * d[:, :, None]) * scale                  # (B, R, S, 3) scaled
    p = p.detach().requires_grad_(True)
    unit = (p / scale - lo) / (hi - lo) * 2 - 1
    feat = F.grid_sample(vol, unit.reshape(B, 1, 1, R * S, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=True).reshape(B, -1, R, S).permute(0, 2, 3, 1)
    h = decoder(params, "sdf_net", p, feat, lambda x: F.softplus(x, beta=100))
    sdf, geo = h[..., 0], h[..., 1:]
    (n,) = torch.autograd.grad(sdf.sum(), p, create_graph=True)
    rgb = torch.sigmoid(decoder(params, "rgb_net", p.detach(),
                                torch.cat([d[:, :, None].expand(B, R, S, 3), feat, n, geo], -1), F.relu))
    ts = t * scale
    delta = torch.cat([ts[..., 1:] - ts[..., :-1], ts[..., -1:] - ts[..., -2:-1]], -1)
    cos = torch.clamp((d[:, :, None] * n).sum(-1), max=0.0)
    prev = torch.sigmoid((sdf - cos * delta / 2) * inv_s)
    nxt = torch.sigmoid((sdf + cos * delta / 2) * inv_s)
    alpha = torch.clamp((prev - nxt + 1e-5) / (prev + 1e-5), 0.0, 1.0)
    w = torch.zeros_like(alpha)
    trans = torch.ones_like(alpha[..., 0])
    for i in range(S):
        w[..., i] = alpha[..., i] * trans
        trans = trans * (1 - alpha[..., i] + 1e-7)
    return (w[..., None] * rgb).sum(-2), (w * t).sum(-1), w.sum(-1), sdf, n


@pytest.mark.parametrize("force_triton", ["0", "1"], ids=["reference", "kernel"])
def test_official_field_matches_independent_torch(monkeypatch, force_triton):
    # forward (rgb, depth sum, opacity) and the gradients of a loss on them w.r.t. the volume and every
    # decoder parameter: through the normals that is the sampler's double backward
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force_triton)
    cfg = small_cfg(field="official", vox_dim=4, sample_hidden=5, sample_geo=3)
    field = perturbed_field(cfg)
    vol, o, d, t = scene(cfg)
    vol.requires_grad_(True)
    inv_s = torch.tensor(20.0, dtype=torch.float64)
    got = field.render(field.prepare(vol), o, d, t, inv_s)
    params = dict(field.named_parameters())
    want = independent_render(cfg, params, vol, o, d, t, inv_s)
    for name, a, b in zip(("rgb", "depth_sum", "opacity"), got, want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    op = want[2].detach()                       # the rays see surfaces (1e-7 in the transmittance: may pass 1)
    assert 0.05 < float(op.mean()) and float(op.max()) <= 1 + 1e-5
    gw = torch.Generator().manual_seed(3)
    coef = [torch.randn(x.shape, generator=gw, dtype=torch.float64) for x in want[:3]]
    leaves = [vol] + list(params.values())
    g_got = torch.autograd.grad(sum((c * x).sum() for c, x in zip(coef, got)), leaves)
    g_want = torch.autograd.grad(sum((c * x).sum() for c, x in zip(coef, want[:3])), leaves)
    for name, a, b in zip(["volume"] + list(params), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    # the normals enter the loss: the volume gradient through them is a real part of the total
    _, _, _, _, n = independent_render(cfg, params, vol, o, d, t, inv_s)
    (g_n,) = torch.autograd.grad((n * torch.randn_like(n)).sum(), vol)
    assert g_n.abs().max() > 1e-3


def test_normals_are_the_sdf_gradient_in_scaled_units():
    cfg = small_cfg(field="official", vox_dim=4, sample_hidden=5, sample_geo=3)
    field = perturbed_field(cfg, seed=2)
    vol, o, d, t = scene(cfg, B=1, R=3, S=4, seed=4)
    p = field.points(o, d, t).requires_grad_(True)
    sdf, _, _ = field.sdf_and_features(vol, p)
    (n,) = torch.autograd.grad(sdf.sum(), p)
    h = 1e-6
    for a in range(3):
        e = torch.zeros_like(p)
        e[..., a] = h
        fd = (field.sdf_and_features(vol, p + e)[0] - field.sdf_and_features(vol, p - e)[0]) / (2 * h)
        torch.testing.assert_close(n[..., a], fd, rtol=1e-5, atol=1e-7)
    # sdf() (the importance-sampling pass) is the same SDF
    torch.testing.assert_close(field.sdf(vol, o, d, t), sdf.detach().reshape(t.shape))


def test_official_sizes_and_paper_preset():
    cfg = M.PRESETS["paper"]
    assert cfg.field == "official" and cfg.num_uniform + cfg.num_importance == 96
    with torch.device("meta"):
        field = M.OfficialField(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # SDF decoder (in 32, out 17, hidden 16, 5 blocks): fc_p 3->16, 6 fc_c 32->16, 5 x 16->16, 16->17
    assert n(field.sdf_net) == (3 * 16 + 16) + 6 * (32 * 16 + 16) + 5 * (16 * 16 + 16) + (16 * 17 + 17)
    # RGB decoder (in 3 + 32 + 3 + 16 = 54, hidden 16, 3 blocks): fc_p, 4 fc_c 54->16, 3 x 16->16, 16->3
    assert n(field.rgb_net) == (3 * 16 + 16) + 4 * (54 * 16 + 16) + 3 * (16 * 16 + 16) + (16 * 3 + 3)
    assert isinstance(field.sdf_net.act, torch.nn.Softplus) and field.sdf_net.act.beta == 100
    assert field.scale == 1 / 51.2


def test_training_step_and_eval_with_the_official_field():
    cfg = small_cfg(field="official")
    torch.manual_seed(0)
    model = M.MIM4D(cfg)
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.01)
    b = batch_for(cfg, 2)
    before = {k: v.clone() for k, v in model.render_head.state_dict().items()}
    loss, out = model(b)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in out["terms"].values())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the variance (NeuS sharpness) and the decoders are trained
    assert model.render_head.variance.grad.abs() > 0
    assert model.render_head.field.sdf_net.fc_p.weight.grad.abs().max() > 0
    opt.step()
    after = model.render_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model.eval()
    with torch.no_grad():
        loss_eval, out_eval = model(b)
    assert torch.isfinite(loss_eval) and not loss_eval.requires_grad


def test_official_field_under_bf16_autocast():
    cfg = small_cfg(field="official")
    torch.manual_seed(1)
    model = M.MIM4D(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch_for(cfg, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
