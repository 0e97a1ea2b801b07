"""MuM model (nano4d/mum.py); the training script is tested in tests/test_train_mum.py.

Most tests run the model through the pure-torch attention path (NANO4D_FORCE_TRITON=0) because the
kernel itself is tested in tests/test_patch_attn.py; `test_triton_path_matches_reference` and
`test_frame_blocks_do_not_see_other_views` run the model through the Triton interpreter.
"""
import ast
import builtins
import json
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nano4d.mum import (PRESETS, MuM, MuMConfig, apply_rope, config_from_dict, mark_views_dynamic, patch_coords,
                        rope_sincos, with_prefix)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = MuMConfig(embed_dim=32, depth=1, num_heads=2, decoder_dim=16, decoder_depth=2, decoder_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny shapes gain nothing from intra-op threads, and on a shared, loaded CI machine the thread
    barriers cost 2-3x; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def _model(cfg=MICRO, seed=0, **kw):
    torch.manual_seed(seed)
    return MuM(MuMConfig(**{**cfg.__dict__, **kw})).eval()


# ------------------------------------------------------------------------------------------ model file

def test_model_file_imports_only_torch_kernels_stdlib():
    src = open(os.path.join(ROOT, "nano4d", "mum.py")).read()
    tops = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            tops.add(node.module.split(".")[0])
    bad = {t for t in tops if t not in ("torch", "kernels") and t not in sys.stdlib_module_names}
    assert not bad, f"nano4d/mum.py imports {bad}"
    # executing the file records every import it really makes (including indirect ones at import time)
    seen = []
    real_import = builtins.__import__

    def spy(name, *a, **kw):
        seen.append(name)
        return real_import(name, *a, **kw)

    builtins.__import__ = spy
    try:
        exec(compile(src, "mum_standalone", "exec"), {"__name__": "mum_standalone"})
    finally:
        builtins.__import__ = real_import
    assert seen and not [n for n in seen if n.split(".")[0] == "nano4d"], seen


# ------------------------------------------------------------------------------------------ masking

@settings(max_examples=10)
@given(M=st.integers(1, 5), L=st.integers(1, 40), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1))
def test_masking_keeps_floor_count_and_restore_inverts(M, L, ratio, seed):
    keep = int(L * (1 - ratio))                                            # floor, as MAE and the official code
    if keep < 1:
        return
    model = _model()
    torch.manual_seed(seed)
    x = torch.randn(M, L, 3)
    xk, mask, ids_restore, ids_keep = model.random_masking(x, ratio)
    assert xk.shape == (M, keep, 3) and ids_keep.shape == (M, keep)
    assert (mask.sum(1) == L - keep).all()                                  # same count in every view
    assert torch.equal(xk, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 3)))
    assert (torch.gather(mask, 1, ids_keep) == 0).all()                     # kept = unmasked
    # ids_restore is the inverse of the shuffle: restoring [kept, fillers] puts kept tokens back in place
    assert torch.equal(ids_restore.sort(1).values, torch.arange(L).expand(M, L))
    assert torch.equal(torch.gather(ids_restore, 1, ids_keep), torch.arange(keep).expand(M, keep))
    full = torch.cat([xk, torch.zeros(M, L - keep, 3)], 1)
    restored = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored, x * (1 - mask[..., None]))


