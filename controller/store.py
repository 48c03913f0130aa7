"""The cabinet's SQLite store (sqlite-utils): register, sessions, event log, presence,
custody and the MQTT outbox.

Rules the rest of the controller relies on:

* WAL with ``synchronous=FULL``: a committed take survives a power cut.
* Every state change and the events it causes are written inside one
  :meth:`Store.write` block (``BEGIN IMMEDIATE`` ... ``COMMIT``); an event row
  and its outbox row are inserted together by :meth:`Store.append_event`.
* ``events.seq`` is assigned inside that transaction as ``max(seq) + 1``, so it
  is gap-free and increasing per cabinet.
* Each thread opens its own :class:`Store` (one SQLite connection each).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils import Migrations

SCHEMA = Migrations("smartcab")

UNIT_STATUSES = ("available", "checked_out", "in_maintenance", "damaged", "lost", "retired")
CONDITIONS = ("new", "excellent", "good", "fair", "poor", "damaged")


def utcnow() -> str:
    """Now as ISO 8601 UTC with milliseconds, the format of every stored timestamp."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@SCHEMA()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE products (
            id INTEGER PRIMARY KEY,
            sku TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            tracking TEXT NOT NULL CHECK (tracking IN ('serialized', 'quantity')),
            category TEXT NOT NULL DEFAULT '',
            par_level INTEGER,
            created_at TEXT NOT NULL
        );
        CREATE TABLE units (
            id INTEGER PRIMARY KEY,
            serial TEXT NOT NULL UNIQUE,
            epc TEXT UNIQUE,
            product_id INTEGER NOT NULL REFERENCES products(id),
            quantity INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL DEFAULT 'available',
            condition TEXT NOT NULL DEFAULT 'good',
            notes TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        );
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            external_id TEXT UNIQUE,
            name TEXT NOT NULL,
            email TEXT NOT NULL DEFAULT '',
            enabled INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL
        );
        CREATE TABLE badges (
            uid TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            enabled INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL
        );
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('badge', 'forced', 'remote')),
            user_id INTEGER REFERENCES users(id),
            badge_uid TEXT,
            started_at TEXT NOT NULL,
            opened_at TEXT,
            closed_at TEXT,
            ended_at TEXT,
            outcome TEXT
        );
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            ts TEXT NOT NULL,
            session_id TEXT,
            user_id INTEGER,
            unit_id INTEGER,
            epc TEXT,
            payload TEXT NOT NULL
        );
        CREATE INDEX events_type ON events(type);
        CREATE INDEX events_unit ON events(unit_id);
        CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
        CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
        CREATE TABLE presence (
            epc TEXT PRIMARY KEY,
            unit_id INTEGER REFERENCES units(id),
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            antennas TEXT NOT NULL DEFAULT '[]',
            rssi INTEGER
        );
        CREATE TABLE custody (
            id INTEGER PRIMARY KEY,
            unit_id INTEGER NOT NULL REFERENCES units(id),
            user_id INTEGER REFERENCES users(id),
            session_id TEXT NOT NULL,
            taken_at TEXT NOT NULL,
            returned_at TEXT,
            return_session_id TEXT
        );
        CREATE UNIQUE INDEX custody_open ON custody(unit_id) WHERE returned_at IS NULL;
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload TEXT NOT NULL
        );
        CREATE TABLE admins (
            username TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL
        );
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """
    )


@SCHEMA()
def m002_presence_evidence(db: sqlite_utils.Database) -> None:
    # Per-antenna read history (passes seen / passes run) for the miss-probability
    # estimate, and the uncertainty flag of a unit the cabinet could not settle.
    db.executescript(
        """
        ALTER TABLE presence ADD COLUMN history TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE presence ADD COLUMN uncertain_since TEXT;
        ALTER TABLE presence ADD COLUMN uncertain_session TEXT;
        ALTER TABLE presence ADD COLUMN uncertain_user INTEGER;
        """
    )


@dataclass(frozen=True)
class BadgeCheck:
    """Result of looking a badge up in the local register (no network needed)."""

    uid: str
    user_id: int | None
    user_name: str | None
    reason: str | None  # None when granted; else "unknown badge", "badge disabled", ...

    @property
    def granted(self) -> bool:
        return self.reason is None


class Store:
    """One connection to the cabinet database."""

    def __init__(self, path: str | Path, *, site: str = "site", cabinet: str = "cabinet-1") -> None:
        self.path = Path(path)
        self.site = site
        self.cabinet = cabinet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False only because waitress may hand a request to another
        # worker thread; each Store is still used by one thread at a time.
        conn = sqlite3.connect(str(self.path), timeout=10.0, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        with self.db.ensure_autocommit_on():
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA journal_size_limit=4194304")

    def migrate(self) -> None:
        """Bring the schema up to date (idempotent)."""
        SCHEMA.apply(self.db)

    def close(self) -> None:
        self.db.close()

    # -- transactions -------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Store]:
        """One write transaction; everything inside commits together or not at all."""
        conn = self.db.conn
        # IMMEDIATE takes the write lock up front, so a second writer waits on the
        # busy timeout instead of failing mid-transaction on lock upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _q(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query(sql, params)]

    def _one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        rows = self._q(sql, params)
        return rows[0] if rows else None

    # -- register -----------------------------------------------------------------

    def add_product(
        self,
        sku: str,
        name: str,
        tracking: str = "serialized",
        *,
        category: str = "",
        par_level: int | None = None,
    ) -> int:
        """Add a product; ``tracking`` is 'serialized' or 'quantity'."""
        if tracking not in ("serialized", "quantity"):
            raise ValueError(f"tracking must be 'serialized' or 'quantity', got {tracking!r}")
        return (
            self.db["products"]
            .insert(
                {
                    "sku": sku,
                    "name": name,
                    "tracking": tracking,
                    "category": category,
                    "par_level": par_level,
                    "created_at": utcnow(),
                }
            )
            .last_pk
        )

    def add_unit(
        self,
        serial: str,
        product_id: int,
        epc: str | None = None,
        *,
        quantity: int = 1,
        condition: str = "good",
    ) -> int:
        """Add a unit; a duplicate serial or EPC is a ValueError naming it."""
        epc = normalise_epc(epc) if epc else None
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
        if self._one("SELECT 1 FROM units WHERE serial = ?", [serial]):
            raise ValueError(f"serial {serial!r} is already registered")
        if epc and self._one("SELECT 1 FROM units WHERE epc = ?", [epc]):
            raise ValueError(f"EPC {epc} is already bound to another unit")
        return (
            self.db["units"]
            .insert(
                {
                    "serial": serial,
                    "epc": epc,
                    "product_id": product_id,
                    "quantity": quantity,
                    "status": "available",
                    "condition": condition,
                    "created_at": utcnow(),
                }
            )
            .last_pk
        )

    def add_user(self, name: str, email: str = "", *, enabled: bool = True) -> int:
        return (
            self.db["users"]
            .insert({"name": name, "email": email, "enabled": int(enabled), "created_at": utcnow()})
            .last_pk
        )

    def add_badge(self, uid: str, user_id: int, *, enabled: bool = True) -> None:
        uid = normalise_uid(uid)
        if self._one("SELECT 1 FROM badges WHERE uid = ?", [uid]):
            raise ValueError(f"badge {uid} is already enrolled")
        self.db["badges"].insert(
            {"uid": uid, "user_id": user_id, "enabled": int(enabled), "created_at": utcnow()}
        )

    def set_user_enabled(self, user_id: int, enabled: bool) -> None:
        self.db.execute("UPDATE users SET enabled = ? WHERE id = ?", [int(enabled), user_id])
        self.db.conn.commit()

    def check_badge(self, uid: str) -> BadgeCheck:
        """Look a badge up locally: who it belongs to and whether it may open the cabinet."""
        row = self._one(
            "SELECT b.uid, b.enabled AS badge_enabled, u.id, u.name, u.enabled AS user_enabled "
            "FROM badges b JOIN users u ON u.id = b.user_id WHERE b.uid = ?",
            [uid],
        )
        if row is None:
            return BadgeCheck(uid, None, None, "unknown badge")
        if not row["badge_enabled"]:
            return BadgeCheck(uid, row["id"], row["name"], "badge disabled")
        if not row["user_enabled"]:
            return BadgeCheck(uid, row["id"], row["name"], "user disabled")
        return BadgeCheck(uid, row["id"], row["name"], None)

    def unit_by_epc(self, epc: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT u.*, p.name AS product, p.sku, p.tracking FROM units u "
            "JOIN products p ON p.id = u.product_id WHERE u.epc = ?",
            [epc],
        )

    def user(self, user_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM users WHERE id = ?", [user_id])

    # -- presence and custody ----------------------------------------------------

    def present_epcs(self) -> set[str]:
        """EPCs the last committed inventory found inside the cabinet."""
        return {r["epc"] for r in self._q("SELECT epc FROM presence")}

    def presence(self) -> dict[str, dict[str, Any]]:
        """Every tag inside, with its read history decoded (``{antenna: (seen, passes)}``)."""
        rows = self._q("SELECT * FROM presence")
        for r in rows:
            r["history"] = {int(a): (s, t) for a, (s, t) in json.loads(r["history"]).items()}
        return {r["epc"]: r for r in rows}

    def set_present(
        self,
        epc: str,
        unit_id: int | None,
        antennas: list[int],
        rssi: int,
        history: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        """Record a tag as inside (new, or seen again), clearing any uncertainty."""
        now = utcnow()
        self.db.execute(
            """
            INSERT INTO presence (epc, unit_id, first_seen, last_seen, antennas, rssi, history)
            VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(epc) DO UPDATE SET
            last_seen = excluded.last_seen, antennas = excluded.antennas,
            rssi = excluded.rssi, unit_id = excluded.unit_id, history = excluded.history,
            uncertain_since = NULL, uncertain_session = NULL, uncertain_user = NULL
            """,
            [
                epc,
                unit_id,
                now,
                now,
                json.dumps(antennas),
                rssi,
                json.dumps({str(a): list(v) for a, v in (history or {}).items()}),
            ],
        )

    def mark_uncertain(self, epc: str, session_id: str | None, user_id: int | None) -> None:
        """The scan could not tell whether this tag left; keep it inside, flagged."""
        self.db.execute(
            "UPDATE presence SET uncertain_since = ?, uncertain_session = ?, uncertain_user = ? "
            "WHERE epc = ? AND uncertain_since IS NULL",
            [utcnow(), session_id, user_id, epc],
        )

    def sessions_opened_since(self, ts: str) -> int:
        """How many times the door was opened after ``ts``."""
        row = self._one("SELECT count(*) AS n FROM sessions WHERE opened_at > ?", [ts])
        return row["n"] if row else 0

    def set_absent(self, epc: str) -> None:
        self.db.execute("DELETE FROM presence WHERE epc = ?", [epc])

    def open_custody(self, unit_id: int, user_id: int | None, session_id: str) -> None:
        self.db.execute(
            "INSERT INTO custody (unit_id, user_id, session_id, taken_at) VALUES (?, ?, ?, ?)",
            [unit_id, user_id, session_id, utcnow()],
        )
        self.db.execute("UPDATE units SET status = 'checked_out' WHERE id = ?", [unit_id])

    def close_custody(self, unit_id: int, session_id: str) -> dict[str, Any] | None:
        """Close the open custody of a unit; returns it (None if nobody held it)."""
        row = self._one(
            "SELECT * FROM custody WHERE unit_id = ? AND returned_at IS NULL", [unit_id]
        )
        if row:
            self.db.execute(
                "UPDATE custody SET returned_at = ?, return_session_id = ? WHERE id = ?",
                [utcnow(), session_id, row["id"]],
            )
        self.db.execute(
            "UPDATE units SET status = 'available' WHERE id = ? AND status = 'checked_out'",
            [unit_id],
        )
        return row

    # -- sessions -----------------------------------------------------------------

    def open_session(self, kind: str, user_id: int | None, badge_uid: str | None) -> str:
        sid = str(uuid.uuid4())
        self.db["sessions"].insert(
            {
                "id": sid,
                "kind": kind,
                "user_id": user_id,
                "badge_uid": badge_uid,
                "started_at": utcnow(),
            }
        )
        return sid

    def mark_session(self, session_id: str, **fields: str | None) -> None:
        allowed = {"opened_at", "closed_at", "ended_at", "outcome"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown session fields: {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE sessions SET {sets} WHERE id = ?", [*fields.values(), session_id])

    # -- events and outbox --------------------------------------------------------

    def append_event(
        self,
        type: str,
        *,
        session_id: str | None = None,
        user: dict[str, Any] | None = None,
        unit: dict[str, Any] | None = None,
        epc: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append an event and its outbox row; call inside :meth:`write`.

        ``user`` is a users row (or None when unattributed), ``unit`` a row from
        :meth:`unit_by_epc`. Returns the payload that goes to MQTT.
        """
        if not self.db.conn.in_transaction:
            raise RuntimeError("append_event must run inside Store.write()")
        seq = (self._one("SELECT max(seq) AS m FROM events") or {}).get("m") or 0
        seq += 1
        payload: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "seq": seq,
            "type": type,
            "ts": utcnow(),
            "site": self.site,
            "cabinet": self.cabinet,
            "session_id": session_id,
        }
        if user is not None:
            payload["user"] = {"id": user["id"], "name": user["name"]}
        if unit is not None:
            payload["unit"] = {
                "serial": unit["serial"],
                "epc": unit["epc"],
                "product": unit["product"],
            }
        if epc is not None and unit is None:
            payload["epc"] = epc
        if data:
            payload["data"] = data
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        self.db.execute(
            """
            INSERT INTO events (seq, event_id, type, ts, session_id, user_id, unit_id, epc,
                                payload)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            [
                seq,
                payload["event_id"],
                type,
                payload["ts"],
                session_id,
                user["id"] if user else None,
                unit["id"] if unit else None,
                unit["epc"] if unit else epc,
                text,
            ],
        )
        self.db.execute(
            "INSERT INTO outbox (seq, topic, payload) VALUES (?, ?, ?)",
            [seq, f"smartcab/{self.site}/{self.cabinet}/events", text],
        )
        return payload

    def outbox_batch(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Undelivered events after ``after_seq``, oldest first."""
        return self._q(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            [after_seq, limit],
        )

    def outbox_ack(self, seqs: list[int]) -> None:
        """The broker acknowledged these; they may leave the outbox now."""
        if not seqs:
            return
        with self.write():
            self.db.conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def outbox_depth(self) -> int:
        return self._one("SELECT count(*) AS n FROM outbox")["n"]  # type: ignore[index]

    # -- views for the admin page ------------------------------------------------

    def recent_events(self, limit: int = 50, *, type: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE type = ?", [type]) if type else ("", [])
        rows = self._q(
            f"SELECT payload FROM events {where} ORDER BY seq DESC LIMIT ?", [*params, limit]
        )
        return [json.loads(r["payload"]) for r in rows]

    def units_overview(self) -> list[dict[str, Any]]:
        """Every unit with its product, whether it is inside, and who holds it."""
        return self._q(
            """
            SELECT u.id, u.serial, u.epc, u.status, u.condition, u.quantity,
                   p.name AS product, p.tracking,
                   (pr.epc IS NOT NULL) AS inside,
                   c.taken_at AS held_since, c.user_id AS holder_id, us.name AS holder
            FROM units u
            JOIN products p ON p.id = u.product_id
            LEFT JOIN presence pr ON pr.epc = u.epc
            LEFT JOIN custody c ON c.unit_id = u.id AND c.returned_at IS NULL
            LEFT JOIN users us ON us.id = c.user_id
            ORDER BY u.serial
            """
        )

    def users_overview(self) -> list[dict[str, Any]]:
        return self._q(
            """
            SELECT u.id, u.name, u.email, u.enabled,
                   group_concat(b.uid, ' ') AS badges,
                   (SELECT count(*) FROM custody c
                     WHERE c.user_id = u.id AND c.returned_at IS NULL) AS holding
            FROM users u LEFT JOIN badges b ON b.user_id = u.id
            GROUP BY u.id ORDER BY u.name
            """
        )

    def unknown_present(self) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM presence WHERE unit_id IS NULL ORDER BY first_seen")

    # -- admin accounts ------------------------------------------------------------

    def set_admin(self, username: str, password_hash: str) -> None:
        self.db["admins"].upsert(
            {"username": username, "password_hash": password_hash}, pk="username"
        )

    def admin_hash(self, username: str) -> str | None:
        row = self._one("SELECT password_hash FROM admins WHERE username = ?", [username])
        return row["password_hash"] if row else None

    def has_admin(self) -> bool:
        return bool(self._one("SELECT 1 FROM admins"))

    def setting(self, key: str) -> str | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", [key])
        return row["value"] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.db["settings"].upsert({"key": key, "value": value}, pk="key")


def normalise_uid(uid: str) -> str:
    """Badge UIDs are stored as upper-case hex without separators."""
    text = uid.replace(":", "").replace(" ", "").upper()
    if not text or len(text) % 2 or any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"badge UID must be hex bytes, got {uid!r}")
    if len(text) // 2 not in (4, 7, 10):
        raise ValueError(f"badge UID must be 4, 7 or 10 bytes, got {len(text) // 2}")
    return text


def normalise_epc(epc: str) -> str:
    """EPCs are stored as upper-case hex; whole 16-bit words as Gen2 requires."""
    text = epc.replace(":", "").replace(" ", "").replace("-", "").upper()
    if not text or len(text) % 4 or any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"EPC must be hex in whole 16-bit words, got {epc!r}")
    return text
