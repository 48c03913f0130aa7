"""Cabinet configuration: one TOML file read once at start into frozen dataclasses.

Every key has a documented default (see ``provisioning/smartcab.example.toml``).
An unknown section or key, a value of the wrong type or out of range is a
:class:`ConfigError` whose one-line message names the key, e.g.
``config: rfid.power_dbm: must be between 0 and 31.5, got 40``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad config file; the message names the offending key."""


class _Invalid(ValueError):
    def __init__(self, key: str, msg: str) -> None:
        super().__init__(msg)
        self.key = key


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise _Invalid(key, msg)


def _name(value: str, key: str) -> None:
    # Site and cabinet names go into MQTT topics: no wildcards, separators or spaces.
    _check(
        bool(value) and all(c.isalnum() or c in "-_" for c in value),
        key,
        f"must be letters, digits, '-' or '_', got {value!r}",
    )


@dataclass(frozen=True)
class CabinetConfig:
    """Identity of the cabinet and its door timings."""

    site: str = "site"
    name: str = "cabinet-1"
    data_dir: str = "/var/lib/smartcab"
    unlock_s: float = 10.0  # how long the strike stays released after a valid badge
    door_ajar_s: float = 60.0  # door open longer than this raises a door_ajar alarm

    def validate(self) -> None:
        _name(self.site, "site")
        _name(self.name, "name")
        _check(1 <= self.unlock_s <= 120, "unlock_s", "must be between 1 and 120 s")
        _check(5 <= self.door_ajar_s <= 3600, "door_ajar_s", "must be between 5 and 3600 s")


@dataclass(frozen=True)
class GpioConfig:
    """Pins (BCM numbers) of the cabinet's own I/O; hardware is described here, not in code."""

    pin_factory: str = ""  # "" = gpiozero's default order; "mock" for the simulated cabinet
    lock_pin: int = 17
    lock_active_high: bool = True
    door_pin: int = 27
    door_closed_when_low: bool = True  # reed switch to GND with the internal pull-up
    door_debounce_s: float = 0.05
    # -1 means "not fitted"
    green_led_pin: int = 22
    red_led_pin: int = 23
    buzzer_pin: int = 24

    _PINS = ("lock_pin", "door_pin", "green_led_pin", "red_led_pin", "buzzer_pin")

    def validate(self) -> None:
        seen: dict[int, str] = {}
        for key in self._PINS:
            pin = getattr(self, key)
            optional = key not in ("lock_pin", "door_pin")
            if optional and pin == -1:
                continue
            _check(0 <= pin <= 27, key, f"{pin} is not a BCM GPIO number (0-27)")
            _check(pin not in seen, key, f"pin {pin} is already used by {seen.get(pin)}")
            seen[pin] = key
        _check(0 <= self.door_debounce_s <= 1, "door_debounce_s", "must be between 0 and 1 s")

    def pin(self, key: str) -> int | None:
        """A pin number, or None for an optional device that is not fitted."""
        value = getattr(self, key)
        return None if value == -1 else value


@dataclass(frozen=True)
class NfcConfig:
    """The badge reader, by nfcpy device path."""

    path: str = "tty:AMA0:pn532"
    holdoff_s: float = 3.0  # the same badge is not re-read within this time

    def validate(self) -> None:
        _check(
            self.path.split(":")[0] in ("tty", "usb", "udp"),
            "path",
            f"must start with tty:, usb: or udp:, got {self.path!r}",
        )
        _check(0 <= self.holdoff_s <= 60, "holdoff_s", "must be between 0 and 60 s")


@dataclass(frozen=True)
class RfidConfig:
    """The UHF reader: which wire protocol, where, and how to scan."""

    protocol: str = "mercury"
    port: str = "/dev/ttyUSB0"
    baudrate: int = 115200
    antennas: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    power_dbm: float = 27.0
    region: str = "EU"
    session: int = 2
    dwell_ms: int = 200  # time on each antenna per pass
    timeout_s: float = 1.0  # reply timeout on the serial link

    def validate(self) -> None:
        from readers.rfid import PROTOCOLS

        known = ", ".join(sorted(PROTOCOLS))
        _check(self.protocol in PROTOCOLS, "protocol", f"must be one of: {known}")
        _check(bool(self.antennas), "antennas", "must list at least one antenna")
        _check(all(1 <= a <= 16 for a in self.antennas), "antennas", "ports are 1-16")
        _check(len(set(self.antennas)) == len(self.antennas), "antennas", "a port is listed twice")
        _check(0 <= self.power_dbm <= 31.5, "power_dbm", "must be between 0 and 31.5")
        _check(self.session in (0, 1, 2, 3), "session", "must be 0, 1, 2 or 3")
        _check(10 <= self.dwell_ms <= 10000, "dwell_ms", "must be between 10 and 10000 ms")
        _check(0.1 <= self.timeout_s <= 30, "timeout_s", "must be between 0.1 and 30 s")
        _check(
            self.baudrate in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600),
            "baudrate",
            f"{self.baudrate} is not a supported baud rate",
        )


