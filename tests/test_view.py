"""nano4d.view: the browser viewer, checked in a real headless Chromium (skipped without viser or Chromium)."""
import base64
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d.cameras import look_at
from nano4d.ply import load_ply, save_ply
from nano4d.view import collect, gaussian_arrays, load_cameras, save_cameras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _red_blob(n=3000, seed=0):
    """A ball of opaque red Gaussians of radius 0.3 around the origin."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    means = 0.3 * d / d.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g) ** (1 / 3)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    scales = torch.full((n, 3), 0.03)
    return means, quats, scales, torch.full((n,), 0.95), torch.tensor([[0.95, 0.05, 0.05]]).expand(n, 3)


def test_gaussian_arrays_covariance():
    means, quats, scales, op, rgb = _red_blob(50)
    scales = scales * torch.linspace(0.5, 2, 50)[:, None] * torch.tensor([1.0, 2.0, 3.0])
    with tempfile.TemporaryDirectory() as d:
        save_ply(os.path.join(d, "a.ply"), means, quats, scales, op, rgb)
        a = gaussian_arrays(load_ply(os.path.join(d, "a.ply")))
    ev = np.sort(np.linalg.eigvalsh(a["covariances"].astype(np.float64)), 1)
    np.testing.assert_allclose(ev, np.sort(scales.numpy() ** 2, 1), rtol=1e-4)
    assert a["centers"].shape == (50, 3) and a["opacities"].shape == (50, 1)
    np.testing.assert_allclose(a["rgbs"], rgb.numpy(), atol=1e-5)


def test_cameras_roundtrip_and_collect(tmp_path):
    c2w = torch.stack([look_at(torch.tensor([2.0, 0, 0.5]), torch.zeros(3)),
                       look_at(torch.tensor([0, 2.0, 0.5]), torch.zeros(3))])
    K = torch.tensor([[40.0, 0, 32], [0, 40, 24], [0, 0, 1]]).expand(2, 3, 3)
    imgs = torch.rand(2, 3, 48, 64)
    save_cameras(str(tmp_path / "inputs.cameras.npz"), imgs, c2w, K)
    c = load_cameras(str(tmp_path / "inputs.cameras.npz"))
    assert c["images"].shape == (2, 48, 64, 3) and c["images"].dtype == np.uint8
    np.testing.assert_allclose(c["c2w"], c2w.double().numpy())
    with pytest.raises(ValueError, match="cameras.npz"):
        save_cameras(str(tmp_path / "x.npz"), imgs, c2w, K)
    with pytest.raises(ValueError, match="no .ply"):
        collect(str(_empty_dir(tmp_path)))
    save_ply(str(tmp_path / "g.ply"), *_red_blob(10))
    found = collect(str(tmp_path))
    assert [os.path.basename(p) for p in found["ply"]] == ["g.ply"] and len(found["cameras"]) == 1


def _empty_dir(tmp_path):
    p = tmp_path / "empty"
    p.mkdir(exist_ok=True)
    return p


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CDP:
    """Just enough of the Chrome DevTools protocol (over the websockets package viser depends on)."""

    def __init__(self, ws_url):
        from websockets.sync.client import connect
        self.ws, self.n = connect(ws_url, max_size=64 << 20, open_timeout=30), 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})


def _red_fraction(png: bytes) -> float:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (a[..., 0] > 120) & (a[..., 0] > 2 * a[..., 1] + 20) & (a[..., 0] > 2 * a[..., 2] + 20)
    return float(red.mean())


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_viewer_draws_splats_in_chromium(tmp_path):
    pytest.importorskip("viser")
    pytest.importorskip("websockets")
    save_ply(str(tmp_path / "blob.ply"), *_red_blob())
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    srv = subprocess.Popen([sys.executable, "-m", "nano4d.view", str(tmp_path / "blob.ply"), "--port", str(port),
                            "--seconds", "150"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    profile = tmp_path / "chrome-profile"
    browser = None
    try:
        seen = []
        while srv.poll() is None and not (seen and seen[-1].startswith("nano4d.view:")):
            seen.append(srv.stdout.readline())
        assert "3000 Gaussians" in seen[-1], "".join(seen) + (srv.stdout.read() if srv.poll() is not None else "")
        browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                                    "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                    "--disable-quic", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                    "--window-size=640,480", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        t0 = time.time()
        while not (active.exists() and active.read_text().count("\n") >= 1) and time.time() - t0 < 60:
            time.sleep(0.2)
        dport = active.read_text().split("\n")[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{dport}/json/list", timeout=30))
        cdp = _CDP(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        frac, png, t0 = 0.0, b"", time.time()
        while time.time() - t0 < 90:                 # SwiftShader WebGL: give the splat sorter time to run
            time.sleep(3)
            png = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
            frac = _red_fraction(png)
            if frac > 0.01:
                break
        (tmp_path / "screenshot.png").write_bytes(png)
        out = os.environ.get("NANO4D_VIEW_SCREENSHOT")
        if out:
            shutil.copy(tmp_path / "screenshot.png", out)
        assert frac > 0.01, f"only {frac:.4%} red pixels: the splats were not drawn (screenshot in {tmp_path})"
    finally:
        for p in (browser, srv):
            if p is not None:
                p.kill()
                p.wait(timeout=30)
