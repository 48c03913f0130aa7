"""The cabinet state machine.

One thread owns all cabinet state. Hardware threads (badge reader, door sensor)
and the web page only :meth:`Cabinet.post` messages to its queue; the thread
turns them into effects (lock, indicator, inventory) and into events that are
committed to the store together with the state change that caused them.

States::

    idle ──valid badge──▶ unlocked ──door opens──▶ open ──door closes──▶ scanning ──▶ idle
     │  ╲                    │ unlock time passes                          ▲
     │   ╲bad badge: denied  ▼                                             │
     │                      idle                                           │
     └──door opens without a badge: forced_entry alarm ──▶ open ───────────┘

Door open longer than ``door_ajar_s`` raises a ``door_ajar`` alarm (state stays open).
A scan that is incomplete (reader error, antenna fault) never reports a take:
only returns, which a sighting proves, are recorded, plus a ``reader_fault``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.config import Config
from controller.inventory import Inventory, Scan, diff
from controller.store import Store, normalise_uid, utcnow
from firmware import CabinetIO

log = logging.getLogger(__name__)

IDLE, UNLOCKED, OPEN, SCANNING = "idle", "unlocked", "open", "scanning"


@dataclass(frozen=True)
class BadgeTapped:
    uid: str


@dataclass(frozen=True)
class DoorChanged:
    is_open: bool


@dataclass(frozen=True)
class Stop:
    pass


class StatusBoard:
    """A thread-safe snapshot of the cabinet for the web page, MQTT status and tests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._data: dict[str, Any] = {}
        self.version = 0

    def update(self, **fields: Any) -> None:
        with self._cond:
            self._data.update(fields)
            self.version += 1
            self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._data)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._data), timeout)


