"""nano4d.cameras: pose inversion, look-at, OpenGL/OpenCV, intrinsics, pixel centres, rays, Plücker, quaternions, slabs."""
import math

import pytest

import torch

from nano4d import cameras as C


def _random_c2w(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = C.quat_to_rotmat(torch.randn(n, 4, generator=g, dtype=torch.float64))
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3], T[:, :3, 3] = R, torch.randn(n, 3, generator=g, dtype=torch.float64)
    return T


def test_pose_inverse_round_trip():
    c2w = _random_c2w(8)
    w2c = C.c2w_to_w2c(c2w)
    eye = torch.eye(4, dtype=torch.float64).expand(8, 4, 4)
    torch.testing.assert_close(c2w @ w2c, eye)
    torch.testing.assert_close(C.w2c_to_c2w(w2c), c2w)
    torch.testing.assert_close(w2c, torch.linalg.inv(c2w))


def test_look_at_is_opencv_and_principal_ray_hits_principal_point():
    eye, target = torch.tensor([2.0, -1.0, 0.7]), torch.tensor([0.1, 0.2, -0.1])
    c2w = C.look_at(eye, target)
    R = c2w[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(R) > 0.99                       # right-handed
    K = C.fov_to_K(math.radians(40), 64, 48)
    uv, z = C.project_points(target[None], C.invert_pose(c2w), K)
    torch.testing.assert_close(uv[0], torch.tensor([K[0, 2], K[1, 2]]), atol=1e-4, rtol=0)
    assert z[0] > 0
    # world up appears up in the image (smaller v)
    uv_up, _ = C.project_points((target + torch.tensor([0, 0, 0.2]))[None], C.invert_pose(c2w), K)
    assert uv_up[0, 1] < K[1, 2]
    # looking straight down the up axis does not degenerate
    c2w_down = C.look_at(torch.tensor([0.0, 0.0, 2.0]), torch.zeros(3))
    assert torch.isfinite(c2w_down).all() and torch.linalg.det(c2w_down[:3, :3]) > 0.99


def test_opengl_to_opencv_gives_positive_depth_in_front():
    # An OpenGL camera at z=+3 looking down -z (its -z axis) sees the origin in front of it.
    c2w_gl = torch.eye(4)
    c2w_gl[2, 3] = 3.0
    c2w_cv = C.opengl_to_opencv(c2w_gl)
    K = C.fov_to_K(0.8, 32, 32)
    uv, z = C.project_points(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]]), C.invert_pose(c2w_cv), K)
    assert z[0] == pytest.approx(3.0)
    torch.testing.assert_close(uv[0], torch.tensor([16.0, 16.0]))
    assert uv[1, 1] < 16.0                                   # OpenGL +y (up) lands above centre
    torch.testing.assert_close(C.opencv_to_opengl(c2w_cv), c2w_gl)


def test_intrinsics_conversions():
    K = C.fov_to_K(math.radians(60), 80, 40, fov_x=math.radians(90))
    assert K[0, 0] == pytest.approx(40.0) and K[0, 2] == 40 and K[1, 2] == 20
    assert K[1, 1] == pytest.approx(20 / math.tan(math.radians(30)))
    Kn = C.pixel_to_normalized_K(K, 80, 40)
    assert Kn[0, 0] == pytest.approx(0.5) and Kn[0, 2] == pytest.approx(0.5) and Kn[2, 2] == 1
    torch.testing.assert_close(C.normalized_to_pixel_K(Kn, 80, 40), K)


def test_pixel_centres_and_camera_rays_reproject():
    c2w = C.look_at(torch.tensor([0.0, -2.0, 0.5]), torch.zeros(3))
    K = C.fov_to_K(0.9, 7, 5)
    o, d = C.camera_rays(c2w, K, 5, 7)
    pts = o + 1.7 * d
    uv, _ = C.project_points(pts.reshape(-1, 3), C.invert_pose(c2w), K)
    torch.testing.assert_close(uv.reshape(5, 7, 2), C.pixel_centers(5, 7), atol=1e-4, rtol=0)
    assert C.pixel_centers(5, 7)[0, 0].tolist() == [0.5, 0.5]


def test_plucker_properties():
    c2w = _random_c2w(6).reshape(2, 3, 4, 4)
    K = C.fov_to_K(0.7, 9, 6).double().expand(2, 3, 3, 3)
    pl = C.plucker_rays(c2w, K, 6, 9)
    assert pl.shape == (2, 3, 6, 6, 9)
    d, m = pl[:, :, :3], pl[:, :, 3:]
    torch.testing.assert_close(d.norm(dim=2), torch.ones(2, 3, 6, 9, dtype=torch.float64))
    torch.testing.assert_close((d * m).sum(2), torch.zeros(2, 3, 6, 9, dtype=torch.float64), atol=1e-12, rtol=0)
    # sliding the origin along the ray leaves the moment unchanged
    o = c2w[..., :3, 3][..., :, None, None]
    m2 = torch.linalg.cross((o + 2.5 * d), d, dim=2)
    torch.testing.assert_close(m2, m)


def test_quaternion_round_trip_and_pose():
    q = torch.randn(20, 4, dtype=torch.float64)
    R = C.quat_to_rotmat(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(20, 3, 3))
    q2 = C.rotmat_to_quat(R)
    qn = torch.nn.functional.normalize(q, dim=-1) * torch.sign(q[:, :1])
    torch.testing.assert_close(q2, qn)
    # 90 degrees about z maps x to y
    qz = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])
    T = C.pose_from_quat_trans(qz, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(T @ torch.tensor([1.0, 0, 0, 1]), torch.tensor([1.0, 3.0, 3.0, 1.0]), atol=1e-6, rtol=0)


def test_ray_aabb_entry_exit_and_axis():
    o = torch.tensor([[-2.0, 0.1, 0.2], [0.0, 0.0, 3.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tn, tf, ax = C.ray_aabb(o, d, -0.5, 0.5)
    torch.testing.assert_close(tn[:2], torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(tf[:2], torch.tensor([2.5, 3.5]))
    assert ax[:2].tolist() == [0, 2]
    assert tf[2] < tn[2]                                    # parallel to the x slab, outside in y: a miss
    assert tn[3] == -0.5 and tf[3] == 0.5                   # starting inside: enters behind the origin
    lo, hi = torch.tensor([[1.0, -1, -1]]), torch.tensor([[2.0, 1, 1]])     # per-ray boxes broadcast
    tn, tf, ax = C.ray_aabb(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0]]), lo, hi)
    assert (tn.item(), tf.item(), ax.item()) == (1.0, 2.0, 0)
