"""ThingMagic/JADAK Mercury serial protocol (M6e family): codec and driver.

Wire format (see docs in the research notes, section 1.1):

* command: ``FF LEN OPCODE DATA[LEN] CRC_HI CRC_LO``
* reply:   ``FF LEN OPCODE STATUS_HI STATUS_LO DATA[LEN] CRC_HI CRC_LO``

The CRC is ThingMagic's "augmented" CRC-16 (poly 0x1021, init 0xFFFF, no
final augmentation) over everything after the 0xFF header.

The codec (CRC, frame building, incremental parsing, tag-record layout) lives
here so that the driver and the simulator in :mod:`readers.rfid.mercury_sim`
share one definition of the bytes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import serial

from .base import (
    FrameError,
    InventoryResult,
    ReaderError,
    ReaderInfo,
    ReaderStatusError,
    ReaderTimeout,
    TagReport,
    check_ports,
    select_antennas,
)
from .serial_link import LINK_ERRORS, SerialFactory, SerialReader

__all__ = [
    "ANTENNA_STATUSES",
    "INVENTORY_METADATA",
    "MAX_COMMAND_DATA",
    "MAX_REPLY_DATA",
    "MODELS",
    "REGIONS",
    "STATUS_MESSAGES",
    "TARGET_CODES",
    "Frame",
    "FrameParser",
    "MercuryReader",
    "TagRecord",
    "build_command",
    "build_reply",
    "build_tag_buffer_reply_data",
    "crc",
    "decode_antenna",
    "encode_antenna",
    "encode_tag_record",
    "gen2_crc",
    "parse_tag_buffer",
    "status_text",
]

# --------------------------------------------------------------------------- opcodes

OP_VERSION = 0x03
OP_BOOT_FIRMWARE = 0x04
OP_GET_CURRENT_PROGRAM = 0x0C
OP_READ_TAG_MULTIPLE = 0x22
OP_GET_TAG_BUFFER = 0x29
OP_CLEAR_TAG_BUFFER = 0x2A
OP_SET_ANTENNA = 0x91
OP_SET_READ_POWER = 0x92
OP_SET_PROTOCOL = 0x93
OP_SET_REGION = 0x97
OP_SET_READER_CONFIG = 0x9A
OP_SET_PROTOCOL_PARAM = 0x9B

HEADER = 0xFF
# Packets are at most 255 bytes on the wire (TMR_SR_MAX_PACKET_SIZE and the
# host-side length check); the reference host also rejects reply LEN > 0xF8.
MAX_COMMAND_DATA = 250  # 250 + 5 = 255
MAX_REPLY_DATA = 248  # 248 + 7 = 255

STATUS_OK = 0x0000
STATUS_WRONG_LENGTH = 0x0100
STATUS_INVALID_OPCODE = 0x0101
STATUS_NO_TAGS = 0x0400
STATUS_ANTENNA_NOT_CONNECTED = 0x0503
STATUS_HIGH_RETURN_LOSS = 0x0505

STATUS_MESSAGES: dict[int, str] = {
    0x0000: "success",
    0x0100: "wrong number of data bytes",
    0x0101: "invalid opcode",
    0x0102: "unimplemented opcode",
    0x0103: "power too high",
    0x0105: "invalid parameter value",
    0x0106: "power too low",
    0x0109: "unimplemented feature",
    0x010A: "invalid baud rate",
    0x010B: "invalid region",
    0x0400: "no tags found",
    0x0401: "no protocol defined",
    0x0402: "invalid protocol",
    0x0500: "invalid frequency",
    0x0501: "channel occupied",
    0x0503: "antenna not connected",
    0x0504: "temperature exceeds limits",
    0x0505: "high return loss",
    0x0507: "invalid antenna configuration",
    0x0600: "tag-ID buffer: not enough tags",
    0x0601: "tag-ID buffer full",
    0x0602: "tag-ID buffer: repeated tag ID",
    0x0603: "tag-ID buffer: number of tags too large",
    0x7F00: "unknown error",
    0x7F01: "firmware assertion failed",
}

# Statuses of Read Tag Multiple that concern one antenna (cable, antenna), not
# the reader: the inventory records them per antenna and goes on.
ANTENNA_STATUSES: dict[int, str] = {
    STATUS_ANTENNA_NOT_CONNECTED: "not connected",
    STATUS_HIGH_RETURN_LOSS: "high return loss (check the cable and antenna)",
}

# Region codes for opcode 0x97 (tmr_region.h).
REGIONS: dict[str, int] = {
    "NA": 1,
    "EU": 2,
    "KR": 3,
    "IN": 4,
    "JP": 5,
    "PRC": 6,
    "EU2": 7,
    "EU3": 8,
    "KR2": 9,
    "PRC2": 10,
    "AU": 11,
    "NZ": 12,
    "NA2": 13,
    "NA3": 14,
    "IS": 15,
    "MY": 16,
    "ID": 17,
    "PH": 18,
    "TW": 19,
    "MO": 20,
    "RU": 21,
    "SG": 22,
    "JP2": 23,
    "JP3": 24,
    "VN": 25,
    "TH": 26,
    "AR": 27,
    "HK": 28,
    "BD": 29,
    "EU4": 30,
    "OPEN": 0xFF,
}

# Hardware byte 0 of the Version reply -> (model name, usable logical antenna ports).
# The M6e has 4 physical ports and drives up to 16 through GPO-controlled muxes.
MODELS: dict[int, tuple[str, int]] = {
    0x18: ("M6e", 16),
    0x19: ("M6e-I", 16),
    0x20: ("M6e-Micro", 2),
    0x30: ("M6e-Nano", 1),
    0x38: ("M7e-Pico", 1),
    0x80: ("M3e", 1),
}

GEN2_PROTOCOL = 0x0005
# Read Tag Multiple search flags: 0x0003 = use the configured antenna search
# list, 0x0010 = large tag population (tag count is a u32).
SEARCH_FLAGS = 0x0013
# Tag-buffer metadata we ask for: read count, RSSI, antenna, frequency.
INVENTORY_METADATA = 0x000F
# Gen2 target (0x9B 05 01 value u16): single A or B, or the module-side toggle
# ("AB": search A, switch to B when no more A answer, and back; "BA" starts at B).
TARGET_CODES: dict[str, int] = {"A": 0x0100, "B": 0x0101, "AB": 0x0000, "BA": 0x0001}
# Reader configuration (0x9A 01 key value): GPO lines that drive the antenna mux.
CONFIG_ANTENNA_CONTROL_GPIO = 0x03
MUX_BOTH_GPOS = 3  # GPO1 + GPO2: 4 physical ports x 4 = 16 logical ports


def status_text(status: int) -> str:
    """Human meaning of a Mercury status word."""
    if status in STATUS_MESSAGES:
        return STATUS_MESSAGES[status]
    if 0x0420 <= status <= 0x0430:
        return "Gen2 tag error"
    return "unknown status"


# --------------------------------------------------------------------------- checksums

_TM_CRC_TABLE = (
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7,
    0x8108, 0x9129, 0xA14A, 0xB16B, 0xC18C, 0xD1AD, 0xE1CE, 0xF1EF,
)  # fmt: skip


def crc(data: bytes) -> int:
    """ThingMagic CRC over ``data`` (the frame bytes after the 0xFF header).

    Message nibbles are shifted into the register (augmented form), which is
    why this is not CRC-16/CCITT-FALSE although it uses the same polynomial.
    """
    reg = 0xFFFF
    for b in data:
        reg = (((reg << 4) | (b >> 4)) ^ _TM_CRC_TABLE[reg >> 12]) & 0xFFFF
        reg = (((reg << 4) | (b & 0x0F)) ^ _TM_CRC_TABLE[reg >> 12]) & 0xFFFF
    return reg


def gen2_crc(data: bytes) -> int:
    """EPC Gen2 tag CRC-16 (CRC-16/GENIBUS) over PC + [XPC] + EPC."""
    reg = 0xFFFF
    for b in data:
        reg ^= b << 8
        for _ in range(8):
            reg = ((reg << 1) ^ 0x1021) if reg & 0x8000 else (reg << 1)
            reg &= 0xFFFF
    return reg ^ 0xFFFF


# --------------------------------------------------------------------------- framing


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must be 0..255, got {value}")


def build_command(opcode: int, data: bytes = b"") -> bytes:
    """Encode a host->module command frame."""
    _check_byte("opcode", opcode)
    data = bytes(data)
    if len(data) > MAX_COMMAND_DATA:
        raise ValueError(f"command data is {len(data)} bytes; the maximum is {MAX_COMMAND_DATA}")
    body = bytes([len(data), opcode]) + data
    return bytes([HEADER]) + body + crc(body).to_bytes(2, "big")


def build_reply(opcode: int, status: int, data: bytes = b"") -> bytes:
    """Encode a module->host reply frame."""
    _check_byte("opcode", opcode)
    if not 0 <= status <= 0xFFFF:
        raise ValueError(f"status must be 0..0xFFFF, got {status}")
    data = bytes(data)
    if len(data) > MAX_REPLY_DATA:
        raise ValueError(f"reply data is {len(data)} bytes; the maximum is {MAX_REPLY_DATA}")
    body = bytes([len(data), opcode]) + status.to_bytes(2, "big") + data
    return bytes([HEADER]) + body + crc(body).to_bytes(2, "big")


@dataclass(frozen=True)
class Frame:
    """One decoded frame; ``status`` is None for commands."""

    opcode: int
    status: int | None
    data: bytes

    def to_bytes(self) -> bytes:
        """Encode back to wire bytes (a reply if ``status`` is set, else a command)."""
        if self.status is None:
            return build_command(self.opcode, self.data)
        return build_reply(self.opcode, self.status, self.data)


class FrameParser:
    """Incremental frame decoder that survives partial reads and line noise.

    ``replies=True`` decodes module replies (with a status word), ``False``
    decodes host commands. Bytes that do not form a frame are dropped:
    ``resyncs`` counts each discard (junk before a header, an impossible
    length, a CRC failure, an abandoned false start), ``crc_errors`` counts
    complete candidate frames whose CRC did not match. Runs of 0xFF (the
    wake-up preamble) are skipped without counting.
    """

    def __init__(self, replies: bool = True) -> None:
        self.replies = replies
        self._overhead = 7 if replies else 5
        self._max_len = MAX_REPLY_DATA if replies else MAX_COMMAND_DATA
        self._buf = bytearray()
        # Buffer length already searched for a complete frame behind an
        # incomplete head candidate; bytes only get appended, so candidates
        # ending at or before this were already rejected.
        self._scanned = 0
        self.resyncs = 0
        self.crc_errors = 0

    def reset(self) -> None:
        """Forget buffered bytes (counters are kept)."""
        self._buf.clear()
        self._scanned = 0

    @property
    def buffered(self) -> int:
        """Number of bytes held waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def pending_frame(self) -> tuple[int, int] | None:
        """(bytes received, frame size) of an incomplete frame at the head, if any."""
        buf = self._buf
        if len(buf) >= 2 and buf[0] == HEADER and buf[1] <= self._max_len:
            total = buf[1] + self._overhead
            if len(buf) < total:
                return len(buf), total
        return None

    def _valid_at(self, i: int) -> int:
        """Size of a complete CRC-valid frame starting at ``i``, else 0."""
        buf = self._buf
        if i + 2 > len(buf) or buf[i] != HEADER or buf[i + 1] > self._max_len:
            return 0
        total = buf[i + 1] + self._overhead
        if i + total > len(buf):
            return 0
        end = i + total
        if crc(bytes(buf[i + 1 : end - 2])) != int.from_bytes(buf[end - 2 : end], "big"):
            return 0
        return total

    def _decode(self, raw: bytes) -> Frame:
        n = raw[1]
        if self.replies:
            return Frame(raw[2], int.from_bytes(raw[3:5], "big"), bytes(raw[5 : 5 + n]))
        return Frame(raw[2], None, bytes(raw[3 : 3 + n]))

    def _drop(self, count: int, counted: bool = True) -> None:
        del self._buf[:count]
        self._scanned = 0
        if counted:
            self.resyncs += 1

    def feed(self, chunk: bytes) -> list[Frame]:
        """Add received bytes; return every frame completed by them, in order."""
        buf = self._buf
        buf.extend(chunk)
        frames: list[Frame] = []
        while buf:
            start = buf.find(HEADER)
            if start < 0:
                self._drop(len(buf))
                break
            if start > 0:
                self._drop(start)
            if len(buf) < 2:
                break
            length = buf[1]
            if length > self._max_len:
                # 0xFF 0xFF is the wake-up preamble, anything else is noise.
                self._drop(1, counted=length != HEADER)
                continue
            total = length + self._overhead
            if len(buf) < total:
                # Either a frame still arriving or a false start in noise whose
                # bogus LEN would swallow real frames: if a complete valid frame
                # sits further on, the head was a false start.
                later = self._find_complete_later()
                if later is None:
                    break
                self._drop(later)
                continue
            if self._valid_at(0):
                frames.append(self._decode(bytes(buf[:total])))
                self._drop(total, counted=False)
            else:
                self.crc_errors += 1
                self._drop(1)  # resync on the next 0xFF
        return frames

    def _find_complete_later(self) -> int | None:
        buf = self._buf
        first_new_end = self._scanned
        self._scanned = len(buf)
        i = buf.find(HEADER, 1)
        while i >= 0:
            if i + 1 < len(buf) and buf[i + 1] <= self._max_len:
                end = i + buf[i + 1] + self._overhead
                if first_new_end < end <= len(buf) and self._valid_at(i):
                    return i
            i = buf.find(HEADER, i + 1)
        return None


