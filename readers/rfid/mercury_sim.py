"""A simulated ThingMagic M6e on a pseudo-terminal, speaking the real bytes.

The driver opens :attr:`MercurySimulator.port` with pyserial exactly as it
would open ``/dev/ttyUSB0``; nothing in the driver knows it is simulated.
The simulator keeps a tag world (which EPC each antenna sees, at what mean
RSSI) and a module state (region, power, search list, tag buffer), and can
inject line faults for tests.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import select
import threading
import tty
from collections.abc import Mapping
from types import TracebackType

from .mercury import (
    GEN2_PROTOCOL,
    MAX_REPLY_DATA,
    OP_BOOT_FIRMWARE,
    OP_CLEAR_TAG_BUFFER,
    OP_GET_CURRENT_PROGRAM,
    OP_GET_TAG_BUFFER,
    OP_READ_TAG_MULTIPLE,
    OP_SET_ANTENNA,
    OP_SET_PROTOCOL,
    OP_SET_PROTOCOL_PARAM,
    OP_SET_READ_POWER,
    OP_SET_REGION,
    OP_VERSION,
    REGIONS,
    STATUS_ANTENNA_NOT_CONNECTED,
    STATUS_INVALID_OPCODE,
    STATUS_NO_TAGS,
    STATUS_OK,
    STATUS_WRONG_LENGTH,
    Frame,
    FrameParser,
    TagRecord,
    build_reply,
    build_tag_buffer_reply_data,
    encode_tag_record,
    gen2_crc,
)

__all__ = ["MercurySimulator"]

log = logging.getLogger(__name__)

STATUS_INVALID_PARAMETER = 0x0105
STATUS_POWER_TOO_HIGH = 0x0103
STATUS_POWER_TOO_LOW = 0x0106
STATUS_INVALID_REGION = 0x010B
STATUS_NO_PROTOCOL = 0x0401
STATUS_INVALID_PROTOCOL = 0x0402
STATUS_INVALID_ANTENNA_CONFIG = 0x0507
STATUS_NOT_ENOUGH_TAGS = 0x0600
STATUS_UNKNOWN_ERROR = 0x7F00

# Version reply: bootloader[4], hardware[4] (byte 0 = 0x18 M6e), firmware
# date[4] (BCD), firmware version[4], supported protocols (bit 4 = Gen2).
VERSION_DATA = bytes.fromhex("120617001800003020190516010B010E00000010")
PROGRAM_APP = 0x12
PROGRAM_BOOTLOADER = 0x11

# Read power limits of an M6e, centi-dBm.
MIN_POWER_CDBM = 500
MAX_POWER_CDBM = 3150

_POLL_S = 0.05
_WRITE_TIMEOUT_S = 1.0


def _normalize_epc(epc: str) -> str:
    text = str(epc).strip().upper()
    if not text or any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"EPC {epc!r} is not a hex string")
    if len(text) % 4 or len(text) > 124:
        raise ValueError(
            f"EPC {epc!r} must be 1..31 whole 16-bit words (4..124 hex digits), got {len(text)}"
        )
    return text


def _normalize_antennas(epc: str, antennas: Mapping[int, int] | None) -> dict[int, int]:
    if antennas is None:
        return {1: -50}
    out: dict[int, int] = {}
    for port, rssi in dict(antennas).items():
        if not isinstance(port, int) or not 1 <= port <= 16:
            raise ValueError(f"tag {epc}: antenna port must be 1..16, got {port!r}")
        if not isinstance(rssi, int) or not -128 <= rssi <= 0:
            raise ValueError(f"tag {epc}: mean RSSI must be -128..0 dBm, got {rssi!r}")
        out[port] = rssi
    return out


class MercurySimulator:
    """A simulated M6e on a pty; ``time_scale`` scales how long Read Tag Multiple takes."""

    def __init__(self, antenna_ports: int = 8, seed: int = 0, time_scale: float = 0.0) -> None:
        if not 1 <= antenna_ports <= 16:
            raise ValueError(f"antenna_ports must be 1..16, got {antenna_ports}")
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        self.antenna_ports = antenna_ports
        self.time_scale = time_scale
        self.max_reads = 5  # reads of one tag per Read Tag Multiple: 1..max_reads
        self.errors: list[str] = []  # problems the background thread caught
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._tags: dict[str, dict[int, int]] = {}
        self._disconnected: set[int] = set()
        # [kind, only for this opcode (or None), matching replies still to let through]
        self._faults: list[list] = []
        self._received: list[Frame] = []
        self._master: int | None = None
        self._slave: int | None = None
        self._port: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._unplug = threading.Event()
        self._reset_module()

    # ------------------------------------------------------------ lifecycle

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
        self._thread = threading.Thread(target=self._run, name="mercury-sim", daemon=True)
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
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._close_master()
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None

    def __enter__(self) -> MercurySimulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ tag world

    def add_tag(self, epc: str, antennas: dict[int, int] | None = None) -> None:
        """Place a tag seen by ``antennas`` (port -> mean RSSI dBm; default {1: -50})."""
        key = _normalize_epc(epc)
        ants = _normalize_antennas(key, antennas)
        with self._lock:
            self._tags[key] = ants

    def remove_tag(self, epc: str) -> None:
        """Take a tag out of the cabinet (no error if it is not there)."""
        key = _normalize_epc(epc)
        with self._lock:
            self._tags.pop(key, None)

    def set_tags(self, mapping: Mapping[str, Mapping[int, int] | None]) -> None:
        """Replace the whole tag world."""
        new = {}
        for epc, ants in mapping.items():
            key = _normalize_epc(epc)
            new[key] = _normalize_antennas(key, ants)
        with self._lock:
            self._tags = new

    def tags(self) -> dict[str, dict[int, int]]:
        """A copy of the tag world."""
        with self._lock:
            return {epc: dict(ants) for epc, ants in self._tags.items()}

    # ------------------------------------------------------------ faults and inspection

    def disconnect_antenna(self, port: int, disconnected: bool = True) -> None:
        """Make Read Tag Multiple on ``port`` fail with 0x0503 (or heal it)."""
        if not 1 <= port <= 16:
            raise ValueError(f"antenna port must be 1..16, got {port}")
        with self._lock:
            if disconnected:
                self._disconnected.add(port)
            else:
                self._disconnected.discard(port)

    # Fault injection: each call queues ``times`` one-shot faults. ``opcode``
    # limits a fault to replies with that opcode; ``after`` lets that many
    # matching replies through first. Queued faults fire in order.

    def corrupt_next_reply(self, times: int = 1, opcode: int | None = None, after: int = 0) -> None:
        """Flip one byte of the next reply so its CRC fails."""
        self._queue_fault("corrupt", times, opcode, after)

    def drop_next_reply(self, times: int = 1, opcode: int | None = None, after: int = 0) -> None:
        """Do not send the next reply."""
        self._queue_fault("drop", times, opcode, after)

    def truncate_next_reply(
        self, times: int = 1, opcode: int | None = None, after: int = 0
    ) -> None:
        """Send only the first part (all but 3 bytes) of the next reply."""
        self._queue_fault("truncate", times, opcode, after)

    def inject_boot_reply(self, opcode: int | None = None, after: int = 0) -> None:
        """Reboot: the next reply becomes an unsolicited 0x04 boot frame and the
        module loses its configuration."""
        self._queue_fault("boot", 1, opcode, after)

    def enter_bootloader(self) -> None:
        """Drop to the bootloader, as after a power cycle; 0x04 starts the app again."""
        with self._lock:
            self._reset_module()
            self._app = False

    def unplug(self) -> None:
        """Close the pty master: the driver's next read or write fails."""
        if self._thread is not None and self._thread.is_alive():
            self._unplug.set()
            self._thread.join(timeout=2.0)
        self._close_master()

    def received(self) -> list[Frame]:
        """Every command frame received so far, in order."""
        with self._lock:
            return list(self._received)

    @property
    def config(self) -> dict[str, object]:
        """Snapshot of the module settings the host has made."""
        with self._lock:
            return {
                "protocol": self._protocol,
                "region": self._region,
                "power_cdbm": self._power_cdbm,
                "session": self._session,
                "target": self._target,
                "search_list": list(self._search_list),
                "app": self._app,
            }

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

    # ------------------------------------------------------------ module state

    def _reset_module(self) -> None:
        """Power-on defaults (caller holds the lock or is the constructor)."""
        self._app = True
        self._protocol: int | None = None
        self._region: int | None = None
        self._power_cdbm = 3000
        self._session = 0
        self._target = 0x0100
        self._current: tuple[int, int] = (1, 1)
        self._search_list: list[tuple[int, int]] = [(1, 1)]
        # (EPC, tx, rx) -> [read count, best RSSI]; dict order is buffer order.
        self._buffer: dict[tuple[str, int, int], list[int]] = {}
        self._read_index = 0

    # ------------------------------------------------------------ I/O thread

    def _report(self, message: str) -> None:
        log.warning("mercury simulator: %s", message)
        self.errors.append(message)

    def _close_master(self) -> None:
        if self._master is not None:
            try:
                os.close(self._master)
            except OSError:
                pass  # already gone
            self._master = None

    def _run(self) -> None:
        parser = FrameParser(replies=False)
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
                # EIO while no slave is open; wait for the host to reopen.
                if exc.errno != errno.EIO:
                    self._report(f"read from pty failed: {exc}")
                self._stop.wait(_POLL_S)
                continue
            for frame in parser.feed(chunk):
                try:
                    self._handle(frame)
                except Exception as exc:  # never let one bad command kill the module
                    log.exception("mercury simulator: handling opcode 0x%02X", frame.opcode)
                    self._report(f"opcode 0x{frame.opcode:02X}: {exc!r}")
                    self._reply(frame.opcode, STATUS_UNKNOWN_ERROR)

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
                self._report(f"write to pty failed: {exc}")
                return

    def _reply(self, opcode: int, status: int, data: bytes = b"") -> None:
        frame = build_reply(opcode, status, data)
        with self._lock:
            fault = None
            for i, (kind, only, skip) in enumerate(self._faults):
                if only is None or only == opcode:
                    if skip:
                        self._faults[i][2] -= 1
                    else:
                        fault = kind
                        del self._faults[i]
                    break
            if fault == "boot":
                self._reset_module()
        if fault == "drop":
            return
        if fault == "corrupt":
            raw = bytearray(frame)
            raw[len(raw) // 2] ^= 0x10  # never the header or LEN: the frame keeps its shape
            frame = bytes(raw)
        elif fault == "truncate":
            frame = frame[: max(3, len(frame) - 3)]
        elif fault == "boot":
            frame = build_reply(OP_BOOT_FIRMWARE, STATUS_OK, VERSION_DATA)
        self._send_bytes(frame)

    # ------------------------------------------------------------ command handling

    def _handle(self, frame: Frame) -> None:
        with self._lock:
            self._received.append(frame)
            app = self._app
        op, data = frame.opcode, frame.data
        if op in (OP_VERSION, OP_GET_CURRENT_PROGRAM, OP_BOOT_FIRMWARE) and data:
            self._reply(op, STATUS_WRONG_LENGTH)
        elif op == OP_VERSION:
            self._reply(op, STATUS_OK, VERSION_DATA)
        elif op == OP_GET_CURRENT_PROGRAM:
            self._reply(op, STATUS_OK, bytes([PROGRAM_APP if app else PROGRAM_BOOTLOADER]))
        elif op == OP_BOOT_FIRMWARE:
            if app:
                self._reply(op, STATUS_INVALID_OPCODE)
            else:
                with self._lock:
                    self._app = True
                self._reply(op, STATUS_OK, VERSION_DATA)
        elif not app:
            self._reply(op, STATUS_INVALID_OPCODE)  # the bootloader knows few opcodes
        elif op == OP_READ_TAG_MULTIPLE:
            self._read_tag_multiple(data)
        elif op == OP_GET_TAG_BUFFER:
            self._reply(op, *self._get_tag_buffer(data))
        else:
            setter = {
                OP_CLEAR_TAG_BUFFER: self._clear_buffer,
                OP_SET_ANTENNA: self._set_antenna,
                OP_SET_READ_POWER: self._set_power,
                OP_SET_PROTOCOL: self._set_protocol,
                OP_SET_REGION: self._set_region,
                OP_SET_PROTOCOL_PARAM: self._set_gen2_param,
            }.get(op)
            if setter is None:
                self._reply(op, STATUS_INVALID_OPCODE)
                return
            with self._lock:
                status = setter(data)
            self._reply(op, status)

    # Setters run with the lock held and return a status word.

    def _clear_buffer(self, data: bytes) -> int:
        if data:
            return STATUS_WRONG_LENGTH
        self._buffer.clear()
        self._read_index = 0
        return STATUS_OK

    def _set_antenna(self, data: bytes) -> int:
        if len(data) == 2:
            pairs = [(data[0], data[1])]
        elif data[:1] == b"\x02" and len(data) >= 3 and len(data) % 2 == 1:
            pairs = [(data[i], data[i + 1]) for i in range(1, len(data), 2)]
        elif data[:1] == b"\x04" and len(data) >= 8 and (len(data) - 1) % 7 == 0:
            # Per-port power/settling: accept and check the ports, no RF model behind it.
            pairs = [(data[i], data[i]) for i in range(1, len(data), 7)]
        else:
            return STATUS_WRONG_LENGTH
        if any(not (1 <= p <= 16) for pair in pairs for p in pair):
            return STATUS_INVALID_ANTENNA_CONFIG
        if len(data) == 2:
            self._current = pairs[0]
        elif data[0] == 0x02:
            self._search_list = pairs
        return STATUS_OK

    def _set_power(self, data: bytes) -> int:
        if len(data) != 2:
            return STATUS_WRONG_LENGTH
        value = int.from_bytes(data, "big", signed=True)
        if value > MAX_POWER_CDBM:
            return STATUS_POWER_TOO_HIGH
        if value < MIN_POWER_CDBM:
            return STATUS_POWER_TOO_LOW
        self._power_cdbm = value
        return STATUS_OK

    def _set_protocol(self, data: bytes) -> int:
        if len(data) != 2:
            return STATUS_WRONG_LENGTH
        if int.from_bytes(data, "big") != GEN2_PROTOCOL:
            return STATUS_INVALID_PROTOCOL
        self._protocol = GEN2_PROTOCOL
        return STATUS_OK

    def _set_region(self, data: bytes) -> int:
        if len(data) != 1:
            return STATUS_WRONG_LENGTH
        if data[0] not in REGIONS.values():
            return STATUS_INVALID_REGION
        self._region = data[0]
        return STATUS_OK

    def _set_gen2_param(self, data: bytes) -> int:
        if len(data) < 3:
            return STATUS_WRONG_LENGTH
        if data[0] != GEN2_PROTOCOL:
            return STATUS_INVALID_PARAMETER
        key, value = data[1], data[2:]
        if key == 0x00:  # session
            if len(value) != 1:
                return STATUS_WRONG_LENGTH
            if value[0] > 3:
                return STATUS_INVALID_PARAMETER
            self._session = value[0]
        elif key == 0x01:  # target
            if len(value) != 2:
                return STATUS_WRONG_LENGTH
            target = int.from_bytes(value, "big")
            if target not in (0x0000, 0x0001, 0x0100, 0x0101):
                return STATUS_INVALID_PARAMETER
            self._target = target
        elif key in (0x02, 0x10, 0x11, 0x17):  # M, BLF, Tari, Select policy: one byte
            if len(value) != 1:
                return STATUS_WRONG_LENGTH
        elif key == 0x12 and len(value) not in (1, 2):  # Q: type [+ initial Q]
            return STATUS_WRONG_LENGTH
        return STATUS_OK

    def _read_tag_multiple(self, data: bytes) -> None:
        op = OP_READ_TAG_MULTIPLE
        # option u8, searchFlags u16, timeout u16 [, metadataFlags u16 if option & 0x10]
        if len(data) != (7 if data[:1] and data[0] & 0x10 else 5):
            self._reply(op, STATUS_WRONG_LENGTH)
            return
        option, flags = data[0], int.from_bytes(data[1:3], "big")
        timeout_ms = int.from_bytes(data[3:5], "big")
        with self._lock:
            if self._protocol != GEN2_PROTOCOL:
                status = STATUS_NO_PROTOCOL
            elif flags & 0x03 == 0x03:
                pairs, status = list(self._search_list), STATUS_OK
            elif flags & 0x03 == 0x00:
                pairs, status = [self._current], STATUS_OK
            else:  # 1: ant1 then 2, 2: ant2 then 1
                pairs = [(1, 1), (2, 2)] if flags & 0x03 == 1 else [(2, 2), (1, 1)]
                status = STATUS_OK
            if status == STATUS_OK and any(
                tx > self.antenna_ports or tx in self._disconnected for tx, _ in pairs
            ):
                # The module checks the antenna before switching RF on.
                status = STATUS_ANTENNA_NOT_CONNECTED
        if status != STATUS_OK:
            self._reply(op, status)
            return
        if self.time_scale > 0 and self._stop.wait(self.time_scale * timeout_ms / 1000):
            return
        with self._lock:
            found = 0
            for tx, rx in pairs:
                for epc, ants in self._tags.items():
                    mean = ants.get(tx)
                    if mean is None:
                        continue
                    reads = self._rng.randint(1, max(1, self.max_reads))
                    rssi = max(-128, min(0, mean + self._rng.randint(-2, 2)))
                    entry = self._buffer.setdefault((epc, tx, rx), [0, -128])
                    entry[0] = min(0xFF, entry[0] + reads)
                    entry[1] = max(entry[1], rssi)
                    found += 1
            remaining = len(self._buffer) - self._read_index
        if not found and not remaining:
            self._reply(op, STATUS_NO_TAGS)
            return
        # The large-population flag widens the count to a u32.
        count = remaining.to_bytes(4, "big") if flags & 0x10 else bytes([min(remaining, 0xFF)])
        self._reply(op, STATUS_OK, bytes([option]) + flags.to_bytes(2, "big") + count)

    def _get_tag_buffer(self, data: bytes) -> tuple[int, bytes]:
        with self._lock:
            if len(data) == 0:
                # Bare 0x29: read index u16, write index u16 (tags remaining = difference).
                return STATUS_OK, self._read_index.to_bytes(2, "big") + len(self._buffer).to_bytes(
                    2, "big"
                )
            if len(data) != 3:
                return STATUS_WRONG_LENGTH, b""
            flags, read_options = int.from_bytes(data[:2], "big"), data[2]
            pending = list(self._buffer.items())[self._read_index :]
            if not pending:
                return STATUS_NOT_ENOUGH_TAGS, b""
            records: list[bytes] = []
            size = 4  # flags, read options, record count
            for (epc, tx, rx), (count, rssi) in pending:
                raw = bytes.fromhex(epc)
                pc = (len(raw) // 2) << 11
                record = TagRecord(
                    epc=raw,
                    pc=pc,
                    tag_crc=gen2_crc(pc.to_bytes(2, "big") + raw),
                    read_count=count,
                    rssi=rssi,
                    antenna_byte=((tx & 0x0F) << 4) | (rx & 0x0F),
                    frequency_khz=902750 + 500 * self._rng.randrange(50),
                    timestamp_ms=self._rng.randrange(1000),
                    phase=self._rng.randrange(180),
                    protocol=GEN2_PROTOCOL,
                    gpio=0,
                )
                try:
                    encoded = encode_tag_record(record, flags)
                except ValueError:
                    return STATUS_INVALID_PARAMETER, b""
                if size + len(encoded) > MAX_REPLY_DATA or len(records) == 0xFF:
                    break
                records.append(encoded)
                size += len(encoded)
            self._read_index += len(records)
            return STATUS_OK, build_tag_buffer_reply_data(flags, records, read_options)
