"""nano4d.files: atomic writes (old file kept on failure, no temp left behind, stale temps cleaned, mode 0644),
JSON, and PNG image grids (labels, colour maps, enlargement of tiny images)."""
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d import checkpoint as C
from nano4d import files as F


def test_atomic_write_keeps_previous_file_on_failure_and_stale_tmp_cleanup(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    C.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 1})
    before = (tmp_path / "w.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)  # fail after the temp file was partly written
    with torch.no_grad():
        model.weight += 1
    with pytest.raises(OSError, match="disk full"):
        C.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 2})
    monkeypatch.undo()
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind
    # a kill -9 mid-write cannot run that cleanup: clean_stale_tmp removes what it leaves
    (tmp_path / ".tmp_abc_resume.pt").write_bytes(b"partial")
    (tmp_path / ".tmpdir_keep").mkdir()
    assert F.clean_stale_tmp(str(tmp_path)) == [str(tmp_path / ".tmp_abc_resume.pt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpdir_keep", "w.safetensors"]
    assert F.clean_stale_tmp(str(tmp_path / "missing")) == []


def test_atomic_write_mode_and_json(tmp_path):
    p = F.atomic_write(str(tmp_path / "a" / "b.bin"), b"xyz")
    assert open(p, "rb").read() == b"xyz"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask            # what a plain open() gives, not 0600
    F.save_json(str(tmp_path / "x.json"), {"t": (1, 2), "p": tmp_path})
    assert json.load(open(tmp_path / "x.json")) == {"t": [1, 2], "p": str(tmp_path)}


def test_save_image_grid(tmp_path):
    p = F.save_image_grid(str(tmp_path / "g.png"), [torch.rand(3, 3, 8, 10), torch.rand(2, 1, 6, 6)])
    im = Image.open(p)
    assert im.size == (2 + 3 * 12, 2 + 2 * 10) and im.mode == "RGB"


def test_colorize_turbo_and_labelled_grid(tmp_path):
    d = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8).clone()
    d[0, 0, 0, 0] = float("nan")
    rgb = F.colorize(d, 0.0, 1.0)
    assert rgb.shape == (1, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[0, :, 0, 0].eq(0).all()                       # non-finite -> black
    lo, hi = rgb[0, :, 0, 1], rgb[0, :, 7, 7]
    assert lo[2] > lo[0] and hi[0] > hi[2]                   # turbo: blue at the low end, red at the high end
    rows = [torch.rand(3, 3, 8, 8), rgb.expand(3, -1, -1, -1)]
    F.save_image_grid(str(tmp_path / "a.png"), rows)
    F.save_image_grid(str(tmp_path / "b.png"), rows, labels=["renders", "depth"])
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert b.height == a.height and b.width > a.width
    margin = np.asarray(b.convert("L"))[:, : b.width - a.width]
    assert (margin < 128).any()                              # the label text is drawn


def test_image_grid_enlarges_tiny_rows():
    g = F.image_grid([torch.rand(2, 3, 8, 8), torch.rand(1, 3, 40, 40)], pad=0, min_size=32)
    assert g.shape == (3, 2 * 40, 2 * 40)                                  # 8 px row x4 = 32; 40 px row unchanged
