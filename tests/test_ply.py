"""nano4d.ply: the standard 3DGS .ply layout, round trip, and the INRIA-compatible f_rest option."""
import torch

from nano4d.ply import SH_C0, load_ply, read_ply_raw, save_ply


def test_ply_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    M = 37
    means, quats = torch.randn(M, 3, generator=g), torch.randn(M, 4, generator=g)
    scales, opac = torch.rand(M, 3, generator=g) * 0.1 + 1e-3, torch.rand(M, generator=g) * 0.98 + 0.01
    rgb = torch.rand(M, 3, generator=g)
    means[5, 1] = float("nan")                                                         # dropped
    n = save_ply(str(tmp_path / "g.ply"), means, quats, scales, opac, rgb)
    assert n == M - 1
    blob = open(tmp_path / "g.ply", "rb").read()
    header = blob[:blob.index(b"end_header\n") + 11].decode()
    props = [ln.split()[-1] for ln in header.splitlines() if ln.startswith("property")]
    assert props == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert "binary_little_endian" in header and "obj_info" not in header
    assert len(blob) == len(header) + n * 17 * 4
    raw = read_ply_raw(str(tmp_path / "g.ply"))                                       # stored pre-activation
    keep = torch.arange(M) != 5
    torch.testing.assert_close(torch.from_numpy(raw["opacity"]), torch.logit(opac[keep]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(raw["scale_0"]), scales[keep, 0].log())
    torch.testing.assert_close(torch.from_numpy(raw["f_dc_1"]), (rgb[keep, 1] - 0.5) / SH_C0)
    back = load_ply(str(tmp_path / "g.ply"))
    torch.testing.assert_close(back["means"], means[keep])
    torch.testing.assert_close(back["scales"], scales[keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(back["opacities"], opac[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back["rgb"], rgb[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back["quats"], torch.nn.functional.normalize(quats[keep], dim=-1))


def test_ply_sh_degree_3_writes_zero_f_rest_in_the_inria_order(tmp_path):
    g = torch.Generator().manual_seed(1)
    M = 5
    args = (torch.randn(M, 3, generator=g), torch.randn(M, 4, generator=g), torch.rand(M, 3, generator=g) + 0.01,
            torch.rand(M, generator=g) * 0.9 + 0.05, torch.rand(M, 3, generator=g))
    assert save_ply(str(tmp_path / "a.ply"), *args, sh_degree=3) == M
    raw = read_ply_raw(str(tmp_path / "a.ply"))
    names = list(raw)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)] and names[54] == "opacity" and len(names) == 62
    assert all((raw[f"f_rest_{i}"] == 0).all() for i in range(45))
    save_ply(str(tmp_path / "b.ply"), *args)                                            # degree 0: same values
    back3, back0 = load_ply(str(tmp_path / "a.ply")), load_ply(str(tmp_path / "b.ply"))
    for k in back0:
        assert torch.equal(back3[k], back0[k]), k
    save_ply(str(tmp_path / "c.ply"), *args, sh_degree=3)
    assert open(tmp_path / "a.ply", "rb").read() == open(tmp_path / "c.ply", "rb").read()   # bytes are reproducible
    import pytest
    with pytest.raises(ValueError, match="sh_degree"):
        save_ply(str(tmp_path / "d.ply"), *args, sh_degree=4)
