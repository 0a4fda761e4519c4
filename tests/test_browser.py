"""Smoke test in a real browser: explore.ipynb run in JupyterLab, driven by headless Chromium.

JupyterLab listens on 127.0.0.1 with a token, and Chromium blocks every request that does
not go to 127.0.0.1, so the test never leaves the machine. Screenshots are
saved in the test's tmp folder, and also copied to HERMITKIT_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hermitkit.store import Store
from tests.test_widgets import demo_batch

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_PREFIXES = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")
STARTUP_TIMEOUT_S = 120
KERNEL_IDLE = (
    "() => { const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
    " const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;"
    " return Boolean(kernel) && kernel.status === 'idle'; }"
)


def require_browser_tools() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed: pip install 'hermitkit[browser]'")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install 'hermitkit[browser]'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_lab_settings(base: Path) -> dict[str, str]:
    """Config and settings folders that keep JupyterLab offline and free of pop-ups."""
    config = base / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate", "extension_manager": "readonly"}}), encoding="utf-8"
    )
    notification = base / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")
    return {
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
    }


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server on 127.0.0.1 whose root contains a copy of explore.ipynb; yields its URL."""
    require_browser_tools()
    root = tmp_path / "lab-root"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "explore.ipynb", root / "explore.ipynb")
    port = free_port()
    token = secrets.token_hex(16)
    env = {**os.environ, **write_lab_settings(tmp_path)}
    log_path = tmp_path / "jupyterlab.log"

    with log_path.open("w", encoding="utf-8") as log_file:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--expose-app-in-browser",
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, log_path)
        yield f"http://127.0.0.1:{port}/lab/tree/explore.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def wait_for_server(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text(encoding='utf-8')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on {url.split('?')[0]} within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text(encoding='utf-8')[-3000:]}")


def keep_screenshot(path: Path) -> None:
    folder = os.environ.get("HERMITKIT_SCREENSHOT_DIR", "").strip()
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


def test_explore_notebook_in_jupyterlab(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    batch_id = demo_batch(Store(), models=["demo/steady", "demo/wanderer", "demo/confused"], runs=2, turns=4)
    blocked: list[str] = []

    def only_loopback(route):  # type: ignore[no-untyped-def]
        if route.request.url.startswith(LOCAL_PREFIXES):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(120_000)
            page.goto(jupyterlab)
            page.wait_for_function(KERNEL_IDLE, timeout=180_000)

            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.get_by_text("models listed").first.wait_for()
            page.wait_for_function(KERNEL_IDLE)
            page.locator("table.hk-summary").first.wait_for(state="attached")
            page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
            widget_area = page.locator(".jp-OutputArea-output .jupyter-widgets").first
            widget_area.evaluate("element => element.scrollIntoView({block: 'start'})")
            models_shot = tmp_path / "explore.png"
            page.screenshot(path=str(models_shot))

            assert widget_area.is_visible()
            joined = "\n".join(page.locator(".jp-NotebookPanel .jp-OutputArea").all_inner_texts())
            assert "Traceback" not in joined
            assert "Error displaying widget" not in joined
            assert "Failed to load" not in joined

            # Use the app as a person would: pick two models, press Run, watch it finish.
            picker = page.locator(".jp-OutputArea-output select[multiple]").first
            labels = [text for text in picker.locator("option").all_inner_texts() if text.startswith(("demo/steady", "demo/confused"))]
            assert len(labels) == 2
            picker.select_option(label=labels)
            page.get_by_text("Chosen (2)").first.wait_for()
            page.get_by_text("2. Run").first.click()
            page.locator(".jp-OutputArea-output button", has_text="Run").first.click()
            page.get_by_text(f"Batch {batch_id + 1}: completed").first.wait_for()
            page.get_by_text("30/30 turns, 3 judged").first.wait_for()
            run_shot = tmp_path / "explore-run.png"
            page.screenshot(path=str(run_shot))

            page.get_by_text("3. Results").first.click()
            summary = page.locator("table.hk-summary").first
            summary.wait_for(state="visible")
            assert "demo/confused" in summary.inner_text()
            assert "demo/wanderer" not in summary.inner_text()
            results_shot = tmp_path / "explore-results.png"
            page.screenshot(path=str(results_shot))
        finally:
            context.close()

    assert models_shot.stat().st_size > 10_000
    for shot in (models_shot, run_shot, results_shot):
        keep_screenshot(shot)
