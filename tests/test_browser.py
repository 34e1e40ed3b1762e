"""report.html in headless Chromium: the charts are drawn, and model strings stay text."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE
from qtool import api
from qtool.recipe.schema import Recipe


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium not found: `make test` installs Debian's `chromium` when run as root with apt; "
                "or install it yourself (apt-get install -y chromium)")


def headless(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", Recipe(), root / "q", validation_data=SAMPLE / "eval")
    api.compare(SAMPLE / "model.onnx", root / "q" / "model.onnx", SAMPLE / "eval", root / "c",
                gates={"min_cosine": 0.99, "max_latency_ratio": 50.0}, per_layer=True, bench=True)
    return root / "c" / "report.html"


def test_charts_are_drawn(report_html, tmp_path):
    shot = tmp_path / "report.png"
    result = headless(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report_html.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    background = np.array([0xF6, 0xF7, 0xF9])
    drawn = np.any(np.abs(pixels - background) > 16, axis=2)
    assert drawn.mean() > 0.05, "screenshot is (nearly) blank"
    green = (pixels[:, :, 1] > 110) & (pixels[:, :, 0] < 80) & (pixels[:, :, 2] < 80)  # SQNR bars (#2e7d32)
    assert green.sum() > 2000, "no SQNR bars visible"

    dom = headless(tmp_path, "--dump-dom", report_html.as_uri()).stdout
    assert dom.count("<svg") >= 5  # output SQNR, error distribution, activations, weights, size, latency
    assert dom.count("<rect") >= 20
    assert "Activation SQNR" in dom and "Median latency" in dom


@pytest.fixture(scope="module")
def failed_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("top")
    recipe = root / "strict.yaml"
    recipe.write_text("base: int8\nvalidation:\n  gates: {min_cosine: 0.999999}\n")
    result = api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", recipe, root / "q",
                          validation_data=SAMPLE / "eval", bench=True, per_layer=True)
    assert not result.passed
    return root / "q" / "report.html", result.report


def test_the_report_answers_first(failed_report, tmp_path):
    """Above the first section: verdict, size x, latency x, accuracy and the next step, as a browser draws them."""
    page, report = failed_report
    dom = headless(tmp_path, "--dump-dom", page.as_uri()).stdout
    top = dom[:dom.index("<h2>Gates</h2>")]
    size, latency, acc = report["size"], report["latency"], report["validation"]["accuracy"]
    passed = sum(gate["passed"] for gate in report["gates"])  # base: int8 brings its own gates beside min_cosine
    assert "FAILED" in top and f"{passed} of {len(report['gates'])} gates passed" in top
    assert f"{size['ratio']:.4g}× smaller" in top and "KB →" in top
    assert f"{latency['ratio']:.4g}× latency" in top
    assert f"{acc['float']:.1%} → {acc['quantized']:.1%}" in top
    assert "<b>Next:</b>" in top and "qtool tune " in top and "strict.yaml --data " in top
    assert "<h2>Kernels</h2>" in dom and "QLinearConv ×3" in dom  # every section report.md has
    assert "<details>" in dom  # long per-layer tables collapsed
    shot = tmp_path / "top.png"
    headless(tmp_path, f"--screenshot={shot}", "--window-size=1280,400", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (pixels[:, :, 0] > 170) & (pixels[:, :, 1] < 70) & (pixels[:, :, 2] < 70)  # the FAILED badge (#c62828)
    white = np.all(pixels > 250, axis=2)  # the tiles' cards
    assert red.sum() > 300 and white.mean() > 0.1
