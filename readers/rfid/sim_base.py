"""What every reader simulator shares: the pty, the I/O thread, faults, the RF world.

A protocol simulator subclasses :class:`PtySimulator` and implements
``_on_bytes`` (decode commands, answer through ``_reply_bytes``). The driver
opens :attr:`PtySimulator.port` with pyserial exactly as it would open
``/dev/ttyUSB0``. The tag world and reader physics live in the shared
:class:`~readers.rfid.rf_model.RfModel` (``.rf``, its clock as ``.clock``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import tty
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from .rf_model import Link, RfModel, Scenario, VirtualClock

__all__ = ["PtySimulator"]

log = logging.getLogger(__name__)

_POLL_S = 0.05
_WRITE_TIMEOUT_S = 1.0
RECEIVED_KEPT = 50_000  # commands remembered for received(); a long demo must not grow forever

F = TypeVar("F")


def make_rf(
    antenna_ports: int, seed: int, time_scale: float, scenario: Scenario | str | Path | None
) -> RfModel:
    """The RF model for a simulator: from ``scenario`` if given, else an empty world."""
    if isinstance(time_scale, bool) or not isinstance(time_scale, int | float) or time_scale < 0:
        raise ValueError(f"time_scale must be >= 0, got {time_scale!r}")
    if scenario is None:
        if isinstance(antenna_ports, bool) or not isinstance(antenna_ports, int):
            raise ValueError(f"antenna_ports must be 1..16, got {antenna_ports!r}")
        if not 1 <= antenna_ports <= 16:
            raise ValueError(f"antenna_ports must be 1..16, got {antenna_ports}")
        scenario = Scenario(antenna_ports=antenna_ports, seed=seed)
    elif isinstance(scenario, str | Path):
        scenario = Scenario.load(scenario)
    elif not isinstance(scenario, Scenario):
        raise TypeError("scenario must be a Scenario or the path of a scenario TOML file")
    return RfModel(scenario, time_scale=time_scale)


class PtySimulator(Generic[F]):
    """A simulated reader on a pseudo-terminal (see the module docstring).

    Fault injection (``corrupt_next_reply`` and friends) queues one-shot faults
    on outgoing replies: ``opcode`` limits a fault to replies to that command,
    ``after`` lets that many matching replies through first. Queued faults
    fire in order. Scenario faults (``[[fault]]``) fire on read commands.
    """

    name = "reader"

    def __init__(
        self,
        antenna_ports: int = 8,
        seed: int = 0,
        time_scale: float = 0.0,
        *,
        scenario: Scenario | str | Path | None = None,
    ) -> None:
        self.rf = make_rf(antenna_ports, seed, time_scale, scenario)
        self.errors: list[str] = []  # problems the background thread caught
        self._lock = threading.RLock()
        # [kind, only for this command code (or None), matching replies still to let through]
        self._faults: list[list[Any]] = []
        self._received: deque[F] = deque(maxlen=RECEIVED_KEPT)
        self._master: int | None = None
        self._slave: int | None = None
        self._port: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._unplug = threading.Event()

    # ------------------------------------------------------------ lifecycle

    @property
    def clock(self) -> VirtualClock:
        """The virtual clock of the RF model (simulated seconds: ``clock.now()``)."""
        return self.rf.clock

    @property
    def antenna_ports(self) -> int:
        """Ports wired to the simulated reader."""
        return self.rf.antenna_ports

    @property
    def time_scale(self) -> float:
        """0: replies are immediate; 1.0: the simulator takes the modelled time."""
        return self.rf.clock.time_scale

    def start(self) -> None:
        """Create the pty and start answering on it."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        master, slave = os.openpty()
        # Raw mode: no echo, no CR/LF translation, no line buffering.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._port = os.ttyname(slave)
        self._stop.clear()
        self._unplug.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-sim", daemon=True)
        self._thread.start()

    @property
    def port(self) -> str:
        """Device path of the pty slave, for pyserial."""
        if self._port is None:
            raise RuntimeError("simulator not started; call start() first")
        return self._port

    def stop(self) -> None:
        """Stop answering and close the pty; safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._close_master()
        if self._slave is not None:
            try:
                os.close(self._slave)
            except OSError:
                pass  # already closed
            self._slave = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ tag world (RF model)

    def add_tag(self, epc: str, antennas: Mapping[int, int | float | Link] | None = None) -> None:
        """Place a tag seen by ``antennas`` (port -> mean RSSI dBm, read with p = 1,
        or port -> :class:`Link`; default ``{1: -50}``)."""
        self.rf.add_tag(epc, antennas)

    def add_stray(self, epc: str, antennas: Mapping[int, int | float | Link]) -> None:
        """Place a tag just outside the cabinet (left out of :meth:`tags`)."""
        self.rf.add_tag(epc, antennas, stray=True)

    def remove_tag(self, epc: str) -> None:
        """Take a tag out (no error if it is not there)."""
        self.rf.remove_tag(epc)

    def move_tag(self, epc: str, antennas: Mapping[int, int | float | Link]) -> None:
        """Change which antennas see a tag already placed."""
        self.rf.move_tag(epc, antennas)

    def set_tags(self, mapping: Mapping[str, Mapping[int, int | float | Link] | None]) -> None:
        """Replace every tag inside the cabinet."""
        self.rf.set_tags(mapping)

    def tags(self) -> dict[str, dict[int, int]]:
        """The tags inside the cabinet: EPC -> port -> mean RSSI (dBm, rounded)."""
        return {
            epc: {port: round(link.rssi) for port, link in links.items()}
            for epc, links in self.rf.tags().items()
        }

    def disconnect_antenna(self, port: int, disconnected: bool = True) -> None:
        """Make ``port`` report "antenna not connected" (or heal it)."""
        self.rf.set_antenna_disconnected(port, disconnected)

    # ------------------------------------------------------------ faults

    def corrupt_next_reply(self, times: int = 1, opcode: int | None = None, after: int = 0) -> None:
        """Flip one byte of the next reply so its check fails."""
        self._queue_fault("corrupt", times, opcode, after)

    def drop_next_reply(self, times: int = 1, opcode: int | None = None, after: int = 0) -> None:
        """Do not send the next reply."""
        self._queue_fault("drop", times, opcode, after)

    def truncate_next_reply(
        self, times: int = 1, opcode: int | None = None, after: int = 0
    ) -> None:
        """Send only the first part (all but 3 bytes) of the next reply."""
        self._queue_fault("truncate", times, opcode, after)

    def inject_reboot(self, opcode: int | None = None, after: int = 0) -> None:
        """The module restarts instead of sending the next reply and forgets its settings."""
        self._queue_fault("reboot", 1, opcode, after)

    def unplug(self) -> None:
        """Close the pty master: the driver's next read or write fails."""
        if (
            self._thread is not None
            and self._thread.is_alive()
            and self._thread is not threading.current_thread()
        ):
            self._unplug.set()
            self._thread.join(timeout=5.0)
        self._close_master()

    def received(self) -> list[F]:
        """Command frames received so far (the last 50,000), in order."""
        with self._lock:
            return list(self._received)

    def _queue_fault(self, kind: str, times: int, opcode: int | None, after: int) -> None:
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if opcode is not None and not 0 <= opcode <= 0xFF:
            raise ValueError(f"opcode must be 0..255, got {opcode}")
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        with self._lock:
            self._faults.append([kind, opcode, after])
            self._faults.extend([kind, opcode, 0] for _ in range(times - 1))

    def _take_fault(self, code: int) -> str | None:
        """The queued fault for a reply to ``code``, consumed, or None."""
        with self._lock:
            for i, (kind, only, skip) in enumerate(self._faults):
                if only is None or only == code:
                    if skip:
                        self._faults[i][2] -= 1
                        return None
                    del self._faults[i]
                    return kind
            return None

    @staticmethod
    def _damage(kind: str | None, frame: bytes) -> bytes | None:
        """Apply a line fault to an encoded frame; None means send nothing."""
        if kind == "drop":
            return None
        if kind == "corrupt":
            raw = bytearray(frame)
            raw[len(raw) // 2] ^= 0x10  # never the header or length: the frame keeps its shape
            return bytes(raw)
        if kind == "truncate":
            return frame[: max(3, len(frame) - 3)]
        return frame

    # ------------------------------------------------------------ I/O thread

    def _on_bytes(self, chunk: bytes) -> None:
        """Handle bytes from the host (runs on the simulator thread)."""
        raise NotImplementedError

    def _report(self, message: str) -> None:
        log.warning("%s simulator: %s", self.name, message)
        self.errors.append(message)

    def _close_master(self) -> None:
        with self._lock:
            fd, self._master = self._master, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # already gone

    def _pull_plug(self) -> None:
        """A scenario unplug on the simulator thread: the device vanishes now."""
        self._close_master()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the thread must never die silently
            log.exception("%s simulator thread failed", self.name)
            self._report(f"simulator thread failed: {exc!r}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._unplug.is_set():
                self._close_master()
                return
            fd = self._master
            if fd is None:
                return
            try:
                readable, _, _ = select.select([fd], [], [], _POLL_S)
                if not readable:
                    continue
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if self._master is None:
                    return  # unplugged under us
                # EIO while no slave is open; wait for the host to reopen.
                if exc.errno != errno.EIO:
                    self._report(f"read from pty failed: {exc}")
                self._stop.wait(_POLL_S)
                continue
            if chunk:
                self._on_bytes(chunk)

    def _send_bytes(self, data: bytes) -> None:
        fd = self._master
        view = memoryview(data)
        while view and fd is not None:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                # The host is not reading; wait a little, then give up on the reply.
                _, writable, _ = select.select([], [fd], [], _WRITE_TIMEOUT_S)
                if not writable:
                    self._report("host is not reading; reply discarded")
                    return
            except OSError as exc:
                if self._master is not None:
                    self._report(f"write to pty failed: {exc}")
                return
