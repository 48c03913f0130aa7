"""UHF RFID readers behind one interface, chosen by protocol name.

``open_reader("mercury", "/dev/ttyUSB0")`` returns an unopened
:class:`RfidReader`; call ``open()`` (or use it as a context manager).
"""

from __future__ import annotations

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

__all__ = [
    "PROTOCOLS",
    "AntennaReads",
    "FrameError",
    "InventoryResult",
    "MercuryReader",
    "ReaderError",
    "ReaderInfo",
    "ReaderStatusError",
    "ReaderTimeout",
    "RfidReader",
    "TagReport",
    "open_reader",
]

# Wire protocol name (as written in config) -> driver class.
PROTOCOLS: dict[str, type[RfidReader]] = {"mercury": MercuryReader}


def open_reader(
    protocol: str, port: str, baudrate: int = 115200, timeout_s: float = 1.0
) -> RfidReader:
    """Build the driver for ``protocol`` on ``port``; it is not opened yet."""
    cls = PROTOCOLS.get(str(protocol).strip().lower())
    if cls is None:
        known = ", ".join(sorted(PROTOCOLS))
        raise ValueError(f"unknown RFID protocol {protocol!r}; known protocols: {known}")
    return cls(port, baudrate=baudrate, timeout_s=timeout_s)  # type: ignore[call-arg]
