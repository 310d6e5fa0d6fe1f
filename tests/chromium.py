"""Headless Chromium driven over the DevTools protocol on a pipe, with the standard library.

``load(url)`` opens a page in a fresh, offline browser and returns what a test needs: the
JavaScript errors (uncaught exceptions, ``console.error``, failed resource loads), every URL
the page requested, the value of a JavaScript expression, and a PNG screenshot.
``--remote-debugging-pipe`` makes Chromium read commands from fd 3 and write replies to
fd 4, as NUL-terminated JSON, so no port, websocket library or driver is needed.

Also: ``png_pixels`` decodes a PNG (8-bit, non-interlaced) with ``zlib`` + ``struct``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--allow-file-access-from-files",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: nothing can be fetched
    "--remote-debugging-pipe",
]


def find() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class PageLoad:
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    value: object = None
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self.buffer += chunk


def load(
    url: str, expression: str = "null", width: int = 1200, height: int = 900, settle: float = 0.5
) -> PageLoad:
    """Open ``url`` in a fresh headless Chromium, wait for its load event (and ``settle``
    seconds for scripts to draw), evaluate ``expression``, take a screenshot."""
    exe = find()
    assert exe, "no Chromium on PATH"
    profile = tempfile.mkdtemp(prefix="resid-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds():  # Chromium reads fd 3 and writes fd 4 (via high numbers: no clobbering)
        os.dup2(to_chrome_r, 100)
        os.dup2(from_chrome_w, 101)
        os.dup2(100, 3)
        os.dup2(101, 4)

    proc = subprocess.Popen(
        [
            exe,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(3, 4),  # kept open past the preexec_fn's dup2s
        preexec_fn=child_fds,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    try:
        target = pipe.send("Target.createTarget", url="about:blank")["targetId"]
        session = pipe.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        pipe.events.clear()
        pipe.send("Page.navigate", session, url=url)
        pipe.wait(lambda m: m.get("method") == "Page.loadEventFired", timeout=30)
        time.sleep(settle)
        result = pipe.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
        shot = pipe.send("Page.captureScreenshot", session, format="png", optimizeForSpeed=True)
        load = PageLoad(value=result.get("result", {}).get("value"))
        load.screenshot = base64.b64decode(shot["data"])
        pipe.send("Runtime.evaluate", session, expression="0")  # drain late events
        for event in pipe.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                load.errors.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                load.errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                load.errors.append(f"{params['entry']['text']} ({params['entry'].get('url')})")
            elif method == "Network.loadingFailed":
                load.errors.append(f"failed to load: {params.get('errorText')}")
            elif method == "Network.requestWillBeSent":
                load.requests.append(params["request"]["url"])
        return load
    finally:
        try:
            pipe.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)


def png_pixels(data: bytes) -> np.ndarray:
    """``[height, width, channels]`` uint8 from an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0, f"unsupported PNG: depth {depth}, interlace {interlace}"
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            row = line.reshape(width, channels).cumsum(0).reshape(stride) % 256
        elif kind == 2:  # Up
            row = (line + prev) % 256
        else:  # Average, Paeth: one pixel at a time, all channels together
            row = np.zeros(stride, dtype=np.int32)
            zero = np.zeros(channels, dtype=np.int32)
            for x in range(0, stride, channels):
                cur, here = line[x : x + channels], slice(x, x + channels)
                a = row[x - channels : x] if x else zero
                b, c = prev[here], prev[x - channels : x] if x else zero
                if kind == 3:
                    row[here] = (cur + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
                    row[here] = (cur + pred) % 256
        out[y] = row
        prev = row
    return out.reshape(height, width, channels).astype(np.uint8)
