"""nano4d.data.objects: procedural SDF objects, their renders, occupancy, cache."""
import math
import os

import pytest
import torch

from nano4d.cameras import invert_pose, project_points
from nano4d.data import objects as O



def _box_object(centre=(0.2, 0.0, 0.0), half=(0.2, 0.05, 0.1)) -> O.SDFObject:
    """One axis-aligned box, hand-built (no normalization), solid colour."""
    return O.SDFObject(
        prim_type=torch.tensor([O.PRIM_TYPES.index("box")]), params=torch.tensor([[*half, 0.0]]),
        rot=torch.eye(3)[None], trans=torch.tensor([centre]), op=torch.tensor([0]), smooth=torch.zeros(1),
        tex=torch.tensor([0]), colors=torch.tensor([[[0.8, 0.2, 0.1], [0.0, 0.0, 0.0]]]), tex_freq=torch.ones(1),
        tex_axis=torch.tensor([[1.0, 0.0, 0.0]]), tex_seed=torch.ones(1, dtype=torch.int64),
        light_dir=torch.tensor([0.0, 0.0, 1.0]), ambient=0.4)


def test_objects_shapes_determinism_and_splits():
    kw = dict(num_objects=4, num_views=5, res=(20, 24), occ_res=8, num_surface_points=64)
    a, b = O.ProceduralObjects(**kw)[1], O.ProceduralObjects(**kw)[1]
    shapes = dict(images=(5, 3, 20, 24), alphas=(5, 1, 20, 24), depths=(5, 1, 20, 24), normals=(5, 3, 20, 24),
                  c2w=(5, 4, 4), K=(5, 3, 3), occupancy=(8, 8, 8), surface_points=(64, 3), background=(3,))
    for k, s in shapes.items():
        assert tuple(a[k].shape) == s, k
        assert a[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), f"{k} not deterministic"
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    bg_px = a["alphas"].expand_as(a["images"]) == 0
    assert (a["images"][bg_px] == 1).all()                      # white background
    assert 0 < a["alphas"].mean() < 1 and 0 < a["occupancy"].mean() < 1
    assert (a["depths"][a["alphas"] == 0] == 0).all() and (a["depths"][a["alphas"] == 1] > 0).all()
    other = O.ProceduralObjects(**kw)[2]
    assert not torch.equal(a["images"], other["images"])
    val = O.ProceduralObjects(split="val", **kw)
    seeds_train = {O.ProceduralObjects(**kw).object_seed(i) for i in range(50)}
    assert not seeds_train & {val.object_seed(i) for i in range(50)}
    batch = next(iter(torch.utils.data.DataLoader(O.ProceduralObjects(**kw), batch_size=2)))
    assert batch["images"].shape == (2, 5, 3, 20, 24) and torch.equal(batch["images"][1], a["images"])
    rnd = O.ProceduralObjects(background="random", **kw)[1]
    bg = rnd["background"].view(3, 1, 1)
    mask = rnd["alphas"] == 0
    assert torch.allclose((rnd["images"] - bg).abs().sum(1, keepdim=True)[mask], torch.zeros(1), atol=1e-6)
    assert torch.equal(rnd["depths"], a["depths"])          # background does not change geometry
    with pytest.raises(ValueError, match="split"):
        O.ProceduralObjects(split="tarin")
    with pytest.raises(ValueError, match="background"):
        O.ProceduralObjects(background="blue")


def test_primitives_are_exact_sdfs():
    """Each primitive: 1-Lipschitz (what sphere tracing needs) with unit gradient almost everywhere."""
    g = torch.Generator().manual_seed(0)
    params = dict(sphere=[0.3, 0, 0, 0], box=[0.3, 0.1, 0.2, 0], round_box=[0.3, 0.15, 0.2, 0.05],
                  capsule=[0.2, 0.1, 0, 0], cylinder=[0.2, 0.15, 0, 0], torus=[0.25, 0.08, 0, 0],
                  cone=[0.25, 0.2, 0.05, 0], hex_prism=[0.2, 0.25, 0, 0])
    assert set(params) == set(O.PRIM_TYPES)
    for name, p in params.items():
        k, p = O.PRIM_TYPES.index(name), torch.tensor(p, dtype=torch.float64)
        x = (torch.rand(3000, 3, generator=g, dtype=torch.float64) - 0.5) * 1.2
        y = x + 0.05 * torch.randn(3000, 3, generator=g, dtype=torch.float64)
        dx, dy = O._prim_sdf(k, x, p), O._prim_sdf(k, y, p)
        assert ((dx - dy).abs() <= (x - y).norm(dim=-1) + 1e-9).all(), name
        assert (dx < 0).any() and (dx > 0).any(), name
        h = 1e-5
        grad = torch.stack([(O._prim_sdf(k, x + h * e, p) - O._prim_sdf(k, x - h * e, p)) / (2 * h)
                            for e in torch.eye(3, dtype=torch.float64)], -1).norm(dim=-1)
        assert ((grad - 1).abs() < 1e-3).float().mean() > 0.97, name