class Cabinet:
    """Owns the cabinet's state; run it with :meth:`start` and feed it with :meth:`post`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        io: CabinetIO,
        inventory: Inventory,
        *,
        board: StatusBoard | None = None,
        on_events: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store
        self.io = io
        self.inventory = inventory
        self.board = board or StatusBoard()
        self.on_events = on_events  # told after every commit that added events
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._deadlines: dict[str, float] = {}
        self.state = IDLE
        self.session: dict[str, Any] | None = None  # {id, kind, user}
        self.alarm: str | None = None

    # -- outside world ------------------------------------------------------------

    def post(self, message: object) -> None:
        """Hand a message to the cabinet thread (safe from any thread)."""
        self._queue.put(message)

    def badge(self, uid: str) -> None:
        self.post(BadgeTapped(uid))

    def door(self, is_open: bool) -> None:
        self.post(DoorChanged(is_open))

    def start(self) -> None:
        """Take a baseline inventory, wire the door, and start the cabinet thread."""
        self.io.door.on_change = self.door
        self._publish()
        self._thread = threading.Thread(target=self._run, name="cabinet", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.post(Stop())
        if self._thread:
            self._thread.join(timeout)
        self.io.lock.secure()

    # -- the cabinet thread -------------------------------------------------------

    def _run(self) -> None:
        self._baseline()
        if self.io.door.is_open:
            # Started with the door open and nobody badged in: treat as forced.
            self._on_door(True)
        self._publish()
        while True:
            timeout = None
            if self._deadlines:
                timeout = max(0.0, min(self._deadlines.values()) - time.monotonic())
            try:
                message = self._queue.get(timeout=timeout)
            except queue.Empty:
                message = None
            try:
                if isinstance(message, Stop):
                    return
                if isinstance(message, BadgeTapped):
                    self._on_badge(message.uid)
                elif isinstance(message, DoorChanged):
                    self._on_door(message.is_open)
                self._fire_timers()
            except Exception:
                # A bug must not stop the cabinet: log it, secure the lock, carry on.
                log.exception("cabinet: error handling %r", message)
                self.io.lock.secure()
            self._publish()

    def _fire_timers(self) -> None:
        now = time.monotonic()
        for name, at in list(self._deadlines.items()):
            if at <= now:
                del self._deadlines[name]
                getattr(self, f"_on_{name}")()

    def _commit(self, events: Callable[[Store], None]) -> None:
        with self.store.write():
            events(self.store)
        self.on_events()

    # -- transitions --------------------------------------------------------------

    def _on_badge(self, raw_uid: str) -> None:
        try:
            uid = normalise_uid(raw_uid)
        except ValueError as exc:
            log.warning("ignoring malformed badge UID %r: %s", raw_uid, exc)
            return
        if self.state != IDLE:
            log.info("badge %s ignored: cabinet is %s", uid, self.state)
            return
        check = self.store.check_badge(uid)
        if not check.granted:
            self.io.indicator.denied()
            self._commit(
                lambda s: s.append_event(
                    "access_denied",
                    user=s.user(check.user_id) if check.user_id else None,
                    data={"badge": uid, "reason": check.reason},
                )
            )
            self.board.update(last_denied={"badge": uid, "reason": check.reason, "ts": utcnow()})
            return
        user = self.store.user(check.user_id)  # type: ignore[arg-type]
        # Release first: seconds matter at the door, and the commit is fast anyway.
        self.io.lock.release(self.config.cabinet.unlock_s)
        self.io.indicator.granted()

        def record(s: Store) -> None:
            sid = s.open_session("badge", check.user_id, uid)
            self.session = {"id": sid, "kind": "badge", "user": user}
            s.append_event("access_granted", session_id=sid, user=user, data={"badge": uid})

        self._commit(record)
        self.state = UNLOCKED
        self._deadlines["unlock_expired"] = time.monotonic() + self.config.cabinet.unlock_s

    def _on_unlock_expired(self) -> None:
        if self.state != UNLOCKED or self.session is None:
            return
        self.io.lock.secure()
        session = self.session

        def record(s: Store) -> None:
            s.mark_session(session["id"], ended_at=utcnow(), outcome="not_opened")
            s.append_event("access_expired", session_id=session["id"], user=session["user"])

        self._commit(record)
        self.session = None
        self.state = IDLE

    def _on_door(self, is_open: bool) -> None:
        if is_open:
            self._door_opened()
        else:
            self._door_closed()

    def _door_opened(self) -> None:
        if self.state == OPEN:
            return
        # An electric strike latches mechanically: secure it now so the door
        # locks as soon as it shuts, and the relay is energised as briefly as possible.
        self.io.lock.secure()
        self._deadlines.pop("unlock_expired", None)
        self._deadlines["door_ajar"] = time.monotonic() + self.config.cabinet.door_ajar_s
        if self.state == UNLOCKED and self.session:
            session = self.session

            def record(s: Store) -> None:
                s.mark_session(session["id"], opened_at=utcnow())
                s.append_event("door_opened", session_id=session["id"], user=session["user"])

            self._commit(record)
        else:
            # Opened without a valid badge (or while scanning): forced entry.
            self.io.indicator.alarm(True)
            self.alarm = "forced_entry"

            def record_forced(s: Store) -> None:
                sid = s.open_session("forced", None, None)
                s.mark_session(sid, opened_at=utcnow())
                self.session = {"id": sid, "kind": "forced", "user": None}
                s.append_event("forced_entry", session_id=sid, data={"state": self.state})

            self._commit(record_forced)
        self.state = OPEN

    def _on_door_ajar(self) -> None:
        if self.state != OPEN:
            return
        self.io.indicator.alarm(True)
        self.alarm = self.alarm or "door_ajar"
        session = self.session or {}
        self._commit(
            lambda s: s.append_event(
                "door_ajar",
                session_id=session.get("id"),
                user=session.get("user"),
                data={"open_for_s": self.config.cabinet.door_ajar_s},
            )
        )

    def _door_closed(self) -> None:
        if self.state != OPEN:
            return
        self.io.lock.secure()
        self._deadlines.pop("door_ajar", None)
        self.state = SCANNING
        self.io.indicator.busy(True)
        self._publish()
        scan = self.inventory.scan()
        self.io.indicator.busy(False)
        self.io.indicator.alarm(False)
        self.alarm = None
        session = self.session or {"id": None, "user": None, "kind": "forced"}
        self._commit(lambda s: self._record_scan(s, scan, session))
        self.board.update(
            last_scan={
                "scan_id": scan.scan_id,
                "ts": utcnow(),
                "tags": len(scan.tags),
                "complete": scan.complete,
                "faults": scan.faults,
                "duration_s": round(scan.duration_s, 3),
            }
        )
        self.session = None
        self.state = IDLE

    def _record_scan(self, s: Store, scan: Scan, session: dict[str, Any]) -> None:
        """Diff the scan against the committed presence and record every change."""
        sid, user = session["id"], session["user"]
        if sid:
            s.mark_session(sid, closed_at=utcnow())
            s.append_event("door_closed", session_id=sid, user=user)
        before = s.present_epcs()
        change = diff(before, set(scan.tags))
        removed = change.removed
        if not scan.complete:
            # Absence is only evidence when every antenna was read: never blame
            # a person on a partial scan. Returns are still proven by sightings.
            s.append_event(
                "reader_fault",
                session_id=sid,
                data={
                    "scan_id": scan.scan_id,
                    "faults": scan.faults,
                    "withheld_removals": len(removed),
                },
            )
            removed = frozenset()
        for epc in sorted(removed):
            unit = s.unit_by_epc(epc)
            s.set_absent(epc)
            if unit is None:
                continue  # an unregistered tag left; nothing is owed for it
            s.open_custody(unit["id"], user["id"] if user else None, sid or scan.scan_id)
            s.append_event(
                "unit_taken",
                session_id=sid,
                user=user,
                unit=unit,
                data={"scan_id": scan.scan_id, "attributed": user is not None},
            )
        for epc in sorted(change.added):
            unit = s.unit_by_epc(epc)
            tag = scan.tags[epc]
            s.set_present(epc, unit["id"] if unit else None, tag.antennas, tag.rssi)
            if unit is None:
                s.append_event(
                    "unknown_tag", session_id=sid, user=user, epc=epc, data=scan.evidence(epc)
                )
                continue
            held = s.close_custody(unit["id"], sid or scan.scan_id)
            data = {**scan.evidence(epc), "attributed": user is not None}
            if held:
                data["held_by"] = held["user_id"]
                data["held_since"] = held["taken_at"]
            s.append_event("unit_returned", session_id=sid, user=user, unit=unit, data=data)
        for epc in set(scan.tags) - change.added:
            tag = scan.tags[epc]
            s.touch_present(epc, tag.antennas, tag.rssi)
        if sid:
            outcome = "completed" if scan.complete else "scan_incomplete"
            s.mark_session(sid, ended_at=utcnow(), outcome=outcome)

    def _baseline(self) -> None:
        """First start: take the cabinet's contents as the starting state."""
        self.state = SCANNING
        self._publish()
        scan = self.inventory.scan()
        self.state = IDLE
        if scan.failed:
            log.warning("baseline inventory failed: %s", scan.faults)
            return
        if self.store.present_epcs():
            # Not the first start: the committed state stands; the next close diffs against it.
            return

        def record(s: Store) -> None:
            for epc, tag in scan.tags.items():
                unit = s.unit_by_epc(epc)
                s.set_present(epc, unit["id"] if unit else None, tag.antennas, tag.rssi)
            s.append_event(
                "inventory_baseline",
                data={"scan_id": scan.scan_id, "tags": len(scan.tags), "complete": scan.complete},
            )

        self._commit(record)

    def _publish(self) -> None:
        session = self.session or {}
        user = session.get("user")
        self.board.update(
            state=self.state,
            door="open" if self.io.door.is_open else "closed",
            lock="released" if self.io.lock.released else "locked",
            reader=self.inventory.status,
            alarm=self.alarm,
            session_user=user["name"] if user else None,
            idle=self.state == IDLE and self._queue.empty(),
        )