# --------------------------------------------------------------------------- tag records


def encode_antenna(port: int) -> int:
    """Antenna byte of a monostatic port: ``(tx << 4) | rx``, port 16 wraps to 0."""
    if not 1 <= port <= 16:
        raise ValueError(f"antenna port must be 1..16, got {port}")
    nibble = port & 0x0F
    return (nibble << 4) | nibble


def decode_antenna(value: int) -> int:
    """Logical port (1..16) from a metadata antenna byte (the TX nibble; 0 means 16)."""
    tx = value >> 4
    return tx if tx else 16


# Fixed-size metadata fields in wire order: (flag, attribute, size, signed).
_FIXED_METADATA: tuple[tuple[int, str, int, bool], ...] = (
    (0x0001, "read_count", 1, False),
    (0x0002, "rssi", 1, True),
    (0x0004, "antenna_byte", 1, False),
    (0x0008, "frequency_khz", 3, False),
    (0x0010, "timestamp_ms", 4, False),
    (0x0020, "phase", 2, False),
    (0x0040, "protocol", 1, False),
)
_FLAG_DATA = 0x0080
_LATE_METADATA: tuple[tuple[int, str, int, bool], ...] = (
    (0x0100, "gpio", 1, False),
    (0x0200, "gen2_q", 1, False),
    (0x0400, "gen2_lf", 1, False),
    (0x0800, "gen2_target", 1, False),
)
SUPPORTED_METADATA = 0x0FFF


