"""The store: migrations, badge checks, and events committed with their state change."""

from __future__ import annotations

import sqlite3

import pytest

from controller.store import Store, normalise_epc, normalise_uid


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "smartcab.db", site="s1", cabinet="c1")
    s.migrate()
    yield s
    s.close()


def register(store: Store) -> dict:
    with store.write():
        alice = store.add_user("Alice")
        carol = store.add_user("Carol", enabled=False)
        store.add_badge("a1:b2:c3:d4", alice)
        store.add_badge("C3D4E5F6", carol)
        pid = store.add_product("DRL", "Drill")
        unit = store.add_unit("D-0001", pid, "e2801160600002000000aaaa")
    return {"alice": alice, "carol": carol, "unit": unit}


def test_schema_is_versioned_and_migrating_twice_is_harmless(store, tmp_path):
    store.migrate()
    applied = store.db.execute("SELECT name FROM _sqlite_migrations").fetchall()
    assert applied == [("m001_initial",), ("m002_presence_evidence",)]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table in (
        "products",
        "units",
        "users",
        "badges",
        "sessions",
        "events",
        "presence",
        "custody",
        "outbox",
    ):
        assert table in store.db.table_names()


def test_badge_checks(store):
    ids = register(store)
    assert store.check_badge("A1B2C3D4").granted
    assert store.check_badge("A1B2C3D4").user_name == "Alice"
    assert store.check_badge("C3D4E5F6").reason == "user disabled"
    assert store.check_badge("01020304").reason == "unknown badge"
    store.db.execute("UPDATE badges SET enabled = 0 WHERE user_id = ?", [ids["alice"]])
    store.db.conn.commit()
    assert store.check_badge("A1B2C3D4").reason == "badge disabled"


def test_event_and_outbox_commit_together_or_not_at_all(store):
    register(store)
    unit = store.unit_by_epc("E2801160600002000000AAAA")
    with pytest.raises(RuntimeError, match="boom"):
        with store.write():
            store.set_absent(unit["epc"])
            store.append_event("unit_taken", unit=unit)
            raise RuntimeError("boom")
    assert store.recent_events() == [] and store.outbox_depth() == 0
    with store.write():
        first = store.append_event("unit_taken", unit=unit)
        second = store.append_event("unit_returned", unit=unit)
    assert (first["seq"], second["seq"]) == (1, 2)
    rows = store.outbox_batch(0, 10)
    assert [r["seq"] for r in rows] == [1, 2]
    assert rows[0]["topic"] == "smartcab/s1/c1/events"
    store.outbox_ack([1])
    assert [r["seq"] for r in store.outbox_batch(0, 10)] == [2]
    # The log keeps both: the outbox is only the delivery queue.
    assert [e["seq"] for e in store.recent_events()] == [2, 1]


def test_event_log_is_append_only(store):
    with store.write():
        store.append_event("door_ajar")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE events SET type = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM events")


def test_append_event_outside_a_transaction_is_refused(store):
    with pytest.raises(RuntimeError, match="inside Store.write"):
        store.append_event("door_ajar")


def test_duplicates_are_clear_errors(store):
    register(store)
    with pytest.raises(ValueError, match="serial 'D-0001' is already registered"):
        store.add_unit("D-0001", 1)
    with pytest.raises(ValueError, match="already bound"):
        store.add_unit("D-0002", 1, "E2801160600002000000AAAA")
    with pytest.raises(ValueError, match="already enrolled"):
        store.add_badge("A1B2C3D4", 1)


@pytest.mark.parametrize("bad", ["", "XYZ", "A1B2C3", "A1B2C3D4E5"])
def test_bad_uids(bad):
    with pytest.raises(ValueError):
        normalise_uid(bad)


def test_epc_normalisation():
    assert normalise_epc("e280-1160 6000") == "E28011606000"
    with pytest.raises(ValueError):
        normalise_epc("E28")


def test_custody_opens_and_closes(store):
    ids = register(store)
    with store.write():
        store.open_custody(ids["unit"], ids["alice"], "s-1")
    units = {u["serial"]: u for u in store.units_overview()}
    assert units["D-0001"]["holder"] == "Alice" and units["D-0001"]["status"] == "checked_out"
    with store.write():
        held = store.close_custody(ids["unit"], "s-2")
    assert held["user_id"] == ids["alice"]
    units = {u["serial"]: u for u in store.units_overview()}
    assert units["D-0001"]["holder"] is None and units["D-0001"]["status"] == "available"
