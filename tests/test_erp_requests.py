"""The ERP request/response layer against a real store: every op and command, both reply
styles, authorisation, and hypothesis-generated malformed requests that must change nothing."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from controller.erp import (
    COMMAND_OPS,
    OPS,
    SCHEMA_DIR,
    CommandRefused,
    ErpSecurity,
    Reply,
    RequestHandler,
    RequestMeta,
    sign_request,
    valid_reply_topic,
)
from controller.store import Store, normalise_uid, utcnow

SITE, CAB = "s1", "c1"
KEY = b"0123456789abcdef-cabinet-key"
CLIENT = "erp-test"
NOW = 1_800_000_000.0
EPC = {
    "D-0001": "E28011606000020000000001",
    "D-0002": "E28011606000020000000002",
    "M-0001": "E28011606000020000000003",
    "G-BOX-1": "E28011606000020000000004",
}
STRAY = "E2801160600002000000FFFF"


def _registry() -> Registry:
    resources = []
    for path in SCHEMA_DIR.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


REGISTRY = _registry()
REPLY = Draft202012Validator(
    REGISTRY.contents("https://smartcab.example/schemas/reply.json"), registry=REGISTRY
)
EVENT = Draft202012Validator(
    REGISTRY.contents("https://smartcab.example/schemas/event.json"), registry=REGISTRY
)


# -- a seeded store and a recording cabinet ---------------------------------------------


def seed(tmp_path: Path) -> Path:
    path = tmp_path / "smartcab.db"
    store = Store(path, site=SITE, cabinet=CAB)
    store.migrate()
    with store.write():
        alice = store.add_user("Alice Martin", "alice@example.org")
        bob = store.add_user("Bob Stone")
        carol = store.add_user("Carol Diaz", enabled=False)
        for uid, ext in ((alice, "ext-alice"), (bob, "ext-bob"), (carol, "ext-carol")):
            store.db.execute("UPDATE users SET external_id = ? WHERE id = ?", [ext, uid])
        store.add_badge("04:A1:B2:C3", alice)
        store.add_badge("04B1B2C3D4E5F6", bob)
        store.add_badge("C3D4E5F6", carol)
        drill = store.add_product("DRL", "Cordless drill 18V")
        meter = store.add_product("MTR", "Multimeter")
        gloves = store.add_product("GLV", "Gloves", "quantity", par_level=2)
        store.add_unit("D-0001", drill, EPC["D-0001"])
        d2 = store.add_unit("D-0002", drill, EPC["D-0002"])
        store.add_unit("M-0001", meter, EPC["M-0001"])
        store.add_unit("G-BOX-1", gloves, EPC["G-BOX-1"], quantity=100)
        store.add_unit("D-0009", drill)  # never tagged
        for serial in ("D-0001", "M-0001", "G-BOX-1"):
            store.set_present(EPC[serial], store.unit_by_epc(EPC[serial])["id"], [1], -50)
        store.set_present(STRAY, None, [2], -60)
        store.mark_uncertain(EPC["M-0001"], None, None)
        sid = store.open_session("badge", alice, "04A1B2C3")
        store.append_event("access_granted", session_id=sid, user=store.user(alice))
        store.set_absent(EPC["D-0002"])
        store.open_custody(d2, alice, sid)
        store.append_event(
            "unit_taken",
            session_id=sid,
            user=store.user(alice),
            unit=store.unit_by_epc(EPC["D-0002"]),
            data={"scan_id": "scan-1", "attributed": True},
        )
        store.append_event("door_closed", session_id=sid, user=store.user(alice))
    store.close()
    return path


def dump(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


class FakeCabinet:
    """Records the commands it is given; ``refuse`` makes the next command raise it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: Exception | None = None

    def _do(self, *call: Any) -> dict:
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse
        return {"accepted": True, "op": call[0]}

    def remote_unlock(self, user_id: int, requested_by: str, reason: str) -> dict:
        return self._do("remote_unlock", user_id, requested_by, reason)

    def lockdown(self, on: bool, requested_by: str, reason: str) -> dict:
        return self._do("lockdown", on, requested_by, reason)

    def scan_now(self) -> dict:
        return self._do("scan_now")

    def status(self) -> dict:
        return {
            "state": "online",
            "site": SITE,
            "cabinet": CAB,
            "version": "0.1.0",
            "ts": utcnow(),
            "cabinet_state": "idle",
            "door": "closed",
            "lock": "locked",
            "reader": "ok",
            "alarm": None,
            "last_scan": None,
            "outbox": 0,
        }


def make_handler(
    path: Path,
    cabinet: FakeCabinet,
    *,
    key: bytes | None = KEY,
    allowed: tuple[str, ...] = (),
    clock: Any = lambda: NOW,
    **kwargs: Any,
) -> RequestHandler:
    return RequestHandler(
        SITE,
        CAB,
        lambda: Store(path, site=SITE, cabinet=CAB),
        cabinet,
        ErpSecurity(key, allowed),
        clock=clock,
        **kwargs,
    )


@pytest.fixture
def env(tmp_path: Path) -> Any:
    path = seed(tmp_path)
    cabinet = FakeCabinet()

    class Env:
        pass

    e = Env()
    e.path, e.cabinet, e.handler = path, cabinet, make_handler(path, cabinet)
    return e


_nonce = iter(range(10**9))


