"""Open a page in headless Chromium and report what a user would see, over the DevTools protocol.

Chromium is driven through `--remote-debugging-pipe` (commands on fd 3, events on fd 4,
JSON messages ended by a NUL byte): no port, no websocket package, no network. The page
is loaded, then we collect console errors, uncaught exceptions, log errors (e.g. a
resource that failed to load), every network request that is not a file:// or data: URL,
the images that did not decode, and a PNG screenshot.
"""

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    console_errors: List[str] = field(default_factory=list)
    requests: List[str] = field(default_factory=list)  # every URL the page asked for
    images: List[dict] = field(default_factory=list)  # {"alt", "ok", "width"}
    screenshot: bytes = b""


class Chromium:
    def __init__(self, binary: str, width: int = 1280, height: int = 1600):
        self.profile = tempfile.mkdtemp(prefix="ldm-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--mute-audio", f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        # The protocol's fixed descriptors, 3 (commands in) and 4 (replies out): a small Python trampoline moves
        # our pipe ends there and execs the browser (no preexec_fn, unsafe in a process with threads). The ends
        # are first copied to 10 and above, so that neither is itself 3 or 4 when moved.
        r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        trampoline = f"import os, sys; os.dup2({r}, 3); os.dup2({w}, 4); os.close({r}); os.close({w}); os.execv(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, *args], pass_fds=(r, w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (r, w, to_browser_r, from_browser_w):
            os.close(fd)
        self.width, self.height = width, height
        self.next_id = 0
        self.messages: "queue.Queue[dict]" = queue.Queue()
        self.events: List[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                self.messages.put({"closed": True})
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self.messages.put(json.loads(message))

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if reply.get("closed"):
                raise RuntimeError(f"Chromium closed the pipe during {method}")
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event.get("closed"):
                raise RuntimeError(f"Chromium closed the pipe while waiting for {method}")
            self.events.append(event)
            if event.get("method") == method:
                return event

    def check_page(self, url: str) -> PageCheck:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired")
        images = self.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth})))",
            "returnByValue": True}, session=session)["result"]["value"]
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        check = PageCheck(images=json.loads(images), screenshot=base64.b64decode(shot))
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                check.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                check.console_errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                check.console_errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                check.requests.append(params["request"]["url"])
        return check

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


def check_in_chromium(binary: str, page: Path) -> PageCheck:
    browser = Chromium(binary)
    try:
        return browser.check_page(page.resolve().as_uri())
    finally:
        browser.close()
