"""Standard 3D Gaussian Splatting ``.ply`` files (the graphdeco-inria layout).

One ``vertex`` element, binary little-endian, float32 properties in this order:
``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 [f_rest_*] opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3``.
``sh_degree=d`` adds 3 ((d + 1)^2 - 1) zero ``f_rest_*`` columns: the INRIA viewer/trainer asserts that
count for its default degree 3 (``sh_degree=3``); with the default 0 it needs ``--sh_degree 0``.
Values are stored *before* activation, as viewers expect: ``opacity = logit(alpha)``, ``scale_i = log(s_i)``,
``rot = (w, x, y, z)``, ``f_dc = (rgb - 0.5) / C0`` with C0 = 0.28209479177387814, normals zero.
``save_ply`` takes *activated* Gaussians (what the models output) and drops rows with NaN/Inf;
``load_ply`` reads the bytes back and re-activates (opacity sigmoid, scale exp, normalized quaternion,
rgb = 0.5 + C0 * f_dc), so a round trip returns the input (up to float32 and the logit clamp).
"""
from __future__ import annotations

import numpy as np
import torch

from nano4d.files import atomic_write

SH_C0 = 0.28209479177387814
_BASE = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
_TAIL = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def save_ply(path: str, means, quats, scales, opacities, rgb, min_opacity: float = 0.0, sh_degree: int = 0) -> int:
    """Write activated Gaussians (means (M, 3), quats (M, 4) wxyz, scales (M, 3) > 0, opacities (M,) in
    (0, 1), rgb (M, 3)) as a standard 3DGS ``.ply`` (``save_ply(path, *gaussians)`` for a
    ``nano4d.geolrm.Gaussians``). Rows with NaN/Inf or opacity <= ``min_opacity`` are dropped.
    ``sh_degree`` > 0 writes that many bands of zero ``f_rest`` coefficients. The bytes depend only on the
    inputs. Returns the number of Gaussians written."""
    if sh_degree not in (0, 1, 2, 3):
        raise ValueError(f"save_ply: sh_degree must be 0, 1, 2 or 3, got {sh_degree!r}")
    t = lambda x: torch.as_tensor(x).detach().float().cpu().reshape(len(means), -1)  # noqa: E731
    means, quats, scales, opacities, rgb = map(t, (means, quats, scales, opacities, rgb))
    eps = 1e-6
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    cols = torch.cat([
        means, torch.zeros_like(means), (rgb - 0.5) / SH_C0, torch.zeros(len(means), n_rest),
        torch.logit(opacities.clamp(eps, 1 - eps)), torch.log(scales.clamp_min(1e-12)), quats,
    ], 1)                                                                             # (M, 17 + n_rest)
    keep = torch.isfinite(cols).all(1) & (opacities[:, 0] > min_opacity)
    data = cols[keep].numpy().astype("<f4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(data)}"]
    names = _BASE + [f"f_rest_{i}" for i in range(n_rest)] + _TAIL
    header += [f"property float {n}" for n in names] + ["end_header"]
    atomic_write(path, ("\n".join(header) + "\n").encode("ascii") + data.tobytes())
    return len(data)


def read_ply_raw(path: str) -> dict:
    """Parse a binary little-endian ``vertex``-only PLY of float properties -> {name: np.ndarray (M,)}
    (stored, pre-activation values)."""
    with open(path, "rb") as f:
        blob = f.read()
    end = blob.index(b"end_header\n") + len(b"end_header\n")
    lines = blob[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or lines[1] != "format binary_little_endian 1.0":
        raise ValueError(f"{path}: not a binary little-endian PLY")
    count, names = None, []
    for ln in lines[2:]:
        parts = ln.split()
        if parts[0] == "element":
            if parts[1] != "vertex" or count is not None:
                raise ValueError(f"{path}: expected a single 'vertex' element, got {ln!r}")
            count = int(parts[2])
        elif parts[0] == "property":
            if parts[1] != "float":
                raise ValueError(f"{path}: only float properties are supported, got {ln!r}")
            names.append(parts[2])
    arr = np.frombuffer(blob, dtype="<f4", offset=end, count=count * len(names)).reshape(count, len(names))
    return {n: arr[:, i].copy() for i, n in enumerate(names)}


def load_ply(path: str) -> dict:
    """Read a 3DGS ``.ply`` and activate it -> means (M, 3), quats (M, 4) unit wxyz, scales (M, 3),
    opacities (M,), rgb (M, 3) (DC colour only) as float32 tensors."""
    r = read_ply_raw(path)
    col = lambda *ns: torch.from_numpy(np.stack([r[n] for n in ns], 1))  # noqa: E731
    q = col("rot_0", "rot_1", "rot_2", "rot_3")
    return {"means": col("x", "y", "z"), "quats": q / q.norm(dim=1, keepdim=True).clamp_min(1e-12),
            "scales": torch.exp(col("scale_0", "scale_1", "scale_2")),
            "opacities": torch.sigmoid(torch.from_numpy(r["opacity"])),
            "rgb": 0.5 + SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2")}
