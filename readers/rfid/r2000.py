"""Impinj-R2000 "0xA0" reader-module protocol (Invelion/YR/Rodinbell...): codec and driver.

Wire format (research notes section 1.2)::

    A0 | Len | Address | Cmd | Data... | Check

``Len`` counts the bytes after it (Address, Cmd, Data, Check = len(Data) + 3);
``Check`` is the two's complement of the 8-bit sum of every byte before it.
Replies use the same frame; set commands answer one ErrorCode byte (0x10 =
success). The inventory commands (0x89 real-time, 0x8A fast antenna switch,
0x8B session/target) answer a *stream*: one frame per tag read, then an
end-of-run frame (7 data bytes) or an error frame (1 byte); 0x8A also sends a
2-byte frame (AntID, ErrorCode) for each antenna it could not use.

Tag frame data: ``FreqAnt | PC(2) | EPC | RSSI [| Phase(2)]``. ``FreqAnt`` bits
7..2 are the frequency index, bits 1..0 the antenna within its quad; RSSI bit
7 is the antenna high bit on 8-port firmware (ports 5-8); 16-port readers
switch between ports 1-8 and 9-16 with the antenna-group command (0x6C)::

    port = (FreqAnt & 3) + 4 * (RSSI >> 7) + 8 * group + 1

Command codes differ between firmware families, so the driver takes them from
:data:`COMMAND_SETS` (``firmware=`` keyword).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    "BROADCAST",
    "COMMAND_SETS",
    "ERROR_CODES",
    "MAX_DATA",
    "R2000_REGIONS",
    "CommandSet",
    "R2000Frame",
    "R2000Parser",
    "R2000Reader",
    "R2000TagRead",
    "build_frame",
    "checksum",
    "decode_antenna",
    "dbm_to_rssi",
    "encode_antenna",
    "error_text",
    "freq_index_to_khz",
    "khz_to_freq_index",
    "parse_tag_frame",
    "rssi_to_dbm",
]

HEADER = 0xA0
BROADCAST = 0xFF  # "public" address: any reader answers
MIN_LEN = 3  # Address, Cmd, Check
MAX_DATA = 0xFF - MIN_LEN

SUCCESS = 0x10
FAIL = 0x11
ANTENNA_MISSING = 0x22
NO_TAG = 0x36
PARAMETER_INVALID = 0x41
ANTENNA_ID_OUT_OF_RANGE = 0x47
POWER_OUT_OF_RANGE = 0x48
REGION_OUT_OF_RANGE = 0x49

ERROR_CODES: dict[int, str] = {
    0x10: "success",
    0x11: "command failed",
    0x20: "MCU reset error",
    0x21: "CW on error",
    0x22: "antenna missing",
    0x23: "flash write error",
    0x24: "flash read error",
    0x25: "set output power error",
    0x31: "inventory error",
    0x32: "read error",
    0x33: "write error",
    0x34: "lock error",
    0x35: "kill error",
    0x36: "no tag",
    0x37: "inventory OK but access failed",
    0x38: "buffer empty",
    0x41: "invalid parameter",
    0x47: "antenna ID out of range",
    0x48: "output power out of range",
    0x49: "frequency region out of range",
    0x4A: "baud rate out of range",
    0x50: "RN16 error",
    0x51: "DRM error",
    0x52: "PLL lock failed",
    0x53: "RF chip does not respond",
    0x54: "cannot reach output power",
    0x55: "copyright authentication failed",
    0x56: "spectrum regulation error",
    0x57: "output power too low",
    0xEE: "return loss measurement failed",
}

# Config region name -> (region code, first frequency index, last frequency index) for 0x78.
R2000_REGIONS: dict[str, tuple[int, int, int]] = {
    "FCC": (1, 7, 59),
    "NA": (1, 7, 59),
    "NA2": (1, 7, 59),
    "NA3": (1, 7, 59),
    "ETSI": (2, 0, 6),
    "EU": (2, 0, 6),
    "EU3": (2, 0, 6),
    "CHN": (3, 43, 53),
    "PRC": (3, 43, 53),
}


def error_text(code: int) -> str:
    """Human meaning of an R2000 error code."""
    return ERROR_CODES.get(code, "unknown error")


@dataclass(frozen=True)
class CommandSet:
    """The command codes of one firmware family."""

    reset: int = 0x70
    get_version: int = 0x72
    set_work_antenna: int = 0x74
    get_work_antenna: int = 0x75
    set_output_power: int = 0x76  # saved to flash
    get_output_power: int = 0x77
    set_temporary_power: int = 0x66  # not saved
    set_region: int = 0x78
    get_region: int = 0x79
    set_antenna_group: int = 0x6C
    get_antenna_group: int = 0x6D
    real_time_inventory: int = 0x89
    fast_switch_inventory: int = 0x8A
    session_inventory: int = 0x8B


# Firmware family -> command codes. "alt87": SDKs that list fast switch as 0x87
# and the customised session/target inventory as 0x8A (research notes 1.2.5).
COMMAND_SETS: dict[str, CommandSet] = {
    "standard": CommandSet(),
    "alt87": CommandSet(fast_switch_inventory=0x87, session_inventory=0x8A),
}


# --------------------------------------------------------------------------- framing


def checksum(data: bytes) -> int:
    """Two's complement of the 8-bit sum of ``data`` (every byte before Check)."""
    return (-sum(data)) & 0xFF


