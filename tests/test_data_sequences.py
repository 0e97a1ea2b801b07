"""nano4d.data.sequences: folders of image sequences (MuM)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d.data import sequences as S
from nano4d.data.common import DataError


def test_image_sequence_folder(tmp_path):
    rng = np.random.default_rng(0)
    for s, n in (("seq_a", 5), ("seq_b", 3)):
        os.makedirs(tmp_path / s)
        for k in range(n):
            ext = "png" if k % 2 else "jpg"
            Image.fromarray(rng.integers(0, 255, (20 + k, 30, 3), dtype=np.uint8)).save(tmp_path / s / f"{k:03d}.{ext}")
    (tmp_path / "seq_b" / "notes.txt").write_text("ignored: not an image")
    ds = S.ImageSequenceFolder(str(tmp_path), views=(2, 4), res=16, seed=0)
    assert len(ds) == 2 and ds.sequences == ["seq_a", "seq_b"]
    for i in range(2):
        it = ds[i]
        V = it["images"].shape[0]
        assert 2 <= V <= 4 and it["images"].shape[1:] == (3, 16, 16)
        assert torch.equal(ds[i]["images"], it["images"])
    assert ds[(0, 5)]["images"].shape[0] == 5 and ds[(1, 5)]["images"].shape[0] == 3   # capped by length
    assert S.ImageSequenceFolder(str(tmp_path), views=(3, 3), res=(8, 12))[(0, 3)]["images"].shape == (3, 3, 8, 12)
    with pytest.raises(DataError, match="differs"):
        S.ImageSequenceFolder(str(tmp_path), views=(2, 5), res=None)[(0, 5)]
    with pytest.raises(DataError, match="seq_b: 3 images, fewer than the minimum of 4"):
        S.ImageSequenceFolder(str(tmp_path), views=(4, 6))
    (tmp_path / "seq_a" / "999.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"999\.png: unreadable image"):
        S.ImageSequenceFolder(str(tmp_path), views=(2, 6))[(0, 6)]
