"""What every serial-port reader driver shares: opening the port through a
pyserial factory, identifying the reader, and failing cleanly when the link dies.

A protocol driver subclasses :class:`SerialReader` and supplies
:meth:`SerialReader._identify` (the first exchange after the port opens) and
:meth:`SerialReader._forget_settings` (what the module no longer remembers
after a new link or a reboot).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import Any

import serial

from .base import ReaderError, ReaderInfo, RfidReader

try:  # pyserial's POSIX backend lets termios.error (not an OSError) escape from tcflush
    from termios import error as _TermiosError
except ImportError:  # pragma: no cover - non-POSIX host
    _TermiosError = OSError  # type: ignore[assignment,misc]

SerialFactory = Callable[..., Any]
# What a vanished or failing serial device raises through pyserial.
LINK_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, _TermiosError)
POLL_S = 0.02  # serial read timeout: how often a waiting driver looks at its deadline


class SerialReader(RfidReader):
    """The link lifecycle of a reader on a serial port (see the module docstring)."""

    def __init__(
        self, port: str, baudrate: int, timeout_s: float, serial_factory: SerialFactory
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self._serial_factory = serial_factory
        self._serial: Any = None
        self._lock = threading.RLock()
        self._info: ReaderInfo | None = None
        self._antennas: list[int] = []
        self._closed_reason = ""

    @property
    def info(self) -> ReaderInfo | None:
        """Identity from the last successful open(), else None."""
        return self._info

    @abc.abstractmethod
    def _identify(self) -> ReaderInfo:
        """First exchange on a fresh link: bring the module up and say what it is."""

    @abc.abstractmethod
    def _forget_settings(self) -> None:
        """The module's settings are unknown (new link, reboot, failed link)."""

    def open(self) -> ReaderInfo:
        """Open the port and identify the reader; a no-op when already open."""
        with self._lock:
            if self._serial is not None and self._info is not None:
                return self._info
            try:
                self._serial = self._serial_factory(
                    self.port, baudrate=self.baudrate, timeout=min(POLL_S, self.timeout_s)
                )
            except (*LINK_ERRORS, ValueError) as exc:
                self._serial = None
                raise ReaderError(f"cannot open serial port {self.port!r}: {exc}") from exc
            self._closed_reason = ""
            self._forget_settings()
            try:
                self._info = self._identify()
            except BaseException:
                self.close()
                raise
            return self._info

    def close(self) -> None:
        """Close the port; safe to call any number of times."""
        with self._lock:
            self._drop_link()

    def _drop_link(self) -> None:
        ser, self._serial = self._serial, None
        self._info = None
        self._forget_settings()
        if ser is not None:
            try:
                ser.close()
            except LINK_ERRORS:
                pass  # the device may already be gone; closing is best effort

    def _require_open(self) -> ReaderInfo:
        if self._serial is None or self._info is None:
            why = f" (link failed: {self._closed_reason})" if self._closed_reason else ""
            raise ReaderError(f"reader on {self.port!r} is not open{why}")
        return self._info

    def _fail_link(self, what: str, exc: BaseException) -> ReaderError:
        """Close a link that failed mid-exchange; returns the error to raise."""
        self._closed_reason = f"{what}: {exc}"
        self._drop_link()
        return ReaderError(
            f"serial link to {self.port!r} failed during {what}: {exc} (unplugged or powered off?)"
        )
