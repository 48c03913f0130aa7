"""MercuryReader against MercurySimulator over a real pseudo-terminal."""

from __future__ import annotations

import os
import random
import time
import tty
from collections.abc import Iterator

import pytest
import serial

from readers.rfid import PROTOCOLS, MercuryReader, open_reader
from readers.rfid.base import FrameError, ReaderError, ReaderStatusError, ReaderTimeout
from readers.rfid.mercury import FrameParser, build_command
from readers.rfid.mercury_sim import MercurySimulator

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.3
# Scheduling slack on a loaded CI box; a hang would blow far past it.
MARGIN_S = 1.0


@pytest.fixture
def sim() -> Iterator[MercurySimulator]:
    with MercurySimulator(antenna_ports=8, seed=7) as s:
        yield s
        assert s.errors == []  # the simulator thread never hit an unexpected error


@pytest.fixture
def reader(sim: MercurySimulator) -> Iterator[MercuryReader]:
    r = MercuryReader(sim.port, timeout_s=TIMEOUT_S)
    r.open()
    r.configure(range(1, 9), power_dbm=27, region="NA2", session=2)
    yield r
    r.close()


def sent(sim: MercurySimulator, opcode: int) -> list[bytes]:
    """Wire bytes of every command with ``opcode`` the simulator received."""
    return [f.to_bytes() for f in sim.received() if f.opcode == opcode]


def populate(sim: MercurySimulator, n: int, ports: range, seed: int = 1) -> dict[str, dict]:
    rng = random.Random(seed)
    world = {}
    for i in range(n):
        epc = f"E280{rng.getrandbits(64):016X}{i:04X}"
        ants = rng.sample(list(ports), k=rng.choice([1, 1, 2, 3]))
        world[epc] = {a: rng.randint(-75, -35) for a in ants}
    sim.set_tags(world)
    return world


# ----------------------------------------------------------------- open / configure


def test_open_identifies_an_m6e(sim: MercurySimulator) -> None:
    r = MercuryReader(sim.port, timeout_s=TIMEOUT_S)
    info = r.open()
    try:
        assert (info.protocol, info.model, info.firmware) == ("mercury", "M6e", "01.0B.01.0E")
        assert info.antenna_ports == 16  # M6e drives 16 ports through its muxes
        assert r.open() == info  # already open: same identity, no new exchange
        assert sent(sim, 0x03) == [bytes.fromhex("FF 00 03 1D 0C")]
    finally:
        r.close()
        r.close()  # idempotent
    with pytest.raises(ReaderError, match="not open"):
        r.inventory(1, 10)


def test_open_starts_the_application_from_the_bootloader(sim: MercurySimulator) -> None:
    sim.enter_bootloader()
    with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
        assert r.info is not None and r.info.model == "M6e"
    assert [f.opcode for f in sim.received()] == [0x0C, 0x04, 0x03]
    assert sim.config["app"] is True


def test_configure_sends_the_documented_frames(sim: MercurySimulator) -> None:
    with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
        r.configure([1, 2, 3], power_dbm=27.0, region="na2", session=2)
    assert sent(sim, 0x93) == [build_command(0x93, b"\x00\x05")]
    assert sent(sim, 0x97) == [bytes.fromhex("FF 01 97 0D 4B B0")]
    assert sent(sim, 0x92) == [bytes.fromhex("FF 02 92 0A 8C 4B D5")]
    assert sent(sim, 0x9B) == [
        bytes.fromhex("FF 03 9B 05 00 02 DC EA"),  # session S2
        bytes.fromhex("FF 04 9B 05 01 00 00 A3 FD"),  # target AB
    ]
    cfg = sim.config
    assert (cfg["protocol"], cfg["region"], cfg["power_cdbm"]) == (5, 13, 2700)
    assert (cfg["session"], cfg["target"]) == (2, 0x0000)


def test_configure_rejects_bad_arguments_before_sending(sim: MercurySimulator) -> None:
    with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
        before = len(sim.received())
        with pytest.raises(ValueError, match="'MARS'"):
            r.configure([1], 27, "MARS", 0)
        with pytest.raises(ValueError, match="session"):
            r.configure([1], 27, "EU", 4)
        with pytest.raises(ValueError, match="antenna 17"):
            r.configure([1, 17], 27, "EU", 0)
        with pytest.raises(ValueError, match="twice"):
            r.configure([2, 2], 27, "EU", 0)
        with pytest.raises(ValueError, match="at least one"):
            r.configure([], 27, "EU", 0)
        assert len(sim.received()) == before
        with pytest.raises(ReaderError, match="configure"):
            r.inventory(1, 10)