@dataclass(frozen=True)
class TagRecord:
    """One tag-buffer record: metadata (None when not requested) and EPC block."""

    epc: bytes
    pc: int
    tag_crc: int
    xpc: bytes = b""
    read_count: int | None = None
    rssi: int | None = None
    antenna_byte: int | None = None
    frequency_khz: int | None = None
    timestamp_ms: int | None = None
    phase: int | None = None
    protocol: int | None = None
    data: bytes | None = None
    gpio: int | None = None
    gen2_q: int | None = None
    gen2_lf: int | None = None
    gen2_target: int | None = None

    @property
    def epc_hex(self) -> str:
        return self.epc.hex().upper()

    @property
    def antenna(self) -> int | None:
        return None if self.antenna_byte is None else decode_antenna(self.antenna_byte)

    @property
    def crc_ok(self) -> bool:
        """True when the tag CRC matches PC + XPC + EPC."""
        block = self.pc.to_bytes(2, "big") + self.xpc + self.epc
        return gen2_crc(block) == self.tag_crc


def _check_flags(flags: int) -> None:
    if flags & ~SUPPORTED_METADATA:
        raise ValueError(
            f"unsupported metadata flags 0x{flags & ~SUPPORTED_METADATA:04X} "
            f"(supported: 0x{SUPPORTED_METADATA:04X})"
        )


