"""report.html rendered by a real headless Chromium: every host in the DOM, a non-trivial screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from provisioner.report import build_report, write_report
from test_report import WHEN, fleet_entries

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")


def _chromium(profile_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile_dir}", *args]
    env = {**os.environ, "HOME": str(profile_dir)}   # keep its caches out of the real home
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env, check=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("chromium")
    names = {"gpu-offline": "gpu-offline-<script>alert(1)</script>"}
    report = build_report(fleet_entries(names), profile="rtx3090", generated_at=WHEN)
    paths = write_report(tmp / "reports", report)
    url = paths.html.resolve().as_uri()
    shot = tmp / "report.png"
    dom = _chromium(tmp / "profile-dom", "--dump-dom", url)
    png = _chromium(tmp / "profile-png", f"--screenshot={shot}", "--window-size=1280,2000",
                    "--hide-scrollbars", url)
    if keep := os.environ.get("PROVISION_REPORT_SCREENSHOT"):   # to refresh docs/report-example.png
        shutil.copyfile(shot, keep)
    return {"hosts": [h.host for h in report.hosts], "dom": dom, "png": png, "shot": shot}


def test_every_host_is_in_the_rendered_dom(rendered: dict) -> None:
    dom = rendered["dom"]
    assert dom.returncode == 0, dom.stderr[-2000:]
    for host in rendered["hosts"]:
        escaped = host.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert escaped in dom.stdout, host
    # The hostile host name stayed text: the DOM holds no script element at all.
    assert "<script" not in dom.stdout
    assert dom.stdout.count("<section class=\"panel host") == 5


def test_screenshot_is_a_real_picture(rendered: dict) -> None:
    png, shot = rendered["png"], rendered["shot"]
    assert png.returncode == 0 and shot.exists(), png.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        rgb = img.convert("RGB")
        low, high = zip(*ImageStat.Stat(rgb).extrema)
        assert max(high) - min(low) > 200                # text and badges, not one flat colour
        colours = rgb.resize((640, 1000)).getcolors(maxcolors=640 * 1000)
        assert len(colours) > 50                         # many colours: thumbnails, badges, text
        # The failed hosts' red marks are drawn (status colour #cf222e).
        assert any(r > 180 and g < 80 and b < 80 for _, (r, g, b) in colours)
