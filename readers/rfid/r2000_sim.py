"""A simulated R2000 "0xA0" reader on a pseudo-terminal, speaking the real bytes.

The wire front end of :mod:`readers.rfid.r2000` over the shared RF model
(:mod:`readers.rfid.rf_model`, ``.rf`` / ``.clock``). Same public API as
:class:`~readers.rfid.mercury_sim.MercurySimulator`.

Modelled reader behaviour worth knowing:

* 4- or 8-port firmware (``antenna_ports`` <= 8) takes AntID 0..3 / 0..7 in
  0x74 and 0x8A; 16-port firmware (``antenna_ports`` > 8) adds the antenna
  group command 0x6C/0x6D (group 0 = ports 1-8, 1 = ports 9-16). Other
  firmware answers 0x6C with "command failed".
* 0x89 runs ``Repeat`` Gen2 rounds in session S0, target A (an assumption: the
  command does not say which session the firmware uses); 0x8B uses the session
  and target it is given; 0x8A's short layouts behave like 0x89 per antenna,
  the extended layout uses its Session/Target bytes. Repeat 255 ("as fast as
  possible") is one round. Every read of a tag is its own frame.
* An antenna that is not wired or is disconnected: 0x89/0x8B answer one error
  frame 0x22; 0x8A sends ``AntID 22`` and goes on with the next antenna.
* Tag frames stream out as the model reads them (with ``time_scale`` > 0 they
  are spaced in time); the run ends with the end-of-run frame.
* A reboot loses the work antenna, antenna group and temporary power (0x66);
  region and 0x76 power are kept (flash). The R2000 sends nothing when it boots.
* Line faults apply to single frames (``opcode`` = command code); a scenario
  fault on a read command applies to its whole stream: ``drop`` (no frame),
  ``corrupt`` (the first frame), ``truncate`` (the last frame cut short),
  ``reboot`` (stops halfway, loses settings), ``unplug``.
"""

from __future__ import annotations

from pathlib import Path

from .r2000 import (
    ANTENNA_ID_OUT_OF_RANGE,
    ANTENNA_MISSING,
    BROADCAST,
    COMMAND_SETS,
    FAIL,
    PARAMETER_INVALID,
    POWER_OUT_OF_RANGE,
    REGION_OUT_OF_RANGE,
    SUCCESS,
    R2000Frame,
    R2000Parser,
    build_frame,
    dbm_to_rssi,
    encode_antenna,
    freq_index_to_khz,
    khz_to_freq_index,
)
from .rf_model import Scenario, TagRead
from .sim_base import PtySimulator, log

__all__ = ["R2000Simulator"]

VERSION = (8, 1)
MAX_POWER_DBM = 33
DEFAULT_POWER_DBM = 30
BOOT_S = 0.5
# Frequency regions of 0x78: code -> (first, last) valid index.
REGION_LIMITS = {1: (7, 59), 2: (0, 6), 3: (43, 53)}


