"""A simulated ThingMagic M6e on a pseudo-terminal, speaking the real bytes.

The driver opens :attr:`MercurySimulator.port` with pyserial exactly as it
would open ``/dev/ttyUSB0``; nothing in the driver knows it is simulated. The
tag world, Gen2 flags and timing are the shared RF model
(:mod:`readers.rfid.rf_model`, ``.rf`` / ``.clock``); this module is the
Mercury wire front end over it: module state (region, power per port,
settling time, search list, antenna mux, session/target/Q, tag buffer),
status codes, the boot reply and line faults.

Modelled module behaviour worth knowing:

* Read Tag Multiple (0x22) searches for its whole timeout; the search list is
  visited in order with the timeout split evenly. A port that is not wired or
  disconnected fails the whole command with 0x0503 before RF comes on.
* Logical ports 5-16 need the GPO antenna mux (0x9A 01 03 value): value 1 or 2
  allows ports 1-8, 3 allows 1-16; otherwise Set Antenna answers 0x0507.
* The tag buffer keeps one record per (EPC, tx, rx) with read count, best
  RSSI, the last frequency and the time of the first read.
* A reboot (``inject_reboot``/``inject_boot_reply`` or a scenario ``reboot``
  fault) replaces the reply with an unsolicited 0x04 boot frame and resets
  every setting.
"""

from __future__ import annotations

import random
from pathlib import Path

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
    OP_SET_READER_CONFIG,
    OP_SET_REGION,
    OP_VERSION,
    REGIONS,
    STATUS_ANTENNA_NOT_CONNECTED,
    STATUS_INVALID_OPCODE,
    STATUS_NO_TAGS,
    STATUS_OK,
    STATUS_WRONG_LENGTH,
    TARGET_CODES,
    Frame,
    FrameParser,
    TagRecord,
    build_reply,
    build_tag_buffer_reply_data,
    encode_tag_record,
    gen2_crc,
)
from .rf_model import Scenario
from .sim_base import PtySimulator, log

__all__ = ["MercurySimulator", "region_channels_khz"]

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
BOOT_S = 0.12  # power-up to application (M6e user guide)

# Read power limits of an M6e, centi-dBm.
MIN_POWER_CDBM = 500
MAX_POWER_CDBM = 3150

PHYSICAL_PORTS = 4
# Antenna-control GPIO setting (reader config key 3) -> highest logical port.
MUX_PORTS = {0: PHYSICAL_PORTS, 1: 8, 2: 8, 3: 16}
CONFIG_ANTENNA_CONTROL_GPIO = 0x03

_FCC = tuple(902750 + 500 * i for i in range(50))
_ETSI = (865700, 866300, 866900, 867500)
_PRC = tuple(920625 + 250 * i for i in range(16))


def region_channels_khz(region: int | None) -> tuple[int, ...]:
    """Hop channels the simulator uses for a Mercury region code."""
    if region in (2, 7, 8, 30):
        return _ETSI
    if region in (6, 10):
        return _PRC
    return _FCC


