"""A small Chrome DevTools Protocol client for driving Debian's headless `chromium` in tests
(Playwright's own browser download needs the network; this needs only `websockets`)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.prefect_processes import Processes, wait_until

# The flags of NOTES.md: no GPU, no sandbox (root in CI), nothing that phones home.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1400,1000",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One page of a headless chromium, driven over its DevTools websocket."""

    def __init__(self, group: Processes, profile_dir: Path, timeout: float = 30) -> None:
        from websockets.sync.client import connect

        profile_dir.mkdir(parents=True, exist_ok=True)
        argv = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0", "about:blank"]
        group.start("chromium", argv, env=None)
        port_file = profile_dir / "DevToolsActivePort"
        wait_until(lambda: port_file.is_file() and port_file.read_text().strip(), timeout, "chromium to start", group)
        port = int(port_file.read_text().splitlines()[0])
        page = wait_until(lambda: self._page_target(port), timeout, "chromium's first page", group)
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=timeout)
        self.ids = itertools.count(1)
        self.timeout = timeout
        self.call("Page.enable")
        self.call("Runtime.enable")

    @staticmethod
    def _page_target(port: int) -> dict[str, Any] | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                targets = json.load(response)
        except OSError:
            return None
        return next((target for target in targets if target.get("type") == "page"), None)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile are skipped)."""
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        wait_until(lambda: self.evaluate("document.readyState") == "complete", self.timeout, f"{url} to load")

    def wait_for(self, expression: str, what: str, timeout: float | None = None) -> Any:
        """Poll a JS expression until it is truthy (the page renders asynchronously)."""
        return wait_until(lambda: self.evaluate(expression), timeout or self.timeout, what, every=0.3)

    def click(self, element_expression: str, what: str, timeout: float | None = None) -> None:
        """Wait until the element (a JS expression) is on the page, then click it."""
        self.wait_for(f"(() => {{ const el = {element_expression}; if (!el) return false; el.click(); return true; }})()", what, timeout)

    def type_into(self, selector_expression: str, text: str) -> None:
        """Focus an input (a JS expression for the element), select its text, type `text` as a user would."""
        self.evaluate(f"(() => {{ const el = {selector_expression}; el.scrollIntoView(); el.focus(); el.select(); }})()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.socket.close()  # chromium's process group is killed right after


def launch(group: Processes, profile_dir: Path) -> Browser:
    if chromium_binary() is None:  # pragma: no cover - CI installs it (.ci/run)
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    return Browser(group, profile_dir)