def encode_tag_record(record: TagRecord, flags: int) -> bytes:
    """Encode one tag-buffer record with the metadata selected by ``flags``."""
    _check_flags(flags)
    out = bytearray()

    def put(fields: tuple[tuple[int, str, int, bool], ...]) -> None:
        for flag, name, size, signed in fields:
            if flags & flag:
                value = getattr(record, name)
                out.extend((value or 0).to_bytes(size, "big", signed=signed))

    put(_FIXED_METADATA)
    if flags & _FLAG_DATA:
        payload = record.data or b""
        out.extend((len(payload) * 8).to_bytes(2, "big") + payload)
    put(_LATE_METADATA)
    if len(record.epc) % 2:
        raise ValueError("EPC must be a whole number of 16-bit words")
    block = record.pc.to_bytes(2, "big") + record.xpc + record.epc
    block += record.tag_crc.to_bytes(2, "big")
    out.extend((len(block) * 8).to_bytes(2, "big") + block)
    return bytes(out)


def build_tag_buffer_reply_data(
    flags: int, records: Sequence[bytes], read_options: int = 0
) -> bytes:
    """Data of a 0x29 reply: flags u16, readOptions u8, record count u8, records."""
    if len(records) > 0xFF:
        raise ValueError(f"at most 255 records fit one reply, got {len(records)}")
    return flags.to_bytes(2, "big") + bytes([read_options, len(records)]) + b"".join(records)


