"""The dashboard in a real JupyterLab, driven by headless Chromium through Playwright.

The test writes a small notebook into a temporary root, starts JupyterLab there on a free local
port with a token and follows the prose the way a learner would: run the first cells, press
Start, move the N slider, then run the next cells, which drive the same dashboard from code,
while it is still running. It checks the DOM: those cells pause the run and say so (no
traceback), the distiller reports the new N, and an M the experts cannot serve is refused in red
while its slider snaps back to the M in use. It screenshots the dashboard and the trajectory explorer
into its temporary folder; ``MTT_LAB_SCREENSHOTS=assets`` (or another folder) saves them there instead,
which is how the README's ``assets/dashboard.png`` and ``assets/trajectory_pca.png`` are remade:

    MTT_LAB_SCREENSHOTS=assets .venv/bin/python -m pytest -q tests/test_browser.py

Needs Debian's Chromium at /usr/bin/chromium (Playwright cannot download its own browser here);
without it the test is skipped, unless CI=true, where a missing browser is a failure.
"""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_viz import tiny_store  # noqa: F401  (shared fixture: the notebook resumes this store)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 150_000  # kernel start, imports and the first cells, on a shared CPU

CELLS = [
    """\
import os

import torch

from mtt_lab.data import load_dataset
from mtt_lab.distill import DistillConfig, Distiller
from mtt_lab.experts import ExpertConfig, train_experts
from mtt_lab.widgets import DistillDashboard, TrajectoryExplorer

torch.set_num_threads(1)
tiny = ExpertConfig(model_kwargs={"width": 8, "depth": 2}, num_experts=2, epochs=3, device="cpu")
store = train_experts(tiny, os.environ["MTT_SMOKE_EXPERTS"], progress=False)
train = load_dataset("mnist10k", "train")
distiller = Distiller(store, train, DistillConfig(ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=2,
                                                  device="cpu", iterations=100_000))""",
    """\
dash = DistillDashboard(distiller)
dash""",
    """\
done = await dash.run_async(3)
print(f"async: {len(done)} steps")""",
    """\
record = dash.step()
print(f"step: N = {record.syn_steps}")""",
    """\
replay = Distiller(store, train, DistillConfig(syn_steps=6, expert_epochs=2, max_start_epoch=2, device="cpu"))
records = [replay.step(return_path=True) for _ in range(3)]
TrajectoryExplorer(store, records)""",
]


def write_notebook(path: Path) -> None:
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nbformat.write(notebook, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chromium_path() -> str:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing on CI; install Debian's chromium (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run this test")
    return str(CHROMIUM)


@pytest.fixture
def jupyterlab(tmp_path, tiny_store):
    """A JupyterLab serving ``tmp_path/root`` (holding the notebook); yields its base URL and token."""
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / "dashboard_smoke.ipynb")
    # no "would you like news?" toast over the screenshots, and no settings read from or written to ~/.jupyter
    settings = tmp_path / "user-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "MTT_SMOKE_EXPERTS": str(tiny_store.path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.allow_root=True",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
               f"--LabApp.user_settings_dir={tmp_path / 'user-settings'}"]
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as reply:
                    json.load(reply)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start within 60 s"
                time.sleep(0.25)
        yield url, token
    finally:
        request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            server.wait(timeout=30)
        log.close()


def status_text(page) -> str:
    return page.locator(".mtt-status").inner_text()


