"""setup_dist(), state broadcast and per-rank checkpoint RNG streams under a real 2-process torchrun on CPU (gloo)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_processes_all_reduce(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "_dist_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for r in (0, 1):
        assert f"rank {r}/2 backend=gloo sum=3.0 differ=True same=True restored=True own=True ok=True" in out, out
    assert out.count("MAIN-ONLY LINE") == 1, out


def test_single_process_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    from nano4d.utils import is_main, setup_dist
    info = setup_dist(seed=0)
    assert not info.ddp and info.world_size == 1 and is_main()