class _Cursor:
    """Bounds-checked reader over a reply's data."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise FrameError(
                f"tag buffer reply too short: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self, n: int, what: str, signed: bool = False) -> int:
        return int.from_bytes(self.take(n, what), "big", signed=signed)


def _parse_record(cur: _Cursor, flags: int) -> TagRecord:
    fields: dict[str, Any] = {}
    for flag, name, size, signed in _FIXED_METADATA:
        if flags & flag:
            fields[name] = cur.int(size, name, signed)
    if flags & _FLAG_DATA:
        bits = cur.int(2, "data length")
        fields["data"] = cur.take((bits + 7) // 8, "data")
    for flag, name, size, signed in _LATE_METADATA:
        if flags & flag:
            fields[name] = cur.int(size, name, signed)
    block_len = (cur.int(2, "EPC length") + 7) // 8
    block = _Cursor(cur.take(block_len, "EPC block"))
    pc = block.int(2, "PC word")
    xpc = b""
    if pc & 0x0200:  # XI bit: an XPC_W1 follows, and XPC_W2 if its bit 15 is set
        xpc = block.take(2, "XPC_W1")
        if xpc[0] & 0x80:
            xpc += block.take(2, "XPC_W2")
    epc_len = (pc >> 11) * 2
    if block.pos + epc_len + 2 > block_len:
        raise FrameError(
            f"PC 0x{pc:04X} announces a {epc_len}-byte EPC but the EPC block is only "
            f"{block_len} bytes"
        )
    epc = block.take(epc_len, "EPC")
    # The tag CRC is the last word of the block, whatever padding precedes it.
    tag_crc = int.from_bytes(block.data[-2:], "big")
    return TagRecord(epc=epc, pc=pc, tag_crc=tag_crc, xpc=xpc, **fields)


def parse_tag_buffer(data: bytes, expect_flags: int | None = None) -> list[TagRecord]:
    """Decode the data of a Get Tag Buffer (0x29) reply into records.

    Raises FrameError when the layout is inconsistent (wrong length, flags
    other than ``expect_flags``, unsupported metadata).
    """
    cur = _Cursor(bytes(data))
    flags = cur.int(2, "metadata flags")
    if expect_flags is not None and flags != expect_flags:
        raise FrameError(
            f"tag buffer reply has metadata flags 0x{flags:04X}, asked for 0x{expect_flags:04X}"
        )
    try:
        _check_flags(flags)
    except ValueError as exc:
        raise FrameError(str(exc)) from None
    cur.take(1, "read options")
    count = cur.int(1, "record count")
    records = [_parse_record(cur, flags) for _ in range(count)]
    if cur.pos != len(cur.data):
        raise FrameError(
            f"tag buffer reply has {len(cur.data) - cur.pos} stray bytes after {count} records"
        )
    return records


# --------------------------------------------------------------------------- driver

# Sent before the first command so a module in a sleep power mode wakes up;
# the module ignores 0xFF runs that do not form a frame.
_WAKE_PREAMBLE = b"\xff" * 8


class MercuryReader(SerialReader):
    """Driver for a Mercury (M6e-family) module on a serial port.

    ``antenna_ports`` overrides the port count implied by the model (for
    clones or boards with fewer muxed ports wired). ``q`` sets a static Gen2
    Q at configure() (None leaves the module's dynamic Q). ``mux_gpio`` is the
    antenna-control GPIO setting sent when a port above 4 is used (3 = GPO1 +
    GPO2, 16 ports; boards wired to one GPO use 1 or 2).

    Gen2 target, as :meth:`inventory` uses it: ``"A"`` and ``"B"`` are single
    targets (a tag answers once, then its session flag flips and it stays quiet
    until the flag decays or the target flips; at S2/S3 a tag read on one
    antenna is not read again on the next antenna of the same pass). ``"AB"``
    is the module's toggle (0x9B 01 0000): within each antenna step it searches
    A, switches to B when no more A tags answer and back, so every tag is read
    on every antenna that sees it whatever state earlier inventories left it in.
    """

    def __init__(
        self,
        port: str,
        baudrate: int = 115200,
        timeout_s: float = 1.0,
        serial_factory: SerialFactory = serial.serial_for_url,
        *,
        antenna_ports: int | None = None,
        q: int | None = None,
        mux_gpio: int = MUX_BOTH_GPOS,
    ) -> None:
        super().__init__(port, baudrate, timeout_s, serial_factory)
        if antenna_ports is not None and not 1 <= antenna_ports <= 16:
            raise ValueError(f"antenna_ports must be 1..16, got {antenna_ports}")
        if q is not None and not 0 <= q <= 15:
            raise ValueError(f"Gen2 Q must be 0..15, got {q}")
        if mux_gpio not in (1, 2, 3):
            raise ValueError(f"mux_gpio must be 1, 2 or 3, got {mux_gpio}")
        self._antenna_override = antenna_ports
        self._q = q
        self._mux_gpio = mux_gpio
        self._parser = FrameParser(replies=True)
        self._target: int | None = None  # target code last set on the module
        self._session = 0
        self._mux_set = False
        # Every tag-buffer record of the last inventory (frequency, timestamps: diagnostics).
        self.last_records: list[TagRecord] = []

    # ------------------------------------------------------------ public API

    @property
    def crc_errors(self) -> int:
        """CRC failures seen on replies since construction."""
        return self._parser.crc_errors

    @property
    def resyncs(self) -> int:
        """Discarded-byte events on the reply stream since construction."""
        return self._parser.resyncs

    def _identify(self) -> ReaderInfo:
        """Wake the module, make sure the application firmware runs, identify it."""
        self._write(_WAKE_PREAMBLE, "wake-up")
        # Clones without 0x0C answer "invalid opcode": then assume the app runs.
        program = self._command(OP_GET_CURRENT_PROGRAM, check=False)
        if program.status == STATUS_OK and program.data[:1] and program.data[0] & 3 == 1:
            # Still in the bootloader: start the application firmware.
            self._command(OP_BOOT_FIRMWARE, allow_boot=True)
        return self._parse_version(self._command(OP_VERSION).data)

    def configure(
        self,
        antennas: Sequence[int],
        power_dbm: float,
        region: str,
        session: int,
    ) -> None:
        """Select Gen2, the region, read power, session, target AB and the antennas.

        Ports above 4 switch on the antenna mux (0x9A 01 03 ``mux_gpio``) first.
        """
        with self._lock:
            info = self._require_open()
            ports = check_ports(antennas, info)
            code = REGIONS.get(str(region).upper())
            if code is None:
                raise ValueError(f"unknown region {region!r}; known: {', '.join(REGIONS)}")
            if session not in (0, 1, 2, 3):
                raise ValueError(f"Gen2 session must be 0..3, got {session!r}")
            centi = self._centi_dbm(power_dbm)

            self._antennas = []
            self._command(OP_SET_PROTOCOL, GEN2_PROTOCOL.to_bytes(2, "big"))
            self._command(OP_SET_REGION, bytes([code]))
            self._command(OP_SET_READ_POWER, centi.to_bytes(2, "big", signed=True))
            self._ensure_mux(ports)
            self._command(OP_SET_PROTOCOL_PARAM, bytes([0x05, 0x00, session]))
            self._set_target("AB")
            if self._q is not None:
                self._command(OP_SET_PROTOCOL_PARAM, bytes([0x05, 0x12, 0x01, self._q]))
            self._session = session
            self._antennas = ports

    def set_q(self, q: int | None) -> None:
        """Gen2 Q: a static 0..15, or None for the module's dynamic Q (0x9B 05 12)."""
        if q is not None and not 0 <= q <= 15:
            raise ValueError(f"Gen2 Q must be 0..15, got {q}")
        with self._lock:
            self._require_open()
            value = b"\x00" if q is None else bytes([0x01, q])
            self._command(OP_SET_PROTOCOL_PARAM, bytes([0x05, 0x12]) + value)
            self._q = q

    def set_port_power(
        self, power_dbm: Mapping[int, float], settling_us: int | Mapping[int, int] = 0
    ) -> None:
        """Per-port read power and settling time after switching (0x91 04 form).

        The write power of each port is set to the same value (the cabinet never
        writes tags). Settling time is in microseconds, 0..65535.
        """
        with self._lock:
            info = self._require_open()
            ports = check_ports(list(power_dbm), info)
            body = bytearray([0x04])
            for port in ports:
                centi = self._centi_dbm(power_dbm[port])
                settle = settling_us if isinstance(settling_us, int) else settling_us.get(port, 0)
                if not 0 <= settle <= 0xFFFF:
                    raise ValueError(f"settling time of port {port} must be 0..65535 us")
                word = centi.to_bytes(2, "big", signed=True)
                body += bytes([port]) + word + word + settle.to_bytes(2, "big")
            if len(body) > MAX_COMMAND_DATA:
                raise ValueError(f"too many ports for one command ({len(ports)})")
            self._ensure_mux(ports)
            self._command(OP_SET_ANTENNA, bytes(body))

    def inventory(
        self,
        rounds: int,
        dwell_ms: int,
        *,
        antennas: Sequence[int] | None = None,
        target: str = "AB",
    ) -> InventoryResult:
        """Read each antenna in turn, ``dwell_ms`` each, ``rounds`` times.

        ``antennas`` (a subset of the configured ports, in the order given)
        narrows the pass; ``target`` is "A", "B" or "AB" (see the class
        docstring). Each antenna step runs Set Search List, Clear Buffer, Read
        Tag Multiple and Get Tag Buffer until every counted record is fetched.
        A corrupted or truncated reply (FrameError) redoes that antenna step
        once, keeping the records already fetched; with a single target in
        S1-S3 the redo searches the opposite target, because the tags read by
        the failed attempt have flipped their flags. A timeout or a dead link
        raises.
        """
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if not isinstance(dwell_ms, int) or not 1 <= dwell_ms <= 0xFFFF:
            raise ValueError(f"dwell_ms must be 1..65535, got {dwell_ms!r}")
        target = str(target).upper()
        if target not in ("A", "B", "AB"):
            raise ValueError(f"target must be 'A', 'B' or 'AB', got {target!r}")
        with self._lock:
            self._require_open()
            if not self._antennas:
                raise ReaderError("configure() the reader before running an inventory")
            ports = select_antennas(antennas, self._antennas)
            started = time.monotonic()
            result = InventoryResult()
            self.last_records = []
            for _ in range(rounds):
                for port in ports:
                    reads = self._antenna_step(port, dwell_ms, target)
                    if isinstance(reads, str):
                        result.antenna_errors[port] = reads
                        continue
                    self.last_records.extend(reads)
                    for rec in reads:
                        antenna = rec.antenna if rec.antenna is not None else port
                        report = result.tags.setdefault(rec.epc_hex, TagReport(rec.epc_hex))
                        count = rec.read_count if rec.read_count is not None else 1
                        rssi = rec.rssi if rec.rssi is not None else -128
                        report.add(antenna, count, rssi)
                        result.antenna_reads[antenna] = result.antenna_reads.get(antenna, 0) + count
                result.rounds += 1
            result.duration_s = time.monotonic() - started
            return result

    # ------------------------------------------------------------ internals

    def _parse_version(self, data: bytes) -> ReaderInfo:
        if len(data) < 16:
            raise FrameError(f"version reply has {len(data)} data bytes, expected at least 16")
        hw = data[4]
        model, ports = MODELS.get(hw, (f"unknown Mercury module (hardware 0x{hw:02X})", 16))
        firmware = ".".join(f"{b:02X}" for b in data[12:16])
        if self._antenna_override is not None:
            ports = self._antenna_override
        return ReaderInfo(protocol="mercury", model=model, firmware=firmware, antenna_ports=ports)

    def _forget_settings(self) -> None:
        """The module's settings are unknown (new link, reboot)."""
        self._antennas = []
        self._target = None
        self._mux_set = False

    @staticmethod
    def _centi_dbm(power_dbm: float) -> int:
        centi = round(float(power_dbm) * 100)
        if not -32768 <= centi <= 32767:
            raise ValueError(f"power {power_dbm} dBm is outside what the protocol can encode")
        return centi

    def _ensure_mux(self, ports: Sequence[int]) -> None:
        if max(ports) > 4 and not self._mux_set:
            self._command(
                OP_SET_READER_CONFIG, bytes([0x01, CONFIG_ANTENNA_CONTROL_GPIO, self._mux_gpio])
            )
            self._mux_set = True

    def _set_target(self, target: str) -> None:
        code = TARGET_CODES[target]
        if self._target != code:
            self._command(OP_SET_PROTOCOL_PARAM, bytes([0x05, 0x01]) + code.to_bytes(2, "big"))
            self._target = code

    def _antenna_step(self, port: int, dwell_ms: int, target: str) -> list[TagRecord] | str:
        """One antenna's records (retried once on a FrameError), or why it failed."""
        fetched: list[TagRecord] = []
        try:
            return self._read_antenna(port, dwell_ms, target, fetched)
        except FrameError:
            # S0 flags reset when the RF comes back on; S1-S3 flags of the tags the
            # failed attempt read have flipped, so only the opposite target finds them.
            retry = {"A": "B", "B": "A"}.get(target, target) if self._session else target
            again = self._read_antenna(port, dwell_ms, retry, [])
        if isinstance(again, str):
            return again
        # Records fetched before the failure are good; a tag in both keeps its best values.
        merged: dict[tuple[bytes, int | None], TagRecord] = {}
        for rec in fetched + again:
            key = (rec.epc, rec.antenna_byte)
            old = merged.get(key)
            if old is None:
                merged[key] = rec
            else:
                merged[key] = replace(
                    old,
                    read_count=max(old.read_count or 0, rec.read_count or 0),
                    rssi=max(old.rssi if old.rssi is not None else -128, rec.rssi or -128),
                )
        return list(merged.values())

    def _read_antenna(
        self, port: int, dwell_ms: int, target: str, records: list[TagRecord]
    ) -> list[TagRecord] | str:
        """All buffer records for one antenna (appended to ``records`` as they come),
        or a string saying why the antenna failed."""
        self._command(OP_SET_ANTENNA, bytes([0x02, port, port]))
        self._set_target(target)
        self._command(OP_CLEAR_TAG_BUFFER)
        request = bytes([0x00]) + SEARCH_FLAGS.to_bytes(2, "big") + dwell_ms.to_bytes(2, "big")
        reply = self._command(
            OP_READ_TAG_MULTIPLE, request, extra_wait_s=dwell_ms / 1000, check=False
        )
        if reply.status == STATUS_NO_TAGS:
            return records
        if reply.status in ANTENNA_STATUSES:
            return f"antenna {port} {ANTENNA_STATUSES[reply.status]}"
        self._check_status(reply)
        expected = self._tag_count(reply.data)
        fetched = 0
        while fetched < expected:
            chunk = parse_tag_buffer(
                self._command(
                    OP_GET_TAG_BUFFER, INVENTORY_METADATA.to_bytes(2, "big") + b"\x00"
                ).data,
                expect_flags=INVENTORY_METADATA,
            )
            if not chunk:
                raise ReaderError(
                    f"reader reported {expected} tags on antenna {port} but the tag buffer "
                    f"ran dry after {fetched}"
                )
            records.extend(chunk)
            fetched += len(chunk)
        return records

    @staticmethod
    def _tag_count(data: bytes) -> int:
        # option u8, searchFlags u16, then a u32 count (large-population flag) or a u8.
        if len(data) == 7:
            return int.from_bytes(data[3:7], "big")
        if len(data) == 4:
            return data[3]
        raise FrameError(f"read tag multiple reply has {len(data)} data bytes, expected 7")

    @staticmethod
    def _check_status(frame: Frame) -> None:
        status = frame.status or 0
        if status != STATUS_OK:
            raise ReaderStatusError(
                f"reader answered opcode 0x{frame.opcode:02X} with status 0x{status:04X} "
                f"({status_text(status)})",
                status,
            )

    def _write(self, payload: bytes, what: str) -> None:
        if self._serial is None:
            raise ReaderError(f"reader on {self.port!r} is not open")
        try:
            self._serial.write(payload)
            self._serial.flush()
        except LINK_ERRORS as exc:
            raise self._fail_link(what, exc) from exc

    def _command(
        self,
        opcode: int,
        data: bytes = b"",
        *,
        extra_wait_s: float = 0.0,
        check: bool = True,
        allow_boot: bool = False,
    ) -> Frame:
        """Send one command and wait for its reply (same opcode)."""
        what = f"opcode 0x{opcode:02X}"
        ser = self._serial
        if ser is None:
            raise ReaderError(f"reader on {self.port!r} is not open")
        # Stale bytes (a late reply to a command that already timed out) must
        # not be taken for this command's reply.
        self._parser.reset()
        try:
            ser.reset_input_buffer()
        except LINK_ERRORS as exc:
            raise self._fail_link(what, exc) from exc
        self._write(build_command(opcode, data), what)

        crc_before = self._parser.crc_errors
        budget = self.timeout_s + extra_wait_s
        deadline = time.monotonic() + budget
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                chunk = ser.read(ser.in_waiting or 1)
            except LINK_ERRORS as exc:
                raise self._fail_link(what, exc) from exc
            if not chunk:
                continue
            for frame in self._parser.feed(chunk):
                if frame.opcode == opcode:
                    if check:
                        self._check_status(frame)
                    return frame
                if frame.opcode == OP_BOOT_FIRMWARE and not allow_boot:
                    self._forget_settings()
                    raise ReaderError(
                        f"reader rebooted (boot reply 0x04 while waiting for the reply to "
                        f"{what}); configure() it again"
                    )
                # Any other opcode is a stale or unsolicited frame: ignore it.

        crc_seen = self._parser.crc_errors - crc_before
        if crc_seen:
            raise FrameError(
                f"reply to {what} failed its CRC check ({crc_seen} CRC errors) and no valid "
                f"reply followed within {budget:.2f}s"
            )
        pending = self._parser.pending_frame
        if pending is not None:
            have, need = pending
            raise FrameError(
                f"incomplete reply to {what}: got {have} of {need} bytes within {budget:.2f}s "
                f"(truncated frame)"
            )
        raise ReaderTimeout(f"no reply to {what} within {budget:.2f}s")
