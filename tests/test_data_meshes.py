"""Mesh loading, normalization, cameras, the TinyRenderer path (checked against geometry), the
render-meshes pipeline into the GObjaverse layout, and the sweethome3d preparation step (on a fake catalog)."""
import json
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d.cameras import camera_rays, invert_pose, project_points
from nano4d.data import meshes as Me
from nano4d.data.gobjaverse import GObjaverseDataset, occupancy_from_points, read_gobjaverse_object

# ---------------------------------------------------------------------------- fixtures: a textured box OBJ

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _box_obj(folder, half=(0.5, 0.3, 0.2), center=(0.0, 0.0, 0.0), name="box", textured=True, up="z", vn=False):
    """Write ``<folder>/<name>.obj`` (+ .mtl + texture): an axis-aligned box. Side faces get the texture with
    v = 1 on their top edge (up axis), so their upper half is red and lower half blue."""
    folder.mkdir(parents=True, exist_ok=True)
    h, c = np.array(half), np.array(center)
    ui = 2 if up == "z" else 1
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * h + c
    lines = [f"mtllib {name}.mtl", "# a comment", "o box"] + [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in corners]
    lines += ["vt 0 0", "vt 1 0", "vt 1 1", "vt 0 1", "usemtl mat"]
    for axis in range(3):
        for sgn in (-1, 1):
            idx = [i for i in range(8) if np.sign(corners[i, axis] - c[axis]) == sgn]
            pts = corners[idx] - c
            # order the 4 corners around the face centre, outward normal (CCW seen from outside)
            others = [a for a in range(3) if a != axis]
            ang = np.arctan2(pts[:, others[1]], pts[:, others[0]])
            idx = [idx[k] for k in np.argsort(ang)]
            p = corners[idx] - c
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), p.mean(0) + sgn * np.eye(3)[axis]) < 0:
                idx = idx[::-1]
            # texture coordinates: v = 1 on the upper edge of side faces, u along the remaining axis
            va = ui if axis != ui else others[1]
            ua = [a for a in range(3) if a not in (axis, va)][0]
            vt = [{(0, 0): 1, (1, 0): 2, (1, 1): 3, (0, 1): 4}[(int(corners[i, ua] > c[ua]), int(corners[i, va] > c[va]))]
                  for i in idx]
            if vn:  # an explicit per-face normal through vn (exercises the welded-vertex path)
                lines.append(f"vn {' '.join(str(float(sgn * (a == axis))) for a in range(3))}")
                lines.append("f " + " ".join(f"{i + 1}/{t}/-1" for i, t in zip(idx, vt)))
            else:
                lines.append("f " + " ".join(f"{i + 1}/{t}" for i, t in zip(idx, vt)))
    (folder / f"{name}.obj").write_text("\n".join(lines) + "\n")
    mtl = ["newmtl mat", "Kd 0.2 0.7 0.3"]
    if textured:
        tex = np.zeros((8, 8, 3), np.uint8)
        tex[:4], tex[4:] = RED, BLUE              # image top (v = 1) red, bottom (v = 0) blue
        Image.fromarray(tex).save(folder / "Tex Image.PNG")
        mtl.append("map_Kd -s 1 1 1 tex image.png")  # options + a case-mismatched name with a space
    (folder / f"{name}.mtl").write_text("\n".join(mtl) + "\n")
    return folder / f"{name}.obj"


