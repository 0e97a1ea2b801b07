"""Frozen-feature dense matching of a MuM encoder on a real stereo pair (Middlebury 2014 "Motorcycle").

    python -m nano4d.mum_eval runs/mum/model.safetensors [--scale 1.0] [--out runs/mum/match.json]
    python -m nano4d.mum_eval --official MuM_ViTLarge.pth        # a released davnords/MuM state dict

Both views of `skimage.data.stereo_motorcycle()` (500x741, rectified, ground-truth disparity) are encoded
with `MuM.encode` (no masking). Patch features are L2-normalised and matched by mutual nearest neighbour
(cosine). A left patch centred at (x, y) has its true match at (x - d, y), d = median of the valid
ground-truth disparities inside the patch (patches with < half valid pixels, or whose match falls outside
the right image, are skipped). PCK@k = fraction of mutual matches whose predicted right-patch centre lies
within k patches (Euclidean) of the true location; dense PCK@k is the same for the plain nearest neighbour
of every valid left patch (mutual matching keeps only confident patches, and there even raw pixels score
high on a rectified pair, so the dense numbers separate feature quality better). The baseline is the same
architecture and config at random init, averaged over 3 seeds (for --official: the official architecture
with the official init). MuM's claim: multi-view masked pretraining makes encoder features match across
views. Two feature-free references are printed for scale: raw normalised pixels of the patch, and "zero
motion" (patch i -> i).
Needs scikit-image (in the optional `test` extra).
"""
import argparse
import time

import torch
import torch.nn.functional as F

from nano4d.files import save_json
from nano4d.mum import MuM


