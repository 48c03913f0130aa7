"""Shared by the inventory benchmarks: a simulated reader on a pty, driven by the real driver.

Not a benchmark itself. ``SimReader`` starts a Mercury or R2000 simulator at
``time_scale=0`` (virtual clock) and opens the real driver on its pty;
``CountingReader`` wraps the driver to count what each pass read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from readers.rfid import InventoryResult, RfidReader, open_reader
from readers.rfid.mercury_sim import MercurySimulator
from readers.rfid.r2000_sim import R2000Simulator
from readers.rfid.rf_model import Scenario
from readers.rfid.sim_base import PtySimulator


def epc_of(i: int, prefix: str = "E2801170") -> str:
    """A 96-bit EPC (24 hex digits) numbered ``i``."""
    return f"{prefix}{i:016X}"


def start_simulator(protocol: str, scenario: Scenario) -> PtySimulator[Any]:
    """A started simulator of ``protocol`` at ``time_scale=0`` over ``scenario``."""
    cls = {"mercury": MercurySimulator, "r2000": R2000Simulator}[protocol]
    sim = cls(scenario.antenna_ports, scenario.seed, 0.0, scenario=scenario)
    sim.start()
    return sim


def make_reader(protocol: str, sim: PtySimulator[Any]) -> RfidReader:
    """The real driver for ``protocol`` on the simulator's pty (not opened yet)."""
    options: dict[str, Any] = {"antenna_ports": sim.antenna_ports} if protocol == "r2000" else {}
    return open_reader(protocol, sim.port, 115200, 2.0, **options)


class CountingReader:
    """Proxy for a driver that counts per-pass sightings (tag x antenna) above/below a floor."""

    def __init__(self, reader: RfidReader, floor_dbm: int) -> None:
        self._reader = reader
        self.floor_dbm = floor_dbm
        self.sightings = 0
        self.weak_sightings = 0
        self.passes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def inventory(
        self,
        rounds: int,
        dwell_ms: int,
        *,
        antennas: Sequence[int] | None = None,
        target: str = "AB",
    ) -> InventoryResult:
        """The driver's inventory, counted."""
        result = self._reader.inventory(rounds, dwell_ms, antennas=antennas, target=target)
        self.passes += 1
        for report in result.tags.values():
            for read in report.reads.values():
                self.sightings += 1
                self.weak_sightings += read.rssi < self.floor_dbm
        return result