class R2000Simulator(PtySimulator[R2000Frame]):
    """A simulated R2000 reader on a pty (see the module docstring).

    ``address`` is the reader's own address (it also answers 0xFF);
    ``firmware`` picks the command codes (a key of ``COMMAND_SETS``).
    """

    name = "r2000"

    def __init__(
        self,
        antenna_ports: int = 8,
        seed: int = 0,
        time_scale: float = 0.0,
        *,
        scenario: Scenario | str | Path | None = None,
        address: int = 0x01,
        firmware: str = "standard",
    ) -> None:
        super().__init__(antenna_ports, seed, time_scale, scenario=scenario)
        if not 0 <= address <= 0xFE:
            raise ValueError(f"address must be 0..254, got {address}")
        if firmware not in COMMAND_SETS:
            raise ValueError(f"unknown firmware {firmware!r}")
        self.address = address
        self.cmds = COMMAND_SETS[firmware]
        self._parser = R2000Parser()
        self._flash_power = [DEFAULT_POWER_DBM] * 8
        self._region = (1, 7, 59)
        self._reset_volatile()

    # ------------------------------------------------------------ state

    def _reset_volatile(self) -> None:
        """What a reboot forgets (caller holds the lock or is the constructor)."""
        self._work_antenna = 0
        self._group = 0
        self._temp_power: int | None = None

    @property
    def quads(self) -> int:
        """Antenna IDs per group: 4 on 4-port firmware, else 8."""
        return 4 if self.antenna_ports <= 4 else 8

    @property
    def config(self) -> dict[str, object]:
        """Snapshot of the reader settings the host has made."""
        with self._lock:
            return {
                "work_antenna": self._work_antenna,
                "group": self._group,
                "temp_power": self._temp_power,
                "flash_power": list(self._flash_power),
                "region": self._region,
            }

    def _power_of(self, port: int) -> float:
        if self._temp_power is not None:
            return self._temp_power
        return self._flash_power[(port - 1) % 8]

    def _channels(self) -> tuple[int, ...]:
        _, first, last = self._region
        return tuple(freq_index_to_khz(i) for i in range(first, last + 1))

    # ------------------------------------------------------------ I/O

    def _on_bytes(self, chunk: bytes) -> None:
        for frame in self._parser.feed(chunk):
            if frame.address not in (self.address, BROADCAST):
                continue  # for another reader on the bus
            try:
                self.rf.serial(len(frame.data) + 5, self._stop)  # the command's own bytes
                with self._lock:
                    self._received.append(frame)
                self._handle(frame)
            except Exception as exc:  # never let one bad command kill the reader
                log.exception("r2000 simulator: handling command 0x%02X", frame.cmd)
                self._report(f"command 0x{frame.cmd:02X}: {exc!r}")
                self._send(frame.cmd, bytes([FAIL]))

    def _send(self, cmd: int, data: bytes, fault: str | None = None) -> bool:
        """Send one frame (with any queued fault); False if the reader rebooted or vanished."""
        frame = build_frame(self.address, cmd, data)
        fault = self._take_fault(cmd) or fault
        if fault == "unplug":
            self._pull_plug()
            return False
        if fault == "reboot":
            self._reboot()
            return False
        damaged = self._damage(fault, frame)
        if damaged is not None:
            self.rf.serial(len(damaged), self._stop)
            self._send_bytes(damaged)
        return True

    def _reboot(self) -> None:
        with self._lock:
            self._reset_volatile()
        self.rf.spend(BOOT_S, self._stop)

    # ------------------------------------------------------------ commands

    def _handle(self, frame: R2000Frame) -> None:
        c, cmd, data = self.cmds, frame.cmd, frame.data
        if cmd == c.get_version:
            self._send(cmd, bytes(VERSION))
        elif cmd == c.reset:
            self._reboot()  # no reply: the reader restarts
        elif cmd == c.set_work_antenna:
            self._send(cmd, bytes([self._set_work_antenna(data)]))
        elif cmd == c.get_work_antenna:
            self._send(cmd, bytes([self._work_antenna]))
        elif cmd in (c.set_output_power, c.set_temporary_power):
            self._send(cmd, bytes([self._set_power(data, temporary=cmd == c.set_temporary_power)]))
        elif cmd == c.get_output_power:
            with self._lock:
                values = [self._power_of(p) for p in range(1, self.quads + 1)]
            self._send(cmd, bytes(int(v) for v in values))
        elif cmd == c.set_region:
            self._send(cmd, bytes([self._set_region(data)]))
        elif cmd == c.get_region:
            self._send(cmd, bytes(self._region))
        elif cmd == c.set_antenna_group and self.antenna_ports > 8:
            ok = len(data) == 1 and data[0] in (0, 1)
            if ok:
                with self._lock:
                    self._group = data[0]
            self._send(cmd, bytes([SUCCESS if ok else PARAMETER_INVALID]))
        elif cmd == c.get_antenna_group and self.antenna_ports > 8:
            self._send(cmd, bytes([self._group]))
        elif cmd == c.real_time_inventory:
            self._inventory_one(cmd, data, session_target=None)
        elif cmd == c.session_inventory:
            self._inventory_one(cmd, data, session_target=True)
        elif cmd == c.fast_switch_inventory:
            self._fast_switch(cmd, data)
        else:
            self._send(cmd, bytes([FAIL]))

    def _set_work_antenna(self, data: bytes) -> int:
        if len(data) != 1:
            return PARAMETER_INVALID
        if data[0] >= self.quads:
            return ANTENNA_ID_OUT_OF_RANGE
        with self._lock:
            self._work_antenna = data[0]
        return SUCCESS

    def _set_power(self, data: bytes, temporary: bool) -> int:
        if temporary:
            if len(data) != 1:
                return PARAMETER_INVALID
        elif len(data) not in (1, 4, 8):
            return PARAMETER_INVALID
        if any(v > MAX_POWER_DBM for v in data):
            return POWER_OUT_OF_RANGE
        with self._lock:
            if temporary:
                self._temp_power = data[0]
            else:
                values = list(data) * (8 // len(data))
                self._flash_power = values[:8]
                self._temp_power = None
        return SUCCESS

    def _set_region(self, data: bytes) -> int:
        if len(data) != 3 or data[0] not in REGION_LIMITS:
            return REGION_OUT_OF_RANGE
        low, high = REGION_LIMITS[data[0]]
        if not low <= data[1] <= data[2] <= high:
            return REGION_OUT_OF_RANGE
        with self._lock:
            self._region = (data[0], data[1], data[2])
        return SUCCESS

    @staticmethod
    def _rounds(repeat: int) -> int:
        return 1 if repeat in (0, 255) else repeat

    def _inventory_one(self, cmd: int, data: bytes, session_target: bool | None) -> None:
        """0x89 (Repeat) or 0x8B (Session, Target, [SL, Phase, PowerSave,] Repeat)."""
        if session_target:
            if not 3 <= len(data) <= 6 or data[0] > 3 or data[1] > 1:
                self._send(cmd, bytes([PARAMETER_INVALID]))
                return
            session, target, repeat = data[0], "AB"[data[1]], data[-1]
        else:
            if len(data) != 1:
                self._send(cmd, bytes([PARAMETER_INVALID]))
                return
            session, target, repeat = 0, "A", data[0]
        fault = self.rf.next_read_fault()
        with self._lock:
            port = self._group * 8 + self._work_antenna + 1
            power, channels = self._power_of(port), self._channels()
        visit = self.rf.visit(
            port,
            session=session,
            target=target,
            rounds=self._rounds(repeat),
            power_dbm=power,
            channels_khz=channels,
        )
        if not visit.connected:
            self._stream(cmd, [], [bytes([ANTENNA_MISSING])], visit.duration_s, fault)
            return
        total = sum(r.count for r in visit.reads)
        rate = round(total / visit.duration_s) if visit.duration_s else 0
        end = (
            bytes([self._work_antenna])
            + min(rate, 0xFFFF).to_bytes(2, "big")
            + total.to_bytes(4, "big")
        )
        self._stream(cmd, self._tag_frames(visit.reads, 0.0), [end], visit.duration_s, fault)

    def _fast_switch(self, cmd: int, data: bytes) -> None:
        # 4-port: 4 x (ant, stay) interval repeat; 8-port: 8 x (ant, stay) interval repeat;
        # extended: 8 x (ant, stay) interval reserve x5 session target optimize ongoing
        # target-quantity phase repeat.
        if len(data) == 10:
            slots, interval, repeat = data[:8], data[8], data[9]
            session, target = 0, "A"
        elif len(data) == 18:
            slots, interval, repeat = data[:16], data[16], data[17]
            session, target = 0, "A"
        elif len(data) == 29:
            slots, interval, repeat = data[:16], data[16], data[28]
            session, target = data[22], data[23]
            if session > 3 or target > 1:
                self._send(cmd, bytes([PARAMETER_INVALID]))
                return
            target = "AB"[target]
        else:
            self._send(cmd, bytes([PARAMETER_INVALID]))
            return
        fault = self.rf.next_read_fault()
        with self._lock:
            group, channels = self._group, self._channels()
        frames: list[tuple[float, bytes]] = []
        t = 0.0
        total = 0
        first = True
        for _ in range(max(1, self._rounds(repeat))):
            for i in range(0, len(slots), 2):
                ant_id, stay = slots[i], slots[i + 1]
                if ant_id >= self.quads or stay == 0:
                    continue  # 0xFF (or out of range): skip this slot
                port = group * 8 + ant_id + 1
                with self._lock:
                    power = self._power_of(port)
                visit = self.rf.visit(
                    port,
                    session=session,
                    target=target,
                    rounds=stay,
                    rf_on=first,
                    power_dbm=power,
                    channels_khz=channels,
                )
                first = False
                if not visit.connected:
                    frames.append((t + visit.duration_s, bytes([ant_id, ANTENNA_MISSING])))
                else:
                    frames.extend(self._tag_frames(visit.reads, t))
                    total += sum(r.count for r in visit.reads)
                t += visit.duration_s
            t += interval / 1000
        end = total.to_bytes(3, "big") + round(t * 1000).to_bytes(4, "big")
        frames.sort(key=lambda f: f[0])
        self._stream(cmd, frames, [end], t, fault)

    def _tag_frames(self, reads: list[TagRead], offset: float) -> list[tuple[float, bytes]]:
        """(time, data) of one tag frame per read, in read order."""
        out = []
        for read in reads:
            low, high, _group = encode_antenna(read.antenna)
            freq_ant = (khz_to_freq_index(read.frequency_khz) << 2) | low
            raw = bytes.fromhex(read.epc)
            pc = (len(raw) // 2) << 11
            rssi = (high << 7) | dbm_to_rssi(read.rssi)
            data = bytes([freq_ant]) + pc.to_bytes(2, "big") + raw + bytes([rssi])
            spacing = 1 / self.rf.timing.tags_per_second
            for n in range(read.count):
                out.append((offset + read.first_s + n * spacing, data))
        out.sort(key=lambda f: f[0])
        return out

    def _stream(
        self,
        cmd: int,
        frames: list[tuple[float, bytes]],
        tail: list[bytes],
        duration: float,
        fault: str | None,
    ) -> None:
        """Send tag frames at their modelled times, then ``tail`` at the end of the run."""
        if fault == "unplug":
            self._pull_plug()
            return
        if fault == "drop":
            self.rf.spend(duration, self._stop)
            return
        items = [(t, d) for t, d in frames] + [(duration, d) for d in tail]
        cut = len(items) // 2 if fault == "reboot" else len(items)
        spent = 0.0
        for i, (t, data) in enumerate(items):
            if i == cut:
                self.rf.spend(max(0.0, t - spent), self._stop)
                self._reboot()
                return
            if t > spent:
                if not self.rf.spend(t - spent, self._stop):
                    return
                spent = t
            line_fault = None
            if fault == "corrupt" and i == 0:
                line_fault = "corrupt"
            elif fault == "truncate" and i == len(items) - 1:
                line_fault = "truncate"
            if not self._send(cmd, data, line_fault):
                return
        if duration > spent:
            self.rf.spend(duration - spent, self._stop)
