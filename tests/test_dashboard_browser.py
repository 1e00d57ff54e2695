"""The dashboard in a real headless browser (Chromium), against a live stack.

Not run where no Chromium is installed: the README's test command says so in
its summary (SKIPPED, with the reason); `.ci/run` installs Debian's chromium.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support import ROOT, fire, start_balancer, start_echo

pytestmark = pytest.mark.e2e

BROWSER = next(filter(None, (shutil.which(name) for name in
                             ("chromium", "chromium-browser", "google-chrome"))), None)
ARTIFACTS = ROOT / "tests" / "artifacts"
# Without the background-networking flags Chromium keeps dialling out, and this
# machine's closed network refuses it.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


def browse(url: str, profile: Path, *extra: str) -> str:
    done = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(BROWSER is None, reason="not run: no headless browser (chromium) on this "
                    "machine; .ci/run installs Debian's chromium for it")
def test_the_dashboard_shows_the_pool_live_in_a_real_browser(redis_server, tmp_path):
    failing = start_echo(0, tmp_path, ECHO_ERROR_RATE="1")
    echoes = [failing, start_echo(1, tmp_path), start_echo(2, tmp_path)]
    proc, url, admin = start_balancer([u for _, u in echoes], redis_server, tmp_path,
                                      env={"LB_CHECK_INTERVAL_S": "0"})
    try:
        fire(url, 60, 5, "POST")  # blocks the failing instance
        assert requests.get(f"{admin}/status", timeout=5).json()["backends"][0]["blocked"]
        page = requests.get(f"{admin}/", timeout=5)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        dom = browse(f"{admin}/", tmp_path / "profile-dom", "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        browse(f"{admin}/", tmp_path / "profile-shot", f"--screenshot={shot}",
               "--window-size=1280,900")
    finally:
        proc.stop()
        for p, _ in echoes:
            p.stop()
    # The page's script has run: one row per backend, with its state and why.
    for _, echo in echoes:
        assert f'data-backend="{echo.removeprefix("http://")}"' in dom
    assert 'class="state blocked"' in dom and "reached" in dom  # the block and its reason
    assert dom.count('class="state healthy"') == 2
    assert dom.count('<td class="num">1.00</td>') == 2  # each healthy one's full share
    assert "<polyline" in dom  # the charts are drawn
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
