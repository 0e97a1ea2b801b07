"""nano4d.data.preview: preview PNGs of the procedural data."""
import numpy as np
from PIL import Image

from nano4d.data import preview as P


def test_preview_cli(tmp_path):
    paths = P.preview(str(tmp_path), num_objects=2, num_views=2, res=16, driving_res=(16, 28))
    for p in paths:
        im = np.asarray(Image.open(p))
        assert im.ndim == 3 and im.std() > 5
