"""Headless Chromium (Debian `chromium`) driven over the Chrome DevTools Protocol: open a page, wait for a
condition, read the page, save a screenshot.

Why CDP with websocket-client rather than Selenium or Playwright: Chromium itself speaks the protocol
(`--remote-debugging-port`), so the only addition is websocket-client (pure Python, no dependencies);
Selenium needs the version-matched `chromium-driver` and brings trio and urllib3, playwright-core an npm
package and Node.js for every call. The handful of commands used here (Page.navigate,
Runtime.evaluate, Page.captureScreenshot, Emulation.setDeviceMetricsOverride) are stable parts of the
protocol.

Chromium gets a temporary profile, binds its debugging port to 127.0.0.1 (port 0: the kernel picks one,
read back from the profile's DevToolsActivePort file), renders WebGL in software (SwiftShader: OHIF's
viewports are WebGL, and the box has no GPU), and is stopped with its process group on exit.

    with HeadlessChromium() as browser:
        browser.open(url)
        browser.wait_for("document.querySelector('canvas') !== null", timeout_s=120)
        browser.screenshot(Path("out.png"))
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from wholebody.atomic import atomic_write
from wholebody.triton_server.processes import stop_process_group

log = logging.getLogger(__name__)

CHROMIUM_COMMANDS = ("chromium", "chromium-browser")  # Debian's package installs /usr/bin/chromium
INSTALL_HINT = "install Debian's chromium (make clinical-tools)"


class BrowserError(RuntimeError):
    """Chromium cannot be started or driven, or a page did not reach a condition; one line saying why."""


def chromium_path() -> str:
    """The Chromium executable on PATH. Raises BrowserError naming the package to install."""
    for name in CHROMIUM_COMMANDS:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(f"chromium is not installed: {INSTALL_HINT}")


class HeadlessChromium:
    """One headless Chromium with one page (tab), `width` x `height` CSS pixels, driven over CDP.

    start_timeout_s: how long Chromium may take to open its debugging port (slow 2-core boxes: tens of s).
    """

    def __init__(self, width: int = 1600, height: int = 1000, start_timeout_s: float = 120.0) -> None:
        self.width, self.height = width, height
        self.start_timeout_s = start_timeout_s
        self.profile: Path | None = None
        self.process: subprocess.Popen | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console messages and exceptions of the page, for error messages

    def __enter__(self) -> HeadlessChromium:
        import websocket  # websocket-client: the `viewer` extra

        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        command = [chromium_path(), "--headless=new", "--remote-debugging-address=127.0.0.1",
                   "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--no-first-run",
                   "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
                   "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                   "--disable-dev-shm-usage", f"--window-size={self.width},{self.height}", "--hide-scrollbars"]
        if os.geteuid() == 0:
            command.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        command.append("about:blank")
        try:
            self._log = open(self.profile.parent / f"{self.profile.name}.log", "wb")
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.monotonic() + self.start_timeout_s
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                if self.process.poll() is not None:
                    raise BrowserError(f"chromium exited with {self.process.returncode}: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise BrowserError(f"chromium opened no debugging port in {self.start_timeout_s} s: "
                                       f"{self._log_tail()}")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
                     if t.get("type") == "page"]
            if not pages:
                raise BrowserError("chromium has no page to drive")
            self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120,
                                                   suppress_origin=True)
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _log_tail(self) -> str:
        assert self.profile is not None
        path = self.profile.parent / f"{self.profile.name}.log"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-5:]) if path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except OSError:
                pass
            self._ws = None
        if self.process is not None:
            stop_process_group(self.process)
        if self.process is not None:
            try:  # children that outlived the main process (renderer, GPU process) share its group
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            (self.profile.parent / f"{self.profile.name}.log").unlink(missing_ok=True)
            self.profile = None

    def send(self, method: str, params: dict | None = None, timeout_s: float = 120.0) -> dict:
        """One CDP command; returns its result. Events that arrive meanwhile are kept only as console lines.
        Raises BrowserError for a protocol error or no answer within `timeout_s`."""
        if self._ws is None:
            raise BrowserError("chromium is not running: use HeadlessChromium as a context manager")
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            self._note(message)
        raise BrowserError(f"{method}: no answer from chromium in {timeout_s} s")

    def _note(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params['type']}: {text[:300]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description", details.get("text"))
            self.console.append(f"exception: {text}"[:400])

    def open(self, url: str) -> None:
        """Navigate the page to `url` (returns once the navigation is committed, not when the app is ready)."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited). Raises BrowserError
        when it throws."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 300.0, poll_s: float = 1.0) -> Any:
        """Evaluate `expression` every `poll_s` until it is truthy (a throw counts as not yet: the page may be
        loading); returns that value. Raises BrowserError after `timeout_s`, with the page's last console
        errors."""
        deadline = time.monotonic() + timeout_s
        error = ""
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError as exc:  # the page is between documents (no body yet): not reached yet
                value, error = None, str(exc)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"page did not reach `{expression[:120]}` in {timeout_s} s "
                                   f"({error or 'false'}); last console: {self.console[-3:]}")
            time.sleep(poll_s)

    def screenshot(self, path: Path) -> Path:
        """Save the page as a PNG at `path` (written atomically); returns `path`."""
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda stream: stream.write(data))
        return path
