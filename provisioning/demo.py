"""``smartcab demo``: the real controller on simulated hardware, with a demo register.

The simulators sit where the hardware would: the UHF reader simulator owns a
pseudo-terminal that the Mercury driver opens by path, the badge simulator is a
card-emulating nfcpy frontend on the ``udp`` driver, and the lock and door are
gpiozero mock pins. The controller is configured exactly as on a Pi, only with
those device paths and ``pin_factory = "mock"``.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.security import generate_password_hash

from controller.app import CabinetApp
from controller.config import (
    CabinetConfig,
    Config,
    GpioConfig,
    InventoryConfig,
    MqttConfig,
    NfcConfig,
    RfidConfig,
    WebConfig,
    to_toml,
)
from controller.store import Store
from firmware import make_pin_factory
from readers.nfc import BadgeSimulator, free_udp_port
from readers.rfid.mercury_sim import MercurySimulator
from readers.rfid.r2000_sim import R2000Simulator
from web.sim import create_sim_blueprint

log = logging.getLogger(__name__)

ANTENNAS = 8
SIMULATORS = {"mercury": MercurySimulator, "r2000": R2000Simulator}
CARD_HOLD_S = 1.5  # how long a simulated tap holds the badge on the reader


@dataclass(frozen=True)
class DemoUser:
    name: str
    email: str
    badge: str
    enabled: bool = True


DEMO_USERS = (
    DemoUser("Alice Martin", "alice@example.com", "A1B2C3D4"),
    DemoUser("Bob Nguyen", "bob@example.com", "B2C3D4E5"),
    DemoUser("Carol Diaz", "carol@example.com", "C3D4E5F6", enabled=False),
    DemoUser("Dan Okafor", "dan@example.com", "04A1B2C3D4E5F6"),
)

# (sku, name, tracking, serials, quantity per unit)
DEMO_PRODUCTS = (
    ("DRL-18V", "Cordless drill 18V", "serialized", [f"D-{n:04d}" for n in range(40, 48)], 1),
    ("DMM-87", "Digital multimeter", "serialized", [f"M-{n:04d}" for n in range(1, 9)], 1),
    ("TW-200", "Torque wrench 40-200 Nm", "serialized", [f"TW-{n:04d}" for n in range(1, 5)], 1),
    ("GLV-100", "Nitrile gloves, box of 100", "quantity", ["GL-0001", "GL-0002", "GL-0003"], 100),
    ("CT-50", "Cable ties, bag of 50", "quantity", ["CT-0001", "CT-0002"], 50),
)

# A tagged item nobody registered, offered outside the cabinet in the simulator panel.
STRAY_EPC = "E28011606000020000000999"


def demo_epc(index: int) -> str:
    """A 96-bit EPC for the demo's n-th unit."""
    return f"E2801160600002{index:010X}"


def placement(index: int) -> dict[int, int]:
    """Which antennas see the n-th unit, and how strongly (shelf antenna plus a neighbour)."""
    shelf = index % ANTENNAS + 1
    neighbour = shelf % ANTENNAS + 1
    return {shelf: -45 - (index % 5) * 3, neighbour: -68}


def seed_register(store: Store) -> list[str]:
    """Fill an empty register with the demo users, products and units; returns their EPCs."""
    epcs: list[str] = []
    with store.write():
        for u in DEMO_USERS:
            uid = store.add_user(u.name, u.email, enabled=u.enabled)
            store.add_badge(u.badge, uid)
        index = 0
        for sku, name, tracking, serials, qty in DEMO_PRODUCTS:
            pid = store.add_product(
                sku, name, tracking, par_level=2 if tracking == "quantity" else None
            )
            for serial in serials:
                epc = demo_epc(index)
                store.add_unit(serial, pid, epc, quantity=qty)
                epcs.append(epc)
                index += 1
    return epcs


class SimulatedCabinetHardware:
    """The demo's hardware, driven at its own boundary (see module docstring)."""

    def __init__(
        self, rfid: MercurySimulator | R2000Simulator, badge: BadgeSimulator, config: Config
    ) -> None:
        self.rfid = rfid
        self.badge = badge
        self.gpio = config.gpio
        # The same MockFactory the controller's devices get, so the panel drives their pins.
        self.factory = make_pin_factory(config.gpio.pin_factory)
        self.placements: dict[str, dict[int, int]] = {}

    def know(self, epc: str, antennas: dict[int, int], inside: bool) -> None:
        """Register a tag the panel can move; put it in the cabinet if ``inside``."""
        self.placements[epc] = antennas
        if inside:
            self.rfid.add_tag(epc, antennas)

    def present_badge(self, uid: str) -> None:
        # A new tap takes the previous card out of the field first, as a hand would.
        # The card stays longer than nfcpy's udp reader needs to find it (up to ~1.05 s:
        # it waits 1 s on every poll that went out before the card was there).
        self.badge.remove()
        self.badge.present(uid, seconds=CARD_HOLD_S)

    def set_door(self, is_open: bool) -> None:
        pin = self.factory.pin(self.gpio.door_pin)
        # The reed switch pulls the pin low when the door is shut (closed_when_low).
        if is_open == self.gpio.door_closed_when_low:
            pin.drive_high()
        else:
            pin.drive_low()

    def move_tags(self, add: list[str], remove: list[str]) -> None:
        for epc in remove:
            self.rfid.remove_tag(epc)
        for epc in add:
            self.rfid.add_tag(epc, self.placements.setdefault(epc, placement(len(self.placements))))

    def hardware_state(self) -> dict[str, Any]:
        door_low = not self.factory.pin(self.gpio.door_pin).state
        lock_high = bool(self.factory.pin(self.gpio.lock_pin).state)
        return {
            "door": "closed" if door_low == self.gpio.door_closed_when_low else "open",
            "lock": "released" if lock_high == self.gpio.lock_active_high else "locked",
            "inside": list(self.rfid.tags()),
            "known": list(self.placements),
            "card_present": not self.badge.wait_done(0),
        }


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


