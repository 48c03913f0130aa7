"""The simulated RF world behind every reader simulator: tags, Gen2 flags, timing.

Both protocol simulators (:mod:`readers.rfid.mercury_sim`, :mod:`readers.rfid.r2000_sim`)
are wire front ends over one :class:`RfModel`: the front end decodes a command, asks
the model for an antenna *visit* (RF on one port for a time budget or a number of
Gen2 rounds) and encodes what the model says was read. The model knows nothing
about bytes.

What is modelled
================

* **Tags.** Each tag has, per antenna that can see it, a *read probability per
  visit* ``p`` (the chance the tag is readable at all while that antenna is on:
  detuning, shadowing, orientation) and a *mean RSSI*. Every decoded reply gets
  uniform noise of ``gen2.rssi_noise_db``; a reply weaker than
  ``gen2.sensitivity_dbm`` is not decoded; any reply is lost with
  ``gen2.miss_probability`` (collisions, fading). *Strays* are tags outside the
  cabinet, typically weak and seen only sometimes; they are ordinary tags with a
  ``stray`` mark so :meth:`RfModel.tags` can leave them out.
* **Gen2 sessions.** Every tag has an inventoried flag (A/B) in each session
  S0-S3. A round with target A reads only tags whose flag is A and flips each
  tag it reads to B (and vice versa). Persistence: S0 flags reset every time
  the RF comes on (each visit: a new command or an antenna switch); S1 flags
  fall back to A ``gen2.s1_persistence_s`` after being set (the standard allows
  0.5-5 s); S2/S3 flags last while the tag is energised and fall back to A
  ``gen2.s2_persistence_s`` / ``s3_persistence_s`` after the tag last saw RF
  (the standard only says "> 2 s"). So a target-A visit right after a full
  target-A round at S2 reads nothing until the target flips or the flags decay.
  Target ``"AB"``/``"BA"`` is the reader-side toggle (dual target): search one
  state, switch to the other when a round reads nothing, until the budget ends.
  Decay is applied when a visit starts, not within one.
* **Timing.** A visit costs ``timing.rf_on_ms`` (only the first visit of a
  command), ``timing.antenna_switch_ms`` plus the port's settling time, then
  Gen2 rounds: a round in which ``n`` tags answer takes ``n /
  tags_per_second`` (at least ``empty_round_ms``). A static Gen2 Q slows
  singulation when ``2**Q`` is far from the population (framed-ALOHA
  efficiency relative to 1/e). With a time budget (Mercury's Read Tag
  Multiple timeout) the visit lasts exactly the budget and reads at most what
  fits in it; with a round count (R2000 "Repeat") it lasts as long as the
  rounds take. Serial transfer costs 10 bits per byte at ``timing.baudrate``
  (:meth:`Timing.serial_s`); front ends charge it for every command and reply.
* **The virtual clock** (:class:`VirtualClock`) advances by the modelled time
  of everything the reader does. With ``time_scale=0`` nothing sleeps and
  :meth:`VirtualClock.now` is pure simulated time (deterministic; idle time
  between commands does not count unless a test calls
  :meth:`VirtualClock.advance`). With ``time_scale > 0`` the simulator sleeps
  ``modelled * time_scale`` and ``now()`` follows the wall clock divided by
  ``time_scale``, so flags also decay while the cabinet is idle (the demo).
* **Faults** scheduled by the scenario fire on read commands (Mercury 0x22,
  R2000 0x89/0x8A/0x8B): ``corrupt`` (one reply byte flipped), ``drop`` (no
  reply), ``truncate`` (reply cut short), ``reboot`` (the module restarts and
  forgets its settings mid-scan), ``unplug`` (the serial device goes away).
  Each fires on the Nth read command (``on_read``) or with a probability per
  read command; the front end decides what it means on its wire.

Scenario file format (TOML)
===========================

Every table and key is optional; an unknown key is an error that names it::

    seed = 7                 # all random draws (reads, RSSI noise, faults)
    antenna_ports = 8        # ports wired to the reader (1..16)
    dead_antennas = [7]      # ports that report "antenna not connected"

    [timing]
    tags_per_second = 400.0  # singulation rate (dense population, DRM/M4)
    rf_on_ms = 20.0          # read command -> RF on
    antenna_switch_ms = 2.0  # per antenna visit, plus the port's settling time
    empty_round_ms = 1.0     # a Gen2 round in which no tag answers
    baudrate = 115200        # serial link speed for transfer time

    [gen2]
    s1_persistence_s = 2.0
    s2_persistence_s = 5.0   # after the tag last saw RF
    s3_persistence_s = 5.0
    miss_probability = 0.0   # a single reply is lost
    rssi_noise_db = 2.0      # each reply: mean RSSI +- this (uniform)
    sensitivity_dbm = -90.0  # weaker replies are not decoded
    reference_power_dbm = 27.0  # optional: RSSI values hold at this read power;
                                # at other powers they shift dB for dB

    [[tag]]                  # a tag inside the cabinet
    epc = "E28011606000020000000001"
    antennas = {1 = {p = 0.9, rssi = -48}, 2 = {p = 0.4, rssi = -66}}
    # a bare number is a mean RSSI with p = 1: antennas = {3 = -55}

    [[stray]]                # a tag outside the cabinet (same keys as [[tag]])
    epc = "E28011606000020000000999"
    antennas = {1 = {p = 0.15, rssi = -79}}

    [[population]]           # many tags at once (seeded)
    count = 200
    epc_prefix = "E280117000"  # hex; a serial number fills up to 24 hex digits
    antennas = [1, 2, 3, 4]  # candidate ports
    per_tag = 2              # how many of them see each tag
    p = [0.9, 1.0]           # a number, or a [low, high] uniform range
    rssi = [-70, -40]
    stray = false

    [[fault]]
    kind = "corrupt"         # corrupt | drop | truncate | reboot | unplug
    on_read = 5              # the 5th read command ... or:
    # probability = 0.01     # ... each read command with this chance
"""

