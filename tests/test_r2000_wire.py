"""R2000Reader against R2000Simulator over a real pseudo-terminal."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import serial

from readers.rfid import PROTOCOLS, R2000Reader, open_reader
from readers.rfid.base import FrameError, ReaderError, ReaderStatusError, ReaderTimeout
from readers.rfid.r2000 import R2000Parser, build_frame
from readers.rfid.r2000_sim import R2000Simulator
from readers.rfid.rf_model import FaultSpec, Scenario

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.3
MARGIN_S = 1.0  # scheduling slack on a loaded CI box; a hang would blow far past it


@pytest.fixture
def sim() -> Iterator[R2000Simulator]:
    with R2000Simulator(antenna_ports=8, seed=7) as s:
        yield s
        assert s.errors == []  # the simulator thread never hit an unexpected error


@pytest.fixture
def reader(sim: R2000Simulator) -> Iterator[R2000Reader]:
    r = R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1)
    r.open()
    r.configure(range(1, 9), power_dbm=27, region="EU", session=2)
    yield r
    r.close()


def sent(sim: R2000Simulator, cmd: int) -> list[bytes]:
    """Wire bytes of every command with code ``cmd`` the simulator received."""
    return [f.to_bytes() for f in sim.received() if f.cmd == cmd]


def populate(sim: R2000Simulator, n: int, ports: range, seed: int = 1) -> dict[str, dict]:
    rng = random.Random(seed)
    world = {}
    for i in range(n):
        epc = f"E280{rng.getrandbits(64):016X}{i:04X}"
        ants = rng.sample(list(ports), k=min(len(ports), rng.choice([1, 1, 2, 3])))
        world[epc] = {a: rng.randint(-75, -35) for a in ants}
    sim.set_tags(world)
    return world


def seen(result) -> dict[str, list[int]]:
    return {epc: t.antennas for epc, t in result.tags.items()}


# ----------------------------------------------------------------- open / configure


def test_open_identifies_the_reader(sim: R2000Simulator) -> None:
    r = R2000Reader(sim.port, timeout_s=TIMEOUT_S)
    info = r.open()
    try:
        assert (info.protocol, info.model, info.firmware) == ("r2000", "R2000 module", "8.1")
        assert info.antenna_ports == 16  # unknown count: the protocol's maximum
        assert r.open() == info
        assert sent(sim, 0x72) == [bytes.fromhex("A0 03 FF 72 EC")]  # broadcast address
    finally:
        r.close()
        r.close()
    with pytest.raises(ReaderError, match="not open"):
        r.inventory(1, 10)
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, antenna_ports=8) as r8:
        assert r8.info is not None and r8.info.antenna_ports == 8


def test_configure_sends_the_documented_frames(sim: R2000Simulator) -> None:
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1) as r:
        r.configure([1, 2, 3], power_dbm=27.0, region="eu", session=2)
    assert sent(sim, 0x78) == [build_frame(1, 0x78, bytes([2, 0, 6]))]  # ETSI, index 0..6
    assert sent(sim, 0x66) == [build_frame(1, 0x66, bytes([27]))]  # temporary power
    assert sent(sim, 0x76) == [] and sent(sim, 0x6C) == []
    assert sim.config["temp_power"] == 27 and sim.config["region"] == (2, 0, 6)
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1, save_power=True) as r:
        r.configure([1], power_dbm=30, region="FCC", session=0)
        r.set_port_power({1: 25, 2: 26})
    assert sent(sim, 0x76) == [
        build_frame(1, 0x76, bytes([30])),
        build_frame(1, 0x76, bytes([25, 26] + [25] * 6)),
    ]
    assert sim.config["flash_power"] == [25, 26] + [25] * 6


def test_configure_rejects_bad_arguments_before_sending(sim: R2000Simulator) -> None:
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, antenna_ports=8) as r:
        before = len(sim.received())
        with pytest.raises(ValueError, match="'MARS'"):
            r.configure([1], 27, "MARS", 0)
        with pytest.raises(ValueError, match="session"):
            r.configure([1], 27, "EU", 4)
        with pytest.raises(ValueError, match="antenna 9 is not a port"):
            r.configure([1, 9], 27, "EU", 0)
        with pytest.raises(ValueError, match="twice"):
            r.configure([2, 2], 27, "EU", 0)
        with pytest.raises(ValueError, match="encode"):
            r.configure([1], 300, "EU", 0)
        assert len(sim.received()) == before
        with pytest.raises(ReaderError, match="configure"):
            r.inventory(1, 10)
    with pytest.raises(ValueError, match="unknown firmware 'v9'"):
        R2000Reader(sim.port, firmware="v9")
    with pytest.raises(ValueError, match="mode"):
        R2000Reader(sim.port, mode="turbo")


def test_power_the_reader_refuses_is_a_status_error(sim: R2000Simulator) -> None:
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S) as r:
        with pytest.raises(ReaderStatusError, match=r"0x48 \(output power out of range\)") as exc:
            r.configure([1], power_dbm=40, region="EU", session=0)
        assert exc.value.status == 0x48


# ----------------------------------------------------------------- inventory


def test_inventory_200_tags_over_8_antennas(sim: R2000Simulator, reader: R2000Reader) -> None:
    world = populate(sim, 200, range(1, 9))
    assert sum(len(a) > 1 for a in world.values()) > 30
    assert sum(any(p > 4 for p in a) for a in world.values()) > 50  # RSSI-MSB ports
    wall = time.monotonic()
    result = reader.inventory(rounds=2, dwell_ms=100)
    assert time.monotonic() - wall < 10
    assert result.complete and result.rounds == 2
    assert seen(result) == {epc: sorted(a) for epc, a in world.items()}
    for epc, ants in world.items():
        for port, reads in result.tags[epc].reads.items():
            assert reads.count == 4  # target AB: A then B on each antenna, two rounds
            # +-2 dB of noise; -40 dBm has no R2000 code and reads as -39.
            assert ants[port] - 2 <= reads.rssi <= ants[port] + 2 + (ants[port] + 2 == -40)
    per_antenna = {p: 4 * sum(p in a for a in world.values()) for p in range(1, 9)}
    assert result.antenna_reads == per_antenna
    # Per antenna: work antenna, then session inventory S2 target A and target B, repeat 1.
    assert sent(sim, 0x74) == [build_frame(1, 0x74, bytes([p - 1])) for p in range(1, 9)] * 2
    assert sent(sim, 0x8B) == [
        build_frame(1, 0x8B, bytes([2, t, 1])) for _ in range(2) for _ in range(8) for t in (0, 1)
    ]


def test_single_targets_follow_the_session_flags(sim: R2000Simulator, reader: R2000Reader) -> None:
    world = populate(sim, 40, range(1, 3), seed=4)
    first = reader.inventory(1, 100, target="A")
    assert set(first.tags) == set(world)
    # At S2 a tag read on its first antenna stays quiet on the next one of the pass.
    assert all(len(t.antennas) == 1 for t in first.tags.values())
    assert reader.inventory(1, 100, target="A").tags == {}
    assert set(reader.inventory(1, 100, target="B").tags) == set(world)
    sim.clock.advance(10)  # flags decay once the tags have been without RF long enough
    assert set(reader.inventory(1, 100, target="A").tags) == set(world)


def test_targeted_rounds_visit_only_the_given_antennas(
    sim: R2000Simulator, reader: R2000Reader
) -> None:
    sim.set_tags({"0001": {2: -50}, "0002": {5: -60}, "0003": {7: -45}})
    before = len(sent(sim, 0x74))
    result = reader.inventory(1, 100, antennas=[7, 5], target="AB")
    assert seen(result) == {"0002": [5], "0003": [7]}
    assert sent(sim, 0x74)[before:] == [
        build_frame(1, 0x74, b"\x06"),
        build_frame(1, 0x74, b"\x04"),
    ]
    with pytest.raises(ValueError, match=r"antennas \[9\] are not configured"):
        reader.inventory(1, 100, antennas=[9])
    with pytest.raises(ValueError, match="target"):
        reader.inventory(1, 100, target="C")


def test_dwell_becomes_the_repeat_count(sim: R2000Simulator, reader: R2000Reader) -> None:
    sim.add_tag("ABCD", {3: -50})
    reader.inventory(1, 350, antennas=[3], target="A")
    assert sent(sim, 0x8B)[-1] == build_frame(1, 0x8B, bytes([2, 0, 4]))  # ceil(350 / 100)


def test_dead_antenna_is_reported_and_others_still_read(
    sim: R2000Simulator, reader: R2000Reader
) -> None:
    sim.set_tags({"0001": {3: -50}, "0002": {3: -50, 5: -60}, "0003": {1: -45}})
    sim.disconnect_antenna(3)
    result = reader.inventory(2, 100)
    assert result.antenna_errors == {3: "antenna 3 not connected"}
    assert not result.complete
    assert seen(result) == {"0002": [5], "0003": [1]}
    assert 3 not in result.antenna_reads
    sim.disconnect_antenna(3, disconnected=False)
    assert set(reader.inventory(1, 100).tags) == {"0001", "0002", "0003"}


def test_ports_9_to_16_through_the_antenna_group() -> None:
    with R2000Simulator(antenna_ports=16, seed=3) as sim:
        world = populate(sim, 80, range(1, 17), seed=5)
        world["FFFF0010"] = {16: -42}  # group 1, quad 1, RSSI MSB set
        sim.set_tags(world)
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1, antenna_ports=16) as r:
            r.configure(range(1, 17), 27, "PRC", 1)
            result = r.inventory(1, 100)
            assert seen(result) == {epc: sorted(a) for epc, a in world.items()}
            assert result.tags["FFFF0010"].antennas == [16]
            # Group 0 at configure, then 1 for ports 9-16, back to 0 for the next round.
            assert sent(sim, 0x6C) == [build_frame(1, 0x6C, bytes([g])) for g in (0, 1)]
            r.inventory(1, 100, antennas=[2])
            assert sent(sim, 0x6C)[-1] == build_frame(1, 0x6C, b"\x00")
        assert sim.errors == []


def test_fast_switch_mode_with_a_dead_antenna() -> None:
    with R2000Simulator(antenna_ports=8, seed=9) as sim:
        world = populate(sim, 60, range(1, 9), seed=6)
        sim.disconnect_antenna(6)
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1, mode="fast_switch") as r:
            r.configure(range(1, 9), 27, "EU", 2)
            result = r.inventory(1, 100, target="A")
        assert result.antenna_errors == {6: "antenna 6 not connected"}
        expected = {e for e, a in world.items() if set(a) - {6}}
        assert set(result.tags) == expected
        # Extended layout: 8 x (AntID, stay), interval, 5 reserved, session 2, target A, ...
        slots = bytes(b for p in range(8) for b in (p, 1))
        frame = build_frame(1, 0x8A, slots + bytes(6) + bytes([2, 0, 0, 0, 0, 0, 1]))
        assert sent(sim, 0x8A) == [frame]
        assert sim.errors == []


def test_fast_switch_on_a_4_port_reader_sends_the_quoted_frame() -> None:
    with R2000Simulator(antenna_ports=4, seed=2) as sim:
        sim.set_tags({"AAAA0001": {1: -50}, "AAAA0002": {4: -60}})
        with R2000Reader(
            sim.port, timeout_s=TIMEOUT_S, address=1, mode="fast_switch", antenna_ports=4
        ) as r:
            r.configure([1, 2, 3, 4], 27, "EU", 0)
            result = r.inventory(1, 100, target="A")
        assert seen(result) == {"AAAA0001": [1], "AAAA0002": [4]}
        assert sent(sim, 0x8A) == [bytes.fromhex("A0 0D 01 8A 00 01 01 01 02 01 03 01 00 01 BD")]


def test_realtime_mode_sends_0x89(sim: R2000Simulator) -> None:
    sim.set_tags({"BEEF0001": {2: -50}})
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1, mode="realtime") as r:
        r.configure([1, 2], 27, "EU", 2)
        for _ in range(2):  # the firmware's own session (S0 here): read every time
            assert seen(r.inventory(1, 100, target="A")) == {"BEEF0001": [2]}
    assert set(sent(sim, 0x89)) == {bytes.fromhex("A0 04 01 89 01 D1")}


def test_alternative_firmware_command_codes() -> None:
    with R2000Simulator(seed=1, firmware="alt87") as sim:
        sim.add_tag("CAFE", {2: -50})
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1, firmware="alt87") as r:
            r.configure([1, 2], 27, "EU", 1)
            assert seen(r.inventory(1, 100, target="A")) == {"CAFE": [2]}
        assert sent(sim, 0x8A) and not sent(sim, 0x8B)


def test_virtual_clock_counts_singulation_and_serial_time() -> None:
    with R2000Simulator(seed=5) as sim:
        sim.set_tags({f"E280{i:020X}": {1: -50} for i in range(1000)})
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1) as r:
            r.configure([1], 27, "EU", 2)
            start = sim.clock.now()
            wall = time.monotonic()
            result = r.inventory(1, 100, target="A")
            wall = time.monotonic() - wall
            simulated = sim.clock.now() - start
        assert len(result.tags) == 1000
        # 1000 tags at 400 tags/s (2.5 s) + RF-on/switch (22 ms) + 1000 tag frames of
        # 21 bytes at 115200 baud (1.82 s) + a few short frames.
        assert 2.5 + 0.022 + 1.82 <= simulated <= 4.45
        assert wall < 5


# ----------------------------------------------------------------- faults


def test_corrupt_tag_frame_retries_the_antenna_with_nothing_lost(
    sim: R2000Simulator, reader: R2000Reader
) -> None:
    world = {f"0ACE{i:04X}": {2: -50} for i in range(30)}
    sim.set_tags(world)
    sim.corrupt_next_reply(opcode=0x8B, after=10)  # the 11th tag frame of the run
    result = reader.inventory(1, 100, antennas=[2], target="A")
    assert result.complete and set(result.tags) == set(world)
    assert reader.checksum_errors == 1
    # The redo searched target B: the 29 good reads of the first attempt were
    # kept, the redo re-read all 30 (they had flipped to B) and replaced them.
    assert {t.count for t in result.tags.values()} == {1}
    assert sent(sim, 0x8B)[-2:] == [
        build_frame(1, 0x8B, bytes([2, 0, 1])),
        build_frame(1, 0x8B, bytes([2, 1, 1])),
    ]


def test_repeated_corruption_raises_frame_error_promptly(
    sim: R2000Simulator, reader: R2000Reader
) -> None:
    sim.add_tag("1234", {1: -50})
    sim.corrupt_next_reply(opcode=0x8B)  # the tag frame of the first attempt...
    sim.corrupt_next_reply(opcode=0x8B, after=1)  # ...and of the redo (not the end frame)
    started = time.monotonic()
    with pytest.raises(FrameError, match=r"stream to command 0x8B was damaged \(1 checksum err"):
        reader.inventory(1, 100, antennas=[1], target="A")
    assert time.monotonic() - started < MARGIN_S
    assert set(reader.inventory(1, 100, antennas=[1]).tags) == {"1234"}  # the link recovers


def test_truncated_end_frame_is_a_clear_frame_error(
    sim: R2000Simulator, reader: R2000Reader
) -> None:
    sim.add_tag("ABCD", {1: -50})
    sim.truncate_next_reply(times=2, opcode=0x8B, after=1)  # after the tag frame: the end
    started = time.monotonic()
    with pytest.raises(FrameError, match=r"incomplete reply to command 0x8B: got 9 of 12"):
        reader.inventory(1, 100, antennas=[1], target="AB")
    elapsed = time.monotonic() - started
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + MARGIN_S  # tried, redone, gave up
    sim.truncate_next_reply(opcode=0x8B, after=1)  # once: the redo succeeds
    assert set(reader.inventory(1, 100, antennas=[1], target="AB").tags) == {"ABCD"}


def test_dropped_reply_times_out_promptly(sim: R2000Simulator, reader: R2000Reader) -> None:
    sim.add_tag("CAFE", {1: -50})
    sim.drop_next_reply(opcode=0x74)
    started = time.monotonic()
    with pytest.raises(ReaderTimeout, match=r"no reply to command 0x74 within 0\.30s"):
        reader.inventory(1, 100)
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert set(reader.inventory(1, 100).tags) == {"CAFE"}


def test_reboot_mid_scan_times_out_and_loses_the_settings(sim: R2000Simulator) -> None:
    sim.set_tags({f"B007{i:04X}": {1: -50} for i in range(20)})
    with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1) as r:
        r.configure([1, 2], 27, "EU", 2)
        r.inventory(1, 100, antennas=[2])
        assert sim.config["work_antenna"] == 1 and sim.config["temp_power"] == 27
        sim.inject_reboot(opcode=0x8B, after=5)
        started = time.monotonic()
        with pytest.raises(ReaderTimeout, match="stopped after 5 frames without an end-of-run"):
            r.inventory(1, 100, antennas=[1], target="A")
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert sim.config["work_antenna"] == 0 and sim.config["temp_power"] is None


def test_scenario_faults_on_read_commands() -> None:
    scenario = Scenario(
        antenna_ports=4,
        seed=1,
        faults=[FaultSpec("drop", on_read=2), FaultSpec("corrupt", on_read=3)],
    )
    with R2000Simulator(scenario=scenario) as sim:
        sim.add_tag("AAAA", {1: -50})
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S, address=1) as r:
            r.configure([1], 27, "EU", 0)
            assert set(r.inventory(1, 100, target="A").tags) == {"AAAA"}  # read 1
            with pytest.raises(ReaderTimeout, match="no reply to command 0x8B"):
                r.inventory(1, 100, target="A")  # read 2: dropped
            # Read 3 is corrupted (its only tag frame is lost) and redone as read 4,
            # with the same target: at S0 the flag was reset when the RF came on again.
            result = r.inventory(1, 100, target="A")
            assert r.checksum_errors == 1 and result.complete
            assert seen(result) == {"AAAA": [1]}
        assert sim.rf.read_commands == 4


def test_unplug_gives_reader_error(sim: R2000Simulator, reader: R2000Reader) -> None:
    sim.add_tag("D00D", {1: -50})
    sim.unplug()
    started = time.monotonic()
    with pytest.raises(ReaderError, match="serial link .* failed") as exc:
        reader.inventory(1, 100)
    assert not isinstance(exc.value, ReaderTimeout | FrameError)
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    with pytest.raises(ReaderError, match="not open .*link failed"):
        reader.inventory(1, 100)


def test_scenario_unplug_mid_scan() -> None:
    scenario = Scenario(seed=1, faults=[FaultSpec("unplug", on_read=3)])
    with R2000Simulator(scenario=scenario) as sim:
        sim.add_tag("AAAA", {2: -50})
        with R2000Reader(sim.port, timeout_s=TIMEOUT_S) as r:
            r.configure([1, 2, 3], 27, "EU", 2)
            started = time.monotonic()
            with pytest.raises(ReaderError, match="serial link .* failed"):
                r.inventory(1, 100, target="A")
            assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
        assert sim.errors == []


def test_open_on_a_missing_port() -> None:
    r = R2000Reader("/dev/does-not-exist-smartcab", timeout_s=TIMEOUT_S)
    with pytest.raises(ReaderError, match="cannot open serial port '/dev/does-not-exist"):
        r.open()


# ----------------------------------------------------------------- simulator at the wire


def test_simulator_answers_raw_frames(sim: R2000Simulator) -> None:
    parser = R2000Parser()
    with serial.Serial(sim.port, 115200, timeout=TIMEOUT_S) as port:

        def ask(raw: bytes) -> list[tuple[int, bytes]]:
            port.write(raw)
            got: list[tuple[int, bytes]] = []
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                got += [(f.cmd, f.data) for f in parser.feed(port.read(port.in_waiting or 1))]
            return got

        assert ask(bytes.fromhex("A0 04 01 74 00 E7")) == [(0x74, b"\x10")]
        assert ask(build_frame(1, 0x74, b"\x08")) == [(0x74, b"\x47")]  # 8-port: IDs 0..7
        assert ask(build_frame(1, 0x6C, b"\x01")) == [(0x6C, b"\x11")]  # no groups on 8 ports
        assert ask(build_frame(1, 0x55)) == [(0x55, b"\x11")]  # unknown command
        assert ask(build_frame(1, 0x78, bytes([2, 0, 9]))) == [(0x78, b"\x49")]
        assert ask(build_frame(7, 0x72)) == []  # another reader's address
        assert ask(build_frame(1, 0x72)[:-1] + b"\x00") == []  # bad checksum: no answer
        sim.add_tag("E2801160600002000A1B2C3D", {1: -55})
        frames = ask(bytes.fromhex("A0 04 01 89 01 D1"))
        assert [len(d) for _, d in frames] == [16, 7]  # one tag frame, then the end
        assert frames[1][1][:1] == b"\x00"  # AntID 0
        assert int.from_bytes(frames[1][1][3:7], "big") == 1  # total reads
    assert parser.checksum_errors == 0


# ----------------------------------------------------------------- registry


def test_open_reader_registry(sim: R2000Simulator) -> None:
    assert PROTOCOLS["r2000"] is R2000Reader
    r = open_reader("R2000", sim.port, timeout_s=TIMEOUT_S, antenna_ports=8, mode="realtime")
    assert isinstance(r, R2000Reader) and r.mode == "realtime"
    with r:
        assert r.info is not None and r.info.antenna_ports == 8
    with pytest.raises(TypeError):
        open_reader("r2000", sim.port, colour="red")
