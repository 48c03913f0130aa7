"""Badge tap -> lock pin high, over 200 taps on the simulated cabinet.

Two figures:
* end to end: the badge simulator presents the card on nfcpy's udp driver, the
  controller's nfcpy frontend reads it, the cabinet checks it and releases the lock;
* controller only: from the moment the badge reader hands the UID over (what
  BadgeReader does after nfcpy reports a tag) to the lock pin going high.

Run: python tests/bench/bench_badge_unlock.py [--taps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import summary_ms

from provisioning.demo import DEMO_USERS, Demo


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.0005)


def cycle(demo: Demo, lock_pin, start_tap) -> float:
    """One tap (started by ``start_tap``) -> lock high; then open and close to go idle."""
    board = demo.app.board
    t0 = time.monotonic()
    start_tap()
    wait(lambda: lock_pin.state, 5, "the lock to release")
    latency = time.monotonic() - t0
    wait(lambda: board.snapshot().get("state") == "unlocked", 5, "unlocked state")
    demo.hw.set_door(True)
    wait(lambda: board.snapshot().get("state") == "open", 5, "door open")
    demo.hw.set_door(False)
    wait(
        lambda: board.snapshot().get("idle") and board.snapshot().get("door") == "closed",
        10,
        "idle again",
    )
    return latency


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--taps", type=int, default=200)
    args = ap.parse_args()
    demo = Demo(
        http="127.0.0.1:0",
        mqtt=None,
        data_dir=tempfile.mkdtemp(),
        time_scale=0.0,
        nfc_holdoff_s=0.2,
    )
    demo.start()
    demo.wait_idle(30)
    lock_pin = demo.hw.factory.pin(demo.config.gpio.lock_pin)
    badges = [u.badge for u in DEMO_USERS if u.enabled]
    try:
        e2e = [
            cycle(demo, lock_pin, lambda i=i: demo.hw.present_badge(badges[i % len(badges)]))
            for i in range(args.taps)
        ]
        ctl = [
            cycle(demo, lock_pin, lambda i=i: demo.app.cabinet.badge(badges[i % len(badges)]))
            for i in range(args.taps)
        ]
    finally:
        demo.stop()
    print(summary_ms("tap -> lock high, end to end (nfcpy udp)", e2e))
    print(summary_ms("tap -> lock high, controller only      ", ctl))


if __name__ == "__main__":
    main()