from __future__ import annotations

import math
import random
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "FAULT_KINDS",
    "MAX_PORT",
    "SCENARIO_DIR",
    "FaultSpec",
    "Gen2Settings",
    "Link",
    "RfModel",
    "Scenario",
    "ScenarioError",
    "TagRead",
    "TagSpec",
    "Timing",
    "Visit",
    "VirtualClock",
    "normalize_epc",
]

MAX_PORT = 16
FAULT_KINDS = ("corrupt", "drop", "truncate", "reboot", "unplug")
TARGETS = ("A", "B", "AB", "BA")
SCENARIO_DIR = Path(__file__).with_name("scenarios")
MAX_READ_COUNT = 255  # the read-count fields on the wire are one byte
# A visit never simulates more Gen2 rounds than this; beyond it nothing new can
# happen that matters to a host, and a huge budget must not spin the simulator.
MAX_ROUNDS_PER_VISIT = 2000


class ScenarioError(ValueError):
    """A scenario file or value is invalid; the message names the key."""


def normalize_epc(epc: str) -> str:
    """Upper-case hex EPC of whole 16-bit words, or ValueError."""
    text = str(epc).strip().upper()
    if not text or any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"EPC {epc!r} is not a hex string")
    if len(text) % 4 or len(text) > 124:
        raise ValueError(
            f"EPC {epc!r} must be 1..31 whole 16-bit words (4..124 hex digits), got {len(text)}"
        )
    return text


def _check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise ValueError(f"{what}: antenna port must be 1..{MAX_PORT}, got {port!r}")
    return port


# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class Link:
    """How one antenna sees one tag."""

    p: float = 1.0  # chance the tag is readable during one visit of the antenna
    rssi: float = -50.0  # mean RSSI, dBm

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int | float) or not 0 <= self.p <= 1:
            raise ValueError(f"read probability p must be 0..1, got {self.p!r}")
        if (
            isinstance(self.rssi, bool)
            or not isinstance(self.rssi, int | float)
            or not -128 <= self.rssi <= 0
        ):
            raise ValueError(f"mean RSSI must be -128..0 dBm, got {self.rssi!r}")