def signed(op: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("client", CLIENT)
    kwargs.setdefault("ts", int(NOW))
    kwargs.setdefault("nonce", f"nonce-{next(_nonce):010d}")
    site, cab = kwargs.pop("site", SITE), kwargs.pop("cabinet", CAB)
    return sign_request(kwargs.pop("key", KEY), site, cab, op, body, **kwargs)


def ask(handler: RequestHandler, op: str, body: Any, *, style: str = "v5") -> dict[str, Any]:
    """Send one request; check the reply address and schema; return the reply body."""
    if style == "v5":
        meta = RequestMeta("erp/replies/1", b"\x01corr")
        raw = body
    else:
        meta = RequestMeta(None, None)
        raw = {**body, "reply_to": "erp/replies/v3", "correlation_id": "c-42"}
        if "auth" in body:
            raw = signed(op, {k: v for k, v in raw.items() if k != "auth"})
    reply = handler.handle(op, json.dumps(raw).encode(), meta)
    assert isinstance(reply, Reply)
    out = json.loads(reply.payload)
    REPLY.validate(out)
    assert out["op"] == op
    if style == "v5":
        assert (reply.topic, reply.correlation_data) == ("erp/replies/1", b"\x01corr")
        assert "correlation_id" not in out
    else:
        assert (reply.topic, reply.correlation_data) == ("erp/replies/v3", None)
        assert out["correlation_id"] == "c-42"
    return out


def ok(out: dict[str, Any]) -> Any:
    assert out["ok"] is True, out
    return out["result"]


def err(out: dict[str, Any], code: str) -> dict[str, Any]:
    assert out["ok"] is False and out["error"]["code"] == code, out
    return out["error"]


def events_since(path: Path, seq: int) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT payload FROM events WHERE seq > ? ORDER BY seq", [seq])
        return [json.loads(r[0]) for r in rows]
    finally:
        conn.close()


# -- read ops ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["v5", "v3"])
def test_ping_in_both_reply_styles(env: Any, style: str) -> None:
    result = ok(ask(env.handler, "ping", {}, style=style))
    assert (result["pong"], result["site"], result["cabinet"]) == (True, SITE, CAB)


def test_without_a_reply_address_a_request_is_dropped_and_nothing_runs(env: Any) -> None:
    before = dump(env.path)
    assert env.handler.handle("ping", b"{}", RequestMeta(None, None)) is None
    body = signed("upsert_products", {"products": [{"sku": "X", "name": "X"}]})
    assert env.handler.handle("upsert_products", json.dumps(body).encode(), RequestMeta()) is None
    body = signed("lockdown", {"reason": "test"})
    assert env.handler.handle("lockdown", json.dumps(body).encode(), RequestMeta()) is None
    assert env.handler.handle("ping", b"not json", RequestMeta()) is None
    assert dump(env.path) == before and env.cabinet.calls == []


def test_a_cabinet_topic_or_wildcard_is_never_used_as_a_reply_address(env: Any) -> None:
    for bad in ("smartcab/s1/c2/req/lockdown", "smartcab/x/y/status", "erp/+/r", "$SYS/x", ""):
        assert not valid_reply_topic(bad)
        assert env.handler.handle("ping", b"{}", RequestMeta(bad, b"c")) is None
        body = json.dumps({"reply_to": bad}).encode()
        assert env.handler.handle("ping", body, RequestMeta()) is None
    assert valid_reply_topic("erp/replies/1") and valid_reply_topic("smartcab-erp/replies")


def test_get_status_is_the_cabinets_status(env: Any) -> None:
    result = ok(ask(env.handler, "get_status", {}))
    assert (result["state"], result["door"], result["lock"]) == ("online", "closed", "locked")


@pytest.mark.parametrize("style", ["v5", "v3"])
def test_get_inventory(env: Any, style: str) -> None:
    result = ok(ask(env.handler, "get_inventory", {}, style=style))
    inside = {u["serial"]: u for u in result["inside"]}
    out = {u["serial"]: u for u in result["out"]}
    assert set(inside) == {"D-0001", "M-0001", "G-BOX-1"}
    assert inside["G-BOX-1"]["quantity"] == 100
    assert inside["M-0001"]["uncertain_since"] is not None
    assert inside["D-0001"]["uncertain_since"] is None
    assert set(out) == {"D-0002", "D-0009"}
    assert out["D-0002"]["holder"]["name"] == "Alice Martin" and out["D-0002"]["since"]
    assert out["D-0009"]["holder"] is None and out["D-0009"]["epc"] is None
    assert [u["epc"] for u in result["unknown"]] == [STRAY]
    assert result["last_seq"] == 3


def test_get_events_pages_and_reports_the_last_seq(env: Any) -> None:
    page = ok(ask(env.handler, "get_events", {"since_seq": 0, "limit": 2}))
    assert [e["seq"] for e in page["events"]] == [1, 2]
    assert (page["next_seq"], page["last_seq"], page["more"]) == (2, 3, True)
    page = ok(ask(env.handler, "get_events", {"since_seq": page["next_seq"]}, style="v3"))
    assert [e["seq"] for e in page["events"]] == [3]
    assert (page["next_seq"], page["last_seq"], page["more"]) == (3, 3, False)
    assert page["events"][0]["type"] == "door_closed"
    page = ok(ask(env.handler, "get_events", {"since_seq": 99}))
    assert (page["events"], page["next_seq"], page["last_seq"]) == ([], 99, 3)
    everything = ok(ask(env.handler, "get_events", {}))
    assert everything["events"] == events_since(env.path, 0)


def test_get_unit_by_serial_and_by_epc(env: Any) -> None:
    out = ok(ask(env.handler, "get_unit", {"serial": "D-0002"}))
    assert out["unit"]["epc"] == EPC["D-0002"] and out["unit"]["sku"] == "DRL"
    assert out["inside"] is False and out["holder"]["name"] == "Alice Martin"
    assert [e["type"] for e in out["events"]] == ["unit_taken"]
    lower = ":".join(re.findall("..", EPC["D-0001"].lower()))
    out = ok(ask(env.handler, "get_unit", {"epc": lower}, style="v3"))
    assert out["unit"]["serial"] == "D-0001" and out["inside"] is True
    assert out["holder"] is None and out["since"] is None and out["events"] == []
    err(ask(env.handler, "get_unit", {"serial": "NOPE"}), "not_found")
    err(ask(env.handler, "get_unit", {"epc": "E2801160600002000000BEEF"}), "not_found")
    err(ask(env.handler, "get_unit", {"epc": "E2801160600002000000BE"}), "bad_request")
    err(ask(env.handler, "get_unit", {"serial": "D-0001", "epc": EPC["D-0001"]}), "bad_request")


def test_get_custody(env: Any) -> None:
    result = ok(ask(env.handler, "get_custody", {}))
    assert len(result["custody"]) == 1
    held = result["custody"][0]
    assert held["user"]["name"] == "Alice Martin" and held["user"]["external_id"] == "ext-alice"
    assert held["unit"] == {
        "serial": "D-0002",
        "epc": EPC["D-0002"],
        "product": "Cordless drill 18V",
    }


# -- register commands -----------------------------------------------------------------------


def test_upsert_users_creates_updates_and_binds_badges(env: Any) -> None:
    body = {
        "users": [
            {"external_id": "ext-dan", "name": "Dan Ng", "badges": ["0a:0b:0c:0d", "11223344"]},
            {"external_id": "ext-alice", "name": "Alice Martin-Roy", "email": "a@x.org"},
        ]
    }
    result = ok(ask(env.handler, "upsert_users", signed("upsert_users", body)))
    assert (result["count"], result["created"], result["updated"]) == (2, 1, 1)
    store = Store(env.path, site=SITE, cabinet=CAB)
    try:
        check = store.check_badge(normalise_uid("0A0B0C0D"))
        assert check.granted and check.user_name == "Dan Ng"
        alice = store.check_badge("04A1B2C3")
        assert alice.granted and alice.user_name == "Alice Martin-Roy"  # her badge is kept
        (event,) = store.recent_events(1)
    finally:
        store.close()
    EVENT.validate(event)
    assert event["seq"] == result["seq"] and event["type"] == "users_upserted"
    assert event["data"]["external_ids"] == ["ext-dan", "ext-alice"]
    assert event["data"]["count"] == 2 and event["data"]["requested_by"] == CLIENT

    # badges is the complete set: 11223344 goes, 55667788 comes; enabled: false disables
    body = {
        "users": [
            {"external_id": "ext-dan", "name": "Dan Ng", "enabled": False, "badges": ["55667788"]}
        ]
    }
    ok(ask(env.handler, "upsert_users", signed("upsert_users", body), style="v3"))
    store = Store(env.path, site=SITE, cabinet=CAB)
    try:
        assert store.check_badge("11223344").reason == "unknown badge"
        assert store.check_badge("55667788").reason == "user disabled"
        assert store.check_badge("0A0B0C0D").reason == "unknown badge"
    finally:
        store.close()


def test_upsert_users_is_all_or_nothing(env: Any) -> None:
    before = dump(env.path)
    body = {
        "users": [
            {"external_id": "ext-eve", "name": "Eve", "badges": ["A0A1A2A3"]},
            {"external_id": "ext-fay", "name": "Fay", "badges": ["04A1B2C3"]},  # Alice's
            {"external_id": "ext-gus", "name": "Gus"},
            {"external_id": "ext-eve", "name": "Eve again"},
        ]
    }
    error = err(ask(env.handler, "upsert_users", signed("upsert_users", body)), "bad_request")
    assert [(d["index"], d["code"]) for d in error["details"]] == [
        (1, "conflict"),
        (3, "bad_request"),
    ]
    assert "bound to another user" in error["details"][0]["message"]
    assert dump(env.path) == before
    body["users"] = body["users"][:3]
    error = err(ask(env.handler, "upsert_users", signed("upsert_users", body)), "conflict")
    assert dump(env.path) == before


def test_upsert_products(env: Any) -> None:
    body = {
        "products": [
            {"sku": "TW", "name": "Torque wrench", "category": "tools", "par_level": 1},
            {"sku": "GLV", "name": "Nitrile gloves", "par_level": None},
        ]
    }
    result = ok(ask(env.handler, "upsert_products", signed("upsert_products", body)))
    assert (result["created"], result["updated"]) == (1, 1)
    conn = sqlite3.connect(env.path)
    rows = dict(
        conn.execute(
            "SELECT sku, name || '/' || tracking || '/' || coalesce(par_level, '-') FROM products"
        )
    )
    conn.close()
    assert rows["TW"] == "Torque wrench/serialized/1"
    assert rows["GLV"] == "Nitrile gloves/quantity/-"
    assert events_since(env.path, 3)[0]["data"]["skus"] == ["TW", "GLV"]
    before = dump(env.path)
    body = {"products": [{"sku": "DRL", "name": "Drill", "tracking": "quantity"}]}
    error = err(ask(env.handler, "upsert_products", signed("upsert_products", body)), "conflict")
    assert "has units" in error["details"][0]["message"]
    assert dump(env.path) == before


def test_upsert_units(env: Any) -> None:
    body = {
        "units": [
            {"serial": "D-0003", "sku": "DRL", "epc": STRAY.lower(), "condition": "new"},
            {"serial": "D-0001", "sku": "DRL", "status": "in_maintenance", "notes": "chuck"},
        ]
    }
    result = ok(ask(env.handler, "upsert_units", signed("upsert_units", body)))
    assert (result["created"], result["updated"]) == (1, 1)
    # the stray tag inside the cabinet is now D-0003, inside
    inventory = ok(ask(env.handler, "get_inventory", {}))
    inside = {u["serial"]: u for u in inventory["inside"]}
    assert inside["D-0003"]["epc"] == STRAY and inventory["unknown"] == []
    assert inside["D-0001"]["status"] == "in_maintenance"
    event = events_since(env.path, 3)[0]
    EVENT.validate(event)
    assert event["type"] == "units_upserted" and event["data"]["serials"] == ["D-0003", "D-0001"]
    before = dump(env.path)
    cases = [
        ({"serial": "D-0004", "sku": "NOPE"}, "not_found"),
        ({"serial": "D-0004", "sku": "DRL", "epc": EPC["D-0001"]}, "conflict"),
        ({"serial": "D-0002", "sku": "DRL", "status": "available"}, "conflict"),  # held by Alice
        ({"serial": "D-0004", "sku": "DRL", "epc": "E2801160600002000000AA"}, "bad_request"),
    ]
    for item, code in cases:
        body = {"units": [{"serial": "OK-1", "sku": "DRL"}, item]}
        error = err(ask(env.handler, "upsert_units", signed("upsert_units", body)), code)
        assert error["details"][0]["index"] == 1
    assert dump(env.path) == before
    # epc null unbinds the tag, which becomes unknown again
    body = {"units": [{"serial": "D-0003", "sku": "DRL", "epc": None}]}
    ok(ask(env.handler, "upsert_units", signed("upsert_units", body)))
    assert [u["epc"] for u in ok(ask(env.handler, "get_inventory", {}))["unknown"]] == [STRAY]


def test_disable_badge(env: Any) -> None:
    body = signed("disable_badge", {"uid": "04:a1:b2:c3", "reason": "reported lost"})
    result = ok(ask(env.handler, "disable_badge", body))
    assert (result["badge"], result["was_enabled"]) == ("04A1B2C3", True)
    store = Store(env.path, site=SITE, cabinet=CAB)
    try:
        assert store.check_badge("04A1B2C3").reason == "badge disabled"
        (event,) = store.recent_events(1)
    finally:
        store.close()
    EVENT.validate(event)
    assert event["type"] == "badge_disabled" and event["user"]["name"] == "Alice Martin"
    assert event["data"] == {
        "badge": "04A1B2C3",
        "was_enabled": True,
        "requested_by": CLIENT,
        "reason": "reported lost",
    }
    again = ok(ask(env.handler, "disable_badge", signed("disable_badge", {"uid": "04A1B2C3"})))
    assert again["was_enabled"] is False
    err(
        ask(env.handler, "disable_badge", signed("disable_badge", {"uid": "DEADBEEF"})), "not_found"
    )


# -- cabinet commands ----------------------------------------------------------------------------


def test_cabinet_commands_reach_the_cabinet(env: Any) -> None:
    before = dump(env.path)
    body = signed("remote_unlock", {"user_external_id": "ext-alice", "reason": "night shift"})
    assert ok(ask(env.handler, "remote_unlock", body)) == {"accepted": True, "op": "remote_unlock"}
    ok(ask(env.handler, "remote_unlock", signed("remote_unlock", {"user_id": 2, "reason": "r"})))
    ok(ask(env.handler, "lockdown", signed("lockdown", {"reason": "audit"}), style="v3"))
    ok(ask(env.handler, "release", signed("release", {"reason": "audit done"})))
    ok(ask(env.handler, "scan_now", signed("scan_now", {})))
    assert env.cabinet.calls == [
        ("remote_unlock", 1, CLIENT, "night shift"),
        ("remote_unlock", 2, CLIENT, "r"),
        ("lockdown", True, CLIENT, "audit"),
        ("lockdown", False, CLIENT, "audit done"),
        ("scan_now",),
    ]
    # the cabinet records these events itself; the handler changed nothing
    assert dump(env.path) == before


def test_remote_unlock_needs_a_known_enabled_user(env: Any) -> None:
    body = {"user_external_id": "ext-carol", "reason": "r"}
    err(ask(env.handler, "remote_unlock", signed("remote_unlock", body)), "conflict")
    body = {"user_external_id": "ext-nobody", "reason": "r"}
    err(ask(env.handler, "remote_unlock", signed("remote_unlock", body)), "not_found")
    body = {"user_id": 999, "reason": "r"}
    err(ask(env.handler, "remote_unlock", signed("remote_unlock", body)), "not_found")
    body = {"user_id": 1, "user_external_id": "ext-alice", "reason": "r"}
    err(ask(env.handler, "remote_unlock", signed("remote_unlock", body)), "bad_request")
    assert env.cabinet.calls == []


def test_cabinet_refusals_and_failures_become_error_replies(env: Any) -> None:
    env.cabinet.refuse = CommandRefused("busy", "a door session is running")
    error = err(ask(env.handler, "scan_now", signed("scan_now", {})), "busy")
    assert error["message"] == "a door session is running"
    env.cabinet.refuse = TimeoutError()
    err(ask(env.handler, "lockdown", signed("lockdown", {"reason": "x"})), "busy")
    env.cabinet.refuse = RuntimeError("boom")
    err(ask(env.handler, "scan_now", signed("scan_now", {})), "internal")


def test_a_failing_store_gives_an_internal_error_not_an_exception(tmp_path: Path) -> None:
    def broken() -> Store:
        raise RuntimeError("disk on fire")

    handler = RequestHandler(SITE, CAB, broken, FakeCabinet(), ErpSecurity(KEY))
    err(ask(handler, "get_inventory", {}), "internal")


# -- authorisation --------------------------------------------------------------------------------


def test_hmac_accepted_and_rejected(env: Any) -> None:
    h, body = env.handler, {"reason": "drill"}
    ok(ask(h, "lockdown", signed("lockdown", body)))
    rejected = {
        "wrong key": signed("lockdown", body, key=b"another-key-of-sixteen+"),
        "other op": signed("release", body),
        "other cabinet": signed("lockdown", body, cabinet="c2"),
        "tampered": {**signed("lockdown", body), "reason": "something else"},
        "no hmac": {
            **body,
            "auth": {k: v for k, v in signed("lockdown", body)["auth"].items() if k != "hmac"},
        },
        "no auth": body,
        "stale": signed("lockdown", body, ts=int(NOW) - 61),
        "future": signed("lockdown", body, ts=int(NOW) + 61),
    }
    for why, request in rejected.items():
        out = ask(h, "lockdown", request)
        assert out["error"]["code"] == "unauthorised", (why, out)
    ok(ask(h, "lockdown", signed("lockdown", body, ts=int(NOW) - 59)))
    assert len(env.cabinet.calls) == 2


def test_the_hmac_covers_the_canonical_body() -> None:
    # key order and spacing in the payload do not matter; the values do
    a = signed("lockdown", {"reason": "é ☃", "reply_to": "erp/r"}, nonce="n" * 16)
    b = json.loads(json.dumps(a, indent=3, ensure_ascii=True))
    assert (
        sign_request(KEY, SITE, CAB, "lockdown", b, client=CLIENT, ts=int(NOW), nonce="n" * 16)[
            "auth"
        ]["hmac"]
        == (a["auth"]["hmac"])
    )
    c = signed("lockdown", {"reason": "é ☃ ", "reply_to": "erp/r"}, nonce="n" * 16)
    assert c["auth"]["hmac"] != a["auth"]["hmac"]


def test_replay_is_rejected(env: Any) -> None:
    request = signed("lockdown", {"reason": "once"})
    ok(ask(env.handler, "lockdown", request))
    err(ask(env.handler, "lockdown", request), "unauthorised")
    # the same nonce from another client is a different request
    ok(
        ask(
            env.handler,
            "lockdown",
            signed("lockdown", {"reason": "once"}, client="erp-2", nonce=request["auth"]["nonce"]),
        )
    )
    assert len(env.cabinet.calls) == 2


def test_nonce_memory_is_bounded_and_expires(tmp_path: Path) -> None:
    path = seed(tmp_path)
    now = [NOW]
    handler = make_handler(path, FakeCabinet(), clock=lambda: now[0], max_nonces=3)
    for _ in range(3):
        ok(ask(handler, "scan_now", signed("scan_now", {})))
    err(ask(handler, "scan_now", signed("scan_now", {})), "busy")
    now[0] += 2 * 60 + 1  # the window of a 60 s skew has passed
    ok(ask(handler, "scan_now", signed("scan_now", {}, ts=int(now[0]))))


def test_allowed_clients(tmp_path: Path) -> None:
    path = seed(tmp_path)
    cabinet = FakeCabinet()
    no_key = make_handler(path, cabinet, key=None, allowed=("erp-1",))
    unsigned = {"reason": "x", "auth": {"ts": int(NOW), "nonce": "a" * 16, "client": "erp-1"}}
    ok(ask(no_key, "lockdown", unsigned))
    intruder = {**unsigned, "auth": {**unsigned["auth"], "client": "erp-2", "nonce": "b" * 16}}
    err(ask(no_key, "lockdown", intruder), "unauthorised")
    both = make_handler(path, cabinet, allowed=("erp-1",))
    err(
        ask(both, "lockdown", {**unsigned, "auth": {**unsigned["auth"], "nonce": "c" * 16}}),
        "unauthorised",
    )
    ok(ask(both, "lockdown", signed("lockdown", {"reason": "x"}, client="erp-1")))
    err(ask(both, "lockdown", signed("lockdown", {"reason": "x"}, client="erp-2")), "unauthorised")
    assert len(cabinet.calls) == 2


def test_without_key_or_clients_commands_are_disabled_but_reads_work(tmp_path: Path) -> None:
    path = seed(tmp_path)
    handler = make_handler(path, FakeCabinet(), key=None)
    err(ask(handler, "scan_now", signed("scan_now", {})), "unauthorised")
    ok(ask(handler, "get_custody", {}))


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ErpSecurity(b"short")
    with pytest.raises(ValueError, match="allowed_clients"):
        ErpSecurity(None, "erp-1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_skew_s"):
        ErpSecurity(KEY, max_skew_s=0)
    with pytest.raises(ValueError, match="site"):
        RequestHandler("a/b", CAB, lambda: None, FakeCabinet(), ErpSecurity(KEY))  # type: ignore
    with pytest.raises(ValueError, match="max_bytes"):
        RequestHandler(SITE, CAB, lambda: None, FakeCabinet(), ErpSecurity(KEY), max_bytes=1)  # type: ignore


# -- validation ----------------------------------------------------------------------------------


def test_validation_examples(env: Any) -> None:
    meta = RequestMeta("erp/r", b"x")
    cases = [
        ("ping", b"{" * 10, "bad_request"),
        ("ping", b"[]", "bad_request"),
        ("ping", b'{"a": 1, "a": 2}', "bad_request"),
        ("ping", b'{"n": NaN}', "bad_request"),
        ("ping", b"\xff\xfe", "bad_request"),
        ("ping", b"[" * 50000, "bad_request"),
        ("ping", b" " * 70000 + b"{}", "too_large"),
        ("shutdown", b"{}", "unknown_op"),
        ("ping", b'{"extra": true}', "bad_request"),
        ("get_events", b'{"limit": 0}', "bad_request"),
        ("get_events", b'{"limit": 501}', "bad_request"),
        ("get_events", b'{"since_seq": -1}', "bad_request"),
        ("get_events", b'{"limit": 2.5}', "bad_request"),
        ("get_unit", b"{}", "bad_request"),
        ("disable_badge", b'{"uid": "0102"}', "bad_request"),
        ("ping", b'{"s": "\\ud800"}', "bad_request"),
    ]
    for op, payload, code in cases:
        reply = env.handler.handle(op, payload, meta)
        assert reply is not None, (op, payload[:20])
        out = json.loads(reply.payload)
        REPLY.validate(out)
        assert out["error"]["code"] == code, (op, payload[:20], out)
        assert len(out["error"]["message"]) <= 300
    # an integral float is the same JSON number as the integer
    reply = env.handler.handle("get_events", b'{"limit": 2.0}', meta)
    assert len(json.loads(reply.payload)["result"]["events"]) == 2


# -- hypothesis: malformed requests change nothing -----------------------------------------------

TEMPLATES: dict[str, dict[str, Any]] = {
    "ping": {},
    "get_status": {},
    "get_inventory": {},
    "get_events": {"since_seq": 0, "limit": 10},
    "get_unit": {"serial": "D-0001"},
    "get_custody": {},
    "upsert_users": {
        "users": [
            {
                "external_id": "ext-zed",
                "name": "Zed",
                "email": "z@example.org",
                "enabled": True,
                "badges": ["0A0B0C0D"],
            }
        ]
    },
    "upsert_products": {
        "products": [
            {"sku": "NEW", "name": "New", "tracking": "quantity", "category": "c", "par_level": 3}
        ]
    },
    "upsert_units": {
        "units": [
            {
                "serial": "N-1",
                "sku": "DRL",
                "epc": "E2801160600002000000AAAA",
                "quantity": 1,
                "condition": "good",
                "status": "available",
                "notes": "",
            }
        ]
    },
    "disable_badge": {"uid": "04A1B2C3", "reason": "lost"},
    "remote_unlock": {"user_external_id": "ext-alice", "reason": "night shift"},
    "lockdown": {"reason": "audit"},
    "release": {"reason": "audit over"},
    "scan_now": {},
}
AUTH_FIELDS = [
    (("auth",), "obj"),
    (("auth", "ts"), "int"),
    (("auth", "nonce"), "str"),
    (("auth", "client"), "str"),
    (("auth", "hmac"), "str"),
]
FIELDS: dict[str, list[tuple[tuple[Any, ...], str]]] = {
    "get_events": [(("since_seq",), "int"), (("limit",), "int")],
    "get_unit": [(("serial",), "str")],
    "upsert_users": [
        (("users",), "list"),
        (("users", 0, "external_id"), "str"),
        (("users", 0, "name"), "str"),
        (("users", 0, "email"), "str"),
        (("users", 0, "enabled"), "bool"),
        (("users", 0, "badges"), "list"),
        (("users", 0, "badges", 0), "str"),
    ],
    "upsert_products": [
        (("products",), "list"),
        (("products", 0, "sku"), "str"),
        (("products", 0, "name"), "str"),
        (("products", 0, "tracking"), "str"),
        (("products", 0, "category"), "str"),
        (("products", 0, "par_level"), "int?"),
    ],
    "upsert_units": [
        (("units",), "list"),
        (("units", 0, "serial"), "str"),
        (("units", 0, "sku"), "str"),
        (("units", 0, "epc"), "str?"),
        (("units", 0, "quantity"), "int"),
        (("units", 0, "condition"), "str"),
        (("units", 0, "status"), "str"),
        (("units", 0, "notes"), "str"),
    ],
    "disable_badge": [(("uid",), "str"), (("reason",), "str")],
    "remote_unlock": [(("user_external_id",), "str"), (("reason",), "str")],
    "lockdown": [(("reason",), "str")],
    "release": [(("reason",), "str")],
}
REQUIRED: dict[str, list[tuple[Any, ...]]] = {
    "get_unit": [("serial",)],
    "upsert_users": [("users",), ("users", 0, "external_id"), ("users", 0, "name")],
    "upsert_products": [("products",), ("products", 0, "sku"), ("products", 0, "name")],
    "upsert_units": [("units",), ("units", 0, "serial"), ("units", 0, "sku")],
    "disable_badge": [("uid",)],
    "remote_unlock": [("user_external_id",), ("reason",)],
    "lockdown": [("reason",)],
    "release": [("reason",)],
}
OUT_OF_RANGE: dict[str, list[tuple[tuple[Any, ...], st.SearchStrategy[Any]]]] = {
    "get_events": [
        (("since_seq",), st.integers(max_value=-1) | st.integers(min_value=2**53)),
        (("limit",), st.integers(max_value=0) | st.integers(min_value=501)),
    ],
    "upsert_units": [
        (("units", 0, "quantity"), st.integers(max_value=-1) | st.integers(min_value=10**6 + 1))
    ],
    "upsert_products": [(("products", 0, "par_level"), st.integers(max_value=-1))],
}
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
NON_INTEGRAL = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "str": st.integers() | st.booleans() | st.none() | st.lists(st.text(max_size=3), max_size=2),
    "str?": st.integers() | st.booleans() | st.lists(st.integers(), max_size=2),
    "int": st.text(max_size=5) | st.booleans() | st.none() | NON_INTEGRAL | st.just([1]),
    "int?": st.text(max_size=5) | st.booleans() | NON_INTEGRAL | st.just({"n": 1}),
    "bool": st.integers() | st.text(max_size=3) | st.none(),
    "list": st.text(max_size=3) | st.integers() | st.none() | st.just({"0": {}}),
    "obj": st.text(max_size=3) | st.integers() | st.none() | st.lists(st.integers(), max_size=2),
}