def test_masking_differs_between_views_and_rejects_empty():
    model = _model()
    _, mask, _, _ = model.random_masking(torch.randn(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) > 1                      # independent per view
    with pytest.raises(ValueError, match="mask_ratio"):
        model.random_masking(torch.randn(2, 3, 4), 0.9)


# ------------------------------------------------------------------------------------------ RoPE

@settings(max_examples=10)
@given(D=st.sampled_from([4, 8, 16, 48]), seed=st.integers(0, 2**31 - 1))
def test_rope_relative_position_property(D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    p, p2, t = (torch.rand(2, generator=g, dtype=torch.float64) * 4 - 2 for _ in range(3))

    def dot(a, b):
        sa, ca = rope_sincos(a[None], D)
        sb, cb = rope_sincos(b[None], D)
        ra = apply_rope(q.view(1, 1, 1, D), sa[None].double(), ca[None].double())
        rb = apply_rope(k.view(1, 1, 1, D), sb[None].double(), cb[None].double())
        return float((ra * rb).sum())

    assert dot(p, p2) == pytest.approx(dot(p + t, p2 + t), abs=1e-4)       # only p - p' matters
    assert dot(p, p2) != pytest.approx(dot(p, p2 + 0.7), abs=1e-4)          # ... and it does matter
    assert dot(p, p) == pytest.approx(float(q @ k), abs=1e-4)                # same position: plain dot


def test_rope_axial_layout_and_cls_identity():
    D = 16
    s1, c1 = rope_sincos(torch.tensor([[0.3, -0.2]]), D)
    s2, c2 = rope_sincos(torch.tensor([[0.3, 0.9]]), D)                     # same y, different x
    y_dims = list(range(0, D // 4)) + list(range(D // 2, 3 * D // 4))
    x_dims = list(range(D // 4, D // 2)) + list(range(3 * D // 4, D))
    assert torch.allclose(s1[:, y_dims], s2[:, y_dims]) and not torch.allclose(s1[:, x_dims], s2[:, x_dims])
    # highest frequency: period 1 -> angle = 2*pi*coord
    assert torch.allclose(s1[0, 0], torch.sin(torch.tensor(2 * torch.pi * 0.3)), atol=1e-6)
    # patch centres normalised per axis to [-1, 1]
    c = patch_coords(2, 4)
    assert torch.allclose(c[:, 0].unique(), torch.tensor([-0.5, 0.5]))
    assert torch.allclose(c[:, 1].unique(), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    # CLS row: identity (default) or zero (official global-block quirk)
    s, c = with_prefix(s1[None], c1[None])
    x = torch.randn(1, 1, 2, D)
    assert torch.equal(apply_rope(x, s, c)[:, :, 0], x[:, :, 0])
    s, c = with_prefix(s1[None], c1[None], zero=True)
    assert (apply_rope(x, s, c)[:, :, 0] == 0).all()


# ------------------------------------------------------------------------------------------ decoder

def test_frame_blocks_do_not_see_other_views():
    """Through the Triton interpreter: perturbing view 2 leaves view 1's output of a frame-wise-only decoder
    unchanged; with a global block after it, view 1 changes."""
    B, V, h, w = 1, 3, 2, 2
    for depth, same in ((1, True), (2, False)):
        model = _model(decoder_depth=depth)
        latent = torch.randn(B * V, 1 + 2, MICRO.embed_dim)
        ids_restore = torch.stack([torch.randperm(h * w) for _ in range(B * V)])
        out = model.forward_decoder(latent, ids_restore, B, V, h, w)
        latent2 = latent.clone()
        latent2[2] += torch.randn_like(latent2[2])                            # view 2 (third view)
        out2 = model.forward_decoder(latent2, ids_restore, B, V, h, w)
        assert not torch.allclose(out[2], out2[2])
        assert torch.allclose(out[0], out2[0], atol=1e-6) == same
        assert torch.allclose(out[1], out2[1], atol=1e-6) == same


def test_official_cls_flag_only_changes_global_blocks(torch_path):
    x = torch.rand(2, 2, 3, 32, 48)
    outs = {}
    for depth in (1, 2):
        for flag in (False, True):
            torch.manual_seed(5)
            outs[depth, flag] = _model(decoder_depth=depth, official_global_cls=flag)({"images": x})[0]
    assert torch.equal(outs[1, False], outs[1, True])                       # frame-wise block only: no effect
    assert not torch.allclose(outs[2, False], outs[2, True])                # global block: CLS q/k zeroed


def test_triton_path_matches_reference(monkeypatch):
    x = torch.rand(1, 2, 3, 32, 32)
    grads = {}
    for force in ("1", "0"):
        monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
        model = _model(seed=3)
        torch.manual_seed(7)
        loss, out = model({"images": x})
        loss.backward()
        grads[force] = (loss.detach(), out["pred"].detach(), model.blocks[0].attn.qkv.weight.grad.clone())
    for a, b in zip(grads["1"], grads["0"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


# ------------------------------------------------------------------------------------------ loss

def _patches_by_hand(img, p):
    """img (3, H, W) numpy -> list of patches, row-major, values ordered (py, px, c)."""
    C, H, W = img.shape
    out = []
    for i in range(H // p):
        for j in range(W // p):
            out.append([img[c, i * p + y, j * p + x] for y in range(p) for x in range(p) for c in range(C)])
    return np.array(out, dtype=np.float64)


def _imagenet_normalize(img):
    """(3, H, W) in [0, 1] -> ImageNet-normalised, as the official data transform (torchvision Normalize)."""
    return (img - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array([0.229, 0.224, 0.225])[:, None, None]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_computation(norm_pix):
    model = _model(patch_size=2, norm_pix_loss=norm_pix)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 2, 3, 2, 4, generator=g)                         # 2 views x 2 patches of 2x2
    pred = torch.randn(2, 2, 12, generator=g)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    total, count = 0.0, 0
    for v in range(2):
        tgt = _patches_by_hand(_imagenet_normalize(images[0, v].numpy().astype(np.float64)), 2)
        for i in range(2):
            t = tgt[i]
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            if mask[v, i]:
                total += np.mean((pred[v, i].numpy() - t) ** 2)
                count += 1
    assert float(model.forward_loss(images, pred, mask)) == pytest.approx(total / count, rel=1e-5)
    assert torch.equal(model.unpatchify(model.patchify(images[0]), 1, 2), images[0])


# ------------------------------------------------------------------------------------------ shapes, presets

def test_any_views_any_size_and_encode(torch_path):
    model = _model()
    for V, H, W in ((1, 32, 32), (3, 48, 32)):
        x = torch.rand(2, V, 3, H, W)
        loss, out = model({"images": x})
        L = H * W // 256
        assert torch.isfinite(loss) and out["pred"].shape == (2 * V, L, 768) and out["mask"].shape == (2 * V, L)
        assert set(out["terms"]) == {"mse"} and out["terms"]["mse"] == loss
        feats = model.encode(x)
        assert feats.shape == (2, V, H // 16, W // 16, MICRO.embed_dim)
        assert torch.allclose(model.encode(x[:, :1]), feats[:, :1], atol=1e-5)  # views encoded independently
    with pytest.raises(ValueError, match="divisible"):
        model({"images": torch.rand(1, 2, 3, 30, 32)})
    with pytest.raises(ValueError, match="images"):
        model({"images": torch.rand(2, 3, 32, 32)})


def _vit_params(dim, depth, mlp=4):
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (2 * mlp * dim * dim + mlp * dim + dim) + 4 * dim
    return depth * block


def test_preset_parameter_counts_on_meta():
    for name, (enc, dec) in {"large": (303_099_904, 86_434_560), "base": (85_647_360, 26_008_320)}.items():
        cfg = PRESETS[name]
        C, Cd, p = cfg.embed_dim, cfg.decoder_dim, cfg.patch_size
        enc_formula = 3 * p * p * C + C + C + _vit_params(C, cfg.depth) + 2 * C        # patch, cls, blocks, norm
        dec_formula = C * Cd + Cd + Cd + _vit_params(Cd, cfg.decoder_depth) + 2 * Cd + Cd * p * p * 3 + p * p * 3
        assert (enc_formula, dec_formula) == (enc, dec)
        with torch.device("meta"):
            model = MuM(cfg)
        n_enc = sum(v.numel() for k, v in model.named_parameters() if not k.startswith(("decoder", "mask_token")))
        n_dec = sum(v.numel() for v in model.parameters()) - n_enc
        assert (n_enc, n_dec) == (enc, dec), name
    assert PRESETS["large"].decoder_depth == 12 and PRESETS["large"].decoder_heads == 16


def test_optimizer_groups_no_decay_on_norms_biases_tokens():
    for decay_tokens in (False, True):
        model = _model(decay_tokens=decay_tokens)
        opt = model.configure_optimizer(1e-3)
        assert opt.defaults["fused"] is True                                # CPU params: fused AdamW
        assert opt.defaults["betas"] == (0.9, 0.95)
        no_wd = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
        for n, p in model.named_parameters():
            token = n in ("cls_token", "mask_token")
            assert (id(p) in no_wd) == (p.ndim < 2 or (token and not decay_tokens)), n


def test_official_init_distributions():
    cfg = dict(embed_dim=64, depth=2, num_heads=2, decoder_dim=64, decoder_depth=2, decoder_heads=2)
    off, mae = _model(official_init=True, **cfg), _model(**cfg)
    w = torch.cat([m.weight.flatten() for m in off.modules() if isinstance(m, torch.nn.Linear)])
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and w.abs().max() <= 2.0  # trunc normal(0.02)
    bound = 1 / (3 * 16 * 16) ** 0.5                                         # conv default: U(+-1/sqrt(fan_in))
    for t in (off.patch_embed.weight, off.patch_embed.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    q = mae.blocks[0].attn.qkv.weight                                       # xavier: U(+-sqrt(6/(fan_in+fan_out)))
    assert q.abs().max() <= (6 / (64 + 192)) ** 0.5 and q.abs().max() > 0.9 * (6 / (64 + 192)) ** 0.5
    assert (mae.patch_embed.bias == 0).all()


# ------------------------------------------------------------------------------------------ loss target on a photo

def test_norm_pix_target_is_imagenet_normalized_patch_statistics_on_a_photo():
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()[:64, 200:264].astype(np.float64) / 255       # (64, 64, 3) real photo: face + helmet
    norm = _imagenet_normalize(img.transpose(2, 0, 1))
    model = _model()
    target = model.loss_target(torch.from_numpy(img.transpose(2, 0, 1)).float()[None, None])[0].double().numpy()
    pats = _patches_by_hand(norm, 16)                                       # (16, 768)
    want = (pats - pats.mean(1, keepdims=True)) / np.sqrt(pats.var(1, ddof=1, keepdims=True) + 1e-6)
    assert np.abs(target - want).max() < 1e-4
    # the [0, 1]-pixel target (before the fix) differs by far more than that on this photo
    raw = _patches_by_hand(img.transpose(2, 0, 1), 16)
    old = (raw - raw.mean(1, keepdims=True)) / np.sqrt(raw.var(1, ddof=1, keepdims=True) + 1e-6)
    assert ((old - want) ** 2).mean(1).max() > 0.01


# ------------------------------------------------------------------------------------------ official weights

def _periods(head_dim, dtype=torch.float32):
    return 100.0 ** (2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2))


def official_layout(C=32, depth=2, heads=2, Cd=16, dec_depth=4, dec_heads=2, p=16, encoder_only=False,
                    rope_dtype=torch.float32, seed=0):
    """A state dict with the key names, order and shapes of davnords/MuM's ``MuMAutoEncoder`` (train-dev
    mum/model.py) or, with ``encoder_only``, ``MuMVisionTransformer`` (main mum/vit_model.py); random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, C)}
    if not encoder_only:
        shapes["mask_token"] = (1, 1, Cd)
    shapes.update({"patch_embed.proj.weight": (C, 3, p, p), "patch_embed.proj.bias": (C,)})

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    sd = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    sd["rope_embed.periods"] = _periods(C // heads, rope_dtype)
    for i in range(depth):
        sd.update({k: torch.randn(v, generator=g) * 0.1 for k, v in block(f"blocks.{i}", C).items()})
    sd.update({"norm.weight": 1 + 0.1 * torch.randn(C, generator=g), "norm.bias": 0.1 * torch.randn(C, generator=g)})
    if not encoder_only:
        sd["rope_embed_decoder.periods"] = _periods(Cd // dec_heads, rope_dtype)
        sd.update({"decoder_embed.weight": torch.randn(Cd, C, generator=g) * 0.1,
                   "decoder_embed.bias": torch.randn(Cd, generator=g) * 0.1})
        for kind in ("frame", "global"):
            for i in range(dec_depth // 2):
                sd.update({k: torch.randn(v, generator=g) * 0.1
                           for k, v in block(f"decoder_{kind}_blocks.{i}", Cd).items()})
        sd.update({"decoder_norm.weight": 1 + 0.1 * torch.randn(Cd, generator=g),
                   "decoder_norm.bias": 0.1 * torch.randn(Cd, generator=g),
                   "decoder_pred.weight": torch.randn(p * p * 3, Cd, generator=g) * 0.1,
                   "decoder_pred.bias": torch.randn(p * p * 3, generator=g) * 0.1})
    return sd


def _our_key(k):
    """The official -> nano4d key correspondence, written out independently of the converter."""
    k = k.replace("patch_embed.proj.", "patch_embed.").replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
    for kind, off in (("frame", 0), ("global", 1)):
        pre = f"decoder_{kind}_blocks."
        if k.startswith(pre):
            i, rest = k[len(pre):].split(".", 1)
            k = f"decoder_blocks.{2 * int(i) + off}.{rest}"
    return k


def test_from_official_autoencoder_loads_every_parameter_by_value():
    sd = official_layout()
    model = MuM.from_official(sd)
    c = model.cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.patch_size) == \
        (32, 2, 2, 16, 4, 2, 16)
    assert c.official_global_cls and c.official_init and c.decay_tokens and c.rope_dtype == "float32"
    assert c.ln_eps == 1e-6 and not c.encoder_only                            # as the mum_vitl16_decoderb factory
    ours = model.state_dict()
    loaded = {k: v for k, v in sd.items() if not k.endswith("periods")}
    assert len(ours) == len(loaded)
    for k, v in loaded.items():
        assert torch.equal(ours[_our_key(k)], v), k
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    loss, out = model({"images": torch.rand(1, 2, 3, 32, 32)})
    assert torch.isfinite(loss)
    # overrides and an explicit preset
    assert MuM.from_official(sd, ln_eps=1e-5).cfg.ln_eps == 1e-5
    with pytest.raises(ValueError, match=r"'cls_token' has shape \(1, 1, 32\), expected \(1, 1, 192\)"):
        MuM.from_official(sd, preset="tiny")                                  # tiny is 192-d: shapes do not fit
    sd16 = official_layout(C=64, heads=4, depth=1, Cd=32, dec_heads=4, dec_depth=2)
    with pytest.raises(ValueError, match="rope_embed.periods"):
        MuM.from_official(sd16, embed_dim=64, num_heads=2)                    # heads disagree with the buffer


def test_from_official_encoder_only_with_bf16_rope():
    sd = official_layout(encoder_only=True, rope_dtype=torch.bfloat16)
    model = MuM.from_official(sd)
    assert model.cfg.encoder_only and model.cfg.rope_dtype == "bfloat16" and model.cfg.ln_eps == 1e-5
    ours = model.state_dict()
    assert len(ours) == len(sd) - 1 and not any(k.startswith("decoder") for k in ours)
    for k, v in sd.items():
        if k != "rope_embed.periods":
            assert torch.equal(ours[_our_key(k)], v), k
    x = torch.rand(1, 2, 3, 32, 48)
    feats = model.encode(x)
    assert feats.shape == (1, 2, 2, 3, 32) and torch.isfinite(feats).all()
    fp32 = MuM.from_official(sd, rope_dtype="float32").encode(x)
    assert 0 < (feats - fp32).abs().max() < 0.1                             # bf16 RoPE: a small, real difference
    with pytest.raises(ValueError, match="encoder_only"):
        model({"images": x})


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing key 'blocks.1.mlp.fc2.bias' \(shape \(32,\)\)"),
    (lambda sd: sd.pop("decoder_global_blocks.1.norm1.weight"), "missing key 'decoder_global_blocks.1.norm1.weight'"),
    (lambda sd: sd.pop("rope_embed.periods"), "missing key 'rope_embed.periods'"),
    (lambda sd: sd.update({"storage_tokens": torch.zeros(1, 4, 32)}),
     r"unexpected key 'storage_tokens' with shape \(1, 4, 32\)"),
    (lambda sd: sd.update({"blocks.0.ls1.gamma": torch.zeros(32)}), "unexpected key 'blocks.0.ls1.gamma'"),
    (lambda sd: sd.update({"blocks.0.attn.proj.weight": torch.zeros(32, 33)}),
     r"'blocks.0.attn.proj.weight' has shape \(32, 33\)"),
    (lambda sd: sd.update({"rope_embed.periods": _periods(16) * 2}), "rope_embed.periods"),
])
def test_from_official_rejects_bad_state_dicts(edit, match):
    sd = official_layout()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        MuM.from_official(sd)


def test_from_checkpoint_reads_safetensors_written_by_the_library(tmp_path):
    from safetensors.torch import save_file
    model = _model(official_global_cls=True)
    cfg = {"model": dict(model.cfg.__dict__), "train": {"steps": 3}, "step": 3}
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["probe_bf16"] = torch.randn(3, 2).bfloat16()                       # the reader's other dtypes
    save_file(sd, str(tmp_path / "probe.safetensors"), metadata={"config": json.dumps(cfg)})
    from nano4d.mum import read_safetensors
    back, meta = read_safetensors(str(tmp_path / "probe.safetensors"))
    assert torch.equal(back["probe_bf16"], sd["probe_bf16"]) and json.loads(meta["config"]) == cfg
    del sd["probe_bf16"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"config": json.dumps(cfg)})
    for path in (tmp_path, tmp_path / "model.safetensors"):                 # run dir or file
        loaded = MuM.from_checkpoint(str(path))
        assert loaded.cfg == model.cfg
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_config_from_dict_restores_tuples_and_rejects_unknown_fields():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        res: tuple = (64, 64)
        n: int = 1

    assert config_from_dict(Cfg, {"res": [32, 48]}) == Cfg(res=(32, 48))
    assert isinstance(config_from_dict(Cfg, {"res": [32, 48]}).res, tuple)
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict(Cfg, {"bogus": 1})
    assert config_from_dict(MuMConfig, {"embed_dim": 64}).embed_dim == 64


# ------------------------------------------------------------------------------------------ autocast, compile

def test_forward_backward_under_cpu_bf16_autocast(torch_path):
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model({"images": torch.rand(2, 3, 3, 32, 32)})
    loss.backward()
    assert out["pred"].dtype == torch.bfloat16 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_compile_fullgraph_and_new_view_count_does_not_recompile():
    """On the Triton path (the CUDA path; here through the interpreter). The pure-torch CPU attention
    (kernels.patch_attention_ref) chunks its query loop with a Python range over N, which specializes N."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    cnt = CompileCounter()
    model = _model().train()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    for B, V in ((3, 2), (2, 3)):
        x = mark_views_dynamic(torch.rand(B, V, 3, 32, 32))
        loss, _ = compiled({"images": x})
        assert torch.isfinite(loss)
    assert cnt.frame_count == 1, cnt.frame_count
    torch._dynamo.reset()