def make_link(value: object, what: str) -> Link:
    """A Link from a Link, a bare mean RSSI (p = 1) or a ``{p, rssi}`` mapping."""
    try:
        if isinstance(value, Link):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"p", "rssi"}
            if unknown:
                raise ScenarioError(f"{what}: unknown key {sorted(unknown)[0]!r} (known: p, rssi)")
            return Link(p=value.get("p", 1.0), rssi=value.get("rssi", -50.0))
        return Link(rssi=value)  # type: ignore[arg-type]
    except ScenarioError:
        raise
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def make_links(epc: str, antennas: Mapping[Any, Any] | None) -> dict[int, Link]:
    """Validated port -> Link map (ports may be given as ints or TOML string keys)."""
    if antennas is None:
        return {1: Link(rssi=-50)}
    if not isinstance(antennas, Mapping):
        raise ValueError(f"tag {epc}: antennas must be a table of port -> link")
    out: dict[int, Link] = {}
    for key, value in antennas.items():
        port = int(key) if isinstance(key, str) and key.isdigit() else key
        _check_port(port, f"tag {epc}")
        out[port] = make_link(value, f"tag {epc} antenna {port}")
    return out


@dataclass
class TagSpec:
    """A tag and the antennas that see it."""

    epc: str
    antennas: dict[int, Link] = field(default_factory=lambda: {1: Link()})
    stray: bool = False

    def __post_init__(self) -> None:
        self.epc = normalize_epc(self.epc)
        self.antennas = make_links(self.epc, self.antennas)


