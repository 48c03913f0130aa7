"""Resident memory of `smartcab demo` over 1,000 transactions.

Starts `smartcab demo` as its own process (reader simulator at --time-scale 0,
a real mosquitto on a free port), drives transactions through the /sim
endpoints exactly as the browser panel does (badge over nfcpy udp, door on the
mock pin, tags in the reader simulator), and samples VmRSS from /proc.

Run: python tests/bench/bench_memory.py [--transactions 1000]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT

from provisioning.demo import CARD_HOLD_S
from tests.conftest import Broker, free_port

HOLDOFF_S = 1.5  # the demo's badge hold-off


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def wait(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.call("/sim/state")
            if predicate(s):
                return s
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}: {s['cabinet_state']}")
            time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    broker = Broker(tmp)
    broker.start()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--http",
            f"127.0.0.1:{port}",
            "--mqtt",
            f"127.0.0.1:{broker.port}",
            "--data-dir",
            str(tmp / "demo"),
            "--time-scale",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "admin page" in line:
                break
        c = Client(f"http://127.0.0.1:{port}")
        state = c.wait(lambda s: s["idle"], 30, "baseline")
        badges = [b["uid"] for b in state["badges"] if b["enabled"]]
        tags = [t["epc"] for t in state["inside"]]
        print(f"after start: {rss_mb(proc.pid):.1f} MB", flush=True)
        started = time.monotonic()
        out: list[str] = []
        last_tap: dict[str, float] = {}
        retaps = 0
        for i in range(args.transactions):
            badge = badges[i % len(badges)]
            # The reader ignores the same badge within its hold-off (the demo's 1.5 s after
            # the card was last seen), as a person re-badging at once would be ignored.
            wait_s = last_tap.get(badge, 0) + HOLDOFF_S + CARD_HOLD_S - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)
            last_tap[badge] = time.monotonic()
            c.call("/sim/badge", {"uid": badge})
            try:
                c.wait(lambda s: s["cabinet_state"] == "unlocked", 5, "unlock")
            except SystemExit:
                # A tap the reader did not see (counted): tap again, as a person would.
                retaps += 1
                time.sleep(HOLDOFF_S)
                c.call("/sim/badge", {"uid": badge})
                c.wait(lambda s: s["cabinet_state"] == "unlocked", 10, "unlock after a re-tap")
            c.call("/sim/door", {"state": "open"})
            c.wait(lambda s: s["cabinet_state"] == "open", 10, "door open")
            take = tags[i % len(tags)]
            back = out.pop(0) if len(out) > 3 else None
            c.call("/sim/tags", {"remove": [take], "add": [back] if back else []})
            out.append(take)
            c.call("/sim/door", {"state": "closed"})
            c.wait(lambda s: s["idle"] and s["door"] == "closed", 10, "scan")
            if (i + 1) % 100 == 0:
                rate = (i + 1) / (time.monotonic() - started)
                print(
                    f"after {i + 1} transactions: {rss_mb(proc.pid):.1f} MB "
                    f"({rate:.1f} transactions/s)",
                    flush=True,
                )
        print(
            f"RESULT resident memory after {args.transactions} transactions: "
            f"{rss_mb(proc.pid):.1f} MB ({retaps} taps had to be repeated)"
        )
    finally:
        proc.terminate()
        proc.wait(10)
        broker.stop()


if __name__ == "__main__":
    main()