def test_power_the_module_refuses_is_a_status_error(sim: MercurySimulator) -> None:
    with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
        with pytest.raises(ReaderStatusError, match=r"0x0103 \(power too high\)") as exc:
            r.configure([1], power_dbm=40, region="EU", session=0)
        assert exc.value.status == 0x0103


# ----------------------------------------------------------------- inventory


def test_inventory_200_tags_over_8_antennas(sim: MercurySimulator, reader: MercuryReader) -> None:
    world = populate(sim, 200, range(1, 9))
    assert sum(len(a) > 1 for a in world.values()) > 30  # plenty of tags on several antennas
    started = time.monotonic()
    result = reader.inventory(rounds=2, dwell_ms=1000)
    assert time.monotonic() - started < 10  # time_scale=0: the dwell is not really waited
    assert result.complete and result.antenna_errors == {}
    assert result.rounds == 2
    assert set(result.tags) == set(world)
    for epc, ants in world.items():
        report = result.tags[epc]
        assert report.epc == epc
        assert report.antennas == sorted(ants)
        for port, reads in report.reads.items():
            assert reads.count >= 2  # at least one read per round
            assert ants[port] - 2 <= reads.rssi <= ants[port] + 2
    # Per antenna and round: search list of that antenna alone, then the quoted 0x22 frame.
    assert sent(sim, 0x91) == [build_command(0x91, bytes([2, p, p])) for p in range(1, 9)] * 2
    assert set(sent(sim, 0x22)) == {bytes.fromhex("FF 05 22 00 00 13 03 E8 29 05")}
    # Metadata 0x000F: read count, RSSI, antenna and frequency.
    assert set(sent(sim, 0x29)) == {build_command(0x29, bytes.fromhex("000F 00"))}


