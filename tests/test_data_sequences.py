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


def test_mum_index_file_min_frames_and_dynamic_batches(tmp_path):
    """MuM's annotation format (gzip JSON {scene: [[{"filepath"}, ...], ...]}), sequences shorter than
    min_frames skipped and counted, frames in draw order on request, and (index, V) batches from
    DynamicBatchSampler through a DataLoader."""
    import gzip
    import json

    from torch.utils.data import DataLoader

    from nano4d.data.sampling import DynamicBatchSampler
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "img")
    for k in range(9):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{k}.png")
    ann = {"sceneA": [[{"filepath": f"img/{k}.png"} for k in range(6)], [{"filepath": "img/8.png"}] * 2],
           "sceneB": [[{"filepath": f"img/{k}.png"} for k in (7, 6, 5, 4)]]}
    with gzip.open(tmp_path / "train.jgz", "wt") as f:
        json.dump(ann, f)
    ds = S.ImageSequenceFolder(str(tmp_path), views=(2, 3), res=8, index=str(tmp_path / "train.jgz"), min_frames=4,
                               frame_order="random")
    assert ds.sequences == ["sceneA_0", "sceneB_0"] and ds.skipped == ["sceneA_1"] and ds.paths.dtype.kind == "S"
    assert ds.frames(1)[0].endswith("img/7.png")
    drawn = ds[(0, 5)]["images"]
    in_file_order = S.ImageSequenceFolder(str(tmp_path), views=(2, 3), res=8, index=str(tmp_path / "train.jgz"),
                                          min_frames=4)[(0, 5)]["images"]
    key = lambda x: sorted(x.flatten(1).sum(1).tolist())  # noqa: E731
    assert drawn.shape[0] == 5 and key(drawn) == key(in_file_order)                 # same frames, own order
    with pytest.raises(DataError, match=r"train\.jgz: scene 'sceneA' sequence 1: 2 frames, fewer than the minimum"):
        S.ImageSequenceFolder(str(tmp_path), views=(3, 3), index=str(tmp_path / "train.jgz"))
    (tmp_path / "bad.json").write_text('{"s": [[{"path": "x"}]]}')
    with pytest.raises(DataError, match=r"bad\.json: scene 's' sequence 0: every frame needs a 'filepath'"):
        S.ImageSequenceFolder(str(tmp_path), index=str(tmp_path / "bad.json"))
    bs = DynamicBatchSampler(len(ds), views=(2, 3), max_images=6, seed=0)
    for batch in DataLoader(ds, batch_sampler=bs, collate_fn=lambda b: b):
        V = batch[0]["images"].shape[0]
        assert all(b["images"].shape[0] == V for b in batch) and len(batch) <= 6 // V