@dataclass(frozen=True)
class FaultSpec:
    """A reader fault on a read command: the Nth one, or each with a probability."""

    kind: str
    on_read: int | None = None
    probability: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if (self.on_read is None) == (self.probability == 0):
            raise ValueError("a fault needs exactly one of on_read (>= 1) or probability (0..1]")
        if self.on_read is not None and (
            isinstance(self.on_read, bool) or not isinstance(self.on_read, int) or self.on_read < 1
        ):
            raise ValueError(f"fault on_read must be an integer >= 1, got {self.on_read!r}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"fault probability must be 0..1, got {self.probability!r}")


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class Timing:
    """How long the reader takes for things (see the module docstring)."""

    tags_per_second: float = 400.0
    rf_on_ms: float = 20.0
    antenna_switch_ms: float = 2.0
    empty_round_ms: float = 1.0
    baudrate: int = 115200

    def __post_init__(self) -> None:
        _positive(self.tags_per_second, "timing.tags_per_second")
        _positive(self.rf_on_ms, "timing.rf_on_ms", allow_zero=True)
        _positive(self.antenna_switch_ms, "timing.antenna_switch_ms", allow_zero=True)
        _positive(self.empty_round_ms, "timing.empty_round_ms")
        _positive(self.baudrate, "timing.baudrate")

    def serial_s(self, nbytes: int) -> float:
        """Time to move ``nbytes`` over the link (8N1: 10 bits a byte)."""
        return nbytes * 10 / self.baudrate


@dataclass(frozen=True)
class Gen2Settings:
    """Session persistence and per-reply losses."""

    s1_persistence_s: float = 2.0
    s2_persistence_s: float = 5.0
    s3_persistence_s: float = 5.0
    miss_probability: float = 0.0
    rssi_noise_db: float = 2.0
    sensitivity_dbm: float = -90.0
    reference_power_dbm: float | None = None

    def __post_init__(self) -> None:
        for name in ("s1_persistence_s", "s2_persistence_s", "s3_persistence_s"):
            _positive(getattr(self, name), f"gen2.{name}", allow_zero=True)
        _positive(self.rssi_noise_db, "gen2.rssi_noise_db", allow_zero=True)
        if not 0 <= self.miss_probability < 1:
            raise ValueError(f"gen2.miss_probability must be 0..<1, got {self.miss_probability!r}")
        if not -128 <= self.sensitivity_dbm <= 0:
            raise ValueError(f"gen2.sensitivity_dbm must be -128..0, got {self.sensitivity_dbm!r}")
        if self.reference_power_dbm is not None:
            _positive(self.reference_power_dbm, "gen2.reference_power_dbm", allow_zero=True)

    def persistence_s(self, session: int) -> float:
        return (0.0, self.s1_persistence_s, self.s2_persistence_s, self.s3_persistence_s)[session]


@dataclass
class Scenario:
    """A cabinet's RF world: ports, tags, strays, dead antennas, faults, timing."""

    antenna_ports: int = 8
    seed: int = 0
    tags: list[TagSpec] = field(default_factory=list)
    dead_antennas: set[int] = field(default_factory=set)
    faults: list[FaultSpec] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    gen2: Gen2Settings = field(default_factory=Gen2Settings)

    def __post_init__(self) -> None:
        if (
            isinstance(self.antenna_ports, bool)
            or not isinstance(self.antenna_ports, int)
            or not 1 <= self.antenna_ports <= MAX_PORT
        ):
            raise ValueError(f"antenna_ports must be 1..{MAX_PORT}, got {self.antenna_ports!r}")
        self.dead_antennas = {_check_port(p, "dead_antennas") for p in self.dead_antennas}
        seen: set[str] = set()
        for tag in self.tags:
            if tag.epc in seen:
                raise ValueError(f"tag {tag.epc} is listed twice")
            seen.add(tag.epc)

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        """Read a scenario TOML file (format in the module docstring)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {str(path)!r}: {exc}") from exc
        return cls.from_toml(text, source=path.name)

    @classmethod
    def from_toml(cls, text: str, source: str = "<scenario>") -> Scenario:
        """Parse scenario TOML text; ``source`` names it in error messages."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"scenario {source}: not valid TOML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
        """Build from parsed TOML; every error is a ScenarioError naming the key."""
        where = f"scenario {source}"
        _no_unknown(
            data,
            {
                "seed",
                "antenna_ports",
                "dead_antennas",
                "timing",
                "gen2",
                "tag",
                "stray",
                "population",
                "fault",
            },
            where,
        )
        try:
            seed = _int(data.get("seed", 0), f"{where}: seed")
            timing = _section(Timing, data.get("timing", {}), f"{where}: timing")
            gen2 = _section(Gen2Settings, data.get("gen2", {}), f"{where}: gen2")
            tags: list[TagSpec] = []
            for kind, stray in (("tag", False), ("stray", True)):
                for i, entry in enumerate(_tables(data.get(kind, []), f"{where}: {kind}")):
                    at = f"{where}: {kind}[{i}]"
                    _no_unknown(entry, {"epc", "antennas"}, at)
                    if "epc" not in entry:
                        raise ScenarioError(f"{at}: missing key 'epc'")
                    epc, links = entry["epc"], entry.get("antennas")
                    tags.append(_wrap(at, lambda e=epc, lk=links, s=stray: TagSpec(e, lk, s)))
            rng = random.Random(seed)
            for i, entry in enumerate(_tables(data.get("population", []), f"{where}: population")):
                tags.extend(_population(entry, rng, f"{where}: population[{i}]", len(tags)))
            faults = []
            for i, entry in enumerate(_tables(data.get("fault", []), f"{where}: fault")):
                at = f"{where}: fault[{i}]"
                _no_unknown(entry, {"kind", "on_read", "probability"}, at)
                faults.append(_wrap(at, lambda e=entry: FaultSpec(**e)))
            dead = data.get("dead_antennas", [])
            if not isinstance(dead, list):
                raise ScenarioError(f"{where}: dead_antennas must be a list of ports")
            return _wrap(
                where,
                lambda: cls(
                    antenna_ports=data.get("antenna_ports", 8),
                    seed=seed,
                    tags=tags,
                    dead_antennas=set(dead),
                    faults=faults,
                    timing=timing,
                    gen2=gen2,
                ),
            )
        except ScenarioError:
            raise
        except (ValueError, TypeError) as exc:
            raise ScenarioError(f"{where}: {exc}") from None


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{where}: expected a table, got {type(table).__name__}")
    for key in table:
        if key not in known:
            raise ScenarioError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def _tables(value: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ScenarioError(f"{where}: expected an array of tables ([[...]])")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where} must be an integer, got {value!r}")
    return value


def _wrap(where: str, build: Any) -> Any:
    try:
        return build()
    except ScenarioError:
        raise
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _section(cls: type, table: Any, where: str) -> Any:
    known = {f.name for f in fields(cls)}
    _no_unknown(table, known, where)
    return _wrap(where, lambda: cls(**table))


def _draw(rng: random.Random, value: Any, where: str) -> float:
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
            raise ScenarioError(f"{where} must be a number or [low, high]")
        low, high = sorted(value)
        return rng.uniform(low, high)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where} must be a number or [low, high]")
    return float(value)


