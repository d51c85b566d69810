"""The demo report in a real browser: headless Chromium through selenium and chromedriver.

A tiny-model demo (``mechsteer demo --model tiny-llama``) writes ``index.html``; the page is
opened with the network switched off (Chrome DevTools ``Network.emulateNetworkConditions``),
and the test checks that no JavaScript error was logged, that plotly.js is inlined (no
request leaves ``file://``), and that every plotly figure has drawn (a ``.main-svg`` inside
each ``.plotly-graph-div``). A full-page screenshot is saved as ``report.png`` in the test's
temp dir. Chromium and chromedriver come from Debian (``make browser``, run by ``.ci/run``);
where they are not installed the test skips and says how to install them.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
INSTALL = "install them with `make browser` (apt-get install -y chromium chromium-driver)"


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium is missing: pip install -e ".[dev]"')
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(f"Chromium or chromedriver not found ({CHROMIUM=}, {DRIVER=}): {INSTALL}.")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, "-m", "mechsteer.cli", "demo", "--model", "tiny-llama", "--n", "4", "--steer-epochs", "2", "--out", str(out / "demo")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "demo" / "index.html"


def test_report_renders_offline_without_errors(driver, report, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    source = report.read_text()
    n_figures = source.count('class="plotly-graph-div"')
    assert n_figures >= 5, f"expected the demo's figures in {report}, found {n_figures}"
    assert "<script src=" not in source  # plotly.js inlined, never fetched

    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    )
    driver.get(report.resolve().as_uri())
    drawn = "return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => d.querySelectorAll('.main-svg').length)"
    WebDriverWait(driver, 60).until(lambda d: len(d.execute_script(drawn)) == n_figures and all(d.execute_script(drawn)))
    counts = driver.execute_script(drawn)
    assert len(counts) == n_figures and all(c >= 1 for c in counts), counts

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert driver.execute_script("return typeof Plotly") == "object"
    remote = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !/^(file|data|blob):/.test(n))"
    )
    assert not remote, f"the page fetched {remote}"

    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 16000), "scale": 1}},
    )
    png = tmp_path / "report.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.stat().st_size > 10_000
    print(f"screenshot: {png}")
