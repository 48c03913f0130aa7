"""The cabinet's ERP request/response layer: validation, authorisation, the ops.

Transport-independent: the MQTT wiring hands :meth:`RequestHandler.handle` the op
(the last level of ``smartcab/<site>/<cabinet>/req/<op>``), the raw payload and the
reply address, and publishes the :class:`Reply` it returns (QoS 1, not retained,
``CorrelationData`` set when given).

Reply address
    MQTT 5: the request's ``ResponseTopic`` and ``CorrelationData`` properties; the
    reply carries the same ``CorrelationData``. MQTT 3.1.1: ``reply_to`` and
    ``correlation_id`` in the JSON body; the reply body echoes ``correlation_id``.
    A request with no usable reply address is logged and dropped (nothing runs).
    A reply topic must have no wildcards, must not start with ``$`` and must not be
    one of a cabinet's own channels (``smartcab/<site>/<cabinet>/{events,status,
    inventory,alarms,req}...``), so a request cannot make a cabinet publish there.

Validation
    Before anything else every request is checked: at most ``max_bytes``, UTF-8,
    one JSON object without duplicate keys, NaN or Infinity, a known op, then the
    op's JSON Schema (``controller/schemas/request-<op>.json``, Draft 2020-12). A bad
    request gets ``{"ok": false, "error": {"code": ...}}`` and changes nothing.

Authorisation of commands (read ops need none)
    The body carries ``"auth": {"ts": <int unix s>, "nonce": "<16-64 of
    [A-Za-z0-9_-]>", "client": "<id>", "hmac": "<64 hex>"}``.

    * ``hmac`` = hex(HMAC-SHA256(command_key, M)) where M is the UTF-8 request topic
      ``smartcab/<site>/<cabinet>/req/<op>``, one ``\\n`` byte, then the canonical JSON
      of the whole request body with ``auth.hmac`` removed: keys sorted at every
      level, separators ``,`` and ``:`` with no spaces, non-ASCII characters as
      UTF-8 (not ``\\u`` escapes). Integral numbers are written without a fraction
      (``5``, not ``5.0``); the request schemas allow no other numbers. The topic in
      M binds a signature to one cabinet and one op (a signed ``lockdown`` cannot
      be replayed as ``release`` or at another cabinet). Compared in constant time.
    * ``ts`` must be within ``max_skew_s`` of the cabinet's clock, which also stops
      a command queued for hours in a persistent session from running late.
    * ``(client, nonce)`` must not have been accepted in the last ``2 * max_skew_s``
      (any replay of an accepted request falls in that window, because its ``ts``
      must still be fresh). At most ``max_nonces`` are remembered; when full, new
      commands get ``busy`` rather than forgetting a nonce early.
    * ``allowed_clients`` non-empty: ``auth.client`` must be one of them, and the
      hmac is still required when ``command_key`` is set. Without a key the client
      id is only a claim: use it only where the broker's ACL lets just those
      identities publish on ``.../req/#``.
    * No key and no allowed clients: every command is refused.

    ``auth.client`` becomes ``requested_by`` in the events and cabinet calls.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

from controller.store import Store, normalise_epc, normalise_uid, utcnow

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMA_BASE = "https://smartcab.example/schemas/"

READ_OPS = ("ping", "get_status", "get_inventory", "get_events", "get_unit", "get_custody")
COMMAND_OPS = (
    "upsert_users",
    "upsert_products",
    "upsert_units",
    "disable_badge",
    "remote_unlock",
    "lockdown",
    "release",
    "scan_now",
)
OPS = READ_OPS + COMMAND_OPS
ERROR_CODES = (
    "bad_request",
    "unknown_op",
    "unauthorised",
    "too_large",
    "not_found",
    "conflict",
    "busy",
    "internal",
)
CABINET_CHANNELS = ("events", "status", "inventory", "alarms", "req")
UNIT_EVENTS_LIMIT = 20
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MESSAGE_MAX = 300  # an error message quotes the input; keep replies and logs small


# -- public data types ----------------------------------------------------------------


@dataclass
class RequestMeta:
    """The MQTT 5 reply address of a request (both None under MQTT 3.1.1)."""

    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass
class Reply:
    """What to publish in answer: QoS 1, not retained, with ``correlation_data``."""

    topic: str
    payload: bytes
    correlation_data: bytes | None = None


class CabinetCommands(Protocol):
    """What the cabinet thread does for ERP commands; each returns a JSON-able dict.

    A method may raise :class:`CommandRefused` (e.g. ``busy`` while a door
    session runs) or ``TimeoutError`` (answered as ``busy``).
    """

    def remote_unlock(self, user_id: int, requested_by: str, reason: str) -> dict: ...

    def lockdown(self, on: bool, requested_by: str, reason: str) -> dict: ...

    def scan_now(self) -> dict: ...

    def status(self) -> dict: ...


class CommandRefused(Exception):
    """Raised by a :class:`CabinetCommands` method to refuse with an error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in ERROR_CODES else "conflict"
        self.message = message