def wait_until(page, condition, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition()`` every 100 ms (the page keeps running meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; status: {status_text(page)!r}"
        page.wait_for_timeout(100)


def run_cell(page, index: int, attempts: int = 3, seconds: float = 20) -> None:
    """Click into cell ``index`` and press Shift+Enter until it is queued ([*] or a count in its prompt).

    While Lab is still settling the key press can do nothing, or Lab can ask which kernel to use
    (answered with the preselected one), hence the retries.
    """
    cell = page.locator(".jp-NotebookPanel .jp-Cell").nth(index)
    prompt, dialog = cell.locator(".jp-InputPrompt"), page.locator(".jp-Dialog")
    for _ in range(attempts):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if dialog.is_visible():  # its accept button reads "Select" (accessible name "Select Kernel")
                dialog.locator("button.jp-mod-accept").click()
            if re.search(r"\[[*\d]", prompt.inner_text()):
                return
            page.wait_for_timeout(200)
    raise AssertionError(f"cell {index} did not start in {attempts} attempts")


def output_text(page, index: int) -> str:
    return page.locator(".jp-NotebookPanel .jp-Cell").nth(index).locator(".jp-OutputArea").inner_text()


def run_dashboard(page, url: str, token: str, assets: Path) -> None:
    """Follow the prose: run the dashboard cell, press Start, move N, run the next cells while it runs."""
    page.goto(f"{url}/lab/tree/dashboard_smoke.ipynb?token={token}")
    page.locator('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for()
    run_cell(page, 0)
    run_cell(page, 1)
    grid = page.locator("img.mtt-grid")
    grid.wait_for()
    page.locator(".mtt-curves .main-svg").first.wait_for()
    wait_until(page, lambda: "iteration 0" in status_text(page), "the dashboard to show")
    assert "N = 2" in status_text(page)
    first_src = grid.get_attribute("src")
    size = grid.bounding_box()
    assert size["width"] > 2 * size["height"] > 0, f"the ten digits should be a 2 x 5 block, got {size}"

    page.locator(".mtt-dashboard button", has_text="Start").click()
    wait_until(page, lambda: "running" in status_text(page), "the run to start")
    wait_until(page, lambda: grid.get_attribute("src") != first_src, "the images to change")
    moving_src = grid.get_attribute("src")

    handle = page.locator(".mtt-n-slider .noUi-handle")
    handle.focus()
    handle.press("ArrowRight")  # N: 2 -> 3, sent to the kernel on release (continuous_update=False)
    wait_until(page, lambda: "N = 3" in status_text(page), "the distiller to take N = 3")
    wait_until(page, lambda: grid.get_attribute("src") != moving_src, "the images to keep changing")
    assert "running" in status_text(page)

    # the next cells, as the prose says, with the dashboard still running
    for index in (2, 3, 4):
        run_cell(page, index)
    page.locator(".mtt-explorer .main-svg").first.wait_for()  # the last cell has run
    page.locator('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for()
    assert "paused it at iteration" in output_text(page, 2) and "async: 3 steps" in output_text(page, 2)
    assert "step: N = 3" in output_text(page, 3)
    assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert "Traceback" not in page.locator(".jp-NotebookPanel").inner_text()
    assert "idle" in status_text(page) and page.locator(".mtt-error").inner_text().strip() == ""
    assert page.locator(".mtt-curves .shapelayer path").count() >= 1, "the N change is not marked on the curves"

    # a refused slider value snaps back: T+ = 2 and E = 3 leave room for M = 2 at most
    m_handle, m_readout = page.locator(".mtt-m-slider .noUi-handle"), page.locator(".mtt-m-slider .widget-readout")
    assert m_readout.inner_text().strip() == "1"
    m_handle.focus()
    m_handle.press("End")  # M = 3
    wait_until(page, lambda: "Not applied" in page.locator(".mtt-message").inner_text(), "the refusal")
    wait_until(page, lambda: m_readout.inner_text().strip() == "1", "the M slider to snap back")
    assert "M = 1" in status_text(page)
    assert "lower T+ first" in page.locator(".mtt-message").inner_text()

    assets.mkdir(exist_ok=True)
    page.locator(".mtt-dashboard").screenshot(path=str(assets / "dashboard.png"))
    page.locator(".mtt-explorer").screenshot(path=str(assets / "trajectory_pca.png"))


def test_dashboard_in_jupyterlab(chromium_path, jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            run_dashboard(page, url, token, Path(os.environ.get("MTT_LAB_SCREENSHOTS", tmp_path)))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}; server log: {tmp_path / 'jupyterlab.log'}")
            raise
        finally:
            browser.close()
