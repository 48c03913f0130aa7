"""The payload schemas (controller/schemas) and the AsyncAPI document (docs/asyncapi.yaml) against
the README and against messages the controller really produces."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from controller.erp import OPS, SCHEMA_BASE, SCHEMA_DIR, inventory_snapshot
from controller.store import CONDITIONS, UNIT_STATUSES, Store

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
SCHEMAS = {p.name: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}
REGISTRY = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values()
)


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(REGISTRY.contents(SCHEMA_BASE + name), registry=REGISTRY)


def refs(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ($ref value, where) in a JSON/YAML tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append((value, path))
            else:
                found.extend(refs(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(refs(value, f"{path}/{i}"))
    return found


def pointer(doc: Any, fragment: str) -> Any:
    """Resolve a JSON pointer ('/a/b~1c'); KeyError/IndexError if it does not exist."""
    node = doc
    for part in fragment.lstrip("/").split("/") if fragment.strip("/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# -- the schemas themselves ---------------------------------------------------------------


def test_expected_schema_files_exist() -> None:
    expected = {"event.json", "status.json", "inventory.json", "alarm.json", "reply.json"}
    expected |= {f"request-{op}.json" for op in OPS}
    assert expected <= set(SCHEMAS)
    # no stray request schema for an op the handler does not know
    assert {n for n in SCHEMAS if n.startswith("request-")} == {f"request-{op}.json" for op in OPS}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = SCHEMAS[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == SCHEMA_BASE + name
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_ref_in_a_schema_resolves(name: str) -> None:
    resolver = REGISTRY.resolver(base_uri=SCHEMA_BASE + name)
    found = refs(SCHEMAS[name])
    for ref, where in found:
        resolved = resolver.lookup(ref)  # raises when the target does not exist
        assert isinstance(resolved.contents, dict | bool), (name, where, ref)


def test_schema_enums_match_the_store() -> None:
    units = SCHEMAS["request-upsert_units.json"]["properties"]["units"]["items"]["properties"]
    assert units["condition"]["enum"] == list(CONDITIONS)
    # the ERP may set any status except checked_out, which custody alone sets
    assert set(units["status"]["enum"]) == set(UNIT_STATUSES) - {"checked_out"}


# -- events ---------------------------------------------------------------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_event_example_validates() -> None:
    (block,) = re.findall(r"### Event payload\s+```json\n(.*?)```", readme(), re.S)
    example = json.loads(block)
    validator("event.json").validate(example)


def test_every_event_type_in_the_readme_is_in_the_schema() -> None:
    table = readme().split("| type | when |", 1)[1].split("\n\n", 1)[0]
    documented = set()
    for line in table.splitlines():
        cell = line.split("|")[1] if line.startswith("|") else ""
        documented |= set(re.findall(r"`(\w+)`", cell))
    assert len(documented) >= 10, documented
    assert documented <= set(SCHEMAS["event.json"]["properties"]["type"]["enum"])


def appended_types() -> set[str]:
    """Event types the controller passes to append_event (string constants, both sides of
    a conditional)."""
    types: set[str] = set()
    for path in (ROOT / "controller").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "append_event"
                and node.args
            ):
                for sub in ast.walk(node.args[0]):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        types.add(sub.value)
    return types


def test_every_event_type_the_controller_appends_is_in_the_schema() -> None:
    found = appended_types()
    assert {"access_granted", "unit_taken", "badge_disabled"} <= found
    assert found <= set(SCHEMAS["event.json"]["properties"]["type"]["enum"])
    # the upserts pass their type through a helper; the cabinet records the others
    source = (ROOT / "controller" / "erp.py").read_text()
    for kind in ("users_upserted", "products_upserted", "units_upserted"):
        assert f'"{kind}"' in source
        assert kind in SCHEMAS["event.json"]["properties"]["type"]["enum"]


def test_events_written_by_the_store_validate(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", site="plant-7", cabinet="cab_2")
    store.migrate()
    check = validator("event.json")
    with store.write():
        uid = store.add_user("Alice")
        pid = store.add_product("DRL", "Drill")
        store.add_unit("D-1", pid, "E28011606000020000000001")
        store.add_unit("Q-1", pid)  # no tag
        user = store.user(uid)
        unit = store.unit_by_epc("E28011606000020000000001")
        untagged = {**unit, "serial": "Q-1", "epc": None}
        sid = store.open_session("badge", uid, "04A1B2C3")
        events = [
            store.append_event(t, session_id=sid, user=user, data={"badge": "04A1B2C3"})
            for t in SCHEMAS["event.json"]["properties"]["type"]["enum"]
        ]
        events.append(store.append_event("unit_taken", session_id=sid, user=user, unit=unit))
        events.append(store.append_event("unit_missing", unit=untagged))
        events.append(store.append_event("unknown_tag", epc="E2801160600002000000FFFF"))
    for event in events:
        check.validate(event)
    store.close()


def test_the_event_schema_rejects_what_it_should() -> None:
    good = json.loads(re.findall(r"### Event payload\s+```json\n(.*?)```", readme(), re.S)[0])
    check = validator("event.json")
    bad = [
        {**good, "type": "unit_teleported"},
        {k: v for k, v in good.items() if k != "seq"},
        {**good, "seq": 0},
        {**good, "ts": "2026-11-23 11:30:46"},
        {**good, "surprise": 1},
        {**good, "user": {"id": 1}},
    ]
    for event in bad:
        assert list(check.iter_errors(event)), event


# -- status and inventory from the real producers ---------------------------------------------


def test_status_messages_from_the_outbox_validate(tmp_path: Path) -> None:
    from controller.cabinet import StatusBoard
    from controller.config import Config
    from controller.mqtt_link import Outbox

    store = Store(tmp_path / "db.sqlite")
    store.migrate()
    board = StatusBoard()
    board.update(state="idle", door="closed", lock="locked", reader="ok", alarm=None)
    outbox = Outbox(Config(), lambda: store, board)
    check = validator("status.json")
    check.validate(json.loads(outbox._status_payload("offline")))
    check.validate(json.loads(outbox._status_payload("online", store)))
    assert list(check.iter_errors({"state": "sleeping"}))
    store.close()


def test_the_inventory_snapshot_validates(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", site="s", cabinet="c")
    store.migrate()
    with store.write():
        uid = store.add_user("Alice")
        pid = store.add_product("DRL", "Drill")
        a = store.add_unit("D-1", pid, "E28011606000020000000001")
        store.add_unit("D-2", pid, "E28011606000020000000002")
        store.set_present("E28011606000020000000002", None, [1], -40)
        store.set_present("E2801160600002000000FFFF", None, [1], -40)
        store.open_custody(a, uid, "session-1")
    snapshot = inventory_snapshot(store)
    validator("inventory.json").validate(snapshot)
    assert [u["serial"] for u in snapshot["out"]] == ["D-1"]
    assert snapshot["out"][0]["holder"] == {"id": uid, "name": "Alice"}
    store.close()


def test_alarm_schema_accepts_a_raised_alarm_and_rejects_an_unknown_type() -> None:
    alarm = {
        "alarm_id": "0b7c3e0e-3a4c-4d0c-9a55-1f8f0c8e7f10",
        "type": "door_ajar",
        "state": "raised",
        "severity": "warning",
        "ts": "2026-11-23T11:30:46.125Z",
        "site": "demo",
        "cabinet": "cabinet-1",
        "seq": 42,
        "data": {"open_for_s": 60},
    }
    check = validator("alarm.json")
    check.validate(alarm)
    assert list(check.iter_errors({**alarm, "type": "fire"}))


# -- the AsyncAPI document -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return yaml.safe_load((DOCS / "asyncapi.yaml").read_text())


def test_asyncapi_document_shape(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in asyncapi["channels"].values()}
    for suffix in ("events", "status", "inventory", "alarms", "req/{op}"):
        assert f"smartcab/{{site}}/{{cabinet}}/{suffix}" in addresses
    assert asyncapi["components"]["parameters"]["op"]["enum"] == list(OPS)
    assert set(asyncapi["channels"]["request"]["messages"]) == set(OPS)
    ops = asyncapi["operations"]
    retained = {name: op["bindings"]["mqtt"].get("retain") for name, op in ops.items()}
    assert retained["sendStatus"] is True and retained["sendInventory"] is True
    assert retained["sendEvents"] is False
    reply = ops["receiveRequests"]["reply"]
    # the pattern AsyncAPI 3.0 requires of a runtime expression
    assert re.match(
        r"^\$message\.(header|payload)#(/(([^/~])|(~[01]))*)*", reply["address"]["location"]
    )
    assert asyncapi["channels"]["reply"]["address"] is None


def test_every_asyncapi_ref_resolves(asyncapi: dict[str, Any]) -> None:
    found = refs(asyncapi)
    external = 0
    for ref, where in found:
        target, _, fragment = ref.partition("#")
        if target:
            path = (DOCS / target).resolve()
            assert path.is_file(), (where, ref)
            doc = json.loads(path.read_text())
            external += 1
        else:
            doc = asyncapi
        try:
            pointer(doc, fragment)
        except (KeyError, IndexError, ValueError, TypeError):
            pytest.fail(f"{where}: $ref {ref} does not resolve")
    assert external >= len(OPS) + 5  # every request schema plus event/status/inventory/alarm/reply


def test_the_ref_checker_notices_a_broken_ref(asyncapi: dict[str, Any]) -> None:
    with pytest.raises(KeyError):
        pointer(asyncapi, "/components/messages/no_such_message")
    assert not (DOCS / "./schemas/missing.json").is_file()