@dataclass(frozen=True)
class ErpSecurity:
    """How commands are authorised (see the module docstring)."""

    command_key: bytes | None
    allowed_clients: tuple[str, ...] = ()
    max_skew_s: float = 60.0

    def __post_init__(self) -> None:
        if self.command_key is not None:
            if not isinstance(self.command_key, bytes) or len(self.command_key) < 16:
                raise ValueError("command_key must be at least 16 bytes (or None)")
        if isinstance(self.allowed_clients, str) or not all(
            isinstance(c, str) and c for c in self.allowed_clients
        ):
            raise ValueError("allowed_clients must be a tuple of non-empty client ids")
        if not 1 <= self.max_skew_s <= 3600:
            raise ValueError(f"max_skew_s must be between 1 and 3600 s, got {self.max_skew_s}")


# -- helpers shared with ERP-side code ------------------------------------------------


def request_topic(site: str, cabinet: str, op: str) -> str:
    """The topic an ERP publishes an ``op`` request to."""
    return f"smartcab/{site}/{cabinet}/req/{op}"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes an HMAC is computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_input(site: str, cabinet: str, op: str, body: dict[str, Any]) -> bytes:
    """M of the scheme: request topic, newline, canonical body without ``auth.hmac``."""
    unsigned = dict(body)
    if isinstance(unsigned.get("auth"), dict):
        unsigned["auth"] = {k: v for k, v in unsigned["auth"].items() if k != "hmac"}
    return request_topic(site, cabinet, op).encode() + b"\n" + canonical_json(unsigned)