def test_orbit_cameras_ring_and_sphere():
    c2w, K = O.orbit_cameras(7, (30, 40), fov_deg=40.0, distance=2.0, elevation_deg=20.0, seed=3)
    eye = c2w[:, :3, 3]
    assert torch.allclose(eye.norm(dim=-1), torch.full((7,), 2.0), atol=1e-5)
    el = torch.rad2deg(torch.asin(eye[:, 2] / 2.0))
    assert torch.allclose(el[:4], torch.full((4,), 20.0), atol=1e-3)
    az = torch.atan2(eye[:4, 1], eye[:4, 0])
    step = torch.remainder(torch.rad2deg(az[1:] - az[:-1]), 360)
    assert torch.allclose(step, torch.full((3,), 90.0), atol=1e-3)
    uv, z = project_points(torch.zeros(1, 3), invert_pose(c2w), K)        # all look at the origin
    assert torch.allclose(uv, torch.tensor([20.0, 15.0]).expand(7, 1, 2), atol=1e-3)
    assert torch.allclose(z, torch.full((7, 1), 2.0), atol=1e-5)
    assert math.isclose(2 * math.degrees(math.atan(15 / K[0, 1, 1].item())), 40.0, rel_tol=1e-5)
    R_ = c2w[:, :3, :3]
    assert torch.allclose(R_ @ R_.transpose(1, 2), torch.eye(3).expand(7, 3, 3), atol=1e-5)
    assert (torch.linalg.det(R_) > 0).all()


def test_render_depth_backprojects_to_surface_and_same_pixel():
    """A rendered surface pixel p with depth z back-projects to a point on the surface (|SDF| ~ 0) that
    projects to p again with depth z; normals are unit, outward and face the camera."""
    obj = O.random_object(11)
    c2w, K = O.orbit_cameras(3, 32, seed=1)
    out = O.render_object(obj, c2w, K, 32, 32)
    for v in range(3):
        m = out["alpha"][v, 0] > 0
        i, j = m.nonzero().unbind(1)
        z = out["depth"][v, 0, i, j]
        uv = torch.stack([j + 0.5, i + 0.5], -1)
        cam = torch.cat([uv, torch.ones_like(z)[:, None]], -1) @ torch.linalg.inv(K[v]).T * z[:, None]
        X = cam @ c2w[v, :3, :3].T + c2w[v, :3, 3]
        assert O.object_sdf(obj, X).abs().max() < 2e-3
        uv2, z2 = project_points(X, invert_pose(c2w[v]), K[v])
        assert torch.allclose(uv2, uv, atol=1e-3) and torch.allclose(z2, z, atol=1e-4)
        n = out["normal"][v][:, i, j].T
        assert torch.allclose(n.norm(dim=-1), torch.ones(len(n)), atol=1e-4)
        d = torch.nn.functional.normalize(X - c2w[v, :3, 3], dim=-1)
        assert ((n * d).sum(-1) < 0.05).float().mean() > 0.99
        g = O.sdf_normals(obj, X + 0.01 * n)           # outward: SDF grows along n
        assert (O.object_sdf(obj, X + 0.01 * n) > 0).float().mean() > 0.97 and g.shape == n.shape