def build_frame(address: int, cmd: int, data: bytes = b"") -> bytes:
    """Encode one frame (host command or reader reply: same layout)."""
    for name, value in (("address", address), ("cmd", cmd)):
        if not 0 <= value <= 0xFF:
            raise ValueError(f"{name} must be 0..255, got {value}")
    data = bytes(data)
    if len(data) > MAX_DATA:
        raise ValueError(f"frame data is {len(data)} bytes; the maximum is {MAX_DATA}")
    body = bytes([HEADER, len(data) + MIN_LEN, address, cmd]) + data
    return body + bytes([checksum(body)])


@dataclass(frozen=True)
class R2000Frame:
    """One decoded frame."""

    address: int
    cmd: int
    data: bytes

    def to_bytes(self) -> bytes:
        return build_frame(self.address, self.cmd, self.data)


class R2000Parser:
    """Incremental frame decoder that survives partial reads and line noise.

    Bytes that do not form a frame are dropped: ``resyncs`` counts each
    discard (junk before a header, an impossible length, a checksum failure,
    an abandoned false start), ``checksum_errors`` counts complete candidate
    frames whose checksum did not match. An incomplete candidate at the head
    is given up as a false start as soon as a complete valid frame is found
    after it. The check is only 8 bits, so noise forms a valid-looking frame
    now and then (1 in 256 candidates); the host must treat content with care.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self.resyncs = 0
        self.checksum_errors = 0

    def reset(self) -> None:
        """Forget buffered bytes (counters are kept)."""
        self._buf.clear()
        self._scanned = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def pending_frame(self) -> tuple[int, int] | None:
        """(bytes received, frame size) of an incomplete frame at the head, if any."""
        buf = self._buf
        if len(buf) >= 2 and buf[0] == HEADER and buf[1] >= MIN_LEN:
            total = buf[1] + 2
            if len(buf) < total:
                return len(buf), total
        return None

    def _valid_at(self, i: int) -> int:
        buf = self._buf
        if i + 2 > len(buf) or buf[i] != HEADER or buf[i + 1] < MIN_LEN:
            return 0
        total = buf[i + 1] + 2
        if i + total > len(buf):
            return 0
        if checksum(bytes(buf[i : i + total - 1])) != buf[i + total - 1]:
            return 0
        return total

    def _drop(self, count: int, counted: bool = True) -> None:
        del self._buf[:count]
        self._scanned = 0
        if counted:
            self.resyncs += 1

    def feed(self, chunk: bytes) -> list[R2000Frame]:
        """Add received bytes; return every frame completed by them, in order."""
        buf = self._buf
        buf.extend(chunk)
        frames: list[R2000Frame] = []
        while buf:
            start = buf.find(HEADER)
            if start < 0:
                self._drop(len(buf))
                break
            if start > 0:
                self._drop(start)
            if len(buf) < 2:
                break
            if buf[1] < MIN_LEN:
                self._drop(1)
                continue
            total = buf[1] + 2
            if len(buf) < total:
                later = self._find_complete_later()
                if later is None:
                    break
                self._drop(later)
                continue
            if self._valid_at(0):
                frames.append(R2000Frame(buf[2], buf[3], bytes(buf[4 : total - 1])))
                self._drop(total, counted=False)
            else:
                self.checksum_errors += 1
                self._drop(1)
        return frames

    def _find_complete_later(self) -> int | None:
        buf = self._buf
        first_new_end = self._scanned
        self._scanned = len(buf)
        i = buf.find(HEADER, 1)
        while i >= 0:
            if i + 1 < len(buf) and buf[i + 1] >= MIN_LEN:
                end = i + buf[i + 1] + 2
                if first_new_end < end <= len(buf) and self._valid_at(i):
                    return i
            i = buf.find(HEADER, i + 1)
        return None


# --------------------------------------------------------------------------- fields


def rssi_to_dbm(raw: int) -> int:
    """dBm from the 7 RSSI bits (datasheet table: above 89 it is raw - 129, else raw - 130)."""
    raw &= 0x7F
    return raw - 129 if raw > 89 else raw - 130


def dbm_to_rssi(dbm: int) -> int:
    """7-bit raw RSSI that decodes to ``dbm`` (-40 dBm has no code; it becomes -39)."""
    dbm = max(-130, min(-2, int(dbm)))
    raw = dbm + 130 if dbm <= -41 else max(90, dbm + 129)
    return max(0, min(0x7F, raw))


def freq_index_to_khz(index: int) -> int:
    """Channel of a frequency index: 0..6 -> 865.0 MHz + 0.5 n, 7..59 -> 902.0 + 0.5 (n - 7)."""
    if not 0 <= index <= 63:
        raise ValueError(f"frequency index must be 0..63, got {index}")
    if index <= 6:
        return 865000 + 500 * index
    return 902000 + 500 * (index - 7)


def khz_to_freq_index(khz: int) -> int:
    """Frequency index of a channel (inverse of :func:`freq_index_to_khz`)."""
    if 865000 <= khz <= 868000 and (khz - 865000) % 500 == 0:
        return (khz - 865000) // 500
    if 902000 <= khz <= 930000 and (khz - 902000) % 500 == 0:
        return 7 + (khz - 902000) // 500
    raise ValueError(f"{khz} kHz is not an R2000 channel")


def encode_antenna(port: int) -> tuple[int, int, int]:
    """(low antenna bits for FreqAnt, RSSI high bit, antenna group) of a port 1..16."""
    if not 1 <= port <= 16:
        raise ValueError(f"antenna port must be 1..16, got {port}")
    n = port - 1
    return n & 3, (n >> 2) & 1, n >> 3


def decode_antenna(freq_ant: int, rssi_byte: int, group: int = 0) -> int:
    """Port 1..16 from a tag frame's FreqAnt and RSSI bytes and the active antenna group."""
    return (freq_ant & 3) + 4 * (rssi_byte >> 7) + 8 * group + 1