def test_many_tags_on_one_antenna_take_several_buffer_fetches(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    world = {f"3008{i:020X}": {4: -55} for i in range(300)}
    sim.set_tags(world)
    reader.configure([4], 27, "EU", 1)
    before = len(sent(sim, 0x29))
    result = reader.inventory(1, 1000)  # 300 tags at 400 tags/s need 0.75 s of dwell
    assert set(result.tags) == set(world)
    assert all(t.antennas == [4] for t in result.tags.values())
    # 24-byte records, at most 244 bytes of records per reply -> 10 per fetch.
    assert len(sent(sim, 0x29)) - before == -(-300 // 10)


def test_empty_cabinet(sim: MercurySimulator, reader: MercuryReader) -> None:
    result = reader.inventory(1, 50)
    assert result.tags == {} and result.antenna_errors == {} and result.complete
    assert sent(sim, 0x29) == []  # status 0x0400: nothing to fetch


def test_tags_added_and_removed_between_inventories(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    sim.add_tag("AAAA0001", {2: -40})
    sim.add_tag("AAAA0002")
    assert set(reader.inventory(1, 20).tags) == {"AAAA0001", "AAAA0002"}
    sim.remove_tag("aaaa0001")
    result = reader.inventory(1, 20)
    assert set(result.tags) == {"AAAA0002"} and result.tags["AAAA0002"].antennas == [1]


def test_disconnected_antenna_is_reported_and_others_still_read(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    sim.set_tags({"0001": {3: -50}, "0002": {3: -50, 5: -60}, "0003": {1: -45}})
    sim.disconnect_antenna(3)
    result = reader.inventory(2, 50)
    assert result.antenna_errors == {3: "antenna 3 not connected"}
    assert not result.complete
    assert set(result.tags) == {"0002", "0003"}
    assert result.tags["0002"].antennas == [5]
    sim.disconnect_antenna(3, disconnected=False)
    assert set(reader.inventory(1, 50).tags) == {"0001", "0002", "0003"}


def test_port_beyond_the_wired_ones_is_an_antenna_error(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    sim.add_tag("BEEF", {1: -50})
    reader.configure([1, 9], 27, "EU", 0)  # the M6e accepts 9; this board wires only 8
    result = reader.inventory(1, 20)
    assert result.antenna_errors == {9: "antenna 9 not connected"}
    assert set(result.tags) == {"BEEF"}


def test_ports_9_to_16_with_a_16_port_simulator() -> None:
    with MercurySimulator(antenna_ports=16, seed=3) as sim:
        world = populate(sim, 64, range(9, 17), seed=5)
        world["FFFF0010"] = {16: -42}  # port 16 is antenna byte 0x00 on the wire
        sim.set_tags(world)
        with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
            r.configure(range(9, 17), 27, "OPEN", 0)
            result = r.inventory(1, 200)
        assert result.complete
        assert {epc: t.antennas for epc, t in result.tags.items()} == {
            epc: sorted(a) for epc, a in world.items()
        }
        assert result.tags["FFFF0010"].antennas == [16]
        assert sim.errors == []


# ----------------------------------------------------------------- faults


def test_corrupt_reply_is_retried_once_per_antenna(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    world = {f"0ACE{i:04X}": {2: -50} for i in range(30)}  # 3 buffer fetches on antenna 2
    sim.set_tags(world)
    sim.max_reads = 1  # every Read Tag Multiple reads each tag exactly once
    sim.corrupt_next_reply(opcode=0x29, after=1)  # the second fetch, 10 records already in
    result = reader.inventory(1, 200)
    # By design a FrameError redoes that antenna's clear/read/fetch once: nothing lost...
    assert result.complete and set(result.tags) == set(world)
    assert reader.crc_errors == 1
    # ...and nothing counted twice (a record fetched by both attempts keeps one count).
    assert {t.count for t in result.tags.values()} == {1}


def test_repeated_corruption_raises_frame_error(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    sim.add_tag("1234")
    sim.corrupt_next_reply(times=2, opcode=0x22)
    started = time.monotonic()
    with pytest.raises(FrameError, match=r"opcode 0x22 failed its CRC check \(1 CRC errors\)"):
        reader.inventory(1, 50)
    assert time.monotonic() - started < 2 * (TIMEOUT_S + 0.05) + MARGIN_S
    assert set(reader.inventory(1, 50).tags) == {"1234"}  # the link recovers


def test_corrupt_version_reply_fails_open_with_frame_error(sim: MercurySimulator) -> None:
    sim.corrupt_next_reply(opcode=0x03)
    r = MercuryReader(sim.port, timeout_s=TIMEOUT_S)
    with pytest.raises(FrameError, match="CRC"):
        r.open()
    assert r.open().model == "M6e"
    r.close()


def test_dropped_reply_times_out_promptly(sim: MercurySimulator, reader: MercuryReader) -> None:
    sim.add_tag("CAFE")
    dwell_ms = 50
    sim.drop_next_reply(opcode=0x22)
    started = time.monotonic()
    with pytest.raises(ReaderTimeout, match=r"no reply to opcode 0x22 within 0\.35s"):
        reader.inventory(1, dwell_ms)
    elapsed = time.monotonic() - started
    assert TIMEOUT_S + dwell_ms / 1000 <= elapsed < TIMEOUT_S + dwell_ms / 1000 + MARGIN_S
    assert set(reader.inventory(1, dwell_ms).tags) == {"CAFE"}


def test_truncated_reply_is_a_clear_frame_error(sim: MercurySimulator) -> None:
    with MercuryReader(sim.port, timeout_s=TIMEOUT_S) as r:
        sim.truncate_next_reply(opcode=0x97)
        started = time.monotonic()
        with pytest.raises(FrameError, match=r"incomplete reply to opcode 0x97: got 4 of 7 bytes"):
            r.configure([1], 27, "EU", 0)
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
        r.configure([1], 27, "EU", 0)
        sim.add_tag("ABCD")
        sim.truncate_next_reply(opcode=0x29)
        assert set(r.inventory(1, 20).tags) == {"ABCD"}  # retried like a CRC error


def test_boot_reply_mid_session_means_rebooted(
    sim: MercurySimulator, reader: MercuryReader
) -> None:
    sim.inject_boot_reply(opcode=0x2A)
    with pytest.raises(ReaderError, match="reader rebooted"):
        reader.inventory(1, 20)
    with pytest.raises(ReaderError, match="configure"):
        reader.inventory(1, 20)  # the module lost its settings, so must the driver
    reader.configure([1], 27, "EU", 0)
    assert reader.inventory(1, 20).complete


def test_unplug_gives_reader_error(sim: MercurySimulator, reader: MercuryReader) -> None:
    sim.add_tag("D00D")
    sim.unplug()
    started = time.monotonic()
    with pytest.raises(ReaderError, match="serial link .* failed") as exc:
        reader.inventory(1, 20)
    assert not isinstance(exc.value, ReaderTimeout | FrameError)
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    with pytest.raises(ReaderError, match="not open .*link failed"):
        reader.inventory(1, 20)
    reader.close()
    reader.close()


def test_open_on_a_missing_port() -> None:
    r = MercuryReader("/dev/does-not-exist-smartcab", timeout_s=TIMEOUT_S)
    with pytest.raises(ReaderError, match="cannot open serial port '/dev/does-not-exist"):
        r.open()


def test_open_on_a_silent_port_times_out() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        r = MercuryReader(os.ttyname(slave), timeout_s=TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(ReaderTimeout, match="no reply to opcode 0x0C"):
            r.open()
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    finally:
        os.close(slave)
        os.close(master)


# ----------------------------------------------------------------- simulator at the wire


def test_simulator_answers_raw_frames(sim: MercurySimulator) -> None:
    parser = FrameParser()
    with serial.Serial(sim.port, 115200, timeout=TIMEOUT_S) as port:

        def ask(raw: bytes) -> tuple[int, int, bytes]:
            port.write(raw)
            deadline = time.monotonic() + TIMEOUT_S + MARGIN_S
            while time.monotonic() < deadline:
                frames = parser.feed(port.read(port.in_waiting or 1))
                if frames:
                    (f,) = frames
                    return f.opcode, f.status or 0, f.data
            raise AssertionError(f"no reply to {raw.hex()}")

        # Wake-up preamble then a command: the 0xFF run is ignored.
        assert ask(b"\xff" * 16 + build_command(0x0C)) == (0x0C, 0, b"\x12")
        assert ask(build_command(0x55)) == (0x55, 0x0101, b"")  # unknown opcode
        assert ask(build_command(0x97, b"\x0d\x00"))[1] == 0x0100  # wrong length
        assert ask(build_command(0x92, b"\x0a"))[1] == 0x0100
        assert ask(build_command(0x93, b"\x00"))[1] == 0x0100
        assert ask(build_command(0x9B, b"\x05\x00"))[1] == 0x0100
        assert ask(build_command(0x9B, b"\x05\x01\x00"))[1] == 0x0100  # target needs u16
        assert ask(build_command(0x91, b"\x02\x01\x01\x02"))[1] == 0x0100  # half a pair
        assert ask(build_command(0x91, b"\x02\x01\x01\x11\x11"))[1] == 0x0507  # port 17
        assert ask(build_command(0x2A, b"\x00"))[1] == 0x0100
        assert ask(build_command(0x97, b"\x63"))[1] == 0x010B  # no such region
        assert ask(build_command(0x22, bytes.fromhex("00 0013 0064")))[1] == 0x0401  # no protocol
        assert ask(build_command(0x93, b"\x00\x05"))[1] == 0
        assert ask(build_command(0x22, bytes.fromhex("00 0013 0064"))) == (0x22, 0x0400, b"")
        # A command with a bad CRC gets no answer; the next good one does.
        port.write(build_command(0x03)[:-1] + b"\x00")
        assert ask(build_command(0x2A)) == (0x2A, 0, b"")
    assert parser.crc_errors == 0


def test_simulator_rejects_bad_tag_world() -> None:
    s = MercurySimulator()
    with pytest.raises(ValueError, match="not a hex string"):
        s.add_tag("XYZ1")
    with pytest.raises(ValueError, match="16-bit words"):
        s.add_tag("ABC")
    with pytest.raises(ValueError, match="antenna port must be 1..16"):
        s.add_tag("ABCD", {17: -50})
    with pytest.raises(ValueError, match="RSSI"):
        s.add_tag("ABCD", {1: 20})
    with pytest.raises(RuntimeError, match="start"):
        _ = s.port
    s.add_tag("abcd")
    assert s.tags() == {"ABCD": {1: -50}}
    s.stop()  # never started: still fine


# ----------------------------------------------------------------- registry


def test_open_reader_registry(sim: MercurySimulator) -> None:
    assert PROTOCOLS["mercury"] is MercuryReader
    r = open_reader("Mercury", sim.port, timeout_s=TIMEOUT_S)
    assert isinstance(r, MercuryReader)
    with pytest.raises(ReaderError, match="not open"):
        r.configure([1], 27, "EU", 0)  # returned unopened
    with r:
        assert r.info is not None and r.info.protocol == "mercury"
    with pytest.raises(
        ValueError, match="unknown RFID protocol 'llrp'; known protocols: mercury, r2000"
    ):
        open_reader("llrp", sim.port)