def load_motorcycle(scale: float = 1.0, patch: int = 16):
    """-> left, right (1, 2, 3, H, W) in [0, 1] and disparity (H, W) in pixels (NaN invalid), H, W multiples of
    ``patch``; images resized by ``scale`` (disparity scaled with them), then cropped at the bottom/right."""
    from skimage.data import stereo_motorcycle
    left, right, disp = stereo_motorcycle()
    imgs = torch.stack([torch.from_numpy(left), torch.from_numpy(right)]).permute(0, 3, 1, 2).float() / 255
    disp = torch.from_numpy(disp).float()
    disp[~torch.isfinite(disp)] = float("nan")
    if scale != 1.0:
        size = (round(imgs.shape[-2] * scale), round(imgs.shape[-1] * scale))
        imgs = F.interpolate(imgs, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        disp = F.interpolate(disp[None, None], size=size, mode="nearest")[0, 0] * scale
    H, W = imgs.shape[-2] // patch * patch, imgs.shape[-1] // patch * patch
    return imgs[None, :, :, :H, :W], disp[:H, :W]


def gt_matches(disp: torch.Tensor, patch: int):
    """Per left patch (row-major): true match centre (x', y) in right-image pixels and a validity mask."""
    H, W = disp.shape
    h, w = H // patch, W // patch
    blocks = disp.reshape(h, patch, w, patch).permute(0, 2, 1, 3).reshape(h * w, patch * patch)
    valid = torch.isfinite(blocks).float().mean(1) >= 0.5
    d = torch.nanmedian(blocks, dim=1).values
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = (ys.flatten() + 0.5) * patch, (xs.flatten() + 0.5) * patch
    tx = cx - d
    valid &= torch.isfinite(tx) & (tx >= 0) & (tx < W)
    return torch.stack([tx, cy], dim=1), valid


def match_pck(fl: torch.Tensor, fr: torch.Tensor, disp: torch.Tensor, patch: int, w: int, ks=(1, 2)) -> dict:
    """fl, fr (L, C) patch features of left/right (row-major, ``w`` patches per row) -> PCK of mutual NN."""
    fl, fr = F.normalize(fl.float(), dim=-1), F.normalize(fr.float(), dim=-1)
    sim = fl @ fr.T                                                  # (L, L) cosine
    nn_lr, nn_rl = sim.argmax(1), sim.argmax(0)
    mutual = nn_rl[nn_lr] == torch.arange(len(fl))
    target, valid = gt_matches(disp, patch)
    pred = torch.stack([(nn_lr % w + 0.5) * patch, (nn_lr // w + 0.5) * patch], dim=1).float()
    err = (pred - target).norm(dim=1) / patch                        # in patches
    sel = mutual & valid
    out = {"n_mutual": int(sel.sum()), "n_valid": int(valid.sum())}
    for k in ks:
        out[f"pck@{k}"] = float((err[sel] <= k).float().mean()) if sel.any() else 0.0
    for k in ks:  # every valid left patch's plain nearest neighbour: coverage, not just confident matches
        out[f"dense_pck@{k}"] = float((err[valid] <= k).float().mean())
    return out


@torch.no_grad()
def evaluate_model(model: MuM, scale: float = 1.0) -> dict:
    p = model.cfg.patch_size
    imgs, disp = load_motorcycle(scale, p)
    model.eval()
    feats = model.encode(imgs)[0]                                    # (2, h, w, C)
    return match_pck(feats[0].flatten(0, 1), feats[1].flatten(0, 1), disp, p, feats.shape[2])


def reference_scores(patch: int = 16, scale: float = 1.0) -> dict:
    """Feature-free references: raw per-patch normalised pixels, and zero motion (left patch i -> right patch i)."""
    imgs, disp = load_motorcycle(scale, patch)
    H, W = disp.shape
    px = F.unfold(imgs[0], patch, stride=patch).transpose(1, 2)     # (2, L, 3 p p)
    px = px - px.mean(-1, keepdim=True)
    out = {"raw_pixels": match_pck(px[0], px[1], disp, patch, W // patch)}
    target, valid = gt_matches(disp, patch)
    h, w = H // patch, W // patch
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pred = torch.stack([(xs.flatten() + 0.5) * patch, (ys.flatten() + 0.5) * patch], 1).float()
    err = (pred - target).norm(dim=1)[valid] / patch
    out["zero_motion"] = {"n_valid": int(valid.sum()), **{f"{m}@{k}": float((err <= k).float().mean())
                                                           for m in ("pck", "dense_pck") for k in (1, 2)}}
    return out


def load_official(path: str) -> MuM:
    """A davnords/MuM ``.pth`` state dict (autoencoder or encoder-only; a training checkpoint's ``{"model": sd}``
    is unwrapped) -> MuM via `MuM.from_official`."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return MuM.from_official(sd)


def compare(ckpt: str = "", scale: float = 1.0, seeds=(0, 1, 2), official: str = "") -> dict:
    """Trained checkpoint (``ckpt``: model.safetensors or its run dir; or ``official``: a released .pth) vs the
    same architecture at random init (mean over ``seeds``; each seed's numbers are kept in
    ``random_init_seeds``), plus the feature-free references."""
    if bool(ckpt) == bool(official):
        raise ValueError("compare: give exactly one of ckpt or official")
    trained = load_official(official) if official else MuM.from_checkpoint(ckpt)
    cfg = trained.cfg
    t = time.time()
    rand = []
    for s in seeds:
        torch.manual_seed(s)
        rand.append(evaluate_model(MuM(cfg), scale))
    mean = {k: sum(r[k] for r in rand) / len(rand) for k in rand[0]}
    res = {"checkpoint": ckpt or official, "official": bool(official), "scale": scale,
           "trained": evaluate_model(trained, scale), "random_init": mean, "random_init_seeds": rand,
           **reference_scores(cfg.patch_size, scale)}
    res["seconds"] = time.time() - t
    return res


def format_table(res: dict) -> str:
    rows = ["features      | mutual-NN PCK@1 | PCK@2 | matches | dense PCK@1 | PCK@2 (of n_valid)"]
    for k in ("trained", "random_init", "raw_pixels", "zero_motion"):
        r = res[k]
        rows.append(f"{k:13s} | {r['pck@1']:.3f}           | {r['pck@2']:.3f} | {r.get('n_mutual', r['n_valid']):7.0f} | "
                    f"{r['dense_pck@1']:.3f}       | {r['dense_pck@2']:.3f} ({r['n_valid']:.0f})")
    seeds = res.get("random_init_seeds", [])
    if len(seeds) > 1:
        rows.append(f"(random_init = mean of {len(seeds)} seeds; dense PCK@1 per seed: "
                    + ", ".join(f"{r['dense_pck@1']:.3f}" for r in seeds) + ")")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.strip().split("\n")[0])
    ap.add_argument("ckpt", nargs="?", default="", help="model.safetensors written by train_mum.py (or its run dir)")
    ap.add_argument("--official", default="", help="a released davnords/MuM .pth state dict instead of ckpt")
    ap.add_argument("--scale", type=float, default=1.0, help="resize the 500x741 pair by this factor first")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if bool(args.ckpt) == bool(args.official):
        ap.error("give a checkpoint or --official PATH (not both)")
    res = compare(args.ckpt, args.scale, official=args.official)
    print(format_table(res))
    if args.out:
        save_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
