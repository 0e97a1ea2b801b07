"""Cameras: one convention everywhere.

``c2w`` (..., 4, 4) in OpenCV axes (x right, y down, z forward), ``w2c = inverse(c2w)``, intrinsics ``K``
(..., 3, 3) in pixels, pixel (row i, col j) has its centre at (u, v) = (j + 0.5, i + 0.5). Quaternions are
(w, x, y, z), normalized inside. Plücker rays are (d, o x d) with unit d. Converters from other conventions
(OpenGL/Blender, normalized intrinsics, fields of view, quaternion + translation poses) are tested in
tests/test_cameras.py. Ray construction (``camera_rays``) and ray/box slab intersection (``ray_aabb``) are
written once, here, for every data module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def look_at(eye: torch.Tensor, target: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV c2w (..., 4, 4) of a camera at ``eye`` looking at ``target``; ``up`` is the world up
    direction, which appears pointing up in the image (so the camera's +y, 'down', is -up)."""
    eye = eye if torch.is_tensor(eye) else torch.as_tensor(eye, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device).expand_as(eye)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = F.normalize(target - eye, dim=-1)                                    # forward
    x = torch.linalg.cross(z, up, dim=-1)
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6                         # looking along up: pick any x
    alt = torch.linalg.cross(z, torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(z), dim=-1)
    x = F.normalize(torch.where(degenerate, alt, x), dim=-1)                 # right
    y = torch.linalg.cross(z, x, dim=-1)                                     # down
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def invert_pose(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4x4 transforms (c2w <-> w2c), exact for rotation + translation."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


c2w_to_w2c = invert_pose
w2c_to_c2w = invert_pose


def opengl_to_opencv(c2w_gl: torch.Tensor) -> torch.Tensor:
    """OpenGL/Blender camera (x right, y up, z backward) c2w -> OpenCV c2w: flip the y and z camera axes."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w_gl.dtype, device=c2w_gl.device))
    return c2w_gl @ flip


opencv_to_opengl = opengl_to_opencv  # the flip is its own inverse


def normalized_to_pixel_K(K_norm: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Intrinsics with fx, cx in units of image width and fy, cy in units of height -> pixels."""
    s = torch.tensor([width, height, 1.0], dtype=K_norm.dtype, device=K_norm.device)
    return K_norm * s[:, None]


def pixel_to_normalized_K(K: torch.Tensor, width: int, height: int) -> torch.Tensor:
    s = torch.tensor([width, height, 1.0], dtype=K.dtype, device=K.device)
    return K / s[:, None]


def fov_to_K(fov_y: float, width: int, height: int, fov_x: float | None = None) -> torch.Tensor:
    """Pinhole K (3, 3) in pixels from field(s) of view in radians; principal point at the image centre.
    With only ``fov_y`` pixels are square."""
    fy = 0.5 * height / math.tan(0.5 * fov_y)
    fx = fy if fov_x is None else 0.5 * width / math.tan(0.5 * fov_x)
    return torch.tensor([[fx, 0.0, width / 2], [0.0, fy, height / 2], [0.0, 0.0, 1.0]])


def project_points(points: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor, eps: float = 1e-8):
    """World points (..., N, 3) -> pixel coords uv (..., N, 2) and camera z-depth (..., N).
    ``w2c`` (..., 4, 4) and ``K`` (..., 3, 3) broadcast over the leading dims. Points behind the camera
    get depth <= 0 (their uv is meaningless; callers mask them)."""
    cam = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = cam[..., 2]
    pix = cam @ K.transpose(-1, -2)
    uv = pix[..., :2] / z.clamp_min(eps)[..., None]
    return uv, z


def pixel_centers(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) pixel centres (u, v) = (j + 0.5, i + 0.5)."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                          torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
    return torch.stack([u, v], -1)


def camera_rays(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int):
    """Per-pixel world ray origins and unit directions, each (..., H, W, 3)."""
    uv = pixel_centers(height, width, device=c2w.device, dtype=c2w.dtype)
    pix = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)                 # (H, W, 3)
    d_cam = pix @ torch.linalg.inv(K).transpose(-1, -2)[..., None, :, :]    # (..., H, W, 3)
    d = F.normalize(d_cam @ c2w[..., None, :3, :3].transpose(-1, -2), dim=-1)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return o, d


def ray_aabb(o: torch.Tensor, d: torch.Tensor, lo, hi, eps: float = 1e-12):
    """Slab intersection of rays o, d (..., 3) with axis-aligned boxes [lo, hi] (broadcasting; floats or
    (..., 3) tensors) -> (t_near, t_far, axis), each (...): the ray enters at ``t_near`` through a face
    normal to ``axis`` and leaves at ``t_far``; it misses when t_far < t_near. Direction components with
    |d| < eps are replaced by +eps (so rays parallel to a slab stay finite)."""
    inv = 1.0 / torch.where(d.abs() < eps, torch.full_like(d, eps), d)
    ta, tb = (lo - o) * inv, (hi - o) * inv
    t_near, axis = torch.minimum(ta, tb).max(-1)
    return t_near, torch.maximum(ta, tb).min(-1).values, axis


def plucker_rays(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Plücker ray embedding (d, o x d) per pixel: c2w (B, V, 4, 4), K (B, V, 3, 3) -> (B, V, 6, H, W)."""
    o, d = camera_rays(c2w, K, height, width)
    m = torch.linalg.cross(o, d, dim=-1)
    return torch.cat([d, m], -1).movedim(-1, -3)


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternion (w, x, y, z), normalized inside -> (..., 3, 3) rotation matrix."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation -> (..., 4) unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cands = torch.stack([
        torch.stack([1 + tr, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
        torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                     m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0],
                     1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], m[:, 1, 2] + m[:, 2, 1]], -1),
        torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                     1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
    ], 1)                                                                     # (n, 4 candidates, 4)
    diag = torch.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    best = diag.argmax(-1)
    q = F.normalize(cands[torch.arange(len(m)), best], dim=-1)
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)
    return q.reshape(*R.shape[:-2], 4)


def pose_from_quat_trans(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rotation quaternion (w, x, y, z) (..., 4) + translation (..., 3) -> 4x4 transform (e.g. nuScenes
    sensor->ego or ego->global)."""
    T = torch.zeros(*q.shape[:-1], 4, 4, dtype=q.dtype, device=q.device)
    T[..., :3, :3] = quat_to_rotmat(q)
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T
