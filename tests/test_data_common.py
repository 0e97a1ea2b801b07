"""nano4d.data.common: seeds and splits, thread limits, backgrounds, JSON field reading with named errors."""
import pytest
import torch

from nano4d.data import common as C


def test_split_seeds_are_deterministic_and_disjoint():
    a = [C.split_seed(0, "train", i) for i in range(50)]
    assert a == [C.split_seed(0, "train", i) for i in range(50)] and len(set(a)) == 50
    assert not set(a) & {C.split_seed(0, "val", i) for i in range(50)}
    assert all(0 <= s < 2 ** 63 for s in a)
    with pytest.raises(ValueError, match="split must be one of"):
        C.split_seed(0, "dev", 0)


def test_limit_threads_restores():
    old = torch.get_num_threads()
    with C.limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old


def test_backgrounds():
    assert torch.equal(C.background_rgb("white"), torch.ones(3)) and torch.equal(C.background_rgb("black"), torch.zeros(3))
    a = C.dataset_background("random", 5)
    assert torch.equal(a, C.dataset_background("random", 5)) and not torch.equal(a, C.dataset_background("random", 6))
    with pytest.raises(ValueError, match="background must be"):
        C.check_background("grey")
    with pytest.raises(ValueError, match="3 values"):
        C.check_background((1.0, 0.0))
    rgb, alpha = torch.rand(2, 3, 4, 5), torch.rand(2, 1, 4, 5)
    torch.testing.assert_close(C.composite(rgb, alpha, "black"), rgb * alpha)


def test_json_errors_name_file_and_field(tmp_path):
    p = tmp_path / "x.json"
    with pytest.raises(C.DataError, match=r"x\.json: cannot open camera JSON"):
        C.read_json(str(p), "camera JSON")
    p.write_text("{oops")
    with pytest.raises(C.DataError, match=r"x\.json: bad JSON"):
        C.read_json(str(p))
    p.write_text('{"w": "wide", "k": [[1, 2], [3, 4]]}')
    d = C.read_json(str(p))
    with pytest.raises(C.DataError, match=r"x\.json: missing field 'h'"):
        C.field(d, "h", str(p))
    with pytest.raises(C.DataError, match=r"x\.json: expected a JSON object, got list"):
        C.field([], "h", str(p))
    with pytest.raises(C.DataError, match=r"x\.json: field 'w' must be an integer, got 'wide'"):
        C.as_int(d["w"], str(p), "w")
    for bad in (True, 2.5, float("nan"), None):
        with pytest.raises(C.DataError, match="must be an integer"):
            C.as_int(bad, "f", "w")
    assert C.as_int(3.0, "f", "w") == 3 and C.as_float(2, "f", "t") == 2.0
    with pytest.raises(C.DataError, match=r"f: field 't' must be a finite number, got inf"):
        C.as_float(float("inf"), "f", "t")
    assert C.as_array(d["k"], (2, 2), "f", "k").dtype == torch.float64
    for bad in ([[1, 2]], [[1, "a"], [3, 4]], "[[1, 2], [3, 4]]", [[1, float("nan")], [3, 4]]):
        with pytest.raises(C.DataError, match=r"f: field 'k' must be 2x2 finite numbers"):
            C.as_array(bad, (2, 2), "f", "k")