@dataclass(frozen=True)
class R2000TagRead:
    """One tag frame, decoded."""

    epc: bytes
    pc: int
    antenna: int  # 1..16
    frequency_index: int
    rssi: int  # dBm
    phase: int | None = None

    @property
    def epc_hex(self) -> str:
        return self.epc.hex().upper()


def parse_tag_frame(data: bytes, group: int = 0) -> R2000TagRead:
    """Decode the data of a real-time tag frame (FreqAnt, PC, EPC, RSSI [, phase])."""
    if len(data) < 4:
        raise FrameError(f"tag frame has {len(data)} data bytes; it needs at least 4")
    freq_ant, pc = data[0], int.from_bytes(data[1:3], "big")
    epc_len = (pc >> 11) * 2
    phase = None
    if len(data) == 4 + epc_len:
        epc, rssi_byte = data[3:-1], data[-1]
    elif len(data) == 6 + epc_len:
        epc, rssi_byte = data[3 : 3 + epc_len], data[3 + epc_len]
        phase = int.from_bytes(data[-2:], "big")
    else:
        # Some firmware ignores the PC length bits; the frame length is checksummed.
        epc, rssi_byte = data[3:-1], data[-1]
    return R2000TagRead(
        epc=bytes(epc),
        pc=pc,
        antenna=decode_antenna(freq_ant, rssi_byte, group),
        frequency_index=freq_ant >> 2,
        rssi=rssi_to_dbm(rssi_byte),
        phase=phase,
    )


# --------------------------------------------------------------------------- driver

MODES = ("session", "fast_switch", "realtime")
END_LEN = 7  # data bytes of an end-of-run frame