def sign_request(
    key: bytes,
    site: str,
    cabinet: str,
    op: str,
    body: dict[str, Any],
    *,
    client: str,
    ts: int | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """Return a copy of ``body`` with a signed ``auth`` object (what an ERP sends)."""
    signed = dict(body)
    signed["auth"] = {
        "ts": int(time.time()) if ts is None else ts,
        "nonce": nonce or secrets.token_hex(16),
        "client": client,
    }
    digest = hmac.new(key, signing_input(site, cabinet, op, signed), hashlib.sha256)
    signed["auth"]["hmac"] = digest.hexdigest()
    return signed


def valid_reply_topic(topic: Any) -> bool:
    """A topic the cabinet may publish a reply to (see the module docstring)."""
    if not isinstance(topic, str) or not topic or len(topic.encode("utf-8", "replace")) > 512:
        return False
    if topic.startswith("$") or any(c in topic for c in "+#\x00"):
        return False
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    levels = topic.split("/")
    return not (len(levels) >= 4 and levels[0] == "smartcab" and levels[3] in CABINET_CHANNELS)


def load_validators(directory: Path = SCHEMA_DIR) -> dict[str, Draft202012Validator]:
    """One validator per op from ``request-<op>.json``; every schema file is checked."""
    resources = []
    for path in sorted(directory.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry: Registry = Registry().with_resources(resources)
    validators = {}
    for op in OPS:
        try:
            schema = registry.contents(f"{SCHEMA_BASE}request-{op}.json")
        except LookupError:
            raise FileNotFoundError(f"no schema for op {op!r} in {directory}") from None
        validators[op] = Draft202012Validator(schema, registry=registry)
    return validators


def inventory_snapshot(store: Store) -> dict[str, Any]:
    """Units inside, units out with holder, unknown tags (``controller/schemas/inventory.json``).

    The get_inventory result, and the retained ``.../inventory`` message.
    """
    presence = store.presence()
    inside, out = [], []
    for u in store.units_overview():
        if u["inside"]:
            inside.append(
                {
                    "serial": u["serial"],
                    "epc": u["epc"],
                    "product": u["product"],
                    "quantity": u["quantity"],
                    "status": u["status"],
                    "uncertain_since": presence.get(u["epc"], {}).get("uncertain_since"),
                }
            )
        else:
            holder = {"id": u["holder_id"], "name": u["holder"]} if u["holder_id"] else None
            out.append(
                {
                    "serial": u["serial"],
                    "epc": u["epc"],
                    "product": u["product"],
                    "status": u["status"],
                    "holder": holder,
                    "since": u["held_since"],
                }
            )
    unknown = [
        {"epc": r["epc"], "first_seen": r["first_seen"], "last_seen": r["last_seen"]}
        for r in store.unknown_present()
    ]
    return {
        "site": store.site,
        "cabinet": store.cabinet,
        "ts": utcnow(),
        "last_seq": _last_seq(store),
        "inside": inside,
        "out": out,
        "unknown": unknown,
    }


# -- internals ----------------------------------------------------------------------


class RequestError(Exception):
    """A request that gets an error reply; raised before any state changes commit."""

    def __init__(
        self, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = _clip(message)
        self.details = details


class _Drop(Exception):
    """No reply address: log and drop."""


class _ItemError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = _clip(message)


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 3] + "..."


def _row(store: Store, sql: str, params: Any = ()) -> dict[str, Any] | None:
    for row in store.db.query(sql, params):
        return dict(row)
    return None


def _last_seq(store: Store) -> int:
    row = _row(store, "SELECT max(seq) AS m FROM events")
    return (row or {}).get("m") or 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float | int:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    # 5.0 and 5 are the same JSON number; keep one form so HMACs and stored values agree.
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # Two parsers could disagree on which copy counts; a signed body must be unambiguous.
            raise ValueError(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


class _Nonces:
    """Accepted (client, nonce) pairs for a window; bounded, thread-safe."""

    def __init__(self, window_s: float, capacity: int) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: tuple[str, str], now: float) -> str:
        """'ok' (recorded), 'replay' or 'full'."""
        with self._lock:
            # Entries are appended with now + window; a clock step back only keeps some longer.
            while self._seen:
                first_key, expires = next(iter(self._seen.items()))
                if expires > now:
                    break
                del self._seen[first_key]
            if key in self._seen:
                return "replay"
            if len(self._seen) >= self.capacity:
                return "full"
            self._seen[key] = now + self.window_s
            return "ok"

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class _Address:
    topic: str | None
    correlation_data: bytes | None
    correlation_id: str | None = None


# -- the handler ---------------------------------------------------------------------


class RequestHandler:
    """Answers ERP requests for one cabinet; see the module docstring for the rules."""

    def __init__(
        self,
        site: str,
        cabinet: str,
        open_store: Callable[[], Store],
        commands: CabinetCommands,
        security: ErpSecurity,
        *,
        max_bytes: int = 65536,
        clock: Callable[[], float] = time.time,
        max_nonces: int = 10_000,
        schema_dir: Path = SCHEMA_DIR,
    ) -> None:
        for what, value in (("site", site), ("cabinet", cabinet)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise ValueError(f"{what} must be 1-64 letters, digits, '-' or '_': {value!r}")
        if not isinstance(security, ErpSecurity):
            raise TypeError("security must be an ErpSecurity")
        if not 256 <= max_bytes <= 16 * 1024 * 1024:
            raise ValueError(f"max_bytes must be between 256 and 16 MiB, got {max_bytes}")
        if max_nonces < 1:
            raise ValueError("max_nonces must be at least 1")
        self.site = site
        self.cabinet = cabinet
        self.open_store = open_store
        self.commands = commands
        self.security = security
        self.max_bytes = max_bytes
        self._clock = clock
        self._validators = load_validators(schema_dir)
        self._nonces = _Nonces(2 * security.max_skew_s, max_nonces)
        self._ops: dict[str, Callable[[dict[str, Any], str | None], Any]] = {
            "ping": self._ping,
            "get_status": self._get_status,
            "get_inventory": self._get_inventory,
            "get_events": self._get_events,
            "get_unit": self._get_unit,
            "get_custody": self._get_custody,
            "upsert_users": self._upsert_users,
            "upsert_products": self._upsert_products,
            "upsert_units": self._upsert_units,
            "disable_badge": self._disable_badge,
            "remote_unlock": self._remote_unlock,
            "lockdown": self._lockdown,
            "release": self._release,
            "scan_now": self._scan_now,
        }

    # -- entry point ---------------------------------------------------------------

    def handle(self, op: str, payload: bytes, meta: RequestMeta) -> Reply | None:
        """Answer one request; None when it has no reply address. Never raises."""
        op_name = op[:64] if isinstance(op, str) else "?"
        addr = _Address(None, None)
        try:
            addr = _Address(
                meta.response_topic if valid_reply_topic(meta.response_topic) else None,
                meta.correlation_data if isinstance(meta.correlation_data, bytes) else None,
            )
            if meta.response_topic is not None and addr.topic is None:
                log.warning("erp %s: unusable response topic %r", op_name, meta.response_topic)
            result = self._process(op, payload, addr)
            body: dict[str, Any] = {"ok": True, "op": op_name, "result": result}
        except _Drop as exc:
            log.warning("erp %s: dropped (%s)", op_name, exc)
            return None
        except RequestError as exc:
            log.warning("erp %s: %s: %s", op_name, exc.code, exc.message)
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.details:
                error["details"] = exc.details[:100]
            body = {"ok": False, "op": op_name, "error": error}
        except Exception:
            log.exception("erp %s: internal error", op_name)
            body = {
                "ok": False,
                "op": op_name,
                "error": {"code": "internal", "message": "internal error (see cabinet log)"},
            }
        if addr.topic is None:
            log.warning("erp %s: no reply address; reply dropped", op_name)
            return None
        return self._reply(addr, body)

    def _reply(self, addr: _Address, body: dict[str, Any]) -> Reply | None:
        body["ts"] = utcnow()
        if addr.correlation_id is not None:
            body["correlation_id"] = addr.correlation_id
        try:
            payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError, UnicodeEncodeError):
            # A cabinet result that is not JSON-able: say so rather than crash the link.
            log.exception("erp %s: result is not JSON", body.get("op"))
            body = {
                "ok": False,
                "op": body.get("op", "?"),
                "ts": body["ts"],
                "error": {"code": "internal", "message": "result could not be encoded"},
            }
            if addr.correlation_id is not None:
                body["correlation_id"] = addr.correlation_id
            payload = json.dumps(body, separators=(",", ":")).encode()
        assert addr.topic is not None
        return Reply(addr.topic, payload, addr.correlation_data)

    def _process(self, op: Any, payload: Any, addr: _Address) -> Any:
        body = self._parse(payload, addr)
        if not isinstance(op, str) or op not in self._ops:
            raise RequestError(
                "unknown_op", f"unknown op {str(op)[:64]!r}; known: {', '.join(OPS)}"
            )
        error = best_match(self._validators[op].iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(body)"
            raise RequestError("bad_request", f"{where}: {error.message}")
        requested_by = self._authorise(op, body) if op in COMMAND_OPS else None
        return self._ops[op](body, requested_by)

    def _parse(self, payload: Any, addr: _Address) -> dict[str, Any]:
        """Bytes to a JSON object, filling the reply address from the body if needed."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogatepass")
        if not isinstance(payload, bytes | bytearray | memoryview):
            self._need_address(addr)
            raise RequestError("bad_request", "payload must be bytes")
        if len(payload) > self.max_bytes:
            self._need_address(addr)
            raise RequestError(
                "too_large", f"request is {len(payload)} bytes; at most {self.max_bytes}"
            )
        try:
            text = bytes(payload).decode("utf-8")
            body = json.loads(
                text,
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_reject_constant,
                parse_float=_parse_float,
            )
            # Lone surrogates (\ud800) parse but cannot be stored or signed as UTF-8.
            canonical_json(body)
        except UnicodeError:
            self._need_address(addr)
            raise RequestError("bad_request", "request is not valid UTF-8") from None
        except (ValueError, RecursionError) as exc:
            self._need_address(addr)
            raise RequestError("bad_request", f"request is not valid JSON: {exc}") from None
        if isinstance(body, dict):
            cid = body.get("correlation_id")
            if isinstance(cid, str) and 0 < len(cid) <= 128 and cid.isprintable():
                addr.correlation_id = cid
            if addr.topic is None and valid_reply_topic(body.get("reply_to")):
                addr.topic = body["reply_to"]
        self._need_address(addr)
        if not isinstance(body, dict):
            raise RequestError("bad_request", "request must be a JSON object")
        return body

    @staticmethod
    def _need_address(addr: _Address) -> None:
        if addr.topic is None:
            raise _Drop("no reply address: neither an MQTT 5 response topic nor reply_to")

    # -- authorisation -------------------------------------------------------------------

    def _authorise(self, op: str, body: dict[str, Any]) -> str:
        sec = self.security
        if sec.command_key is None and not sec.allowed_clients:
            raise RequestError("unauthorised", "commands are disabled on this cabinet")
        auth = body.get("auth")
        if auth is None:
            raise RequestError("unauthorised", f"{op} needs an auth object")
        client = auth["client"]
        if sec.allowed_clients and client not in sec.allowed_clients:
            raise RequestError("unauthorised", f"client {client!r} may not send commands")
        now = self._clock()
        skew = auth["ts"] - now
        if abs(skew) > sec.max_skew_s:
            raise RequestError(
                "unauthorised",
                f"auth.ts is {skew:+.0f} s from the cabinet's clock (allowed ±{sec.max_skew_s:g})",
            )
        if sec.command_key is not None:
            if "hmac" not in auth:
                raise RequestError("unauthorised", "auth.hmac is required")
            expected = hmac.new(
                sec.command_key,
                signing_input(self.site, self.cabinet, op, body),
                hashlib.sha256,
            ).digest()
            if not hmac.compare_digest(expected, bytes.fromhex(auth["hmac"])):
                raise RequestError("unauthorised", "auth.hmac does not match")
        outcome = self._nonces.add((client, auth["nonce"]), now)
        if outcome == "replay":
            raise RequestError("unauthorised", "auth.nonce was already used (replay)")
        if outcome == "full":
            raise RequestError("busy", "too many commands in the replay window; retry later")
        return client

    # -- store access --------------------------------------------------------------------

    @contextmanager
    def _store(self) -> Iterator[Store]:
        try:
            store = self.open_store()
        except sqlite3.OperationalError as exc:
            raise RequestError("busy", f"store unavailable: {exc}") from None
        try:
            yield store
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise RequestError("busy", "the store is busy; retry") from None
            raise
        finally:
            store.close()

    # -- read ops --------------------------------------------------------------------------

    def _ping(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        return {"pong": True, "site": self.site, "cabinet": self.cabinet, "ts": utcnow()}

    def _get_status(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        return self._call(self.commands.status)

    def _get_inventory(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        with self._store() as store:
            return inventory_snapshot(store)

    def _get_events(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        since = body.get("since_seq", 0)
        limit = body.get("limit", 100)
        with self._store() as store:
            rows = store.db.execute(
                "SELECT payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", [since, limit]
            ).fetchall()
            last = _last_seq(store)
        events = [json.loads(r[0]) for r in rows]
        next_seq = events[-1]["seq"] if events else since
        return {"events": events, "next_seq": next_seq, "last_seq": last, "more": next_seq < last}

    def _get_unit(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        if "epc" in body:
            try:
                key, value = "u.epc", normalise_epc(body["epc"])
            except ValueError as exc:
                raise RequestError("bad_request", f"epc: {exc}") from None
        else:
            key, value = "u.serial", body["serial"]
        with self._store() as store:
            unit = _row(
                store,
                "SELECT u.id, u.serial, u.epc, u.quantity, u.status, u.condition, u.notes, "
                "p.name AS product, p.sku, p.tracking FROM units u "
                f"JOIN products p ON p.id = u.product_id WHERE {key} = ?",
                [value],
            )
            if unit is None:
                raise RequestError("not_found", f"no unit with {key[2:]} {value!r}")
            presence = (
                _row(store, "SELECT uncertain_since FROM presence WHERE epc = ?", [unit["epc"]])
                if unit["epc"]
                else None
            )
            held = _row(
                store,
                "SELECT c.taken_at, c.user_id, us.name FROM custody c "
                "LEFT JOIN users us ON us.id = c.user_id "
                "WHERE c.unit_id = ? AND c.returned_at IS NULL",
                [unit["id"]],
            )
            rows = store.db.execute(
                "SELECT payload FROM events WHERE unit_id = ? ORDER BY seq DESC LIMIT ?",
                [unit["id"], UNIT_EVENTS_LIMIT],
            ).fetchall()
        del unit["id"]
        return {
            "unit": unit,
            "inside": presence is not None,
            "uncertain_since": presence["uncertain_since"] if presence else None,
            "holder": (
                {"id": held["user_id"], "name": held["name"]} if held and held["user_id"] else None
            ),
            "since": held["taken_at"] if held else None,
            "events": [json.loads(r[0]) for r in reversed(rows)],
        }

    def _get_custody(self, body: dict[str, Any], _: str | None) -> dict[str, Any]:
        with self._store() as store:
            rows = list(
                store.db.query(
                    """
                    SELECT c.taken_at, c.session_id, c.user_id, us.name AS user_name,
                           us.external_id, u.serial, u.epc, p.name AS product
                    FROM custody c
                    JOIN units u ON u.id = c.unit_id
                    JOIN products p ON p.id = u.product_id
                    LEFT JOIN users us ON us.id = c.user_id
                    WHERE c.returned_at IS NULL
                    ORDER BY c.taken_at, u.serial
                    """
                )
            )
        return {
            "custody": [
                {
                    "user": (
                        {
                            "id": r["user_id"],
                            "name": r["user_name"],
                            "external_id": r["external_id"],
                        }
                        if r["user_id"]
                        else None
                    ),
                    "unit": {"serial": r["serial"], "epc": r["epc"], "product": r["product"]},
                    "since": r["taken_at"],
                    "session_id": r["session_id"],
                }
                for r in rows
            ]
        }

    # -- register commands -------------------------------------------------------------------

    def _apply_items(
        self,
        items: list[dict[str, Any]],
        key: str,
        noun: str,
        apply: Callable[[Store, dict[str, Any]], bool],
        event: str,
        requested_by: str | None,
    ) -> dict[str, Any]:
        """Apply every item in one transaction; any item error rolls everything back."""
        errors: list[dict[str, Any]] = []
        created = 0
        seen: set[str] = set()
        with self._store() as store:
            with store.write():
                for i, item in enumerate(items):
                    try:
                        if item[key] in seen:
                            raise _ItemError("bad_request", f"{key} {item[key]!r} appears twice")
                        seen.add(item[key])
                        created += apply(store, item)
                    except _ItemError as exc:
                        errors.append(
                            {"index": i, "key": item[key], "code": exc.code, "message": exc.message}
                        )
                if errors:
                    codes = {e["code"] for e in errors}
                    code = next(c for c in ("bad_request", "not_found", "conflict") if c in codes)
                    raise RequestError(
                        code,
                        f"{len(errors)} of {len(items)} {noun} rejected; nothing was changed",
                        errors,
                    )
                keys = [item[key] for item in items]
                payload = store.append_event(
                    event,
                    data={
                        "count": len(items),
                        f"{key}s": keys,
                        "created": created,
                        "updated": len(items) - created,
                        "requested_by": requested_by,
                    },
                )
        log.info("erp %s by %s: %d %s", event, requested_by, len(items), noun)
        return {
            "count": len(items),
            "created": created,
            "updated": len(items) - created,
            "seq": payload["seq"],
        }

    def _upsert_users(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        return self._apply_items(
            body["users"], "external_id", "users", _upsert_user, "users_upserted", requested_by
        )

    def _upsert_products(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        return self._apply_items(
            body["products"], "sku", "products", _upsert_product, "products_upserted", requested_by
        )

    def _upsert_units(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        return self._apply_items(
            body["units"], "serial", "units", _upsert_unit, "units_upserted", requested_by
        )

    def _disable_badge(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        try:
            uid = normalise_uid(body["uid"])
        except ValueError as exc:
            raise RequestError("bad_request", f"uid: {exc}") from None
        with self._store() as store:
            with store.write():
                badge = _row(store, "SELECT user_id, enabled FROM badges WHERE uid = ?", [uid])
                if badge is None:
                    raise RequestError("not_found", f"no badge {uid}")
                store.db.execute("UPDATE badges SET enabled = 0 WHERE uid = ?", [uid])
                user = _row(store, "SELECT id, name FROM users WHERE id = ?", [badge["user_id"]])
                data: dict[str, Any] = {
                    "badge": uid,
                    "was_enabled": bool(badge["enabled"]),
                    "requested_by": requested_by,
                }
                if "reason" in body:
                    data["reason"] = body["reason"]
                payload = store.append_event("badge_disabled", user=user, data=data)
        log.info("erp badge %s disabled by %s", uid, requested_by)
        return {"badge": uid, "was_enabled": bool(badge["enabled"]), "seq": payload["seq"]}

    # -- cabinet commands ----------------------------------------------------------------------

    def _remote_unlock(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        with self._store() as store:
            if "user_id" in body:
                user = _row(
                    store, "SELECT id, name, enabled FROM users WHERE id = ?", [body["user_id"]]
                )
                what = f"id {body['user_id']}"
            else:
                user = _row(
                    store,
                    "SELECT id, name, enabled FROM users WHERE external_id = ?",
                    [body["user_external_id"]],
                )
                what = f"external_id {body['user_external_id']!r}"
        if user is None:
            raise RequestError("not_found", f"no user with {what}")
        if not user["enabled"]:
            raise RequestError("conflict", f"user {what} is disabled")
        assert requested_by is not None
        return self._call(self.commands.remote_unlock, user["id"], requested_by, body["reason"])

    def _lockdown(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        assert requested_by is not None
        return self._call(self.commands.lockdown, True, requested_by, body["reason"])

    def _release(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        assert requested_by is not None
        return self._call(self.commands.lockdown, False, requested_by, body["reason"])

    def _scan_now(self, body: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        return self._call(self.commands.scan_now)

    @staticmethod
    def _call(fn: Callable[..., dict], *args: Any) -> dict[str, Any]:
        try:
            result = fn(*args)
        except CommandRefused as exc:
            raise RequestError(exc.code, exc.message) from None
        except TimeoutError:
            raise RequestError("busy", "the cabinet did not answer in time; retry") from None
        if not isinstance(result, dict):
            raise TypeError(f"cabinet returned {type(result).__name__}, not a dict")
        return result


# -- register upserts (run inside Store.write(); return True when a row was created) --------


def _upsert_user(store: Store, item: dict[str, Any]) -> bool:
    ext = item["external_id"]
    row = _row(store, "SELECT id FROM users WHERE external_id = ?", [ext])
    if row is None:
        cur = store.db.execute(
            "INSERT INTO users (external_id, name, email, enabled, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [ext, item["name"], item.get("email", ""), int(item.get("enabled", True)), utcnow()],
        )
        user_id = cur.lastrowid
    else:
        user_id = row["id"]
        store.db.execute(
            "UPDATE users SET name = ?, email = coalesce(?, email), "
            "enabled = coalesce(?, enabled) WHERE id = ?",
            [
                item["name"],
                item.get("email"),
                int(item["enabled"]) if "enabled" in item else None,
                user_id,
            ],
        )
    if "badges" in item:
        _set_badges(store, user_id, item["badges"])
    return row is None


def _set_badges(store: Store, user_id: int, raw_uids: list[str]) -> None:
    """Make ``raw_uids`` the user's complete badge set; new ones start enabled."""
    uids: list[str] = []
    for raw in raw_uids:
        try:
            uid = normalise_uid(raw)
        except ValueError as exc:
            raise _ItemError("bad_request", str(exc)) from None
        if uid in uids:
            raise _ItemError("bad_request", f"badge {uid} is listed twice")
        uids.append(uid)
    for uid in uids:
        bound = _row(store, "SELECT user_id FROM badges WHERE uid = ?", [uid])
        if bound is None:
            store.db.execute(
                "INSERT INTO badges (uid, user_id, enabled, created_at) VALUES (?, ?, 1, ?)",
                [uid, user_id, utcnow()],
            )
        elif bound["user_id"] != user_id:
            raise _ItemError("conflict", f"badge {uid} is bound to another user")
        # A badge already this user's keeps its enabled flag: a disable_badge stays in force.
    marks = ",".join("?" * len(uids))
    store.db.execute(
        f"DELETE FROM badges WHERE user_id = ? AND uid NOT IN ({marks})", [user_id, *uids]
    )


def _upsert_product(store: Store, item: dict[str, Any]) -> bool:
    row = _row(store, "SELECT id, tracking FROM products WHERE sku = ?", [item["sku"]])
    if row is None:
        store.db.execute(
            "INSERT INTO products (sku, name, tracking, category, par_level, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                item["sku"],
                item["name"],
                item.get("tracking", "serialized"),
                item.get("category", ""),
                item.get("par_level"),
                utcnow(),
            ],
        )
        return True
    tracking = item.get("tracking", row["tracking"])
    if tracking != row["tracking"] and _row(
        store, "SELECT 1 FROM units WHERE product_id = ?", [row["id"]]
    ):
        raise _ItemError("conflict", f"tracking of {item['sku']!r} cannot change: it has units")
    store.db.execute(
        "UPDATE products SET name = ?, tracking = ?, category = coalesce(?, category), "
        "par_level = CASE WHEN ? THEN ? ELSE par_level END WHERE id = ?",
        [
            item["name"],
            tracking,
            item.get("category"),
            int("par_level" in item),
            item.get("par_level"),
            row["id"],
        ],
    )
    return False


def _upsert_unit(store: Store, item: dict[str, Any]) -> bool:
    product = _row(store, "SELECT id FROM products WHERE sku = ?", [item["sku"]])
    if product is None:
        raise _ItemError("not_found", f"no product with sku {item['sku']!r}")
    row = _row(store, "SELECT id, epc FROM units WHERE serial = ?", [item["serial"]])
    epc = row["epc"] if row else None
    if "epc" in item:
        try:
            epc = normalise_epc(item["epc"]) if item["epc"] is not None else None
        except ValueError as exc:
            raise _ItemError("bad_request", str(exc)) from None
        if epc is not None:
            other = _row(store, "SELECT serial FROM units WHERE epc = ?", [epc])
            if other and other["serial"] != item["serial"]:
                raise _ItemError("conflict", f"EPC {epc} is bound to unit {other['serial']!r}")
    if row is None:
        cur = store.db.execute(
            "INSERT INTO units (serial, epc, product_id, quantity, status, condition, notes, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                item["serial"],
                epc,
                product["id"],
                item.get("quantity", 1),
                item.get("status", "available"),
                item.get("condition", "good"),
                item.get("notes", ""),
                utcnow(),
            ],
        )
        unit_id = cur.lastrowid
        old_epc = None
    else:
        unit_id, old_epc = row["id"], row["epc"]
        if item.get("status") == "available" and _row(
            store, "SELECT 1 FROM custody WHERE unit_id = ? AND returned_at IS NULL", [unit_id]
        ):
            raise _ItemError(
                "conflict", f"unit {item['serial']!r} is checked out; its return sets it available"
            )
        store.db.execute(
            "UPDATE units SET epc = ?, product_id = ?, quantity = coalesce(?, quantity), "
            "status = coalesce(?, status), condition = coalesce(?, condition), "
            "notes = coalesce(?, notes) WHERE id = ?",
            [
                epc,
                product["id"],
                item.get("quantity"),
                item.get("status"),
                item.get("condition"),
                item.get("notes"),
                unit_id,
            ],
        )
    if epc != old_epc:
        # Keep presence consistent: a tag already inside now belongs to this unit, and the
        # old tag (if still inside) becomes an unknown one.
        if old_epc:
            store.db.execute("UPDATE presence SET unit_id = NULL WHERE epc = ?", [old_epc])
        if epc:
            store.db.execute("UPDATE presence SET unit_id = ? WHERE epc = ?", [unit_id, epc])
    return row is None
