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
A unit is reported taken only when the inventory is confident it left (see
controller/inventory.py); otherwise it is ``unit_uncertain`` and looked for again.
A failed scan concludes nothing but a ``reader_fault``. Idle scans (scheduled while
closed and locked) report changes as anomalies, never as silent state changes.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.config import Config
from controller.erp import CommandRefused
from controller.inventory import Inventory, Scan
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
class IdleScan:
    """Scan now if the cabinet is closed, locked and idle (schedule, ERP request)."""


@dataclass(frozen=True)
class Command:
    """An ERP command for the cabinet thread; the result (or a CommandRefused) goes to ``reply``."""

    name: str  # remote_unlock, lockdown, scan_now
    args: dict[str, Any]
    reply: queue.Queue[object]


@dataclass(frozen=True)
class Stop:
    pass


class ErpCommands:
    """The cabinet side of ERP commands (``controller.erp.CabinetCommands``)."""

    def __init__(self, cabinet: Cabinet, status: Callable[[], dict[str, Any]]) -> None:
        self.cabinet = cabinet
        self._status = status

    def remote_unlock(self, user_id: int, requested_by: str, reason: str) -> dict:
        return self.cabinet.command(
            "remote_unlock", user_id=user_id, requested_by=requested_by, reason=reason
        )

    def lockdown(self, on: bool, requested_by: str, reason: str) -> dict:
        return self.cabinet.command("lockdown", on=on, requested_by=requested_by, reason=reason)

    def scan_now(self) -> dict:
        return self.cabinet.command("scan_now", timeout=120.0)

    def status(self) -> dict:
        return self._status()


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
        self.locked_down = False  # ERP lockdown: no badge opens the cabinet

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
                elif isinstance(message, IdleScan):
                    self._on_idle_scan()
                elif isinstance(message, Command):
                    self._on_command(message)
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
        if check.granted and self.locked_down:
            check = dataclasses.replace(check, reason="cabinet locked down")
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
        scan, presence = self._scan()
        self.io.indicator.busy(False)
        self.io.indicator.alarm(False)
        self.alarm = None
        session = self.session or {"id": None, "user": None, "kind": "forced"}
        self._commit(lambda s: self._record_scan(s, scan, presence, session))
        self._scan_summary(scan)
        self.session = None
        self.state = IDLE

    def _scan(self) -> tuple[Scan, dict[str, dict[str, Any]]]:
        """Inventory the cabinet against its committed presence."""
        presence = self.store.presence()
        scan = self.inventory.scan({epc: row["history"] for epc, row in presence.items()})
        return scan, presence

    def _record_scan(
        self,
        s: Store,
        scan: Scan,
        presence: dict[str, dict[str, Any]],
        session: dict[str, Any] | None,
    ) -> None:
        """Record every change a scan found; ``session`` is None for idle scans.

        After a door session, a unit that left is ``unit_taken`` by the session's
        user (unattributed after a forced entry). Between sessions (idle or start-up
        scans) a change is an anomaly: ``unit_missing`` / ``unit_appeared``.
        """
        sid = session["id"] if session else None
        user = session["user"] if session else None
        if sid:
            s.mark_session(sid, closed_at=utcnow())
            s.append_event("door_closed", session_id=sid, user=user)
        if not scan.complete:
            s.append_event(
                "reader_fault",
                session_id=sid,
                data={
                    "scan_id": scan.scan_id,
                    "faults": scan.faults
                    + [f"antenna {a}: {why}" for a, why in sorted(scan.degraded.items())],
                    "withheld_removals": len(scan.withheld),
                    "uncertain": len(scan.uncertain),
                },
            )
        for epc in sorted(scan.gone):
            row = presence[epc]
            unit = s.unit_by_epc(epc)
            s.set_absent(epc)
            if unit is None:
                continue  # an unregistered tag left; nothing is owed for it
            taker, data = self._who_took(s, row, session)
            s.open_custody(unit["id"], taker["id"] if taker else None, sid or scan.scan_id)
            s.append_event(
                "unit_taken" if session else "unit_missing",
                session_id=sid,
                user=taker,
                unit=unit,
                data={**scan.absence(epc), **data},
            )
        for epc in sorted(scan.uncertain):
            row = presence[epc]
            if row["uncertain_since"]:
                continue  # already flagged; the cabinet is still looking
            s.mark_uncertain(epc, sid, user["id"] if user else None)
            s.append_event(
                "unit_uncertain",
                session_id=sid,
                user=user,
                unit=s.unit_by_epc(epc),
                epc=epc,
                data={**scan.absence(epc), "reason": scan.uncertain[epc]},
            )
        for epc, tag in sorted(scan.tags.items()):
            row = presence.get(epc)
            unit = s.unit_by_epc(epc)
            history = scan.history_update(epc, row["history"] if row else {})
            s.set_present(epc, unit["id"] if unit else None, tag.antennas, tag.rssi, history)
            if row is not None:
                if row["uncertain_since"]:
                    s.append_event(
                        "unit_confirmed",
                        session_id=sid,
                        unit=unit,
                        epc=epc,
                        data={**scan.evidence(epc), "uncertain_since": row["uncertain_since"]},
                    )
                continue
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
            s.append_event(
                "unit_returned" if session else "unit_appeared",
                session_id=sid,
                user=user,
                unit=unit,
                data=data,
            )
        if sid:
            outcome = "completed" if scan.complete else "scan_incomplete"
            s.mark_session(sid, ended_at=utcnow(), outcome=outcome)

    @staticmethod
    def _who_took(
        s: Store, row: dict[str, Any], session: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The person a take is attributed to, or None with the candidates.

        A unit flagged uncertain in an earlier session and confirmed gone now
        could have left in that session or in any opened since; it is attributed
        only when a single person had the door open in that time.
        """
        user = session["user"] if session else None
        if not row["uncertain_since"]:
            return user, {"attributed": user is not None}
        candidates = {row["uncertain_user"]} if row["uncertain_user"] else set()
        if user:
            candidates.add(user["id"])
        others = s.sessions_opened_since(row["uncertain_since"]) - (1 if session else 0)
        data: dict[str, Any] = {
            "uncertain_since": row["uncertain_since"],
            "uncertain_session": row["uncertain_session"],
        }
        if (
            others == 0
            and len(candidates) == 1
            and (row["uncertain_session"] is not None or session is not None)
        ):
            (uid,) = candidates
            return s.user(uid), {**data, "attributed": True}
        return None, {**data, "attributed": False, "candidates": sorted(candidates)}

    def _on_idle_scan(self) -> None:
        """A scheduled scan while closed and locked: any change is an anomaly."""
        if self.state != IDLE or self.io.door.is_open:
            return
        self.state = SCANNING
        self._publish()
        scan, presence = self._scan()
        self._commit(lambda s: self._record_scan(s, scan, presence, None))
        self._scan_summary(scan)
        self.state = IDLE

    def _scan_summary(self, scan: Scan) -> None:
        self.board.update(
            last_scan={
                "scan_id": scan.scan_id,
                "ts": utcnow(),
                "tags": len(scan.tags),
                "complete": scan.complete,
                "faults": scan.faults,
                "degraded": {str(a): why for a, why in scan.degraded.items()},
                "rounds": scan.rounds,
                "reverify_rounds": scan.reverify_rounds,
                "gone": len(scan.gone),
                "uncertain": len(scan.uncertain),
                "duration_s": round(scan.duration_s, 3),
                "antenna_reads": dict(self.inventory.last_antenna_reads),
            }
        )

    def _baseline(self) -> None:
        """Start-up scan: the first one sets the starting state; later ones are anomalies."""
        self.state = SCANNING
        self._publish()
        scan, presence = self._scan()
        self.state = IDLE
        if scan.failed:
            log.warning("start-up inventory failed: %s", scan.faults)
            return
        if presence:
            # Changes made while the controller was down belong to nobody we know.
            self._commit(lambda s: self._record_scan(s, scan, presence, None))
            self._scan_summary(scan)
            return

        def record(s: Store) -> None:
            for epc, tag in scan.tags.items():
                unit = s.unit_by_epc(epc)
                s.set_present(
                    epc,
                    unit["id"] if unit else None,
                    tag.antennas,
                    tag.rssi,
                    scan.history_update(epc, {}),
                )
            s.append_event(
                "inventory_baseline",
                data={"scan_id": scan.scan_id, "tags": len(scan.tags), "complete": scan.complete},
            )

        self._commit(record)
        self._scan_summary(scan)

    # -- ERP commands (controller/erp.py validates and authorises them first) -----------

    def command(self, name: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """Run an ERP command on the cabinet thread and wait for its result.

        Raises CommandRefused (with an error code for the reply) or TimeoutError.
        """
        reply: queue.Queue[object] = queue.Queue(maxsize=1)
        self.post(Command(name, args, reply))
        try:
            result = reply.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the cabinet did not answer {name} within {timeout} s") from None
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[return-value]

    def _on_command(self, command: Command) -> None:
        try:
            result: object = getattr(self, f"_cmd_{command.name}")(**command.args)
        except CommandRefused as exc:
            result = exc
        except Exception as exc:  # logged here; the requester gets an "internal" error
            log.exception("ERP command %s failed", command.name)
            result = exc
        command.reply.put(result)

    def _cmd_remote_unlock(self, user_id: int, requested_by: str, reason: str) -> dict[str, Any]:
        if self.locked_down:
            raise CommandRefused("conflict", "the cabinet is locked down; release it first")
        if self.state != IDLE:
            raise CommandRefused("busy", f"the cabinet is {self.state}")
        user = self.store.user(user_id)
        if user is None:
            raise CommandRefused("not_found", f"no user {user_id}")
        if not user["enabled"]:
            raise CommandRefused("conflict", f"user {user_id} is disabled")
        self.io.lock.release(self.config.cabinet.unlock_s)
        self.io.indicator.granted()
        sid = ""

        def record(s: Store) -> None:
            nonlocal sid
            sid = s.open_session("remote", user_id, None)
            self.session = {"id": sid, "kind": "remote", "user": user}
            s.append_event(
                "remote_unlock",
                session_id=sid,
                user=user,
                data={"requested_by": requested_by, "reason": reason},
            )

        self._commit(record)
        self.state = UNLOCKED
        self._deadlines["unlock_expired"] = time.monotonic() + self.config.cabinet.unlock_s
        return {"session_id": sid, "unlock_s": self.config.cabinet.unlock_s}

    def _cmd_lockdown(self, on: bool, requested_by: str, reason: str) -> dict[str, Any]:
        self.locked_down = on
        self._commit(
            lambda s: s.append_event(
                "lockdown" if on else "release",
                data={"requested_by": requested_by, "reason": reason},
            )
        )
        return {"locked_down": on}

    def _cmd_scan_now(self) -> dict[str, Any]:
        if self.state != IDLE or self.io.door.is_open:
            raise CommandRefused("busy", f"the cabinet is {self.state}, door {self._door()}")
        self._commit(lambda s: s.append_event("scan_now"))
        self._on_idle_scan()
        return dict(self.board.snapshot().get("last_scan") or {})

    def _door(self) -> str:
        return "open" if self.io.door.is_open else "closed"

    def _publish(self) -> None:
        session = self.session or {}
        user = session.get("user")
        self.board.update(
            state=self.state,
            door=self._door(),
            locked_down=self.locked_down,
            lock="released" if self.io.lock.released else "locked",
            reader=self.inventory.status,
            alarm=self.alarm,
            session_user=user["name"] if user else None,
            idle=self.state == IDLE and self._queue.empty(),
        )
