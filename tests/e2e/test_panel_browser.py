"""End to end in a real browser: JupyterLab on 127.0.0.1 and headless Chromium (Playwright) open
notebooks/05_sampling_sweeps.ipynb, run every cell, and drag the sampling panel's temperature
slider; the panel's summary of the next-token distribution must change and no cell may show an
error. A screenshot of the panel is saved under tests/e2e/artifacts/.

Needs Debian's `chromium` at /usr/bin/chromium (``make test`` installs it when it can) and the
`playwright` package (its own browser downloads are not used); skipped, with the install command,
when chromium is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from serving import free_port, server_process

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "05_sampling_sweeps.ipynb"
ARTIFACTS = ROOT / "tests" / "e2e" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 90
RUN_ALL_S = 150


def _settings(directory: Path) -> None:
    """JupyterLab settings for the test: every cell kept in the page, no news or update checks."""
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }.items():
        path = directory / plugin
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    """A JupyterLab server on a free port of 127.0.0.1 serving a copy of the notebook; stopped after."""
    work = tmp_path_factory.mktemp("jupyterlab")
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    _settings(work / "lab-settings")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel draws inline
    env.update(JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTERLAB_SETTINGS_DIR=str(work / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), IPYTHONDIR=str(work / "ipython"),
               HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.token=",
           "--ServerApp.password=", f"--ServerApp.root_dir={work}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with server_process(cmd, health=f"http://127.0.0.1:{port}/api/status", log_path=work / "jupyterlab.log",
                        what="JupyterLab", startup_s=SERVER_START_S, env=env, cwd=work):
        yield f"http://127.0.0.1:{port}"


def _code_prompts(page) -> list[str]:
    """The execution prompts ("[3]:", "[*]:", "[ ]:") of the notebook's code cells."""
    return page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="Debian's chromium is not installed: run `sudo apt-get install -y chromium` "
                           "(`make test` does it when run as root or with password-less sudo)")
def test_panel_in_jupyterlab(jupyter):
    n_code = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"{jupyter}/lab/tree/{NOTEBOOK.name}")
            # the kernel is up and idle before anything runs
            page.get_by_text(re.compile(r"\(ipykernel\) \| Idle")).wait_for(timeout=120_000)

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            deadline = time.monotonic() + RUN_ALL_S
            while True:
                prompts = _code_prompts(page)
                done = len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:", t.strip()) for t in prompts)
                if done and page.get_by_text(re.compile(r"\(ipykernel\) \| Idle")).count():
                    break
                assert time.monotonic() < deadline, f"the notebook did not finish in {RUN_ALL_S} s: {prompts}"
                time.sleep(1)

            outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
            assert "Traceback (most recent call last)" not in outputs, outputs[-3000:]
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0

            summary = page.locator(".qwen35-sampling-summary")
            summary.wait_for()
            before = summary.inner_text()
            assert "tokens kept" in before

            slider = page.locator(".qwen35-temperature")
            slider.scroll_into_view_if_needed()
            handle = slider.locator(".noUi-handle").bounding_box()
            track = slider.locator(".noUi-base").bounding_box()
            page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + 0.95 * track["width"], handle["y"] + handle["height"] / 2, steps=8)
            page.mouse.up()

            deadline = time.monotonic() + 60
            while summary.inner_text() == before:
                assert time.monotonic() < deadline, f"the panel did not change after moving the slider: {before!r}"
                time.sleep(0.5)
            after = summary.inner_text()
            readout = slider.locator(".widget-readout").inner_text()
            assert float(readout) > 1.5, readout  # the slider moved towards its maximum, 2
            assert "tokens kept" in after and after != before

            panel = page.locator(".widget-vbox", has=summary).first
            panel.screenshot(path=str(ARTIFACTS / "sampling_panel.png"))
            page.screenshot(path=str(ARTIFACTS / "notebook.png"))
        finally:
            browser.close()
