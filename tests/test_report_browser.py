"""A real browser (headless Chromium) opens the report from disk and renders every card."""

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.report import build_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
WINDOW = (1200, 1800)


def _browser() -> str:
    for name in (os.environ.get("PMU_CHROMIUM"), *BROWSERS):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary found (apt-get install -y --no-install-recommends chromium)")


def _run(browser: str, profile, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_chromium_renders_the_report(synthetic_shards, tmp_path):
    browser = _browser()
    report = tmp_path / "labels.html"
    build_report(synthetic_shards, report, samples=5, seed=0, progress=False)
    url = report.resolve().as_uri()

    dom = _run(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<article class="card"') == 5
    assert '<section id="summary">' in dom.stdout

    shot = tmp_path / "shot.png"
    result = _run(
        browser, tmp_path / "profile-shot", f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", url,
    )  # fmt: skip
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == WINDOW
    pixels = np.asarray(img, dtype=np.float32)
    # a blank or error page is one or two flat colours; the report has text, plots and photos
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
