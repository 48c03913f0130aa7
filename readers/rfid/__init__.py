"""UHF RFID readers behind one interface, chosen by protocol name.

``open_reader("mercury", "/dev/ttyUSB0")`` returns an unopened
:class:`RfidReader`; call ``open()`` (or use it as a context manager).
Protocols: ``mercury`` (ThingMagic M6e family), ``r2000`` (Impinj-R2000
"0xA0" modules). Their simulators (``mercury_sim``, ``r2000_sim``) share the
RF model in :mod:`readers.rfid.rf_model`.
"""

from __future__ import annotations

from typing import Any

from .base import (
    AntennaReads,
    FrameError,
    InventoryResult,
    ReaderError,
    ReaderInfo,
    ReaderStatusError,
    ReaderTimeout,
    RfidReader,
    TagReport,
)
from .mercury import MercuryReader
from .r2000 import R2000Reader

__all__ = [
    "PROTOCOLS",
    "AntennaReads",
    "FrameError",
    "InventoryResult",
    "MercuryReader",
    "R2000Reader",
    "ReaderError",
    "ReaderInfo",
    "ReaderStatusError",
    "ReaderTimeout",
    "RfidReader",
    "TagReport",
    "open_reader",
]

# Wire protocol name (as written in config) -> driver class.
PROTOCOLS: dict[str, type[RfidReader]] = {"mercury": MercuryReader, "r2000": R2000Reader}


def open_reader(
    protocol: str, port: str, baudrate: int = 115200, timeout_s: float = 1.0, **options: Any
) -> RfidReader:
    """Build the driver for ``protocol`` on ``port``; it is not opened yet.

    ``options`` are the driver's keyword arguments (e.g. ``antenna_ports=16`` or
    ``mode="fast_switch"`` for ``r2000``); an unknown one is a TypeError.
    """
    cls = PROTOCOLS.get(str(protocol).strip().lower())
    if cls is None:
        known = ", ".join(sorted(PROTOCOLS))
        raise ValueError(f"unknown RFID protocol {protocol!r}; known protocols: {known}")
    return cls(port, baudrate=baudrate, timeout_s=timeout_s, **options)  # type: ignore[call-arg]