class MercurySimulator(PtySimulator[Frame]):
    """A simulated M6e on a pty (see the module docstring).

    ``scenario`` (a :class:`~readers.rfid.rf_model.Scenario` or a TOML path)
    supplies ports, seed, tags, faults and timing; without it the world is
    empty with ``antenna_ports`` ports and ``seed``, and every tag placed with
    :meth:`add_tag` is read on each of its antennas with probability 1.
    ``time_scale`` 0 answers at once (the virtual clock still advances), 1.0
    takes the modelled time.
    """

    name = "mercury"

    def __init__(
        self,
        antenna_ports: int = 8,
        seed: int = 0,
        time_scale: float = 0.0,
        *,
        scenario: Scenario | str | Path | None = None,
    ) -> None:
        super().__init__(antenna_ports, seed, time_scale, scenario=scenario)
        self.max_reads = 255  # cap on one record's read count per Read Tag Multiple
        self._cosmetic = random.Random(self.rf.scenario.seed)  # phase: not part of the RF draws
        self._parser = FrameParser(replies=False)
        self._reset_module()

    # ------------------------------------------------------------ extra controls

    def inject_boot_reply(self, opcode: int | None = None, after: int = 0) -> None:
        """Reboot: the next reply becomes an unsolicited 0x04 boot frame and the
        module loses its configuration."""
        self.inject_reboot(opcode, after)

    def enter_bootloader(self) -> None:
        """Drop to the bootloader, as after a power cycle; 0x04 starts the app again."""
        with self._lock:
            self._reset_module()
            self._app = False

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
                "q": self._q,
                "search_list": list(self._search_list),
                "port_power": {p: v for p, v in sorted(self._port_power.items())},
                "mux": self._mux,
                "app": self._app,
            }

    # ------------------------------------------------------------ module state

    def _reset_module(self) -> None:
        """Power-on defaults (caller holds the lock or is the constructor)."""
        self._app = True
        self._protocol: int | None = None
        self._region: int | None = None
        self._power_cdbm = 3000
        self._session = 0
        self._target = 0x0100
        self._q: int | None = None  # None: dynamic Q
        self._mux = 0
        self._current: tuple[int, int] = (1, 1)
        self._search_list: list[tuple[int, int]] = [(1, 1)]
        # port -> (read power cdBm, write power cdBm, settling time us)
        self._port_power: dict[int, tuple[int, int, int]] = {}
        # (EPC, tx, rx) -> [read count, best RSSI, frequency kHz, first read ms]
        self._buffer: dict[tuple[str, int, int], list[int]] = {}
        self._read_index = 0

    # ------------------------------------------------------------ I/O

    def _on_bytes(self, chunk: bytes) -> None:
        for frame in self._parser.feed(chunk):
            try:
                self.rf.serial(5 + len(frame.data), self._stop)  # the command's own bytes
                self._handle(frame)
            except Exception as exc:  # never let one bad command kill the module
                log.exception("mercury simulator: handling opcode 0x%02X", frame.opcode)
                self._report(f"opcode 0x{frame.opcode:02X}: {exc!r}")
                self._reply(frame.opcode, STATUS_UNKNOWN_ERROR)

    def _reply(self, opcode: int, status: int, data: bytes = b"", fault: str | None = None) -> None:
        frame = build_reply(opcode, status, data)
        queued = self._take_fault(opcode)
        fault = queued or fault
        if fault == "unplug":
            self._pull_plug()
            return
        if fault == "reboot":
            with self._lock:
                self._reset_module()
            self.rf.spend(BOOT_S, self._stop)
            frame = build_reply(OP_BOOT_FIRMWARE, STATUS_OK, VERSION_DATA)
            fault = None
        damaged = self._damage(fault, frame)
        if damaged is None:
            return
        self.rf.serial(len(damaged), self._stop)
        self._send_bytes(damaged)

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
                self.rf.spend(BOOT_S, self._stop)
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
                OP_SET_READER_CONFIG: self._set_reader_config,
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

    def _port_allowed(self, port: int) -> bool:
        return 1 <= port <= MUX_PORTS[self._mux]

    def _set_antenna(self, data: bytes) -> int:
        if len(data) == 2:
            pairs = [(data[0], data[1])]
        elif data[:1] == b"\x02" and len(data) >= 3 and len(data) % 2 == 1:
            pairs = [(data[i], data[i + 1]) for i in range(1, len(data), 2)]
        elif data[:1] == b"\x04" and len(data) >= 8 and (len(data) - 1) % 7 == 0:
            return self._set_port_power(data[1:])
        else:
            return STATUS_WRONG_LENGTH
        if any(not self._port_allowed(p) for pair in pairs for p in pair):
            return STATUS_INVALID_ANTENNA_CONFIG
        if len(data) == 2:
            self._current = pairs[0]
        else:
            self._search_list = pairs
        return STATUS_OK

    def _set_port_power(self, entries: bytes) -> int:
        # (port u8, read power s16 cdBm, write power s16 cdBm, settling time u16 us)*
        new = {}
        for i in range(0, len(entries), 7):
            port = entries[i]
            read = int.from_bytes(entries[i + 1 : i + 3], "big", signed=True)
            write = int.from_bytes(entries[i + 3 : i + 5], "big", signed=True)
            settle = int.from_bytes(entries[i + 5 : i + 7], "big")
            if not self._port_allowed(port):
                return STATUS_INVALID_ANTENNA_CONFIG
            if max(read, write) > MAX_POWER_CDBM:
                return STATUS_POWER_TOO_HIGH
            if min(read, write) < MIN_POWER_CDBM:
                return STATUS_POWER_TOO_LOW
            new[port] = (read, write, settle)
        self._port_power.update(new)
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

    def _set_reader_config(self, data: bytes) -> int:
        # Key-value form: 01 key value.
        if len(data) != 3:
            return STATUS_WRONG_LENGTH
        if data[0] != 0x01:
            return STATUS_INVALID_PARAMETER
        if data[1] == CONFIG_ANTENNA_CONTROL_GPIO:
            if data[2] not in MUX_PORTS:
                return STATUS_INVALID_PARAMETER
            self._mux = data[2]
        return STATUS_OK  # other keys are accepted and have no effect here

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
            if target not in TARGET_CODES.values():
                return STATUS_INVALID_PARAMETER
            self._target = target
        elif key in (0x02, 0x10, 0x11, 0x17):  # M, BLF, Tari, Select policy: one byte
            if len(value) != 1:
                return STATUS_WRONG_LENGTH
        elif key == 0x12:  # Q: 00 dynamic | 01 q static
            if value == b"\x00":
                self._q = None
            elif len(value) == 2 and value[0] == 0x01 and value[1] <= 15:
                self._q = value[1]
            elif len(value) not in (1, 2):
                return STATUS_WRONG_LENGTH
            else:
                return STATUS_INVALID_PARAMETER
        return STATUS_OK

    def _read_tag_multiple(self, data: bytes) -> None:
        op = OP_READ_TAG_MULTIPLE
        # option u8, searchFlags u16, timeout u16 [, metadataFlags u16 if option & 0x10]
        if len(data) != (7 if data[:1] and data[0] & 0x10 else 5):
            self._reply(op, STATUS_WRONG_LENGTH)
            return
        fault = self.rf.next_read_fault()
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
            if status == STATUS_OK and not all(self.rf.antenna_connected(tx) for tx, _ in pairs):
                # The module checks the antenna before switching RF on.
                status = STATUS_ANTENNA_NOT_CONNECTED
            session, target = self._session, self._target
            q, region = self._q, self._region
            port_power = dict(self._port_power)
            global_power = self._power_cdbm
        if status != STATUS_OK:
            self.rf.spend(self.rf.timing.rf_on_ms / 1000, self._stop)
            self._reply(op, status, fault=fault)
            return
        target_name = next(k for k, v in TARGET_CODES.items() if v == target)
        total = 0.0
        visits = []
        for i, (tx, _rx) in enumerate(pairs):
            read_cdbm, _write, settle_us = port_power.get(tx, (global_power, global_power, 0))
            visit = self.rf.visit(
                tx,
                session=session,
                target=target_name,
                budget_s=timeout_ms / 1000 / len(pairs),
                rf_on=i == 0,
                settle_s=settle_us / 1e6,
                power_dbm=read_cdbm / 100,
                q=q,
                channels_khz=region_channels_khz(region),
                max_count=max(1, min(255, self.max_reads)),
            )
            visits.append(visit)
            total += visit.duration_s
        if not self.rf.spend(total, self._stop):
            return  # shutting down
        with self._lock:
            offset_ms = 0.0
            for (tx, rx), visit in zip(pairs, visits, strict=True):
                for read in visit.reads:
                    entry = self._buffer.get((read.epc, tx, rx))
                    first_ms = int(offset_ms + read.first_s * 1000)
                    if entry is None:
                        self._buffer[(read.epc, tx, rx)] = [
                            read.count, read.rssi, read.frequency_khz, first_ms,
                        ]  # fmt: skip
                    else:
                        entry[0] = min(0xFF, entry[0] + read.count)
                        entry[1] = max(entry[1], read.rssi)
                        entry[2] = read.frequency_khz
                offset_ms += visit.duration_s * 1000
            found = sum(len(v.reads) for v in visits)
            remaining = len(self._buffer) - self._read_index
        if not found and not remaining:
            self._reply(op, STATUS_NO_TAGS, fault=fault)
            return
        # The large-population flag widens the count to a u32.
        count = remaining.to_bytes(4, "big") if flags & 0x10 else bytes([min(remaining, 0xFF)])
        self._reply(op, STATUS_OK, bytes([option]) + flags.to_bytes(2, "big") + count, fault=fault)

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
            for (epc, tx, rx), (count, rssi, freq, first_ms) in pending:
                raw = bytes.fromhex(epc)
                pc = (len(raw) // 2) << 11
                record = TagRecord(
                    epc=raw,
                    pc=pc,
                    tag_crc=gen2_crc(pc.to_bytes(2, "big") + raw),
                    read_count=count,
                    rssi=rssi,
                    antenna_byte=((tx & 0x0F) << 4) | (rx & 0x0F),
                    frequency_khz=freq,
                    timestamp_ms=first_ms,
                    phase=self._cosmetic.randrange(180),
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
