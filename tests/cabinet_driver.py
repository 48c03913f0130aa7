"""Drive a simulated cabinet the way a technician would, through the demo's /sim endpoints."""

from __future__ import annotations

from typing import Any

from tests.conftest import wait_until


def epc_of(demo: Any, serial: str) -> str:
    store = demo.app.open_store()
    try:
        row = store.db.execute("SELECT epc FROM units WHERE serial = ?", [serial]).fetchone()
    finally:
        store.close()
    assert row, f"no unit {serial} in the demo register"
    return row[0]


def state(demo: Any) -> dict[str, Any]:
    return demo.app.board.snapshot()


def tap(demo: Any, uid: str) -> None:
    status, body = demo.http.post("/sim/badge", {"uid": uid})
    assert status == 200, body


def door(demo: Any, is_open: bool) -> None:
    status, body = demo.http.post("/sim/door", {"state": "open" if is_open else "closed"})
    assert status == 200, body


def move(demo: Any, remove: list[str] = (), add: list[str] = ()) -> None:  # type: ignore[assignment]
    status, body = demo.http.post(
        "/sim/tags",
        {"remove": [epc_of(demo, s) for s in remove], "add": [epc_of(demo, s) for s in add]},
    )
    assert status == 200, body


def close_and_wait_scan(demo: Any) -> dict[str, Any]:
    """Close the door and wait until the cabinet has scanned and is idle again."""
    before = (state(demo).get("last_scan") or {}).get("scan_id")
    door(demo, False)
    return wait_until(
        lambda: (
            (s := state(demo)).get("state") == "idle"
            and (s.get("last_scan") or {}).get("scan_id") not in (None, before)
            and s["last_scan"]
        ),
        15,
        "the scan after the door closed",
    )


def session(demo: Any, uid: str, remove: list[str] = (), add: list[str] = ()) -> dict:  # type: ignore[assignment]
    """One badge transaction: tap, open, move tags, close; returns the scan summary."""
    tap(demo, uid)
    wait_until(lambda: state(demo).get("state") == "unlocked", 10, "the door to unlock")
    door(demo, True)
    wait_until(lambda: state(demo).get("state") == "open", 5, "the door to be seen open")
    move(demo, remove, add)
    return close_and_wait_scan(demo)