def _store_rejects_uid(text: str) -> bool:
    try:
        normalise_uid(text)
    except ValueError:
        return True
    return False


BAD_UIDS = st.sampled_from(
    ["", "0102", "01:02:03", "0102030405", "GG112233", "04A1B2C3D"]
) | st.text(alphabet="0123456789ABCDEFabcdefXYZ: -", max_size=24).filter(_store_rejects_uid)


@dataclass
class Case:
    kind: str
    op: str
    payload: bytes
    meta: RequestMeta
    codes: set[str]
    addressed: bool


def _set(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        body = body[step]
    body[path[-1]] = value


def _drop(body: Any, path: tuple[Any, ...]) -> None:
    for step in path[:-1]:
        body = body[step]
    if isinstance(body, list):
        body.clear()  # an empty list is as invalid as a missing one (minItems 1)
    else:
        del body[path[-1]]


@st.composite
def bad_requests(draw: st.DrawFn, replayable: bytes) -> Case:
    style = draw(st.sampled_from(["v5", "body", "none"]))
    meta = RequestMeta("erp/r/1", b"cid") if style == "v5" else RequestMeta(None, None)
    kind = draw(
        st.sampled_from(
            [
                "garbage",
                "not_object",
                "random_object",
                "unknown_op",
                "too_large",
                "extra_field",
                "missing_field",
                "wrong_type",
                "out_of_range",
                "huge_string",
                "bad_uid",
                "bad_auth",
                "replay",
                "valid_but_unaddressed",
            ]
        )
    )
    op = draw(st.sampled_from(OPS))

    def finish(body: Any, codes: set[str], op: str = op, sign: bool = True) -> tuple[Any, set[str]]:
        if style == "body" and isinstance(body, dict):
            body = {**body, "reply_to": "erp/r/3", "correlation_id": "c-1"}
        if sign and isinstance(body, dict) and op in COMMAND_OPS:
            body = signed(op, body)
        return body, codes

    if kind == "garbage":
        payload = draw(st.binary(max_size=64).filter(lambda b: not _is_object(b)))
        return Case(kind, op, payload, meta, {"bad_request"}, style == "v5")
    if kind == "not_object":
        value = draw(SMALL_JSON.filter(lambda v: not isinstance(v, dict)))
        return Case(kind, op, json.dumps(value).encode(), meta, {"bad_request"}, style == "v5")
    if kind == "random_object":
        value = draw(st.dictionaries(st.text(max_size=5), SMALL_JSON, max_size=3))
        value["x_" + draw(st.text(max_size=5))] = draw(SMALL_JSON)
        op = draw(st.sampled_from(OPS) | st.text(max_size=12))
        body, codes = finish(value, {"bad_request", "unknown_op"}, op, sign=False)
    elif kind == "unknown_op":
        op = draw(st.text(max_size=20).filter(lambda s: s not in OPS))
        body, codes = finish({}, {"unknown_op"}, op)
    elif kind == "too_large":
        body = json.loads(json.dumps(TEMPLATES[op]))
        body, codes = finish(body, {"too_large"})
        pad = b" " * draw(st.integers(65537, 70000))
        return Case(kind, op, pad + json.dumps(body).encode(), meta, codes, style == "v5")
    elif kind == "valid_but_unaddressed":
        meta = RequestMeta(None, None)
        body = signed(op, TEMPLATES[op]) if op in COMMAND_OPS else TEMPLATES[op]
        return Case(kind, op, json.dumps(body).encode(), meta, set(), False)
    elif kind == "replay":
        return Case(kind, "upsert_products", replayable, meta, {"unauthorised"}, True)
    elif kind == "bad_auth":
        op = draw(st.sampled_from(COMMAND_OPS))
        body, _ = finish(json.loads(json.dumps(TEMPLATES[op])), set(), op, sign=False)
        how = draw(
            st.sampled_from(["hmac", "key", "stale", "client", "missing", "no_hmac", "op", "edit"])
        )
        if how == "missing":
            pass
        elif how == "stale":
            delta = draw(st.integers(61, 10**8))
            body = signed(op, body, ts=int(NOW) + draw(st.sampled_from([-delta, delta])))
        elif how == "key":
            body = signed(op, body, key=draw(st.binary(min_size=16, max_size=40)))
        elif how == "client":
            body = signed(op, body, client=draw(st.from_regex(r"\Aintruder[a-z0-9]{0,8}\Z")))
        elif how == "op":
            # a valid signature, but for another op's topic
            other = {"lockdown": "release", "release": "lockdown"}.get(op, "ping")
            body = signed(other, body)
        else:
            body = signed(op, body)
            if how == "hmac":
                hexdigits = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
                body["auth"]["hmac"] = draw(hexdigits)
            elif how == "no_hmac":
                del body["auth"]["hmac"]
            else:  # edited after signing (still fresh)
                body["auth"]["ts"] += 1
        codes = {"unauthorised"}
    else:
        body, _ = finish(json.loads(json.dumps(TEMPLATES[op])), set())
        codes = {"bad_request"}
        fields = FIELDS.get(op, []) + (AUTH_FIELDS if op in COMMAND_OPS else [])
        strings = [p for p, k in fields if k.startswith("str")]
        if kind == "extra_field" or (kind == "missing_field" and op not in REQUIRED):
            target = body
            if op.startswith("upsert_") and draw(st.booleans()):
                target = next(iter(body[k] for k in ("users", "products", "units") if k in body))[0]
            target["x_" + draw(st.text(max_size=6))] = draw(SMALL_JSON)
        elif kind == "missing_field":
            _drop(body, draw(st.sampled_from(REQUIRED[op])))
        elif kind == "wrong_type" and fields:
            path, typ = draw(st.sampled_from(fields))
            _set(body, path, draw(WRONG[typ]))
        elif kind == "out_of_range" and op in OUT_OF_RANGE:
            path, values = draw(st.sampled_from(OUT_OF_RANGE[op]))
            _set(body, path, draw(values))
        elif kind == "huge_string" and strings:
            _set(body, draw(st.sampled_from(strings)), "A" * draw(st.integers(1001, 70000)))
            codes = {"bad_request", "too_large"}
        elif kind == "bad_uid":
            op = draw(st.sampled_from(["upsert_users", "disable_badge"]))
            body, _ = finish(json.loads(json.dumps(TEMPLATES[op])), set(), op)
            path = ("users", 0, "badges", 0) if op == "upsert_users" else ("uid",)
            _set(body, path, draw(BAD_UIDS))
        else:  # the op has no such field: an extra one instead
            body["x_" + draw(st.text(max_size=6))] = draw(SMALL_JSON)
    payload = json.dumps(body).encode()
    # An oversized request is never parsed, so a reply_to inside it cannot be honoured.
    in_body = style == "body" and isinstance(body, dict) and len(payload) <= 65536
    return Case(kind, op, payload, meta, codes, style == "v5" or in_body)


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


def test_malformed_requests_get_error_replies_and_change_nothing(tmp_path: Path) -> None:
    path = seed(tmp_path)
    cabinet = FakeCabinet()
    handler = make_handler(path, cabinet, allowed=(CLIENT,))
    # One accepted command: replaying it must be refused.
    accepted = signed(
        "upsert_products",
        {"products": [{"sku": "RPL", "name": "Replay"}], "reply_to": "erp/r/0"},
    )
    replayable = json.dumps(accepted).encode()
    first = json.loads(handler.handle("upsert_products", replayable, RequestMeta()).payload)
    assert first["ok"] is True
    before = dump(path)
    kinds: list[str] = []

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bad_requests(replayable))
    def check(case: Case) -> None:
        kinds.append(case.kind)
        reply = handler.handle(case.op, case.payload, case.meta)
        if not case.addressed:
            assert reply is None, case
        else:
            assert reply is not None, case
            out = json.loads(reply.payload)
            REPLY.validate(out)
            assert out["ok"] is False, (case, out)
            assert out["error"]["code"] in case.codes, (case.kind, case.op, out)
            if case.meta.response_topic:
                assert (reply.topic, reply.correlation_data) == ("erp/r/1", b"cid")
        assert dump(path) == before, case
        assert cabinet.calls == [], case

    check()
    assert len(kinds) >= 200
    assert len(set(kinds)) >= 12, sorted(set(kinds))
