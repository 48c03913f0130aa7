"""Inventory: run a full multi-antenna scan through whichever reader config names,
and diff it against the last committed state of the cabinet.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from controller.config import RfidConfig
from readers.rfid import ReaderError, RfidReader, TagReport

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """One inventory: what was seen, and whether it can be trusted for removals."""

    scan_id: str
    tags: dict[str, TagReport] = field(default_factory=dict)
    # Why the scan is incomplete (antenna errors, reader failure); empty when complete.
    faults: list[str] = field(default_factory=list)
    failed: bool = False  # the reader could not scan at all
    duration_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.faults and not self.failed

    def evidence(self, epc: str) -> dict:
        """The reads behind a sighting, for the event payload."""
        tag = self.tags[epc]
        return {
            "scan_id": self.scan_id,
            "antennas": tag.antennas,
            "reads": tag.count,
            "rssi": tag.rssi,
        }


@dataclass(frozen=True)
class Diff:
    """What changed between two inventories."""

    removed: frozenset[str]
    added: frozenset[str]


def diff(before: set[str], seen: set[str]) -> Diff:
    """Tags that left (in ``before``, not seen) and tags that arrived."""
    return Diff(frozenset(before - seen), frozenset(seen - before))


class Inventory:
    """Owns the RFID reader: opens it lazily and turns its results into :class:`Scan`s."""

    def __init__(self, reader: RfidReader, config: RfidConfig) -> None:
        self.reader = reader
        self.config = config
        self.ready = False
        self.status = "not opened"
        self.model = ""

    def open(self) -> bool:
        """Open and configure the reader; False (with ``status`` set) if it is not there."""
        try:
            info = self.reader.open()
            self.reader.configure(
                self.config.antennas,
                self.config.power_dbm,
                self.config.region,
                self.config.session,
            )
        except (ReaderError, OSError) as exc:
            self.reader.close()
            self.ready = False
            self.status = f"error: {exc}"
            log.warning("RFID reader not available: %s", exc)
            return False
        self.ready = True
        self.model = f"{info.model} fw {info.firmware}"
        self.status = "ok"
        return True

    def scan(self) -> Scan:
        """Run a full inventory; never raises for reader trouble (it is in ``faults``)."""
        scan = Scan(scan_id=str(uuid.uuid4()))
        started = time.monotonic()
        if not self.ready and not self.open():
            scan.failed = True
            scan.faults.append(self.status)
            return scan
        try:
            result = self.reader.inventory(self.config.rounds, self.config.dwell_ms)
        except (ReaderError, OSError) as exc:
            # Reopen next time: the link may have been unplugged and replugged.
            self.reader.close()
            self.ready = False
            self.status = f"error: {exc}"
            scan.failed = True
            scan.faults.append(str(exc))
            log.warning("inventory failed: %s", exc)
        else:
            scan.tags = result.tags
            scan.faults = [
                f"antenna {a}: {why}" for a, why in sorted(result.antenna_errors.items())
            ]
            self.status = "ok" if not scan.faults else "degraded: " + "; ".join(scan.faults)
        scan.duration_s = time.monotonic() - started
        return scan

    def close(self) -> None:
        self.reader.close()
        self.ready = False