def _population(
    entry: Mapping[str, Any], rng: random.Random, where: str, start: int
) -> list[TagSpec]:
    _no_unknown(entry, {"count", "epc_prefix", "antennas", "per_tag", "p", "rssi", "stray"}, where)
    count = _int(entry.get("count", 0), f"{where}: count")
    prefix = str(entry.get("epc_prefix", "E280")).upper()
    if len(prefix) > 16 or any(c not in "0123456789ABCDEF" for c in prefix):
        raise ScenarioError(f"{where}: epc_prefix must be at most 16 hex digits")
    ports = entry.get("antennas", [1])
    if not isinstance(ports, list) or not ports:
        raise ScenarioError(f"{where}: antennas must be a non-empty list of ports")
    for p in ports:
        _wrap(where, lambda p=p: _check_port(p, "antennas"))
    per_tag = _int(entry.get("per_tag", 1), f"{where}: per_tag")
    if not 1 <= per_tag <= len(ports):
        raise ScenarioError(f"{where}: per_tag must be 1..{len(ports)}")
    out = []
    width = 24 - len(prefix)
    for i in range(count):
        epc = prefix + f"{start + i:0{width}X}"[-width:]
        links = {
            port: Link(
                p=min(1.0, max(0.0, _draw(rng, entry.get("p", 1.0), f"{where}: p"))),
                rssi=round(_draw(rng, entry.get("rssi", -50), f"{where}: rssi")),
            )
            for port in rng.sample(ports, per_tag)
        }
        out.append(_wrap(where, lambda e=epc, lk=links: TagSpec(e, lk, bool(entry.get("stray")))))
    return out


# --------------------------------------------------------------------------- clock


