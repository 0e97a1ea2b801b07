"""Results on real data: data recipes, evaluations of any checkpoint, and plots of any run.

    python -m nano4d.results prepare-furniture --src SH3D --out DIR [--train 240] [--res 64]
    python -m nano4d.results prepare-scans --out DIR        # Debian libcgal-demo: Stanford bunny, armadillo, ...
    python -m nano4d.results eval-geolrm RUN --data DIR/val [--views 2,4,8,16] [--out FILE.json]
    python -m nano4d.results eval-mum RUN [--seeds 0,1,2] [--pairs motorcycle,aloe,graf] [--out FILE.json]
    python -m nano4d.results eval-mim4d RUN [--train_scenes 32] [--val_scenes 16] [--out FILE.json]
    python -m nano4d.results plot RUN_DIR_OR_JSON ... --out DIR            # PNG plots (extra: plot)

Held-out split of the furniture (``split_ids``): an object is held out when the first 8 bytes of
sha1(object id), read as a big-endian integer over 2^64, are below ``heldout`` (0.1) -- the rule
``nano4d.data.meshes`` uses for its own ``split.json``, so both agree. Training objects are the
remaining ids ordered by sha1("train/" + id), the first ``--train`` of them (deterministic, catalogue-mixed).
Object ids are the paths under the ``prepare-sweethome3d`` folder (``scopia__bread``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nano4d.data.driving import BEV_LABELS, ProceduralDriving
from nano4d.data.gobjaverse import list_objects, occupancy_from_points, read_gobjaverse_object
from nano4d.data.meshes import find_meshes, object_id_for, render_collection
from nano4d.files import save_json
from nano4d.geolrm import GeoLRM, cell_centers, resize_views
from nano4d.mim4d import MIM4D
from nano4d.metrics import load_lpips, point_cloud_metrics, psnr, ssim
from nano4d.mum import MuM

HELDOUT_FRACTION = 0.1


# ============================================================================ data recipes


def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "big") / 2.0 ** 64


def split_ids(ids, heldout: float = HELDOUT_FRACTION, n_train: int | None = None) -> dict:
    """Deterministic split by name hash (see the module docstring) -> {"train": [...], "val": [...]}, sorted."""
    ids = sorted(set(ids))
    val = [i for i in ids if _unit_hash(i) < heldout]
    train = sorted((i for i in ids if _unit_hash(i) >= heldout), key=lambda i: hashlib.sha1(f"train/{i}".encode()).digest())
    if n_train is not None:
        train = train[:n_train]
    return {"train": sorted(train), "val": val}


def _mirror(src: Path, dst: Path, rel_dirs) -> None:
    """``dst/<rel>/`` = real folders holding symlinks to every file of ``src/<rel>/`` (object ids relative to
    ``dst`` then equal those relative to ``src``; pathlib's rglob does not enter symlinked folders)."""
    for rel in rel_dirs:
        for root, _, files in os.walk(src / rel):
            r = Path(root).relative_to(src)
            (dst / r).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dst / r / f
                if not link.exists():
                    os.symlink(Path(root, f).resolve(), link)


def prepare_furniture(src, out, n_train: int = 240, res: int = 64, val_views: int = 32, train_views: int = 16,
                      heldout: float = HELDOUT_FRACTION, workers: int = 1, ssaa: int = 3, layout_val: int = 8,
                      log=print) -> dict:
    """Render the ``prepare-sweethome3d`` folder ``src`` into ``out/val`` (every held-out object, ``val_views``
    views) and ``out/train`` (``n_train`` training objects, ``train_views`` views), GObjaverse layout at ``res``
    px; ``out/split.json`` records the ids; ``out/geolrm`` lists the train objects, then the first ``layout_val``
    val objects (symlinks ``0__<id>`` / ``1__<id>``), so that ``train_geolrm.py --data out/geolrm --num_val
    <layout_val>`` trains on train objects only and evaluates on a few held-out ones while it runs (the full
    held-out evaluation is ``eval-geolrm --data out/val``)."""
    src, out = Path(src).resolve(), Path(out)
    dirs = {object_id_for(p, src): p.parent.relative_to(src) for p in find_meshes(src)}
    split = split_ids(dirs, heldout, n_train)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for name, views in (("val", val_views), ("train", train_views)):
        sub = out / f"_src_{name}"
        _mirror(src, sub, [dirs[i] for i in split[name]])
        r = render_collection(sub, out / name, views=views, res=res, split=0.0, ssaa=ssaa, workers=workers, log=log)
        done[name] = sorted(set(r["ok"]) | set(r["skipped"]))
        if r["failed"]:
            log(f"prepare-furniture: {len(r['failed'])} {name} object(s) failed (see {out / name / 'failures.json'})")
    lay = out / "geolrm"
    lay.mkdir(exist_ok=True)
    for k, name in enumerate(("train", "val")):
        for i in (done[name] if name == "train" else done[name][:layout_val]):
            link = lay / f"{k}__{i}"
            if not link.exists():
                os.symlink((out / name / i).resolve(), link)
    rec = {"rule": f"val: sha1(id)[:8] / 2^64 < {heldout}; train: first {n_train} other ids by sha1('train/' + id)",
           "train": done["train"], "val": done["val"], "res": res, "val_views": val_views, "train_views": train_views}
    save_json(str(out / "split.json"), rec)
    log(f"prepare-furniture: {len(done['train'])} train / {len(done['val'])} val objects in {out}; "
        f"GeoLRM: --data {lay} --num_val {min(layout_val, len(done['val']))}")
    return rec


SCANS = {"bunny": "data/meshes/bunny00.off", "armadillo": "data/meshes/armadillo.off",
         "chinese_dragon": "data/meshes/ChineseDragon-10kv.off"}


def off_to_obj(off_path, obj_path, rgb=(0.75, 0.75, 0.75)) -> int:
    """An OFF triangle/polygon mesh -> OBJ + MTL with one grey diffuse material (shading shows the geometry).
    Returns the number of faces."""
    tok = []
    for line in Path(off_path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            tok.extend(line.split())
    if not tok or not tok[0].endswith("OFF"):
        raise ValueError(f"{off_path}: not an OFF file")
    rest = tok[1:] if tok[0] == "OFF" else [tok[0][:-3]] + tok[1:]
    nv, nf = int(rest[0]), int(rest[1])
    v = np.asarray(rest[3:3 + 3 * nv], dtype=np.float64).reshape(nv, 3)
    pos, faces = 3 + 3 * nv, []
    for _ in range(nf):
        k = int(rest[pos])
        faces.append([int(i) + 1 for i in rest[pos + 1:pos + 1 + k]])
        pos += 1 + k
    obj_path = Path(obj_path)
    obj_path.parent.mkdir(parents=True, exist_ok=True)
    obj_path.with_suffix(".mtl").write_text(f"newmtl grey\nKd {rgb[0]} {rgb[1]} {rgb[2]}\n")
    with open(obj_path, "w") as f:
        f.write(f"mtllib {obj_path.with_suffix('.mtl').name}\nusemtl grey\n")
        f.writelines(f"v {a:.6g} {b:.6g} {c:.6g}\n" for a, b, c in v)
        f.writelines("f " + " ".join(map(str, fc)) + "\n" for fc in faces)
    return nf


def prepare_scans(out, deb=None, res: int = 64, views: int = 32, log=print) -> dict:
    """Real scanned meshes from Debian's ``libcgal-demo`` (its ``data.tar.gz``: the Stanford bunny and armadillo,
    and a Chinese dragon) -> ``out/meshes/<name>/<name>.obj`` (grey, y up) -> ``out/renders`` (GObjaverse
    layout, shaded by the renderer's camera light). ``deb``: a downloaded libcgal-demo .deb (default:
    ``apt-get download libcgal-demo``)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="nano4d_cgal_") as tmp:
        if deb is None:
            log("+ apt-get download libcgal-demo")
            subprocess.run(["apt-get", "download", "libcgal-demo"], cwd=tmp, check=True)
            deb = sorted(Path(tmp).glob("libcgal-demo_*.deb"))[0]
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        tars = sorted((Path(tmp) / "root").rglob("data.tar.gz"))
        if not tars:
            raise FileNotFoundError(f"{deb}: no data.tar.gz (CGAL's data folder) inside")
        with tarfile.open(tars[0]) as t:
            for name, member in SCANS.items():
                f = t.extractfile(member)
                if f is None:
                    raise FileNotFoundError(f"{tars[0]}: no {member}")
                src = Path(tmp) / f"{name}.off"
                src.write_bytes(f.read())
                n = off_to_obj(src, out / "meshes" / name / f"{name}.obj")
                log(f"  {name}: {n} faces")
    r = render_collection(out / "meshes", out / "renders", views=views, res=res, split=0.0, log=log)
    return {"ok": r["ok"] + r["skipped"], "failed": r["failed"]}


# ============================================================================ GeoLRM: held-out novel views + geometry


def _input_views(n: int, orbit: int = 24) -> list:
    """``n`` input views spread evenly over the orbit views 0..orbit-1 (azimuth steps of 360/n degrees)."""
    return sorted({round(k * orbit / n) % orbit for k in range(n)})


@torch.no_grad()
def eval_geolrm(ckpt, data, views=(2, 4, 8, 16), tau: float = 0.05, opacity_min: float = 0.1, lpips_net="vgg",
                limit: int | None = None, seed: int = 0, points: int = 5000, log=print) -> dict:
    """Held-out objects (``data``: GObjaverse-layout folder, >= 26 views: 24 orbit, top, bottom, then random
    views) -> per number of input views n: novel-view PSNR / SSIM / LPIPS of the model and of the mean-colour
    baseline (each target predicted as its own mean colour, an oracle), proposal occupancy IoU (vs the
    occupancy of the surface samples at the model's resolution), and Chamfer / F-score@tau of the Gaussian
    centres (opacity > ``opacity_min``) and of the proposal's occupied cell centres vs ``points`` of the
    surface samples (a seeded subset).
    Inputs: ``_input_views(n)`` of the orbit; targets: the random views (26..V-1), on white."""
    model = GeoLRM.from_checkpoint(ckpt).eval()
    R = model.cfg.occ_res
    try:
        lp = load_lpips(lpips_net) if lpips_net else None
    except (FileNotFoundError, OSError) as e:
        log(f"eval-geolrm: no LPIPS ({e}); run python -m nano4d.metrics fetch-lpips")
        lp = None
    names = list_objects(data)[:limit]
    acc = {n: {} for n in views}
    gt_cells = {}
    t0 = time.time()
    for k, name in enumerate(names):
        o = read_gobjaverse_object(os.path.join(data, name))
        V = o["images"].shape[0]
        if V < 27 or o.get("surface_points") is None:
            raise ValueError(f"{data}/{name}: eval-geolrm needs >= 27 views (24 orbit, top, bottom, random) and "
                             "surface_points.npy (python -m nano4d.results prepare-furniture writes both)")
        img = o["images"] * o["alphas"] + 1 - o["alphas"]
        tv = list(range(26, V))
        pts = o["surface_points"].float()
        pts = pts[torch.randperm(len(pts), generator=torch.Generator().manual_seed(seed))[:points]]
        occ = occupancy_from_points(pts, R)[None]
        c = cell_centers(R)
        cells = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).flip(-1)        # (Z, Y, X, 3) as x, y, z
        ref = point_cloud_metrics(cells[occ[0] > 0].reshape(-1, 3), pts, tau)
        for m in ("cd", "fscore"):
            gt_cells.setdefault(m, []).append(float(ref[m]))
        T = len(tv)
        for n in views:
            vi = _input_views(n)
            images, K = resize_views(img[vi][None], o["K"][vi][None], model.cfg.img_size)
            batch = {"images": images, "c2w": o["c2w"][vi][None], "K": K, "occupancy": occ,
                     "target_rgb": img[tv][None], "target_alpha": o["alphas"][tv][None],
                     "target_depth": o["depths"][tv][None], "target_c2w": o["c2w"][tv][None],
                     "target_K": o["K"][tv][None], "background": torch.ones(1, T, 3)}
            _, outp = model(batch, stage="proposal")
            occ_pred = outp["occ_logits"] > 0
            batch["anchors"] = model.gt_anchors(occ_pred, generator=torch.Generator().manual_seed(seed))
            _, out = model(batch, stage="recon")
            pred, gt = out["rgb"][0].clamp(0, 1), batch["target_rgb"][0]
            base = gt.mean((2, 3), keepdim=True).expand_as(gt)
            g = out["gaussians"]
            centres = g.means[0][g.opacities[0].reshape(-1) > opacity_min]
            r = {"psnr": psnr(pred, gt).mean(), "ssim": ssim(pred, gt).mean(),
                 "base_psnr": psnr(base, gt).mean(), "base_ssim": ssim(base, gt).mean(), "occ_iou": outp["occ_iou"]}
            if lp is not None:
                r["lpips"], r["base_lpips"] = lp(pred, gt).mean(), lp(base, gt).mean()
            if len(centres):
                pc = point_cloud_metrics(centres.float(), pts, tau)
                r.update(gauss_cd=pc["cd"], gauss_fscore=pc["fscore"])
            cp = cells[occ_pred[0]].reshape(-1, 3)
            if len(cp):
                pc = point_cloud_metrics(cp, pts, tau)
                r.update(prop_cd=pc["cd"], prop_fscore=pc["fscore"])
            for key, v in r.items():
                acc[n].setdefault(key, []).append(float(v))
        if (k + 1) % 10 == 0 or k + 1 == len(names):
            log(f"eval-geolrm: {k + 1}/{len(names)} objects ({time.time() - t0:.0f}s)")
    summ = lambda xs: {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}  # noqa: E731
    return {"kind": "geolrm_heldout", "checkpoint": str(ckpt), "data": str(data), "objects": len(names),
            "targets_per_object": "views 26..V-1 (random elevations in [-30, 72] deg)", "tau": tau,
            "opacity_min": opacity_min, "input_views": {str(n): _input_views(n) for n in views},
            "gt_cells_reference": {m: summ(v) for m, v in gt_cells.items()},
            "by_views": {str(n): {m: summ(v) for m, v in acc[n].items()} for n in views}}


def format_geolrm(res: dict) -> str:
    keys = ["psnr", "base_psnr", "ssim", "base_ssim", "lpips", "base_lpips", "occ_iou", "gauss_cd",
            "gauss_fscore", "prop_cd", "prop_fscore"]
    first = next(iter(res["by_views"].values()))
    keys = [k for k in keys if k in first]
    rows = ["| inputs | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n, r in res["by_views"].items():
        rows.append(f"| {n} | " + " | ".join(f"{r[k]['mean']:.4g}" for k in keys) + " |")
    ref = res["gt_cells_reference"]
    rows.append(f"\n(objects: {res['objects']}; F-score tau = {res['tau']}; ground-truth occupied cells as points: "
                f"CD {ref['cd']['mean']:.4g}, F {ref['fscore']['mean']:.4g})")
    return "\n".join(rows)


# ============================================================================ MuM: frozen-feature matching, real pairs


def _opencv_doc_data() -> Path:
    for p in (Path(os.environ.get("NANO4D_OPENCV_DATA", "/nonexistent")),
              Path("/usr/share/doc/opencv-doc/examples/data")):
        if (p / "aloeL.jpg").is_file():
            return p
    raise FileNotFoundError("the Aloe / graf pairs come from Debian's opencv-doc: apt-get install opencv-doc, or "
                            "apt-get download opencv-doc && dpkg -x opencv-doc_*.deb X and set "
                            "NANO4D_OPENCV_DATA=X/usr/share/doc/opencv-doc/examples/data")


def _img(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def load_pair(name: str) -> tuple:
    """A real image pair with dense ground truth -> (img_a, img_b (3, H, W) in [0, 1], target (H, W, 2): the
    true (x, y) in image b of each pixel centre of image a, NaN where unknown).
    motorcycle: Middlebury 2014 (scikit-image), x' = x - d. aloe: Middlebury 2006 Aloe full size (opencv-doc;
    aloeGT.png = left disparity in pixels, 0 unknown), x' = x - d. graf: Oxford affine graf 1 -> 3 (opencv-doc;
    H1to3p homography, a planar scene: every pixel has ground truth)."""
    if name == "motorcycle":
        from skimage.data import stereo_motorcycle
        left, right, disp = stereo_motorcycle()
        a, b = (torch.from_numpy(x.copy()).permute(2, 0, 1).float() / 255 for x in (left, right))
        d = torch.from_numpy(np.asarray(disp, dtype=np.float32))
        d[~torch.isfinite(d)] = float("nan")
    elif name == "aloe":
        root = _opencv_doc_data()
        a, b = _img(root / "aloeL.jpg"), _img(root / "aloeR.jpg")
        with Image.open(root / "aloeGT.png") as im:
            d = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
        d[d == 0] = float("nan")
    elif name == "graf":
        root = _opencv_doc_data()
        a, b = _img(root / "graf1.png"), _img(root / "graf3.png")
        txt = (root / "H1to3p.xml").read_text()
        vals = [float(v) for v in txt.split("<data>")[1].split("</data>")[0].split()]
        Hm = torch.tensor(vals, dtype=torch.float64).reshape(3, 3)
        H, W = a.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                                indexing="ij")
        p = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ Hm.T                   # pixel centres; Oxford H is
        return a, b, (p[..., :2] / p[..., 2:]).float()                                # defined on pixel coords
    else:
        raise ValueError(f"pair must be motorcycle, aloe or graf, got {name!r}")
    H, W = d.shape
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return a, b, torch.stack([xs - d, ys], -1)


def prepare_pair(name: str, long_side: int, patch: int):
    """Resize a pair so that its longer side is ~``long_side`` (crop to multiples of ``patch``) -> images
    (1, 2, 3, H, W), per patch of image a: true centre in image b (L, 2) in pixels and validity (L,)
    (>= half the patch's pixels known, target inside image b), grid width w."""
    a, b, tgt = load_pair(name)
    s = long_side / max(a.shape[-2:])
    size_a = (round(a.shape[-2] * s) // patch * patch, round(a.shape[-1] * s) // patch * patch)
    size_b = (round(b.shape[-2] * s) // patch * patch, round(b.shape[-1] * s) // patch * patch)
    rs = lambda x, sz: F.interpolate(x[None], size=sz, mode="bilinear", antialias=True, align_corners=False)[0]  # noqa: E731
    ia, ib = rs(a, size_a).clamp(0, 1), rs(b, size_b).clamp(0, 1)
    sy, sx = size_a[0] / a.shape[-2], size_a[1] / a.shape[-1]
    sby, sbx = size_b[0] / b.shape[-2], size_b[1] / b.shape[-1]
    t = tgt * torch.tensor([sbx, sby])                                              # into resized-b pixels
    # the resized a-pixel centres (i + .5) / s map to source pixels; sample the target at them (nearest)
    Ha, Wa = size_a
    yi = ((torch.arange(Ha) + 0.5) / sy).long().clamp(0, a.shape[-2] - 1)
    xi = ((torch.arange(Wa) + 0.5) / sx).long().clamp(0, a.shape[-1] - 1)
    t = t[yi][:, xi]                                                                # (Ha, Wa, 2)
    h, w = Ha // patch, Wa // patch
    blocks = t.reshape(h, patch, w, patch, 2).permute(0, 2, 1, 3, 4).reshape(h * w, patch * patch, 2)
    known = torch.isfinite(blocks).all(-1)
    centre = torch.nanmedian(blocks, dim=1).values                                  # (L, 2)
    valid = (known.float().mean(1) >= 0.5) & torch.isfinite(centre).all(-1)
    valid &= (centre[:, 0] >= 0) & (centre[:, 0] < size_b[1]) & (centre[:, 1] >= 0) & (centre[:, 1] < size_b[0])
    if size_a != size_b:
        raise ValueError(f"{name}: the two images differ in size after resizing ({size_a} vs {size_b})")
    return torch.stack([ia, ib])[None], centre, valid, w


def match_scores(fa, fb, centre, valid, patch: int, w: int, ks=(1, 2, 5)) -> dict:
    """Patch features (L, C) of both images -> dense PCK@k (the nearest neighbour in b of every valid patch of
    a lies within k patches of the truth) and mutual-NN precision@1 (of the mutual nearest neighbours among
    valid patches, the fraction within 1 patch) with their count."""
    fa, fb = F.normalize(fa.double(), dim=-1), F.normalize(fb.double(), dim=-1)
    sim = fa @ fb.T
    nn_ab, nn_ba = sim.argmax(1), sim.argmax(0)
    mutual = nn_ba[nn_ab] == torch.arange(len(fa))
    pred = torch.stack([(nn_ab % w + 0.5) * patch, (nn_ab // w + 0.5) * patch], 1).double()
    err = (pred - centre.double()).norm(dim=1) / patch
    out = {f"pck@{k}": float((err[valid] <= k).double().mean()) for k in ks}
    sel = mutual & valid
    out["mnn_precision@1"] = float((err[sel] <= 1).double().mean()) if sel.any() else 0.0
    out["mnn_count"] = int(sel.sum())
    out["n_valid"] = int(valid.sum())
    return out


def _pixel_features(imgs, patch: int):
    px = F.unfold(imgs[0], patch, stride=patch).transpose(1, 2)                      # (2, L, 3 p p)
    return px - px.mean(-1, keepdim=True)


@torch.no_grad()
def eval_mum(ckpts, pairs=("motorcycle", "aloe", "graf"), seeds=(0, 1, 2), long_side: int = 384, log=print) -> dict:
    """Frozen MuM encoder features (``MuM.encode``, no masking) on real pairs: trained checkpoints (mean +- std
    over ``ckpts``, e.g. runs with different seeds) vs the same config at random init (over ``seeds``) vs raw
    mean-centred patch pixels."""
    trained = [MuM.from_checkpoint(c).eval() for c in ckpts]
    cfg = trained[0].cfg
    p = cfg.patch_size
    rand = []
    for s in seeds:
        torch.manual_seed(s)
        rand.append(MuM(cfg).eval())
    res = {"kind": "mum_matching", "checkpoints": [str(c) for c in ckpts], "seeds": list(seeds),
           "long_side": long_side, "patch": p, "pairs": {}}
    for name in pairs:
        try:
            imgs, centre, valid, w = prepare_pair(name, long_side, p)
        except FileNotFoundError as e:
            log(f"eval-mum: skipping {name}: {e}")
            continue
        r = {"size": list(imgs.shape[-2:]), "features": {}}
        for label, models in (("trained", trained), ("random_init", rand)):
            runs = []
            for m in models:
                f = m.encode(imgs)[0]
                runs.append(match_scores(f[0].flatten(0, 1), f[1].flatten(0, 1), centre, valid, p, w))
            r["features"][label] = {"runs": runs}
        px = _pixel_features(imgs, p)
        r["features"]["raw_pixels"] = {"runs": [match_scores(px[0], px[1], centre, valid, p, w)]}
        for v in r["features"].values():
            v["mean"] = {k: float(np.mean([x[k] for x in v["runs"]])) for k in v["runs"][0]}
            v["std"] = {k: float(np.std([x[k] for x in v["runs"]])) for k in v["runs"][0]}
        res["pairs"][name] = r
        log(f"eval-mum: {name} {tuple(imgs.shape[-2:])}: " + ", ".join(
            f"{lab} PCK@1 {v['mean']['pck@1']:.3f}" for lab, v in r["features"].items()))
    return res


def format_mum(res: dict) -> str:
    keys = ["pck@1", "pck@2", "pck@5", "mnn_precision@1", "mnn_count"]
    rows = ["| pair | features | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for name, r in res["pairs"].items():
        for lab, v in r["features"].items():
            cells = [f"{v['mean'][k]:.3f} ± {v['std'][k]:.3f}" if k != "mnn_count" else f"{v['mean'][k]:.0f}"
                     for k in keys]
            rows.append(f"| {name} ({r['features']['raw_pixels']['runs'][0]['n_valid']} patches) | {lab} | "
                        f"{len(v['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ============================================================================ MIM4D: frozen-feature BEV segmentation probe


def probe_scenes(cfg, split: str, n: int, seed: int = 0, cache_dir: str | None = None) -> list:
    """``n`` procedural driving scenes (one frame each) of ``split`` with BEV labels on the model's voxel nodes:
    the volume's node i sits at x = min + i (max - min) / (N - 1) (LiDAR frame = ego axes shifted up), which is
    the cell centre of an ego-centred label grid of range (max - min) / 2 * N / (N - 1) and N cells."""
    (x0, y0, _, x1, y1, _), (NX, NY, _) = cfg.pc_range, cfg.grid
    if not (math.isclose(x0, -x1) and math.isclose(y0, -y1) and math.isclose(x1 / (NX - 1), y1 / (NY - 1))):
        raise ValueError(f"the BEV probe needs a pc_range centred on the ego with square nodes, got {cfg.pc_range}, "
                         f"grid {cfg.grid}")
    ds = ProceduralDriving(num_scenes=n, num_frames=1, res=cfg.img_size, seed=seed, split=split,
                           bev_range=x1 * NX / (NX - 1), bev_res=(NY, NX), cache_dir=cache_dir)
    keys = ("images", "K", "cam2ego", "lidar2ego", "bev")
    out = []
    for i in range(n):
        sc = ds[i]
        if not torch.allclose(sc["lidar2ego"][:3, :3], torch.eye(3)):
            raise ValueError("the BEV probe assumes the LiDAR frame has the ego's axes")
        out.append({k: sc[k] for k in keys})
    return out


@torch.no_grad()
def _bev_features(model, scenes) -> torch.Tensor:
    model.eval()
    feats = []
    for sc in scenes:
        _, bev = model.extract_features(sc["images"][None], sc["K"][None], sc["cam2ego"][None], sc["lidar2ego"][None])
        feats.append(bev[0, 0].float())                                          # (C*Z, Y, X)
    return torch.stack(feats)


def _position_features(S: int, Y: int, X: int, n: int = 32) -> torch.Tensor:
    """A layout-only reference: fixed random Fourier features of the (x, y) node position, same for all scenes."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, Y), torch.linspace(-1, 1, X), indexing="ij")
    B = torch.randn(2, n // 2, generator=g) * 3
    ang = torch.stack([xs, ys], -1) @ B
    f = torch.cat([ang.sin(), ang.cos(), xs[..., None], ys[..., None], ys.abs()[..., None]], -1).permute(2, 0, 1)
    return f[None].expand(S, -1, -1, -1)


def train_probe(ftr, ltr, fva, lva, classes: int, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> dict:
    """Linear 1x1 probe (per-channel standardized features, class-balanced cross-entropy, AdamW full batch) ->
    IoU per class on the held-out scenes."""
    torch.manual_seed(seed)
    mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    head = torch.nn.Conv2d(ftr.shape[1], classes, 1)
    freq = torch.bincount(ltr.flatten(), minlength=classes).double().clamp_min(1)
    w = (freq.sum() / freq / classes).float()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(ftr), ltr, weight=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(fva).argmax(1)
    iou = {}
    for c in range(classes):
        inter, union = ((pred == c) & (lva == c)).sum().item(), ((pred == c) | (lva == c)).sum().item()
        iou[c] = inter / union if union else float("nan")
    return {"iou": iou, "train_loss": float(loss.detach())}


def eval_mim4d(ckpt, n_train: int = 32, n_val: int = 16, steps: int = 300, seeds=(0, 1, 2), data_seed: int = 0,
               cache_dir: str | None = None, log=print) -> dict:
    """Frozen ``MIM4D.extract_features`` BEV maps -> linear BEV segmentation probe on procedural driving scenes
    (train: split 'train', held-out: split 'test' -- scenes the pretraining never rendered), pretrained vs
    random init (one model per seed) vs position-only features; IoU per class (other, road, car, building)."""
    model = MIM4D.from_checkpoint(ckpt)
    cfg = model.cfg
    t0 = time.time()
    tr = probe_scenes(cfg, "train", n_train, data_seed + 1000, cache_dir)
    va = probe_scenes(cfg, "test", n_val, data_seed, cache_dir)
    log(f"eval-mim4d: {n_train} + {n_val} scenes in {time.time() - t0:.0f}s")
    ltr, lva = torch.stack([s["bev"][0] for s in tr]), torch.stack([s["bev"][0] for s in va])
    C = len(BEV_LABELS)
    runs = {"pretrained": [], "random_init": [], "position_only": []}
    ftr, fva = _bev_features(model, tr), _bev_features(model, va)
    runs["pretrained"] = [train_probe(ftr, ltr, fva, lva, C, steps, seed=s) for s in seeds]
    for s in seeds:
        torch.manual_seed(s)
        m = MIM4D(cfg)
        runs["random_init"].append(train_probe(_bev_features(m, tr), ltr, _bev_features(m, va), lva, C, steps, seed=s))
    Y, X = ltr.shape[-2:]
    runs["position_only"] = [train_probe(_position_features(len(tr), Y, X), ltr, _position_features(len(va), Y, X),
                                         lva, C, steps, seed=s) for s in seeds]
    res = {"kind": "mim4d_probe", "checkpoint": str(ckpt), "classes": list(BEV_LABELS), "n_train": n_train,
           "n_val": n_val, "steps": steps, "seeds": list(seeds),
           "label_freq_val": [float((lva == c).float().mean()) for c in range(C)], "iou": {}, "iou_std": {}}
    for lab, rs in runs.items():
        res["iou"][lab] = {BEV_LABELS[c]: float(np.nanmean([r["iou"][c] for r in rs])) for c in range(C)}
        res["iou_std"][lab] = {BEV_LABELS[c]: float(np.nanstd([r["iou"][c] for r in rs])) for c in range(C)}
        res["iou"][lab]["mIoU"] = float(np.mean([res["iou"][lab][k] for k in BEV_LABELS]))
    log(f"eval-mim4d: done in {time.time() - t0:.0f}s")
    return res


def format_mim4d(res: dict) -> str:
    cols = list(res["classes"]) + ["mIoU"]
    rows = ["| features | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lab, r in res["iou"].items():
        sd = res["iou_std"][lab]
        rows.append(f"| {lab} | " + " | ".join(f"{r[c]:.3f}" + (f" ± {sd[c]:.3f}" if c in sd else "") for c in cols)
                    + " |")
    return "\n".join(rows)


# ============================================================================ plots (extra: plot = matplotlib)

_NOT_LOSSES = {"kind", "step", "total", "stage", "lr", "grad_norm", "step_time", "eta_s", "time", "split"}


def read_run(run_dir) -> dict:
    """A run folder -> {"train": [records], "eval": [records], "metrics": metrics.json or {}} (log.jsonl as the
    scripts write it: ``{"kind": "train", "step", <terms>, ...}`` / ``{"kind": "eval", "step", "split",
    "metrics": {...}}``; unreadable lines are reported, not skipped silently)."""
    run_dir = Path(run_dir)
    out = {"train": [], "eval": [], "metrics": {}}
    log = run_dir / "log.jsonl"
    if log.is_file():
        for k, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{log}:{k}: not JSON ({e})") from None
            if rec.get("kind") in ("train", "eval"):
                out[rec["kind"]].append(rec)
    if (run_dir / "metrics.json").is_file():
        out["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    if not out["train"] and not out["eval"] and not out["metrics"]:
        raise FileNotFoundError(f"{run_dir}: no log.jsonl records and no metrics.json")
    return out


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'nano4d[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_run(run_dir, out_dir, name: str | None = None) -> list:
    """Loss curves (every loss term of the train records, one panel per stage when records carry one),
    held-out eval metrics vs step, and metrics.json's PSNR vs input views when present -> PNG paths."""
    plt = _plt()
    run = read_run(run_dir)
    name = name or Path(run_dir).resolve().name
    paths = []
    if run["train"]:
        stages = sorted({r.get("stage", "") for r in run["train"]}, key=lambda s: [r.get("stage", "") for r in
                                                                                     run["train"]].index(s))
        fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
        for ax, st in zip(axes[0], stages):
            recs = [r for r in run["train"] if r.get("stage", "") == st]
            keys = [k for k in recs[-1] if k not in _NOT_LOSSES and not k.endswith("_s")       # timings: *_s
                    and isinstance(recs[-1][k], (int, float))]
            for k in keys:
                xs = [r["step"] for r in recs if k in r]
                ax.plot(xs, [r[k] for r in recs if k in r], label=k, lw=1.2)
            ax.set_xlabel("step")
            ax.set_yscale("log" if all(r[k] > 0 for r in recs for k in keys if k in r) else "linear")
            ax.set_title(f"{name}: training loss" + (f" ({st})" if st else ""))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        paths.append(_save(fig, Path(out_dir) / f"{name}_loss.png"))
        plt.close(fig)
    if run["eval"]:
        keys = sorted({k for r in run["eval"] for k in r["metrics"]})
        fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
        for ax, k in zip(axes[0], keys):
            recs = [r for r in run["eval"] if k in r["metrics"]]
            ax.plot([r["step"] for r in recs], [r["metrics"][k] for r in recs], "o-", ms=3)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{name}: held-out evaluation", fontsize=10)
        paths.append(_save(fig, Path(out_dir) / f"{name}_eval.png"))
        plt.close(fig)
    pv = run["metrics"].get("psnr_vs_views")
    if pv:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        ns = sorted(pv, key=int)
        ax.plot([int(n) for n in ns], [pv[n] for n in ns], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input views")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{name}: held-out PSNR vs views", fontsize=9)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, Path(out_dir) / f"{name}_psnr_vs_views.png"))
        plt.close(fig)
    return paths


def plot_geolrm(res: dict, out_dir, name: str = "geolrm_heldout") -> list:
    """PSNR and LPIPS (and SSIM, F-score) vs the number of input views, model vs mean-colour baseline."""
    plt = _plt()
    ns = sorted(res["by_views"], key=int)
    panels = [(k, f"base_{k}") for k in ("psnr", "ssim", "lpips") if k in res["by_views"][ns[0]]]
    panels += [(k, None) for k in ("occ_iou", "gauss_fscore") if k in res["by_views"][ns[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    x = [int(n) for n in ns]
    for ax, (k, b) in zip(axes[0], panels):
        m = [res["by_views"][n][k]["mean"] for n in ns]
        e = [res["by_views"][n][k]["std"] / math.sqrt(res["by_views"][n][k]["n"]) for n in ns]
        ax.errorbar(x, m, yerr=e, fmt="o-", capsize=3, label="GeoLRM")
        if b:
            ax.plot(x, [res["by_views"][n][b]["mean"] for n in ns], "s--", color="gray", label="mean colour")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("input views")
        ax.set_title(k + (" (lower is better)" if k == "lpips" else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"held-out objects ({res['objects']}), novel views; error bars: s.e.m. over objects", fontsize=9)
    path = _save(fig, Path(out_dir) / f"{name}_vs_views.png")
    plt.close(fig)
    return [path]


def plot_mum(res: dict, out_dir, name: str = "mum_matching") -> list:
    """Dense PCK@k curves (k = 1, 2, 5 patches) per real pair: trained vs random init vs raw pixels (mean +- std)."""
    plt = _plt()
    pairs = list(res["pairs"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs), 3.3), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        feats = res["pairs"][pair]["features"]
        ks = sorted(int(k.split("@")[1]) for k in next(iter(feats.values()))["mean"] if k.startswith("pck@"))
        for lab, v in feats.items():
            ax.errorbar(ks, [v["mean"][f"pck@{k}"] for k in ks], yerr=[v["std"][f"pck@{k}"] for k in ks],
                        fmt="o-", capsize=3, label=f"{lab} (n={len(v['runs'])})")
        ax.set_xlabel("threshold k (patches)")
        ax.set_ylabel("dense PCK@k")
        ax.set_ylim(0, 1)
        ax.set_title(pair, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = _save(fig, Path(out_dir) / f"{name}_pck.png")
    plt.close(fig)
    return [path]


def plot_probe(res: dict, out_dir, name: str = "mim4d_probe") -> list:
    """Per-class IoU of the frozen-feature BEV probe, pretrained vs random init."""
    plt = _plt()
    classes = res["classes"]
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2, 3.2))
    labels = list(res["iou"])
    wdt = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        ax.bar([i + j * wdt for i in range(len(classes))], [res["iou"][lab][c] for c in classes], wdt, label=lab)
    ax.set_xticks([i + 0.4 - wdt / 2 for i in range(len(classes))], classes)
    ax.set_ylabel("IoU (held-out)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    path = _save(fig, Path(out_dir) / f"{name}_iou.png")
    plt.close(fig)
    return [path]


def plot_any(path, out_dir) -> list:
    """A run folder, or a JSON written by one of the eval commands -> its plots."""
    p = Path(path)
    if p.is_dir():
        return plot_run(p, out_dir)
    res = json.loads(p.read_text())
    kind = res.get("kind") if isinstance(res, dict) else None
    fn = {"geolrm_heldout": plot_geolrm, "mum_matching": plot_mum, "mim4d_probe": plot_probe}.get(kind)
    if fn is None:
        raise ValueError(f"{p}: not a run folder nor a JSON written by python -m nano4d.results eval-* (kind {kind!r})")
    return fn(res, out_dir, p.stem)


# ============================================================================ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nano4d.results", allow_abbrev=False,
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-furniture", help="render the held-out split + a training subset of the "
                       "prepare-sweethome3d folder (GObjaverse layout)")
    p.add_argument("--src", required=True, help="folder written by python -m nano4d.data.meshes prepare-sweethome3d")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=240, help="training objects rendered")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--val_views", type=int, default=32, help="views per held-out object (24 orbit, top, bottom, random)")
    p.add_argument("--train_views", type=int, default=16)
    p.add_argument("--heldout", type=float, default=HELDOUT_FRACTION, help="held-out fraction (by name hash)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ssaa", type=int, default=3)
    p.add_argument("--layout_val", type=int, default=8, help="held-out objects placed in out/geolrm (the training "
                   "script's own in-run evaluation)")
    sc = sub.add_parser("prepare-scans", help="render CGAL's real scanned meshes (Debian libcgal-demo)")
    sc.add_argument("--out", required=True)
    sc.add_argument("--deb", default=None, help="a downloaded libcgal-demo_*.deb (default: apt-get download)")
    sc.add_argument("--res", type=int, default=64)
    sc.add_argument("--views", type=int, default=32)
    e = sub.add_parser("eval-geolrm", help="held-out novel views / occupancy / geometry of a GeoLRM checkpoint")
    e.add_argument("ckpt", help="run folder or model.safetensors of train_geolrm.py")
    e.add_argument("--data", required=True, help="held-out objects (GObjaverse layout, >= 27 views), e.g. DIR/val")
    e.add_argument("--views", default="2,4,8,16", help="numbers of input views")
    e.add_argument("--tau", type=float, default=0.05, help="F-score threshold (objects span [-0.5, 0.5])")
    e.add_argument("--limit", type=int, default=None, help="only the first N objects (sorted by id)")
    e.add_argument("--lpips_net", default="vgg", choices=("vgg", "alex", ""), help="'' = no LPIPS")
    e.add_argument("--out", default="", help="write the results JSON here")
    m = sub.add_parser("eval-mum", help="frozen-feature matching of MuM checkpoints on real pairs")
    m.add_argument("ckpts", nargs="+", help="run folders or model.safetensors of train_mum.py (mean +- std over them)")
    m.add_argument("--pairs", default="motorcycle,aloe,graf")
    m.add_argument("--seeds", default="0,1,2", help="random-init seeds")
    m.add_argument("--long_side", type=int, default=384, help="resize each pair so its longer side is this")
    m.add_argument("--out", default="")
    q = sub.add_parser("eval-mim4d", help="frozen-feature BEV segmentation probe of a MIM4D checkpoint")
    q.add_argument("ckpt", help="run folder or model.safetensors of train_mim4d.py")
    q.add_argument("--train_scenes", type=int, default=32)
    q.add_argument("--val_scenes", type=int, default=16)
    q.add_argument("--steps", type=int, default=300, help="probe optimizer steps")
    q.add_argument("--seeds", default="0,1,2", help="probe / random-init seeds")
    q.add_argument("--cache_dir", default="", help="cache the rendered scenes here")
    q.add_argument("--out", default="")
    pl = sub.add_parser("plot", help="PNG plots of run folders and eval JSON files (needs matplotlib)")
    pl.add_argument("paths", nargs="+")
    pl.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    if args.cmd == "prepare-scans":
        prepare_scans(args.out, args.deb, args.res, args.views)
    elif args.cmd == "eval-geolrm":
        res = eval_geolrm(args.ckpt, args.data, [int(v) for v in args.views.split(",")], args.tau,
                          lpips_net=args.lpips_net, limit=args.limit)
        print(format_geolrm(res))
    elif args.cmd == "eval-mum":
        res = eval_mum(args.ckpts, args.pairs.split(","), [int(s) for s in args.seeds.split(",")], args.long_side)
        print(format_mum(res))
    elif args.cmd == "eval-mim4d":
        res = eval_mim4d(args.ckpt, args.train_scenes, args.val_scenes, args.steps,
                         [int(v) for v in args.seeds.split(",")], cache_dir=args.cache_dir or None)
        print(format_mim4d(res))
    elif args.cmd == "plot":
        try:
            for p in args.paths:
                for q in plot_any(p, args.out):
                    print(q)
        except (RuntimeError, ValueError, FileNotFoundError) as err:
            print(f"plot: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.cmd.startswith("eval-") and args.out:
        save_json(args.out, res)
    if args.cmd == "prepare-furniture":
        prepare_furniture(args.src, args.out, args.train, args.res, args.val_views, args.train_views, args.heldout,
                          args.workers, args.ssaa, args.layout_val)
    return 0


if __name__ == "__main__":
    sys.exit(main())