def _ray_box(o, d, lo, hi):
    """Slab test: entry distance t_near and slack t_far - t_near for rays (..., 3)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tn = np.nanmax(np.minimum(t1, t2), -1)
    tf = np.nanmin(np.maximum(t1, t2), -1)
    return tn, tf - tn


# ---------------------------------------------------------------------------- loading


def test_load_obj_polygons_materials_negative_indices(tmp_path):
    (tmp_path / "m.mtl").write_text("newmtl a\nKd 1 0 0\nnewmtl b\nKd 0 0 1\nd 0.5\nmap_Kd missing.jpg\n")
    (tmp_path / "m.obj").write_text(
        "mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
        "f 1 2 3 4\nusemtl a\nf -5/1 -4/2 -1/4\nusemtl b\nf 1/1/1 2/2/1 3/3/1 4/4/1 5/1/1\nusemtl undefined\nf 1 2 5\n")
    m = Me.load_obj(tmp_path / "m.obj")
    assert m.faces.shape == (2 + 1 + 3 + 1, 3)                                 # quad, tri, pentagon fans, tri
    assert m.faces[2].tolist() == [0, 1, 4]                                    # negative indices resolved
    assert [mat.name for mat in m.materials] == ["__default__", "a", "b", "undefined"]
    assert m.face_material.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert np.isnan(m.uvs[0]).all() and m.uvs[2].tolist() == [[0, 0], [1, 0], [0, 1]]
    assert m.materials[1].kd == (1.0, 0.0, 0.0) and m.materials[2].opacity == 0.5
    assert m.materials[2].texture is None
    assert any("missing.jpg" in w for w in m.warnings) and any("undefined" in w for w in m.warnings)
    assert any("normal indices out of range" in w for w in m.warnings) and np.isnan(m.normals).all()
    # vn: per-corner unit normals, rotated with the mesh by the up-axis conversion
    (tmp_path / "n.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvn 0 0 2\nvn 0 1 0\nf 1//1 2//1 3//2\nf 1 2 3\n")
    n = Me.load_obj(tmp_path / "n.obj")
    np.testing.assert_allclose(n.normals[0], [[0, 0, 1], [0, 0, 1], [0, 1, 0]])
    assert np.isnan(n.normals[1]).all()
    np.testing.assert_allclose(Me.y_up_to_z_up(n).normals[0], [[0, -1, 0], [0, -1, 0], [0, 0, 1]])


def test_load_obj_errors_name_the_file(tmp_path):
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 zz\nf 1 2 3\n")
    with pytest.raises(Me.MeshError, match=r"bad\.obj:2"):
        Me.load_obj(tmp_path / "bad.obj")
    (tmp_path / "empty.obj").write_text("v 0 0 0\n")
    with pytest.raises(Me.MeshError, match="no faces"):
        Me.load_obj(tmp_path / "empty.obj")
    (tmp_path / "oob.obj").write_text("v 0 0 0\nv 1 0 0\nf 1 2 7\n")
    with pytest.raises(Me.MeshError, match="out of range"):
        Me.load_obj(tmp_path / "oob.obj")


def test_normalize_and_up_axis(tmp_path):
    # OBJ y-up box: extents x 2.0, y (up) 1.0, z 0.5, off-centre
    m = Me.load_obj(_box_obj(tmp_path, half=(1.0, 0.5, 0.25), center=(3.0, -2.0, 1.0), up="y"))
    assert m.materials[1].texture is not None and m.materials[1].texture.endswith("Tex Image.PNG")
    z = Me.y_up_to_z_up(m)
    n, scale, offset = Me.normalize_mesh(z)
    lo, hi = n.bounds()
    np.testing.assert_allclose(lo, [-0.5, -0.125, -0.25], atol=1e-12)        # world x, y (= -z_obj), z (= y_obj)
    np.testing.assert_allclose(hi, [0.5, 0.125, 0.25], atol=1e-12)
    assert scale == pytest.approx(0.5)
    np.testing.assert_allclose((z.vertices - offset) * scale, n.vertices)
    pts = Me.sample_surface(n, 4000, seed=1)
    on_face = np.isclose(np.abs(pts), [0.5, 0.125, 0.25], atol=1e-6).any(1)
    assert pts.shape == (4000, 3) and on_face.all() and (np.abs(pts) <= np.array([0.5, 0.125, 0.25]) + 1e-6).all()
    # area-uniform: the two big faces (x-y extents 1 x 0.25 ... ) get their share of samples
    areas = {0: 0.25 * 0.5, 1: 1.0 * 0.5, 2: 1.0 * 0.25}
    frac_x = np.isclose(np.abs(pts[:, 0]), 0.5, atol=1e-6).mean()
    assert frac_x == pytest.approx(areas[0] / sum(areas.values()), abs=0.03)
    occ = occupancy_from_points(torch.from_numpy(pts), 16)
    assert occ.shape == (16, 16, 16) and occ[8, 8, 8] == 0 and occ[8, 8, 0] == 1   # hollow, x = -0.5 wall


def test_gobjaverse_cameras_layout():
    c2w, K = Me.gobjaverse_cameras(30, res=(48, 64), fov_deg=39.6, distance=2.0, elevation_deg=20.0, seed=3)
    assert c2w.shape == (30, 4, 4) and K.shape == (30, 3, 3)
    eye = c2w[:, :3, 3]
    torch.testing.assert_close(eye.norm(dim=-1), torch.full((30,), 2.0, dtype=torch.float64))
    # every camera looks at the origin and has an orthonormal rotation
    torch.testing.assert_close(c2w[:, :3, 2], -eye / 2.0)
    R = c2w[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(30, 3, 3))
    el = torch.rad2deg(torch.asin(eye[:, 2] / 2))
    torch.testing.assert_close(el[:24], torch.full((24,), 20.0, dtype=torch.float64))
    az = torch.rad2deg(torch.atan2(eye[:24, 1], eye[:24, 0])) % 360
    torch.testing.assert_close(az, torch.arange(24, dtype=torch.float64) * 15.0)
    assert el[24] == pytest.approx(90) and el[25] == pytest.approx(-90)
    assert (el[26:] > -31).all() and (el[26:] < 73).all()
    assert K[0, 1, 1].item() == pytest.approx(24 / np.tan(np.radians(19.8))) and K[0, 0, 2] == 32


# ---------------------------------------------------------------------------- rendering vs geometry


@pytest.fixture(scope="module")
def renderer():
    pytest.importorskip("pybullet", reason="renderer tests need the render extra: pip install 'nano4d[render]'")
    r = Me.PyBulletRenderer()
    yield r
    r.close()


def test_render_box_matches_projected_geometry(tmp_path, renderer):
    lo, hi = np.array([-0.5, -0.3, -0.2]), np.array([0.5, 0.3, 0.2])
    mesh = Me.load_obj(_box_obj(tmp_path, half=tuple(hi)))
    renderer.load(mesh)
    c2w, K = Me.gobjaverse_cameras(28, res=(40, 56), distance=2.0, seed=0)
    H, W = 40, 56
    corners = torch.tensor([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])],
                           dtype=torch.float64)
    for v in (0, 5, 13, 24, 25, 27):                                           # orbit, top, bottom, random
        # off-centre principal point and non-square pixels must also be exact
        Kv = K[v].clone()
        Kv[0, 2] += 3.3
        Kv[1, 1] *= 1.1
        rgba, depth = renderer.render(c2w[v], Kv, H, W, ssaa=1)
        alpha = rgba[..., 3]
        assert set(np.unique(alpha)) <= {0.0, 1.0}
        # 1) the mask's extent equals the projected corners' extent (pixel centres at +0.5)
        uv, _ = project_points(corners, invert_pose(c2w[v]), Kv)
        umin, vmin = uv.min(0).values.numpy()
        umax, vmax = uv.max(0).values.numpy()
        rows, cols = np.nonzero(alpha > 0)
        assert cols.min() == int(np.ceil(umin - 0.5)) and cols.max() == int(np.floor(umax - 0.5)), (v, umin, umax)
        assert rows.min() == int(np.ceil(vmin - 0.5)) and rows.max() == int(np.floor(vmax - 0.5)), (v, vmin, vmax)
        # 2) per pixel: coverage and z-depth equal the ray-box intersection
        o, d = camera_rays(c2w[v], Kv, H, W)
        tn, slack = _ray_box(o.numpy(), d.numpy(), lo, hi)
        inside, outside = slack > 1e-4, slack < -1e-4
        assert (alpha[inside] == 1).all() and (alpha[outside] == 0).all(), v
        zdepth = tn * (d.numpy() @ c2w[v, :3, 2].numpy())
        np.testing.assert_allclose(depth[inside], zdepth[inside], rtol=0, atol=2e-5)
        assert (depth[alpha == 0] == 0).all()
    # 3) texture orientation: seen from +x (view 0), the upper half of the +x face is red, the lower blue
    rgba, _ = renderer.render(c2w[0], K[0], H, W, ssaa=1)
    pts = torch.tensor([[0.5, 0.0, 0.1], [0.5, 0.0, -0.1]], dtype=torch.float64)
    uv, _ = project_points(pts, invert_pose(c2w[0]), K[0])
    (u_up, v_up), (u_lo, v_lo) = uv.numpy().astype(int)
    up, low = rgba[v_up, u_up, :3], rgba[v_lo, u_lo, :3]
    assert up[0] > 0.5 and up[0] > 4 * up[2], up
    assert low[2] > 0.5 and low[2] > 4 * low[0], low


def test_render_supersampling(tmp_path, renderer, monkeypatch):
    renderer.load(Me.load_obj(_box_obj(tmp_path, textured=False)))
    c2w, K = Me.gobjaverse_cameras(1, res=32, seed=0)
    rgba1, d1 = renderer.render(c2w[0], K[0], 32, 32, ssaa=1)
    rgba3, d3 = renderer.render(c2w[0], K[0], 32, 32, ssaa=3)
    a3 = rgba3[..., 3]
    assert ((a3 > 0) & (a3 < 1)).any()                                         # anti-aliased edges
    both = (d1 > 0) & (d3 > 0)
    np.testing.assert_allclose(d3[both], d1[both], atol=1e-5)                 # depth from the centre sample
    np.testing.assert_array_equal(d3 > 0, rgba1[..., 3] > 0)
    full = a3 == 1
    np.testing.assert_allclose(rgba3[full, :3].mean(0), rgba1[full, :3].mean(0), atol=0.02)
    # untextured: the material's Kd colour (0.2, 0.7, 0.3) times shading in [0.6, 1]
    c = rgba3[full, :3]
    assert (c[:, 1] > c[:, 0]).all() and (c[:, 1] > c[:, 2]).all() and c[:, 1].max() <= 0.7 + 1e-2
    with pytest.raises(ValueError, match="odd"):
        renderer.render(c2w[0], K[0], 32, 32, ssaa=2)
    # the same box with OBJ normals (welded shared vertices) renders like the flat-shaded one
    renderer.load(Me.load_obj(_box_obj(tmp_path / "vn", textured=False, vn=True)))
    rgba_vn, d_vn = renderer.render(c2w[0], K[0], 32, 32, ssaa=3)
    np.testing.assert_allclose(rgba_vn, rgba3, atol=1.5 / 255)
    np.testing.assert_allclose(d_vn, d3, atol=1e-6)
    # split into several pybullet shapes (large meshes): same image
    monkeypatch.setattr(Me.PyBulletRenderer, "MAX_FACES_PER_SHAPE", 5)
    renderer.load(Me.load_obj(_box_obj(tmp_path / "vn", textured=False, vn=True)))
    assert len(renderer.bodies) == 3                                           # 12 triangles in chunks of 5
    rgba_c, d_c = renderer.render(c2w[0], K[0], 32, 32, ssaa=3)
    np.testing.assert_allclose(rgba_c, rgba3, atol=1.5 / 255)
    np.testing.assert_allclose(d_c, d3, atol=1e-6)


def test_missing_render_extra_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pybullet", None)                        # import pybullet -> ImportError
    with pytest.raises(RuntimeError, match=r"nano4d\[render\]"):
        Me.PyBulletRenderer()


# ---------------------------------------------------------------------------- pipeline


def _fake_sweethome3d(root):
    """A fake extracted .deb: one .sh3f catalog (zip) with a textured box, a plain box and a broken OBJ."""
    models = root / "models"
    _box_obj(models / "mycat" / "box", half=(1.0, 0.5, 0.25), name="box", up="y")
    _box_obj(models / "mycat" / "plain", name="plain", textured=False, up="y")
    (models / "mycat" / "broken").mkdir(parents=True)
    (models / "mycat" / "broken" / "broken.obj").write_text("v 0 0 0\nf 1 2 3\n")
    props = ("id=Test#cat\nname=Test catalog\n\nid#1=Test#box\nname#1=Box\ncategory#1=Misc\n"
             "model#1=/mycat/box/box.obj\nwidth#1=200\ndepth#1=50\nheight#1=100\n")
    sh3f = root / "usr/share/sweethome3d/furniture/TestCat.sh3f"
    sh3f.parent.mkdir(parents=True)
    with zipfile.ZipFile(sh3f, "w") as z:
        z.writestr("LICENSE.TXT", "CC0\n")
        z.writestr("PluginFurnitureCatalog.properties", props)
        for p in sorted(models.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(models).as_posix())
    return root


def test_prepare_and_render_collection(tmp_path):
    pytest.importorskip("pybullet", reason="needs the render extra: pip install 'nano4d[render]'")
    src = tmp_path / "sh3d"
    counts = Me.prepare_sweethome3d(src, extracted=_fake_sweethome3d(tmp_path / "deb"), catalogs=None,
                                    log=lambda *a: None)
    assert counts == {"TestCat": 3}
    cat = json.loads((src / "catalog.json").read_text())
    assert cat["objects"]["mycat__box"]["name"] == "Box" and cat["objects"]["mycat__box"]["height_cm"] == 100
    assert cat["license_files"] == ["_catalogs/TestCat/LICENSE.TXT"]

    out, logs = tmp_path / "renders", []
    res = Me.render_collection(src, out, views=27, res=24, split=0.5, ssaa=1, points=500, log=logs.append)
    assert sorted(res["ok"]) == ["mycat__box", "mycat__plain"]
    assert [f["id"] for f in res["failed"]] == ["mycat__broken"]
    assert "out of range" in res["failed"][0]["reason"]
    assert any("broken.obj" in line and "out of range" in line for line in logs)   # listed at the end
    assert json.loads((out / "failures.json").read_text())[0]["path"].endswith("broken.obj")
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == ["mycat__box", "mycat__plain"]
    assert (out / "preview.png").is_file()
    ds = GObjaverseDataset(str(out), num_views=4, object_ids=str(out / ("train.json" if split["train"] else "val.json")))
    item = ds[0]
    assert item["images"].shape == (4, 3, 24, 24) and item["depths"].shape == (4, 1, 24, 24)
    assert len(GObjaverseDataset(str(out), num_views=4)) == 2                 # default: every object folder

    o = read_gobjaverse_object(str(out / "mycat__box"))
    assert o["images"].shape == (27, 3, 24, 24) and o["depths"].shape == (27, 1, 24, 24)
    c2w_ref, K_ref = Me.gobjaverse_cameras(27, 24, seed=0)
    torch.testing.assert_close(o["K"], K_ref.float())
    torch.testing.assert_close(o["c2w"][:24], c2w_ref[:24].float(), atol=1e-6, rtol=0)
    # unproject every pixel's depth: the points lie on the normalized box (y-up OBJ 2 x 1 x 0.5 -> z-up world)
    ext = torch.tensor([0.5, 0.125, 0.25])
    o_r, d_r = camera_rays(o["c2w"], o["K"], 24, 24)
    fwd = o["c2w"][:, None, None, :3, 2]
    z = o["depths"][:, 0]
    hit = (o["alphas"][:, 0] == 1) & (z > 0)
    pts = (o_r + d_r * (z / (d_r * fwd).sum(-1))[..., None])[hit]
    assert hit.sum() > 500
    assert (pts.abs() <= ext + 1e-4).all()
    assert torch.isclose(pts.abs(), ext.expand_as(pts), atol=1e-4).any(-1).all()   # on a face
    assert o["surface_points"].shape == (500, 3) and o["occupancy"].shape == (32, 32, 32)
    torch.testing.assert_close(o["surface_points"].abs().max(0).values, ext, atol=2e-3, rtol=0)
    meta = json.loads((out / "mycat__box" / "render.json").read_text())
    assert meta["scale"] == pytest.approx(0.5) and meta["views"] == 27

    # resumable: finished objects are skipped, the broken one is retried (and fails again)
    res2 = Me.render_collection(src, out, views=27, res=24, split=0.5, ssaa=1, points=500, preview=False,
                                log=lambda *a: None)
    assert sorted(res2["skipped"]) == ["mycat__box", "mycat__plain"] and res2["ok"] == []
    assert len(res2["failed"]) == 1


def test_cli_errors(tmp_path, capsys):
    assert Me.main(["render-meshes", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