def test_surface_points_and_sphere_tracing_agree():
    """Rays from a camera towards surface samples never pass through a surface unseen: the traced hit is
    never beyond the sample, and for the visible majority it is the sample itself."""
    obj = O.random_object(5)
    pts = O.sample_surface(obj, 3000, seed=0, tol=2e-4)     # below the tracer's hit threshold (4e-4)
    assert O.object_sdf(obj, pts).abs().max() < 2e-4 and pts.abs().max() <= 0.5
    c2w, _ = O.orbit_cameras(2, 48, seed=2)
    for v in range(2):
        o = c2w[v, :3, 3].expand_as(pts)
        dist = (pts - o).norm(dim=-1)
        hit, t = O.sphere_trace(obj, o, (pts - o) / dist[:, None])
        assert hit.all() and (t <= dist + 2e-3).all()
        assert ((t - dist).abs() < 2e-3).float().mean() > 0.15


def test_occupancy_matches_sdf_sign_and_zyx_layout():
    obj = _box_object()
    occ = O.occupancy_grid(obj, 20)
    cen = O.grid_centers(20)
    x, y, z = cen.unbind(-1)
    inside = ((x - 0.2).abs() <= 0.2) & (y.abs() <= 0.05) & (z.abs() <= 0.1)
    assert torch.equal(occ, inside.float())
    assert torch.allclose(cen[0, 0, :, 0], -0.5 + (torch.arange(20) + 0.5) / 20)      # X varies along the last dim
    nz = occ.nonzero()                                                                 # (k, j, i) = (z, y, x)
    assert nz[:, 2].max() - nz[:, 2].min() > nz[:, 0].max() - nz[:, 0].min() > nz[:, 1].max() - nz[:, 1].min()
    # random object: every occupied cell centre is hidden behind (or on) the rendered surface in every view
    obj = O.random_object(21)
    occ = O.occupancy_grid(obj, 16)
    pts = O.grid_centers(16)[occ > 0]
    assert len(pts) > 5
    sdf = O.object_sdf(obj, O.grid_centers(16).reshape(-1, 3)).reshape(16, 16, 16)
    assert torch.equal(occ > 0, sdf <= 0)
    c2w, K = O.orbit_cameras(3, 40, seed=0)
    for v in range(3):
        o = c2w[v, :3, 3].expand_as(pts)
        dist = (pts - o).norm(dim=-1)
        hit, t = O.sphere_trace(obj, o, (pts - o) / dist[:, None])
        assert hit.all() and (t <= dist + 1e-3).all()
    surf = O.occupancy_grid(obj, 16, mode="surface")
    assert (surf * (sdf.abs() > 0.5 * math.sqrt(3) / 16)).sum() == 0 and surf.sum() > 0
    with pytest.raises(ValueError, match="mode"):
        O.occupancy_grid(obj, 8, mode="hollow")


def test_supersample_and_composite():
    obj = O.random_object(4)
    c2w, K = O.orbit_cameras(1, 16, seed=0)
    a1 = O.render_object(obj, c2w, K, 16, 16, supersample=1)["alpha"]
    a3 = O.render_object(obj, c2w, K, 16, 16, supersample=3)
    frac = ((a3["alpha"] > 0) & (a3["alpha"] < 1)).sum()
    assert frac > 0 and (a3["alpha"] - a1).abs().mean() < 0.1
    rgb = torch.rand(2, 3, 4, 4)
    alpha = torch.rand(2, 1, 4, 4)
    out = O.composite(rgb, alpha, (0.0, 0.5, 1.0))
    assert torch.allclose(out, rgb * alpha + torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1) * (1 - alpha))


def test_objects_cache_roundtrip(tmp_path):
    kw = dict(num_objects=3, num_views=3, res=16, occ_res=8, num_surface_points=32)
    ref = O.ProceduralObjects(**kw)[2]
    ds = O.ProceduralObjects(cache_dir=str(tmp_path), **kw)
    first, second = ds[2], ds[2]                   # render + write, then read back
    for k in ref:
        assert torch.equal(first[k], second[k]), k             # the first access is served from the cache too
        tol = 1 / 255 + 1e-6 if k == "images" else 1e-6
        assert torch.allclose(first[k].float(), ref[k].float(), atol=tol), k
        assert torch.allclose(second[k].float(), ref[k].float(), atol=tol), k
    assert not [p for p in os.listdir(next(tmp_path.iterdir())) if p.startswith(".")]   # no temp dirs left
