"""The UHF RFID driver interface every wire protocol implements.

The controller only sees :class:`RfidReader`; which protocol sits behind it
is chosen in config (``[rfid] protocol``) through :func:`readers.rfid.open_reader`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


class ReaderError(Exception):
    """The reader could not do what was asked; the message says why."""


class ReaderTimeout(ReaderError):
    """The reader did not answer (unplugged, powered off, dropped reply)."""


class FrameError(ReaderError):
    """A reply arrived but was malformed (bad CRC, bad length, wrong opcode)."""


class ReaderStatusError(ReaderError):
    """The reader answered with a non-success status word."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AntennaReads:
    """What one antenna saw of one tag during an inventory."""

    antenna: int
    count: int
    rssi: int  # strongest read, dBm


@dataclass
class TagReport:
    """One tag seen during an inventory, with the antennas that saw it."""

    epc: str  # upper-case hex, no separators
    reads: dict[int, AntennaReads] = field(default_factory=dict)

    @property
    def antennas(self) -> list[int]:
        return sorted(self.reads)

    @property
    def count(self) -> int:
        return sum(r.count for r in self.reads.values())

    @property
    def rssi(self) -> int:
        return max(r.rssi for r in self.reads.values())

    def add(self, antenna: int, count: int, rssi: int) -> None:
        """Merge reads from another round or buffer record."""
        old = self.reads.get(antenna)
        if old is None:
            self.reads[antenna] = AntennaReads(antenna, count, rssi)
        else:
            self.reads[antenna] = AntennaReads(antenna, old.count + count, max(old.rssi, rssi))


@dataclass
class InventoryResult:
    """The outcome of one full multi-antenna inventory."""

    tags: dict[str, TagReport] = field(default_factory=dict)
    # antenna port -> why it could not be read (e.g. "antenna not connected")
    antenna_errors: dict[int, str] = field(default_factory=dict)
    rounds: int = 0
    duration_s: float = 0.0
    # antenna port -> reads it made in this inventory (all tags), for antenna health
    antenna_reads: dict[int, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every requested antenna was read without error."""
        return not self.antenna_errors


@dataclass(frozen=True)
class ReaderInfo:
    """Identity the reader reports about itself."""

    protocol: str
    model: str
    firmware: str
    antenna_ports: int


def check_ports(antennas: Sequence[int], info: ReaderInfo) -> list[int]:
    """Validate the antennas to configure: ports of this reader, each listed once."""
    ports = list(antennas)
    if not ports:
        raise ValueError("antennas must list at least one port")
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= info.antenna_ports:
            raise ValueError(
                f"antenna {p!r} is not a port of this {info.model} (1..{info.antenna_ports})"
            )
    if len(set(ports)) != len(ports):
        raise ValueError(f"antennas {ports} lists a port twice")
    return ports


def select_antennas(requested: Sequence[int] | None, configured: Sequence[int]) -> list[int]:
    """The antennas for one inventory: all configured ones, or a subset of them."""
    if requested is None:
        return list(configured)
    ports = list(requested)
    if not ports:
        raise ValueError("antennas must list at least one port (or be None for all)")
    unknown = [p for p in ports if p not in configured]
    if unknown:
        raise ValueError(f"antennas {unknown} are not configured (configured: {list(configured)})")
    if len(set(ports)) != len(ports):
        raise ValueError(f"antennas {ports} lists a port twice")
    return ports


class RfidReader(abc.ABC):
    """A UHF reader with several antenna ports behind one serial link."""

    @abc.abstractmethod
    def open(self) -> ReaderInfo:
        """Open the link and identify the reader. Raises ReaderError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the link; safe to call twice."""

    @abc.abstractmethod
    def configure(
        self,
        antennas: Sequence[int],
        power_dbm: float,
        region: str,
        session: int,
    ) -> None:
        """Set region, Gen2 session, read power and the antennas to use."""

    @abc.abstractmethod
    def inventory(
        self,
        rounds: int,
        dwell_ms: int,
        *,
        antennas: Sequence[int] | None = None,
        target: str = "AB",
    ) -> InventoryResult:
        """Run ``rounds`` passes over the antennas, ``dwell_ms`` on each.

        ``antennas`` narrows the pass to some configured ports (a targeted
        re-check); None means every configured antenna. ``target`` is the Gen2
        inventoried flag the reader queries: "A" or "B" (a tag answers once, on
        the first antenna that reaches it, then its flag flips), or "AB" (both
        targets within each antenna step, so every tag answers on every antenna
        that sees it whatever state its flag was left in; Mercury toggles inside
        the step, R2000 session mode runs A then B). Tags from all rounds are
        merged. An antenna that fails is listed in ``antenna_errors`` and the
        others are still read; a dead link raises ReaderError.
        """

    def __enter__(self) -> RfidReader:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
