"""Simulator control endpoints, registered only by ``smartcab demo``.

They drive the simulated hardware at its own boundary (a badge over nfcpy's udp
driver, the door's mock GPIO pin, tags inside the reader simulator); the
controller sees nothing but that hardware. The browser's simulator panel and the
end-to-end tests use the same endpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from flask import Blueprint, jsonify, request

from controller.cabinet import StatusBoard
from controller.store import Store, normalise_epc, normalise_uid

MAX_TAGS_PER_REQUEST = 1000


class SimulatedHardware(Protocol):
    """What the demo's simulated cabinet offers to the web page."""

    def present_badge(self, uid: str) -> None: ...

    def set_door(self, is_open: bool) -> None: ...

    def move_tags(self, add: list[str], remove: list[str]) -> None: ...

    def hardware_state(self) -> dict[str, Any]:
        """``door``, ``lock``, ``inside`` (EPCs), ``known`` (every EPC), ``card_present``."""
        ...


class BadRequest(ValueError):
    pass


def create_sim_blueprint(
    hw: SimulatedHardware, open_store: Callable[[], Store], board: StatusBoard
) -> Blueprint:
    bp = Blueprint("sim", __name__, url_prefix="/sim")

    @bp.errorhandler(BadRequest)
    def _bad(exc: BadRequest) -> Any:
        return jsonify({"error": str(exc)}), 400

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("send a JSON object with Content-Type: application/json")
        return data

    @bp.post("/badge")
    def badge() -> Any:
        uid = body().get("uid")
        if not isinstance(uid, str):
            raise BadRequest('"uid" must be a hex string')
        try:
            uid = normalise_uid(uid)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        hw.present_badge(uid)
        return jsonify({"ok": True, "uid": uid})

    @bp.post("/door")
    def door() -> Any:
        state = body().get("state")
        if state not in ("open", "closed"):
            raise BadRequest('"state" must be "open" or "closed"')
        hw.set_door(state == "open")
        return jsonify({"ok": True, "door": state})

    @bp.post("/tags")
    def tags() -> Any:
        data = body()
        lists = {}
        for key in ("add", "remove"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRequest(f'"{key}" must be a list of EPC hex strings')
            if len(value) > MAX_TAGS_PER_REQUEST:
                raise BadRequest(f'"{key}" has more than {MAX_TAGS_PER_REQUEST} EPCs')
            try:
                lists[key] = [normalise_epc(v) for v in value]
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        unknown = set(data) - {"add", "remove"}
        if unknown:
            raise BadRequest(f"unknown keys: {', '.join(sorted(unknown))}")
        hw.move_tags(lists["add"], lists["remove"])
        return jsonify({"ok": True, **lists})

    @bp.get("/state")
    def state() -> Any:
        hs = hw.hardware_state()
        store = open_store()
        try:
            units = {u["epc"]: u for u in store.units_overview() if u["epc"]}
            badges = store.db.query(
                "SELECT b.uid, u.name, (b.enabled AND u.enabled) AS enabled "
                "FROM badges b JOIN users u ON u.id = b.user_id ORDER BY u.name"
            )
            badge_list = [{**b, "enabled": bool(b["enabled"])} for b in badges]
        finally:
            store.close()

        def tag(epc: str) -> dict[str, Any]:
            u = units.get(epc)
            return {
                "epc": epc,
                "serial": u["serial"] if u else None,
                "product": u["product"] if u else None,
            }

        inside = set(hs["inside"])
        snap = board.snapshot()
        return jsonify(
            {
                "inside": [tag(e) for e in sorted(inside, key=lambda e: tag(e)["serial"] or e)],
                "outside": [
                    tag(e)
                    for e in sorted(set(hs["known"]) - inside, key=lambda e: tag(e)["serial"] or e)
                ],
                "badges": badge_list,
                "door": hs["door"],
                "lock": hs["lock"],
                "cabinet_state": snap.get("state"),
                "card_present": hs["card_present"],
                "idle": bool(snap.get("idle")),
            }
        )

    return bp
