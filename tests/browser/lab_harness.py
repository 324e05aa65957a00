"""A JupyterLab server and a headless Chromium for the browser tests, both started and stopped here.

Only loopback traffic: the server listens on 127.0.0.1 with a fixed token, its update check and news
feed are off, and Chromium runs with background networking, sync and component updates switched off.
Selenium drives Debian's chromedriver (``/usr/bin/chromedriver``): a driver path given to ``Service``
makes Selenium skip Selenium Manager, which would otherwise try to download a driver.

Import this module only after checking that selenium is installed (the test module skips first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

TOKEN = "rlhf-course-browser-test"  # fixed, so the test can build URLs; the server is loopback-only
SERVER_START_TIMEOUT_S = 90.0  # JupyterLab starts in 5-15 s on a laptop; two busy CI cores are slower
SERVER_STOP_TIMEOUT_S = 20.0  # after /api/shutdown, then SIGTERM, then SIGKILL of the server's group
# Straight to 127.0.0.1: an http_proxy set in the environment must not route the test's requests elsewhere.
LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_tool(name: str, preferred: str) -> str | None:
    """The Debian path when it exists (``/usr/bin/chromium``), else whatever ``PATH`` finds."""
    return preferred if Path(preferred).is_file() else shutil.which(name)


def free_loopback_port() -> int:
    """A port nothing listens on right now (the server is told not to retry another one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class JupyterLab:
    """A running server: where it listens and where its log goes."""

    process: subprocess.Popen
    port: int
    root_dir: Path  # the folder the server serves (the notebook lives here)
    log_path: Path  # the server's stdout and stderr

    def url(self, path: str) -> str:
        """``path`` (e.g. ``lab/tree/x.ipynb``) on this server, logged in with the token."""
        return f"http://127.0.0.1:{self.port}/{path}?token={TOKEN}"

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-n_chars:]

    def api(self, path: str, method: str = "GET") -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/{path}", method=method, headers={"Authorization": f"token {TOKEN}"}
        )
        with LOOPBACK_OPENER.open(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else {}


@contextlib.contextmanager
def running_jupyterlab(root_dir: Path, state_dir: Path, env: dict[str, str]) -> Iterator[JupyterLab]:
    """Start ``jupyter lab`` serving ``root_dir`` (config, settings and runtime files kept under
    ``state_dir``, so the learner's own JupyterLab set-up is neither read nor touched) with ``env``
    added to the environment (kernels inherit it); shut it and its kernels down on exit."""
    port = free_loopback_port()
    for name in ("config", "data", "runtime", "settings", "workspaces"):
        (state_dir / name).mkdir(parents=True, exist_ok=True)
    server_env = {
        **os.environ,
        **env,
        "JUPYTER_CONFIG_DIR": str(state_dir / "config"),
        "JUPYTER_DATA_DIR": str(state_dir / "data"),  # the venv's share/jupyter is still searched
        "JUPYTER_RUNTIME_DIR": str(state_dir / "runtime"),
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.user_settings_dir={state_dir / 'settings'}",
        f"--LabApp.workspaces_dir={state_dir / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: read the kernel's state
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",  # no PyPI look-ups from the extension manager
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root, which jupyter refuses unless told
    log_path = state_dir / "jupyterlab.log"
    with log_path.open("wb") as log:
        # A session of its own: if the polite shutdown fails, the server and its kernels go as one group.
        process = subprocess.Popen(
            command, env=server_env, cwd=root_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    lab = JupyterLab(process=process, port=port, root_dir=root_dir, log_path=log_path)
    try:
        wait_until_serving(lab)
        yield lab
    finally:
        stop(lab)


def wait_until_serving(lab: JupyterLab) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {lab.process.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("api/status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    raise TimeoutError(
        f"jupyter lab did not answer on port {lab.port} within {SERVER_START_TIMEOUT_S:.0f} s:\n{lab.log_tail()}"
    )


def stop(lab: JupyterLab) -> None:
    """Shut the server down (it shuts its kernels down first); escalate only if it hangs."""
    if lab.process.poll() is None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            lab.api("api/shutdown", method="POST")
        try:
            lab.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(lab.process.pid, signal.SIGTERM)  # the group this harness started, nothing else
            try:
                lab.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(lab.process.pid, signal.SIGKILL)
                lab.process.wait(timeout=5)


@contextlib.contextmanager
def headless_chromium(
    chromium: str, chromedriver: str, profile_dir: Path, window_size: tuple[int, int] = (1400, 1000)
) -> Iterator[webdriver.Chrome]:
    """Debian's Chromium, headless, driven by Debian's chromedriver; a fresh profile in ``profile_dir``."""
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # small /dev/shm in containers
        "--disable-gpu",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--user-data-dir={profile_dir}",
        # Loopback only: no update, sync, safe-browsing or field-trial traffic.
        "--no-proxy-server",  # ignore any http_proxy of the environment: everything is on 127.0.0.1
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-features=OptimizationHints,MediaRouter,Translate",
        "--metrics-recording-only",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for failure reports
    service = Service(executable_path=chromedriver)  # a given path: Selenium Manager is never run
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def browser_console(driver: webdriver.Chrome, n_lines: int = 40) -> str:
    """The last console messages of the page (JupyterLab logs kernel and widget errors there)."""
    try:
        entries = driver.get_log("browser")
    except Exception as error:  # a report helper: never hide the real failure behind its own
        return f"(console not available: {error})"
    return "\n".join(f"{entry['level']}: {entry['message']}" for entry in entries[-n_lines:])
