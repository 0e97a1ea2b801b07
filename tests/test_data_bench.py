"""nano4d.data.bench: one row per dataset with a positive items/s."""
from nano4d.data import bench


def test_bench_rows():
    lines = []
    rows = bench.run(items=1, tiny=True, out=lines.append)
    assert [r[0].split()[0] for r in rows] == ["ProceduralObjects", "ProceduralDriving", "GObjaverseDataset",
                                               "ImageSequenceFolder", "RigDataset", "NuScenesDataset"]
    assert all(r[2] > 0 for r in rows) and len(lines) == 7 and "items/s" in lines[0]
    assert rows[1][1] == "3x6x3x24x40"