class Demo:
    """The whole simulated cabinet: simulators, demo register and the real controller."""

    def __init__(
        self,
        http: str = "127.0.0.1:8080",
        mqtt: str | None = "127.0.0.1:1883",
        data_dir: str | None = None,
        *,
        site: str = "demo",
        name: str = "cabinet-1",
        time_scale: float = 1.0,
        rounds: int = 2,
        dwell_ms: int = 100,
        protocol: str = "mercury",
        command_key: str = "",
        nfc_holdoff_s: float = 1.5,
    ) -> None:
        web_host, web_port = _host_port(http, "http")
        mqtt_host, mqtt_port = _host_port(mqtt, "mqtt") if mqtt else ("127.0.0.1", 1883)
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="smartcab-demo-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if protocol not in SIMULATORS:
            raise ValueError(f"--protocol must be one of {', '.join(SIMULATORS)}, got {protocol!r}")
        self.rfid = SIMULATORS[protocol](antenna_ports=ANTENNAS, time_scale=time_scale)
        self.rfid.start()
        # Outside the ephemeral range and not a named service (nfcpy 1.0.4 trips on those).
        nfc_port = free_udp_port()
        self.badge_sim = BadgeSimulator(nfc_port)
        self.config = Config(
            cabinet=CabinetConfig(site=site, name=name, data_dir=str(self.data_dir)),
            gpio=GpioConfig(pin_factory="mock"),
            nfc=NfcConfig(path=f"udp:localhost:{nfc_port}", holdoff_s=nfc_holdoff_s),
            rfid=RfidConfig(
                protocol=protocol,
                port=self.rfid.port,
                antennas=tuple(range(1, ANTENNAS + 1)),
                dwell_ms=dwell_ms,
            ),
            inventory=InventoryConfig(min_rounds=rounds, max_rounds=max(rounds, 6)),
            mqtt=MqttConfig(
                enabled=mqtt is not None, host=mqtt_host, port=mqtt_port, command_key=command_key
            ),
            web=WebConfig(host=web_host, port=web_port),
        )
        (self.data_dir / "smartcab.toml").write_text(to_toml(self.config))
        self.admin_password = secrets.token_urlsafe(12)
        store = Store(self.config.db_path, site=site, cabinet=name)
        store.migrate()
        fresh = not store.units_overview()
        epcs = seed_register(store) if fresh else [u["epc"] for u in store.units_overview()]
        inside = set(epcs) if fresh else store.present_epcs()
        store.set_admin("admin", generate_password_hash(self.admin_password))
        store.close()
        self.hw = SimulatedCabinetHardware(self.rfid, self.badge_sim, self.config)
        for i, epc in enumerate(epcs):
            self.hw.know(epc, placement(i), epc in inside)
        self.hw.know(STRAY_EPC, {1: -70}, STRAY_EPC in inside)
        self.app = CabinetApp(
            self.config,
            blueprints=lambda app: (create_sim_blueprint(self.hw, app.open_store, app.board),),
        )
        # gpiozero's pull-up makes a fresh mock door pin read "open"; a real reed switch
        # on a shut door reads closed, so shut the simulated door before starting.
        self.hw.set_door(False)
        deadline = time.monotonic() + 2
        while self.app.io.door.is_open and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return self.app.web_url or ""

    def start(self) -> None:
        self.app.start()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until the cabinet is idle (e.g. the baseline scan is done)."""
        return self.app.board.wait_for(lambda s: bool(s.get("idle")), timeout)

    def stop(self) -> None:
        self.app.stop()
        self.badge_sim.close()
        self.rfid.stop()

    def serve_forever(self) -> None:
        """Run until Ctrl-C, printing where to go and how to log in."""
        self.start()
        print(
            f"smartcab demo: admin page {self.url}  (user: admin, password: {self.admin_password})",
            flush=True,
        )
        print(f"smartcab demo: kiosk view {self.url}/kiosk; data in {self.data_dir}", flush=True)
        threading.Thread(target=self.wait_idle, daemon=True).start()
        self.app.serve_forever()
        self.badge_sim.close()
        self.rfid.stop()