class VirtualClock:
    """Simulated seconds; see the module docstring for the two modes."""

    def __init__(self, time_scale: float = 0.0) -> None:
        if isinstance(time_scale, bool) or not isinstance(time_scale, int | float):
            raise ValueError(f"time_scale must be a number, got {time_scale!r}")
        if time_scale < 0 or math.isnan(time_scale):
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        self._scale = float(time_scale)
        self._lock = threading.Lock()
        self._offset = 0.0
        self._t0 = time.monotonic()
        self._debt = 0.0  # scaled mode: modelled time not slept yet (sub-millisecond bits)

    @property
    def time_scale(self) -> float:
        return self._scale

    def now(self) -> float:
        """Simulated seconds since the clock was made."""
        with self._lock:
            if self._scale == 0:
                return self._offset
            return self._offset + (time.monotonic() - self._t0) / self._scale

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated idle time pass at once (never sleeps)."""
        if seconds < 0:
            raise ValueError(f"cannot advance the clock by {seconds} s")
        with self._lock:
            self._offset += seconds

    def spend(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """The reader works for ``seconds`` of simulated time.

        Unscaled, the clock just moves on. Scaled, this sleeps ``seconds *
        time_scale`` (the wall clock moves ``now()``); tiny amounts are pooled so
        the simulator does not make thousands of sub-millisecond sleeps. Returns
        False if ``stop`` was set while sleeping.
        """
        if seconds <= 0:
            return True
        if self._scale == 0:
            with self._lock:
                self._offset += seconds
            return True
        with self._lock:
            self._debt += seconds * self._scale
            if self._debt < 0.002:
                return True
            wait, self._debt = self._debt, 0.0
        if stop is not None:
            return not stop.wait(wait)
        time.sleep(wait)
        return True


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TagRead:
    """What one visit read of one tag."""

    epc: str
    antenna: int
    count: int
    rssi: int  # strongest decoded reply, dBm
    frequency_khz: int
    first_s: float  # when it was first read, seconds after the visit started


@dataclass
class Visit:
    """The result of RF on one antenna."""

    antenna: int
    connected: bool
    reads: list[TagRead]
    duration_s: float


@dataclass
class _TagState:
    links: dict[int, Link]
    stray: bool


@dataclass
class _Flags:
    """Gen2 state of one EPC; kept after the tag leaves so a quick return keeps its flags."""

    b: list[bool] = field(default_factory=lambda: [False] * 4)  # True = B
    set_at: list[float] = field(default_factory=lambda: [0.0] * 4)
    last_energized: float = -math.inf


def _q_factor(population: int, q: int | None) -> float:
    """Singulation speed with a static Q relative to an ideal dynamic Q (1/e per slot)."""
    if q is None or population <= 1:
        return 1.0
    slots = 2.0**q
    per_slot = population / slots * (1 - 1 / slots) ** (population - 1) if slots > 1 else 0.0
    return max(0.02, min(1.0, per_slot * math.e))


class RfModel:
    """The tag world and reader physics; thread-safe (see the module docstring)."""

    def __init__(self, scenario: Scenario | None = None, *, time_scale: float = 0.0) -> None:
        self.scenario = scenario if scenario is not None else Scenario()
        self.clock = VirtualClock(time_scale)
        self.antenna_ports = self.scenario.antenna_ports
        self.timing = self.scenario.timing
        self.gen2 = self.scenario.gen2
        self._lock = threading.RLock()
        self._rng = random.Random(self.scenario.seed)
        # A separate stream so adding a probabilistic fault does not change the reads.
        self._fault_rng = random.Random(self.scenario.seed ^ 0x5EED)
        self._tags: dict[str, _TagState] = {}
        self._flags: dict[str, _Flags] = {}
        self._dead: set[int] = set(self.scenario.dead_antennas)
        self._faults: list[FaultSpec] = list(self.scenario.faults)
        self._read_commands = 0
        self._cursor = 0.0  # end of the last visit, so visits in one command chain in time
        for spec in self.scenario.tags:
            self._tags[spec.epc] = _TagState(dict(spec.antennas), spec.stray)

    # ------------------------------------------------------------ tag world

    def add_tag(
        self, epc: str, antennas: Mapping[int, Any] | None = None, *, stray: bool = False
    ) -> None:
        """Put a tag in the world (or replace how it is seen); flags are kept.

        ``antennas`` maps port -> a :class:`Link`, a ``{"p", "rssi"}`` mapping or a
        bare mean RSSI (read with p = 1); None means ``{1: -50}``.
        """
        key = normalize_epc(epc)
        links = make_links(key, antennas)
        with self._lock:
            self._tags[key] = _TagState(links, stray)

    def remove_tag(self, epc: str) -> None:
        """Take a tag out of the world (no error if it is not there)."""
        key = normalize_epc(epc)
        with self._lock:
            self._tags.pop(key, None)

    def move_tag(self, epc: str, antennas: Mapping[int, Any]) -> None:
        """Change which antennas see a tag that is in the world (KeyError if not)."""
        key = normalize_epc(epc)
        links = make_links(key, antennas)
        with self._lock:
            if key not in self._tags:
                raise KeyError(f"tag {key} is not in the simulated world")
            self._tags[key].links = links

    def set_tags(self, mapping: Mapping[str, Mapping[int, Any] | None]) -> None:
        """Replace every non-stray tag."""
        new = {}
        for epc, ants in mapping.items():
            key = normalize_epc(epc)
            new[key] = _TagState(make_links(key, ants), False)
        with self._lock:
            strays = {k: v for k, v in self._tags.items() if v.stray and k not in new}
            self._tags = {**new, **strays}

    def tags(self, include_strays: bool = False) -> dict[str, dict[int, Link]]:
        """A copy of the world: EPC -> port -> Link."""
        with self._lock:
            return {
                epc: dict(t.links) for epc, t in self._tags.items() if include_strays or not t.stray
            }

    def set_antenna_disconnected(self, port: int, disconnected: bool = True) -> None:
        """A dead port reports "antenna not connected" and energises nothing."""
        _check_port(port, "disconnect")
        with self._lock:
            if disconnected:
                self._dead.add(port)
            else:
                self._dead.discard(port)

    def antenna_connected(self, port: int) -> bool:
        """True if ``port`` is wired and not disconnected."""
        with self._lock:
            return port <= self.antenna_ports and port not in self._dead

    def flag(self, epc: str, session: int) -> str:
        """The tag's inventoried flag in ``session`` now ("A" or "B"), after decay."""
        key = normalize_epc(epc)
        with self._lock:
            state = self._flags.get(key)
            if state is None:
                return "A"
            self._decay(state, session, self._now())
            return "B" if state.b[session] else "A"

    def reset_flags(self) -> None:
        """Every tag back to A in every session (as after a long power-off)."""
        with self._lock:
            self._flags.clear()

    # ------------------------------------------------------------ faults

    def add_fault(self, fault: FaultSpec) -> None:
        """Schedule a fault on read commands (counted from the start of the model)."""
        if not isinstance(fault, FaultSpec):
            raise TypeError("add_fault takes a FaultSpec")
        with self._lock:
            self._faults.append(fault)

    @property
    def read_commands(self) -> int:
        """Read commands seen so far."""
        with self._lock:
            return self._read_commands

    def next_read_fault(self) -> str | None:
        """Count one read command; return the kind of fault due on it, if any."""
        with self._lock:
            self._read_commands += 1
            n = self._read_commands
            for i, f in enumerate(self._faults):
                if f.on_read is not None:
                    if f.on_read == n:
                        del self._faults[i]
                        return f.kind
                elif self._fault_rng.random() < f.probability:
                    return f.kind
            return None

    # ------------------------------------------------------------ physics

    def _now(self) -> float:
        """Model time: the clock, or the end of the last visit if the caller has not
        spent it yet."""
        return max(self.clock.now(), self._cursor)

    def _decay(self, state: _Flags, session: int, now: float) -> None:
        if not state.b[session]:
            return
        if session == 0:
            if now >= state.last_energized:  # S0 has no persistence once the RF is off
                state.b[0] = False
        elif session == 1:
            if now - state.set_at[1] > self.gen2.s1_persistence_s:
                state.b[1] = False
        elif now - state.last_energized > self.gen2.persistence_s(session):
            state.b[session] = False

    def visit(
        self,
        antenna: int,
        *,
        session: int = 0,
        target: str = "A",
        budget_s: float | None = None,
        rounds: int | None = None,
        rf_on: bool = True,
        settle_s: float = 0.0,
        power_dbm: float | None = None,
        q: int | None = None,
        channels_khz: Sequence[int] = (915250,),
        max_count: int = MAX_READ_COUNT,
    ) -> Visit:
        """Turn the RF on ``antenna`` for ``budget_s`` seconds or ``rounds`` Gen2 rounds.

        The caller (a wire front end) must then let the clock pass
        ``duration_s`` (``clock.spend``). ``rf_on`` adds the RF-on latency (the
        first antenna of a command). The reads are in first-read order.
        """
        _check_port(antenna, "visit")
        if session not in (0, 1, 2, 3):
            raise ValueError(f"session must be 0..3, got {session!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        if (budget_s is None) == (rounds is None):
            raise ValueError("give exactly one of budget_s and rounds")
        if budget_s is not None and budget_s < 0:
            raise ValueError(f"budget_s must be >= 0, got {budget_s}")
        if rounds is not None and rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if not channels_khz:
            raise ValueError("channels_khz must list at least one channel")
        t = self.timing
        overhead = (t.rf_on_ms if rf_on else 0.0) / 1000 + t.antenna_switch_ms / 1000 + settle_s
        with self._lock:
            t0 = self._now()
            if antenna > self.antenna_ports or antenna in self._dead:
                # The reader checks the port before it transmits: no RF, no reads.
                self._cursor = t0 + overhead
                return Visit(antenna, False, [], overhead)
            reads, elapsed = self._run_rounds(
                antenna, session, target, budget_s, rounds, t0, overhead, power_dbm, q,
                channels_khz, max_count,
            )  # fmt: skip
            duration = overhead + (budget_s if budget_s is not None else elapsed)
            end = t0 + duration
            for epc, tag in self._tags.items():
                if antenna in tag.links:
                    self._flags.setdefault(epc, _Flags()).last_energized = end
            self._cursor = end
            return Visit(antenna, True, reads, duration)

    def _run_rounds(
        self,
        antenna: int,
        session: int,
        target: str,
        budget_s: float | None,
        rounds: int | None,
        t0: float,
        overhead: float,
        power_dbm: float | None,
        q: int | None,
        channels_khz: Sequence[int],
        max_count: int,
    ) -> tuple[list[TagRead], float]:
        rng, g = self._rng, self.gen2
        shift = 0.0
        if g.reference_power_dbm is not None and power_dbm is not None:
            shift = power_dbm - g.reference_power_dbm
        start = t0 + overhead
        # Tags in this antenna's field, flags decayed to now; the per-visit
        # readability draw is made for every tag so results do not depend on flags.
        field_: list[tuple[str, Link, _Flags]] = []
        for epc in sorted(self._tags):
            link = self._tags[epc].links.get(antenna)
            if link is None:
                continue
            flags = self._flags.setdefault(epc, _Flags())
            readable = rng.random() < link.p
            for s in range(4):
                self._decay(flags, s, start)
            if session == 0:
                flags.b[0] = False  # S0 does not survive the RF coming on again
            if readable:
                field_.append((epc, link, flags))
        found: dict[str, list[float]] = {}  # epc -> [count, best rssi, first_s, freq]
        current = target[0]
        toggle = len(target) == 2
        elapsed = 0.0
        limit = budget_s if budget_s is not None else math.inf
        done_rounds = 0
        idle_states = 0  # consecutive empty rounds (a toggle gives up after both states)
        while done_rounds < MAX_ROUNDS_PER_VISIT:
            if rounds is not None and done_rounds >= rounds:
                break
            if elapsed >= limit:
                break
            want_b = current == "B"
            eligible = [(e, lk, f) for e, lk, f in field_ if f.b[session] == want_b]
            rng.shuffle(eligible)
            rate = self.timing.tags_per_second * _q_factor(len(eligible), q)
            answered: list[tuple[str, float, _Flags]] = []
            for epc, link, flags in eligible:
                if g.miss_probability and rng.random() < g.miss_probability:
                    continue
                rssi = link.rssi + shift + rng.uniform(-g.rssi_noise_db, g.rssi_noise_db)
                if rssi < g.sensitivity_dbm:
                    continue
                answered.append((epc, rssi, flags))
            if budget_s is not None:
                answered = answered[: int((limit - elapsed) * rate)]
            round_s = max(self.timing.empty_round_ms / 1000, len(answered) / rate)
            for i, (epc, rssi, flags) in enumerate(answered):
                at = elapsed + (i + 1) / rate
                entry = found.get(epc)
                if entry is None:
                    found[epc] = [1, rssi, overhead + at, rng.choice(channels_khz)]
                else:
                    entry[0] = min(max_count, entry[0] + 1)
                    entry[1] = max(entry[1], rssi)
                flags.b[session] = not want_b
                flags.set_at[session] = start + at
            elapsed += round_s
            done_rounds += 1
            if answered:
                idle_states = 0
                continue
            if toggle:
                current = "A" if want_b else "B"
                idle_states += 1
                if idle_states < 2:
                    continue
            # Nothing answers in any state we search: further rounds change nothing.
            if not eligible or idle_states >= 2:
                if rounds is not None:
                    elapsed += (rounds - done_rounds) * self.timing.empty_round_ms / 1000
                break
        reads = [
            TagRead(
                epc,
                antenna,
                int(count),
                max(-128, min(0, round(rssi))),
                int(freq),
                first,
            )
            for epc, (count, rssi, first, freq) in sorted(found.items(), key=lambda kv: kv[1][2])
        ]
        return reads, min(elapsed, limit)

    # ------------------------------------------------------------ helpers for front ends

    def spend(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Let the reader work ``seconds`` of simulated time (see VirtualClock.spend)."""
        return self.clock.spend(seconds, stop)

    def serial(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Charge the transfer time of ``nbytes`` on the serial link."""
        return self.clock.spend(self.timing.serial_s(nbytes), stop)