class R2000Reader(SerialReader):
    """Driver for an R2000 "0xA0" reader on a serial port.

    Keywords:

    * ``address``: reader address to send (0xFF = any reader answers).
    * ``antenna_ports``: 4, 8 or 16 if known; None decides from configure()
      (a port above 8 switches to 16-port mode with the antenna group command).
      The protocol cannot ask the reader how many ports it has.
    * ``firmware``: a key of :data:`COMMAND_SETS`.
    * ``mode``: ``"session"`` (default; per antenna: work antenna 0x74, then
      session/target inventory 0x8B), ``"fast_switch"`` (one 0x8A over the
      antennas of each group of 8; the extended form carries session and target,
      except on a 4-port reader, whose short form uses the firmware's own) or
      ``"realtime"`` (per antenna: 0x74 then 0x89, session and target are the
      firmware's own).
    * ``round_ms``: the R2000 has no timed inventory; ``dwell_ms`` becomes the
      Repeat count ``ceil(dwell_ms / round_ms)`` (1..254).
    * ``save_power``: set power with 0x76 (saved to flash) instead of 0x66.
    * ``stream_limit_s``: hard cap on one inventory command's stream.

    Target "A"/"B" is a single target; "AB" runs the antenna step twice, target A
    then B, so every tag that sees the antenna is read whatever its flag.
    """

    def __init__(
        self,
        port: str,
        baudrate: int = 115200,
        timeout_s: float = 1.0,
        serial_factory: SerialFactory = serial.serial_for_url,
        *,
        address: int = BROADCAST,
        antenna_ports: int | None = None,
        firmware: str = "standard",
        mode: str = "session",
        round_ms: int = 100,
        save_power: bool = False,
        stream_limit_s: float = 60.0,
    ) -> None:
        super().__init__(port, baudrate, timeout_s, serial_factory)
        if not 0 <= address <= 0xFF:
            raise ValueError(f"address must be 0..255, got {address}")
        if antenna_ports not in (None, 4, 8, 16):
            raise ValueError(f"antenna_ports must be 4, 8, 16 or None, got {antenna_ports}")
        if firmware not in COMMAND_SETS:
            raise ValueError(
                f"unknown firmware {firmware!r}; known: {', '.join(sorted(COMMAND_SETS))}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if round_ms < 1:
            raise ValueError(f"round_ms must be >= 1, got {round_ms}")
        if stream_limit_s <= 0:
            raise ValueError(f"stream_limit_s must be positive, got {stream_limit_s}")
        self.address = address
        self.cmds = COMMAND_SETS[firmware]
        self.mode = mode
        self.round_ms = round_ms
        self.save_power = save_power
        self.stream_limit_s = stream_limit_s
        self._antenna_ports = antenna_ports
        self._parser = R2000Parser()
        self._session = 0
        self._groups = False  # 16-port mode: ports 9-16 through the antenna group command
        self._group: int | None = None

    # ------------------------------------------------------------ public API

    @property
    def checksum_errors(self) -> int:
        """Checksum failures seen on replies since construction."""
        return self._parser.checksum_errors

    crc_errors = checksum_errors  # the same counter under the Mercury driver's name

    @property
    def resyncs(self) -> int:
        """Discarded-byte events on the reply stream since construction."""
        return self._parser.resyncs

    def _identify(self) -> ReaderInfo:
        """Ask the firmware version (0x72); the protocol has no model or port count."""
        version = self._command(self.cmds.get_version, status=False)
        if len(version.data) != 2:
            raise FrameError(f"version reply has {len(version.data)} data bytes, expected 2")
        return ReaderInfo(
            protocol="r2000",
            model="R2000 module",
            firmware=f"{version.data[0]}.{version.data[1]}",
            antenna_ports=self._antenna_ports or 16,
        )

    def configure(
        self,
        antennas: Sequence[int],
        power_dbm: float,
        region: str,
        session: int,
    ) -> None:
        """Set region (0x78) and power (0x66, or 0x76 with ``save_power``); remember
        the session and antennas. In 16-port mode the antenna group is set to 0."""
        with self._lock:
            info = self._require_open()
            ports = check_ports(antennas, info)
            key = str(region).upper()
            if key not in R2000_REGIONS:
                raise ValueError(f"unknown region {region!r}; known: {', '.join(R2000_REGIONS)}")
            if session not in (0, 1, 2, 3):
                raise ValueError(f"Gen2 session must be 0..3, got {session!r}")
            power = self._power_byte(power_dbm)
            self._antennas = []
            self._command(self.cmds.set_region, bytes(R2000_REGIONS[key]))
            cmd = self.cmds.set_output_power if self.save_power else self.cmds.set_temporary_power
            self._command(cmd, bytes([power]))
            self._groups = self._antenna_ports == 16 or max(ports) > 8
            if self._groups:
                self._set_group(0, force=True)
            self._session = session
            self._antennas = ports

    def set_port_power(self, power_dbm: Mapping[int, float]) -> None:
        """Per-port output power (0x76 with one byte per port; saved to flash).

        Ports 1-4 on a 4-port reader, 1-8 otherwise; ports left out get the
        power of the lowest port given.
        """
        with self._lock:
            self._require_open()
            count = 4 if self._antenna_ports == 4 else 8
            ports = list(power_dbm)
            if not ports or any(not isinstance(p, int) or not 1 <= p <= count for p in ports):
                raise ValueError(f"per-port power covers ports 1..{count}, got {ports}")
            default = self._power_byte(power_dbm[min(ports)])
            values = [
                self._power_byte(power_dbm[p]) if p in power_dbm else default
                for p in range(1, count + 1)
            ]
            self._command(self.cmds.set_output_power, bytes(values))

    def inventory(
        self,
        rounds: int,
        dwell_ms: int,
        *,
        antennas: Sequence[int] | None = None,
        target: str = "AB",
    ) -> InventoryResult:
        """``rounds`` passes over the antennas (see the class docstring for modes).

        An antenna the reader reports missing (0x22) is listed in
        ``antenna_errors``. A reply stream with a checksum error, a truncated
        frame or junk (FrameError) redoes that step once, keeping the reads
        already decoded; with a single target the redo searches the opposite
        target (the tags read by the failed attempt have flipped their flags).
        Silence (no end-of-run frame within ``timeout_s`` of the last byte) or
        a dead link raises.
        """
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if not isinstance(dwell_ms, int) or not 1 <= dwell_ms <= 0xFFFF:
            raise ValueError(f"dwell_ms must be 1..65535, got {dwell_ms!r}")
        target = str(target).upper()
        if target not in ("A", "B", "AB"):
            raise ValueError(f"target must be 'A', 'B' or 'AB', got {target!r}")
        repeat = max(1, min(254, math.ceil(dwell_ms / self.round_ms)))
        with self._lock:
            self._require_open()
            if not self._antennas:
                raise ReaderError("configure() the reader before running an inventory")
            ports = select_antennas(antennas, self._antennas)
            started = time.monotonic()
            result = InventoryResult()
            for _ in range(rounds):
                if self.mode == "fast_switch":
                    steps = [
                        [p for p in ports if (p - 1) // 8 == g]
                        for g in sorted({(p - 1) // 8 for p in ports})
                    ]
                else:
                    steps = [[p] for p in ports]
                for step in steps:
                    reads, errors = self._step(step, target, repeat)
                    result.antenna_errors.update(errors)
                    for read in reads:
                        report = result.tags.setdefault(read.epc_hex, TagReport(read.epc_hex))
                        report.add(read.antenna, 1, read.rssi)
                        result.antenna_reads[read.antenna] = (
                            result.antenna_reads.get(read.antenna, 0) + 1
                        )
                result.rounds += 1
            result.duration_s = time.monotonic() - started
            return result

    # ------------------------------------------------------------ inventory steps

    def _step(
        self, ports: list[int], target: str, repeat: int
    ) -> tuple[list[R2000TagRead], dict[int, str]]:
        """One antenna (or one fast-switch group): reads and antenna errors, retried once."""
        reads: list[R2000TagRead] = []
        try:
            errors = self._run_step(ports, target, repeat, reads)
            return reads, errors
        except FrameError:
            kept = list(reads)
            # S0 flags reset when the RF comes back on; S1-S3 flags of the tags the
            # failed attempt read have flipped, so only the opposite target finds them.
            retry = {"A": "B", "B": "A"}.get(target, target) if self._session else target
            again: list[R2000TagRead] = []
            errors = self._run_step(ports, retry, repeat, again)
        # A tag both attempts read counts once per attempt's frames; the redo only
        # finds what the failed attempt flipped, so nothing is read twice in one state.
        seen = {(r.epc, r.antenna) for r in again}
        return again + [r for r in kept if (r.epc, r.antenna) not in seen], errors

    def _run_step(
        self, ports: list[int], target: str, repeat: int, reads: list[R2000TagRead]
    ) -> dict[int, str]:
        targets = ["A", "B"] if target == "AB" else [target]
        errors: dict[int, str] = {}
        if self.mode == "fast_switch":
            group = (ports[0] - 1) // 8
            if self._groups:
                self._set_group(group)
            for t in targets:
                errors.update(self._fast_switch(ports, t, repeat, group, reads))
            return errors
        (port,) = ports
        group, ant_id = divmod(port - 1, 8)
        if self._groups:
            self._set_group(group)
        self._command(self.cmds.set_work_antenna, bytes([ant_id]))
        for t in targets:
            if self.mode == "realtime":
                cmd, data = self.cmds.real_time_inventory, bytes([repeat])
            else:
                cmd = self.cmds.session_inventory
                data = bytes([self._session, 0 if t == "A" else 1, repeat])
            outcome = self._stream(cmd, data, reads, group)
            if outcome == ANTENNA_MISSING:
                return {port: f"antenna {port} not connected"}
            if self.mode == "realtime":
                break  # the firmware's own target: one run is the whole step
        return errors

    def _fast_switch(
        self, ports: list[int], target: str, repeat: int, group: int, reads: list[R2000TagRead]
    ) -> dict[int, str]:
        slots = [((p - 1) % 8, min(repeat, 0xFF)) for p in ports]
        if self._antenna_ports == 4:
            # Short 4-port layout: A Astay .. D Dstay Interval Repeat (firmware's target).
            slots += [(0xFF, 0)] * (4 - len(slots))
            data = bytes(b for s in slots for b in s) + bytes([0, 1])
        else:
            # Extended layout: A..H/stay Interval Reserve x5 Session Target Optimize
            # Ongoing TargetQuantity Phase Repeat.
            slots += [(0xFF, 0)] * (8 - len(slots))
            data = (
                bytes(b for s in slots for b in s)
                + bytes([0])
                + bytes(5)
                + bytes([self._session, 0 if target == "A" else 1, 0, 0, 0, 0, 1])
            )
        missing: list[int] = []
        self._stream(self.cmds.fast_switch_inventory, data, reads, group, missing)
        return {group * 8 + a + 1: f"antenna {group * 8 + a + 1} not connected" for a in missing}

    def _stream(
        self,
        cmd: int,
        data: bytes,
        reads: list[R2000TagRead],
        group: int,
        missing: list[int] | None = None,
    ) -> int | None:
        """Run one inventory command; append its tag reads to ``reads``.

        Returns None after an end-of-run frame, or the error code of an error
        frame that means "nothing to do here" (antenna missing, no tag). Any
        other error code raises ReaderStatusError; per-antenna errors of a fast
        switch are put in ``missing`` (antenna IDs within the group).
        """
        what = f"command 0x{cmd:02X}"
        ser = self._begin(cmd, data, what)
        crc_before, resync_before = self._parser.checksum_errors, self._parser.resyncs
        started = time.monotonic()
        last = started
        frames = 0
        outcome: int | None = None
        finished = False
        while not finished:
            now = time.monotonic()
            if now - last > self.timeout_s or now - started > self.stream_limit_s:
                break
            chunk = self._read(ser, what)
            if not chunk:
                continue
            last = time.monotonic()
            for frame in self._parser.feed(chunk):
                if frame.cmd != cmd or not self._ours(frame):
                    continue  # a stale or foreign frame
                frames += 1
                n = len(frame.data)
                if n == END_LEN:
                    finished = True
                    break
                if n == 1:
                    code = frame.data[0]
                    if code in (ANTENNA_MISSING, NO_TAG):
                        outcome, finished = code, True
                        break
                    raise ReaderStatusError(
                        f"reader answered {what} with error 0x{code:02X} ({error_text(code)})",
                        code,
                    )
                if n == 2:
                    if frame.data[1] != ANTENNA_MISSING:
                        code = frame.data[1]
                        raise ReaderStatusError(
                            f"reader answered {what} on antenna ID {frame.data[0]} with error "
                            f"0x{code:02X} ({error_text(code)})",
                            code,
                        )
                    if missing is not None:
                        missing.append(frame.data[0])
                    continue
                reads.append(parse_tag_frame(frame.data, group))
        crc_errors = self._parser.checksum_errors - crc_before
        resyncs = self._parser.resyncs - resync_before
        bad = crc_errors + resyncs
        damage = f"{crc_errors} checksum errors, {resyncs} resyncs"
        if finished:
            if bad:
                raise FrameError(
                    f"reply stream to {what} was damaged ({damage}); some reads may be lost"
                )
            return outcome
        waited = time.monotonic() - started
        if time.monotonic() - started > self.stream_limit_s:
            raise ReaderTimeout(
                f"{what} was still streaming after {self.stream_limit_s:.0f}s (stream limit)"
            )
        pending = self._parser.pending_frame
        if pending is not None:
            have, need = pending
            raise FrameError(
                f"incomplete reply to {what}: got {have} of {need} bytes of a frame and then "
                f"nothing for {self.timeout_s:.2f}s (truncated frame)"
            )
        if bad:
            raise FrameError(
                f"reply stream to {what} was damaged ({damage}) and no valid end-of-run "
                f"frame followed within {self.timeout_s:.2f}s"
            )
        if frames:
            raise ReaderTimeout(
                f"reply stream to {what} stopped after {frames} frames without an end-of-run "
                f"frame ({waited:.2f}s; the reader may have rebooted)"
            )
        raise ReaderTimeout(f"no reply to {what} within {self.timeout_s:.2f}s")

    # ------------------------------------------------------------ internals

    def _forget_settings(self) -> None:
        self._antennas = []
        self._group = None
        self._groups = False

    @staticmethod
    def _power_byte(power_dbm: float) -> int:
        value = round(float(power_dbm))
        if not 0 <= value <= 0xFF:
            raise ValueError(f"power {power_dbm} dBm is outside what the protocol can encode")
        return value

    def _set_group(self, group: int, force: bool = False) -> None:
        if force or self._group != group:
            self._command(self.cmds.set_antenna_group, bytes([group]))
            self._group = group

    def _ours(self, frame: R2000Frame) -> bool:
        return self.address == BROADCAST or frame.address in (self.address, BROADCAST)

    def _begin(self, cmd: int, data: bytes, what: str) -> Any:
        """Flush stale input and send one command; returns the serial port."""
        ser = self._serial
        if ser is None:
            raise ReaderError(f"reader on {self.port!r} is not open")
        # A late reply to a command that already timed out must not be taken for this one's.
        self._parser.reset()
        try:
            ser.reset_input_buffer()
            ser.write(build_frame(self.address, cmd, data))
            ser.flush()
        except LINK_ERRORS as exc:
            raise self._fail_link(what, exc) from exc
        return ser

    def _read(self, ser: Any, what: str) -> bytes:
        try:
            return ser.read(ser.in_waiting or 1)
        except LINK_ERRORS as exc:
            raise self._fail_link(what, exc) from exc

    def _command(self, cmd: int, data: bytes = b"", *, status: bool = True) -> R2000Frame:
        """Send a command with a single reply frame and return it.

        With ``status`` the reply must be one ErrorCode byte equal to 0x10.
        """
        what = f"command 0x{cmd:02X}"
        ser = self._begin(cmd, data, what)
        bad_before = self._parser.checksum_errors
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            chunk = self._read(ser, what)
            if not chunk:
                continue
            for frame in self._parser.feed(chunk):
                if frame.cmd != cmd or not self._ours(frame):
                    continue
                if status:
                    if len(frame.data) != 1:
                        raise FrameError(
                            f"reply to {what} has {len(frame.data)} data bytes, expected 1"
                        )
                    code = frame.data[0]
                    if code != SUCCESS:
                        raise ReaderStatusError(
                            f"reader answered {what} with error 0x{code:02X} ({error_text(code)})",
                            code,
                        )
                return frame
        bad = self._parser.checksum_errors - bad_before
        if bad:
            raise FrameError(
                f"reply to {what} failed its checksum ({bad} checksum errors) and no valid "
                f"reply followed within {self.timeout_s:.2f}s"
            )
        pending = self._parser.pending_frame
        if pending is not None:
            have, need = pending
            raise FrameError(
                f"incomplete reply to {what}: got {have} of {need} bytes within "
                f"{self.timeout_s:.2f}s (truncated frame)"
            )
        raise ReaderTimeout(f"no reply to {what} within {self.timeout_s:.2f}s")