@dataclass(frozen=True)
class InventoryConfig:
    """How a full inventory decides what is inside (see controller/inventory.py)."""

    min_rounds: int = 2  # passes over every antenna before the scan may stop
    max_rounds: int = 6  # hard limit on passes in the main scan
    quiet_rounds: int = 1  # stop after this many passes that found no new tag
    time_cap_s: float = 15.0  # the main scan stops here whatever it has found
    reverify_rounds: int = 12  # extra targeted passes for a tag that went missing
    reverify_dwell_ms: int = 300
    # A missing unit is reported taken only when the chance that it is still inside
    # but was not read is below this; otherwise it is reported uncertain.
    max_miss_probability: float = 1e-6
    rssi_floor_dbm: int = -80  # reads weaker than this are strays (outside the cabinet)
    rssi_floor_by_antenna: dict[str, int] = field(default_factory=dict)  # {"3" = -70}
    min_reads: int = 1  # a tag needs this many reads above the floor to count as inside
    sentinels: dict[str, str] = field(default_factory=dict)  # antenna -> sentinel EPC
    idle_scan_minutes: float = 15.0  # scan while closed and locked; 0 = never

    def validate(self) -> None:
        _check(1 <= self.min_rounds <= 20, "min_rounds", "must be between 1 and 20")
        _check(self.min_rounds <= self.max_rounds <= 50, "max_rounds", "must be min_rounds to 50")
        _check(1 <= self.quiet_rounds <= 10, "quiet_rounds", "must be between 1 and 10")
        _check(0.5 <= self.time_cap_s <= 120, "time_cap_s", "must be between 0.5 and 120 s")
        _check(0 <= self.reverify_rounds <= 50, "reverify_rounds", "must be between 0 and 50")
        _check(
            10 <= self.reverify_dwell_ms <= 10000,
            "reverify_dwell_ms",
            "must be between 10 and 10000 ms",
        )
        _check(
            0 < self.max_miss_probability < 0.5,
            "max_miss_probability",
            "must be above 0 and below 0.5",
        )
        _check(-100 <= self.rssi_floor_dbm <= 0, "rssi_floor_dbm", "must be -100 to 0 dBm")
        for port, floor in self.rssi_floor_by_antenna.items():
            _check(
                port.isdigit() and 1 <= int(port) <= 16,
                "rssi_floor_by_antenna",
                f"antenna {port!r} is not a port 1-16",
            )
            _check(-100 <= floor <= 0, "rssi_floor_by_antenna", f"{floor} is not -100 to 0 dBm")
        for port, epc in self.sentinels.items():
            _check(
                port.isdigit() and 1 <= int(port) <= 16,
                "sentinels",
                f"antenna {port!r} is not a port 1-16",
            )
            _check(
                bool(epc) and len(epc) % 4 == 0 and all(c in "0123456789ABCDEF" for c in epc),
                "sentinels",
                f"{epc!r} is not an upper-case hex EPC in whole 16-bit words",
            )
        _check(1 <= self.min_reads <= 100, "min_reads", "must be between 1 and 100")
        _check(
            self.idle_scan_minutes == 0 or 1 <= self.idle_scan_minutes <= 1440,
            "idle_scan_minutes",
            "must be 0 (off) or between 1 and 1440",
        )

    def floor(self, antenna: int) -> int:
        """The RSSI floor of one antenna port."""
        return self.rssi_floor_by_antenna.get(str(antenna), self.rssi_floor_dbm)


@dataclass(frozen=True)
class MqttConfig:
    """The customer's broker, where events and status go."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    client_id: str = ""  # default: smartcab-<site>-<cabinet>
    keepalive_s: int = 30
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # ERP commands must carry an HMAC-SHA256 made with this key (see controller/erp.py);
    # empty: every command is refused unless allowed_clients is set and the broker's ACL
    # restricts who may publish on .../req/#.
    command_key: str = ""
    allowed_clients: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(1 <= self.port <= 65535, "port", "must be between 1 and 65535")
        _check(5 <= self.keepalive_s <= 3600, "keepalive_s", "must be between 5 and 3600 s")
        _check(bool(self.host), "host", "must not be empty")
        _check(
            not self.command_key or len(self.command_key.encode()) >= 16,
            "command_key",
            "must be at least 16 bytes (or empty)",
        )


@dataclass(frozen=True)
class WebConfig:
    """The admin page."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "port", "must be between 0 and 65535")


@dataclass(frozen=True)
class Config:
    """The whole cabinet configuration."""

    cabinet: CabinetConfig = field(default_factory=CabinetConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    nfc: NfcConfig = field(default_factory=NfcConfig)
    rfid: RfidConfig = field(default_factory=RfidConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def db_path(self) -> Path:
        return Path(self.cabinet.data_dir) / "smartcab.db"

    @property
    def topic_prefix(self) -> str:
        return f"smartcab/{self.cabinet.site}/{self.cabinet.name}"


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotated type; return it in that type."""
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        options = get_args(typ)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)][0]
        return _coerce(key, value, inner)
    if origin is dict:
        (_, inner) = get_args(typ)
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key}: must be a table, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if origin is tuple:
        (inner, _) = get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}: must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"config: {key}: must be true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config: {key}: must be an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"config: {key}: must be {typ.__name__}, got {value!r}")
    return value


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {name}: must be a table")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"config: {name}.{key}: unknown key (known: {', '.join(sorted(fields))})"
            )
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    obj = cls(**values)
    try:
        obj.validate()
    except _Invalid as exc:
        raise ConfigError(f"config: {name}.{exc.key}: {exc}") from None
    return obj


def parse_config(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML; raise ConfigError naming a bad key."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = get_type_hints(Config)
    values = {}
    for name, body in raw.items():
        if name not in sections:
            # e.g. a typo such as [mqqt]
            raise ConfigError(f"config: [{name}]: unknown section (known: {', '.join(sections)})")
        values[name] = _section(name, hints[name], body)
    return Config(**values)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: not valid TOML: {exc}") from None
    return parse_config(raw)


def to_toml(config: Config) -> str:
    """Render a config back to TOML (used by the demo to write its config file)."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
