"""Assemble a whole cabinet from its config: store, I/O, readers, state machine,
ERP link and admin page. ``smartcab run`` and ``smartcab demo`` both go through
:class:`CabinetApp`; the demo differs only in the config it writes (mock pin
factory, the simulators' device paths) and the simulator blueprint it adds.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
from collections.abc import Callable

import schedule
from flask import Blueprint
from waitress.server import create_server

from controller.cabinet import Cabinet, ErpCommands, IdleScan, StatusBoard
from controller.config import Config
from controller.erp import ErpSecurity, RequestHandler
from controller.inventory import Inventory
from controller.mqtt_link import Outbox
from controller.store import Store, utcnow
from firmware import CabinetIO, SystemdNotifier, make_pin_factory, watchdog_interval_s
from readers.nfc import BadgeReader
from readers.rfid import open_reader
from web.app import create_app

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The cabinet cannot start as configured; the message says why."""


class CabinetApp:
    """Every part of one cabinet, started and stopped together."""

    def __init__(
        self,
        config: Config,
        *,
        require_admin: bool = True,
        blueprints: Callable[[CabinetApp], tuple[Blueprint, ...]] = lambda app: (),
    ) -> None:
        self.config = config
        self.board = StatusBoard()
        self.store = self.open_store()
        self.store.migrate()
        if config.web.enabled and require_admin and not self.store.has_admin():
            raise StartupError(
                "no admin account: create one with `smartcab set-admin --config FILE` "
                "(or set [web] enabled = false)"
            )
        g = config.gpio
        self.io = CabinetIO(
            lock_pin=g.lock_pin,
            lock_active_high=g.lock_active_high,
            door_pin=g.door_pin,
            door_closed_when_low=g.door_closed_when_low,
            door_debounce_s=g.door_debounce_s,
            green_led_pin=g.pin("green_led_pin"),
            red_led_pin=g.pin("red_led_pin"),
            buzzer_pin=g.pin("buzzer_pin"),
            pin_factory=make_pin_factory(g.pin_factory),
        )
        r = config.rfid
        self.inventory = Inventory(
            open_reader(r.protocol, r.port, r.baudrate, r.timeout_s), r, config.inventory
        )
        self.outbox = Outbox(config, self.open_store, self.board) if config.mqtt.enabled else None
        self.cabinet = Cabinet(
            config,
            self.store,
            self.io,
            self.inventory,
            board=self.board,
            on_events=self.outbox.wake if self.outbox else lambda: None,
        )
        if self.outbox is not None:
            m = config.mqtt
            self.outbox.handler = RequestHandler(
                config.cabinet.site,
                config.cabinet.name,
                self.open_store,
                ErpCommands(self.cabinet, self.outbox.status),
                ErpSecurity(m.command_key.encode() or None, m.allowed_clients),
            )
        self.badges = BadgeReader(
            config.nfc.path, self.cabinet.badge, holdoff_s=config.nfc.holdoff_s
        )
        self.web_server = None
        if config.web.enabled:
            secret = self.store.setting("web_secret")
            if secret is None:
                secret = secrets.token_hex(32)
                self.store.set_setting("web_secret", secret)
            flask_app = create_app(
                self.open_store,
                self.board,
                cabinet_name=config.cabinet.name,
                extra_blueprints=blueprints(self),
                secret_key=secret,
            )
            self.web_server = create_server(
                flask_app, host=config.web.host, port=config.web.port, threads=4
            )
        self.scheduler = schedule.Scheduler()
        self.notifier = SystemdNotifier()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def open_store(self) -> Store:
        """A new connection to this cabinet's database (one per thread)."""
        c = self.config.cabinet
        return Store(self.config.db_path, site=c.site, cabinet=c.name)

    @property
    def web_url(self) -> str | None:
        if self.web_server is None:
            return None
        return f"http://{self.config.web.host}:{self.web_server.effective_port}"

    def start(self) -> None:
        """Start every part; returns once they are running."""
        if self.outbox:
            self.outbox.start()
        self.cabinet.start()
        self.badges.start()
        if self.web_server is not None:
            t = threading.Thread(target=self.web_server.run, name="web", daemon=True)
            t.start()
            self._threads.append(t)
        # Light periodic jobs only; the cabinet's own timers live in its thread.
        self.scheduler.every(30).seconds.do(self._heartbeat)
        if self.config.inventory.idle_scan_minutes:
            self.scheduler.every(self.config.inventory.idle_scan_minutes).minutes.do(
                self.cabinet.post, IdleScan()
            )
        self.notifier.ready()
        log.info(
            "cabinet %s started%s",
            self.config.cabinet.name,
            f"; admin page on {self.web_url}" if self.web_url else "",
        )

    def _heartbeat(self) -> None:
        self.board.update(heartbeat=utcnow(), nfc=self.badges.status)

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM: tick periodic jobs and feed the systemd watchdog."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopped.set())
        tick = min(1.0, watchdog_interval_s() or 1.0)
        while not self._stopped.wait(tick):
            self.scheduler.run_pending()
            self.notifier.watchdog()
        self.stop()

    def stop(self) -> None:
        """Stop every part, lock first; safe to call twice."""
        self._stopped.set()
        self.notifier.stopping()
        self.badges.stop()
        self.cabinet.stop()
        if self.web_server is not None:
            self.web_server.close()
        if self.outbox:
            self.outbox.stop()
        self.inventory.close()
        self.io.close()
        self.store.close()
