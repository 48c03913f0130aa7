"""The Flask admin page and kiosk view.

Everything but the kiosk view, the login form and static files needs a logged-in
admin. There is no default password: ``smartcab set-admin`` (or the demo, which
prints a generated one) creates the account.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.security import check_password_hash

from controller.cabinet import StatusBoard
from controller.store import Store

EVENT_TYPES = (
    "unit_taken", "unit_returned", "unit_uncertain", "unit_confirmed", "unit_missing",
    "unit_appeared", "unknown_tag", "access_granted", "access_denied", "access_expired",
    "door_opened", "door_closed", "forced_entry", "door_ajar", "reader_fault",
    "inventory_baseline", "remote_unlock", "lockdown", "release", "scan_now",
    "users_upserted", "products_upserted", "units_upserted", "badge_disabled",
)  # fmt: skip


def describe(event: dict[str, Any]) -> str:
    """An event as one sentence a person reads on the dashboard."""
    who = (event.get("user") or {}).get("name") or "Someone (no badge)"
    unit = event.get("unit") or {}
    data = event.get("data") or {}
    what = f"{unit.get('serial')} ({unit.get('product')})" if unit else ""
    match event["type"]:
        case "unit_taken":
            return f"{who} took {what}"
        case "unit_returned":
            return f"{who} returned {what}"
        case "unknown_tag":
            return f"Unregistered tag {event.get('epc')} appeared"
        case "access_granted":
            return f"{who} opened the cabinet with badge {data.get('badge')}"
        case "access_denied":
            return f"Badge {data.get('badge')} denied: {data.get('reason')}"
        case "access_expired":
            return f"{who} badged in but did not open the door"
        case "door_opened":
            return f"{who} opened the door"
        case "door_closed":
            return f"{who} closed the door"
        case "forced_entry":
            return "ALARM: door opened without a valid badge"
        case "door_ajar":
            return "ALARM: door left open"
        case "reader_fault":
            return "Reader fault: " + "; ".join(data.get("faults") or [])
        case "inventory_baseline":
            return f"Baseline inventory: {data.get('tags')} tags"
        case "unit_uncertain":
            return f"Not sure whether {what} left (looking again): {data.get('reason')}"
        case "unit_confirmed":
            return f"{what} is in the cabinet after all"
        case "unit_missing":
            return f"ANOMALY: {what} is gone from the closed cabinet"
        case "unit_appeared":
            return f"ANOMALY: {what} appeared in the closed cabinet"
        case "remote_unlock":
            return f"ERP ({data.get('requested_by')}) unlocked the cabinet for {who}"
        case "lockdown":
            return f"ERP ({data.get('requested_by')}) locked the cabinet down: {data.get('reason')}"
        case "release":
            return f"ERP ({data.get('requested_by')}) released the lockdown"
        case "scan_now":
            return "ERP asked for an inventory"
        case "users_upserted" | "products_upserted" | "units_upserted":
            kind = event["type"].split("_")[0]
            return f"ERP ({data.get('requested_by')}) updated {data.get('count')} {kind}"
        case "badge_disabled":
            return f"ERP ({data.get('requested_by')}) disabled badge {data.get('badge')}"
    return event["type"]


def when(ts: str | None) -> str:
    """ISO timestamp shown as local-free short UTC text."""
    if not ts:
        return ""
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return ts


def create_app(
    open_store: Callable[[], Store],
    board: StatusBoard,
    *,
    cabinet_name: str = "cabinet",
    extra_blueprints: tuple[Blueprint, ...] = (),
    secret_key: str | None = None,
) -> Flask:
    """Build the admin app; ``open_store`` gives a Store for the current request."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_hex(32),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=1 << 20,
    )
    app.jinja_env.filters["describe"] = describe
    app.jinja_env.filters["when"] = when
    app.jinja_env.globals["cabinet_name"] = cabinet_name
    app.jinja_env.globals["sim_enabled"] = bool(extra_blueprints)

    def store() -> Store:
        if "store" not in g:
            g.store = open_store()
        return g.store

    @app.teardown_appcontext
    def _close_store(exc: BaseException | None) -> None:
        s = g.pop("store", None)
        if s is not None:
            s.close()

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_hex(16)
        return session["csrf"]

    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def _check_csrf() -> None:
        if request.method == "POST" and request.blueprint != "sim":
            sent = request.form.get("csrf", "")
            if not hmac.compare_digest(sent, session.get("csrf", "")):
                abort(400, "missing or stale form token; reload the page")

    def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not session.get("admin"):
                return redirect(url_for("login", next=request.path))
            return view(*args, **kwargs)

        return wrapped

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = None
        if request.method == "POST":
            username = request.form.get("username", "")[:64]
            password = request.form.get("password", "")[:256]
            stored = store().admin_hash(username)
            if stored and check_password_hash(stored, password):
                session.clear()
                session["admin"] = username
                target = request.args.get("next", "")
                # Only local paths: never redirect off-site from a login form.
                if not target.startswith("/") or target.startswith("//"):
                    target = url_for("dashboard")
                return redirect(target)
            error = "Wrong username or password."
        return render_template("login.html", error=error), 401 if error else 200

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    @login_required
    def dashboard() -> Any:
        return render_template("dashboard.html", **_dashboard_data(store(), board))

    @app.get("/partials/dashboard")
    @login_required
    def dashboard_partial() -> Any:
        return render_template("_dashboard_body.html", **_dashboard_data(store(), board))

    @app.get("/units")
    @login_required
    def units() -> Any:
        return render_template("units.html", units=store().units_overview())

    @app.get("/users")
    @login_required
    def users() -> Any:
        return render_template("users.html", users=store().users_overview())

    @app.get("/events")
    @login_required
    def events() -> Any:
        type_ = request.args.get("type") or None
        if type_ is not None and type_ not in EVENT_TYPES:
            abort(400, f"unknown event type; known: {', '.join(EVENT_TYPES)}")
        rows = store().recent_events(500, type=type_)
        return render_template("events.html", events=rows, types=EVENT_TYPES, selected=type_)

    @app.get("/api/status")
    @login_required
    def api_status() -> Any:
        return jsonify({**board.snapshot(), "outbox": store().outbox_depth()})

    @app.get("/kiosk")
    def kiosk() -> Any:
        return render_template("kiosk.html", status=board.snapshot())

    @app.get("/partials/kiosk")
    def kiosk_partial() -> Any:
        return render_template("_kiosk_body.html", status=board.snapshot())

    for bp in extra_blueprints:
        app.register_blueprint(bp)
    return app


def _dashboard_data(store: Store, board: StatusBoard) -> dict[str, Any]:
    units = store.units_overview()
    return {
        "status": board.snapshot(),
        "outbox": store.outbox_depth(),
        "events": store.recent_events(15),
        "out": [u for u in units if not u["inside"]],
        "inside_count": sum(1 for u in units if u["inside"]),
        "unit_count": len(units),
        "unknown": store.unknown_present(),
    }
