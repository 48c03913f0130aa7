"""R2000 "0xA0" codec: checksum, frames and fields against the frames quoted in rfid.md 1.2."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from readers.rfid.base import FrameError
from readers.rfid.r2000 import (
    COMMAND_SETS,
    MAX_DATA,
    R2000Frame,
    R2000Parser,
    build_frame,
    checksum,
    dbm_to_rssi,
    decode_antenna,
    encode_antenna,
    error_text,
    freq_index_to_khz,
    khz_to_freq_index,
    parse_tag_frame,
    rssi_to_dbm,
)

# Every frame quoted in research/rfid.md section 1.2 (1.2.1 check vectors, 1.2.3 the
# work-antenna success reply, 1.2.5 example frames), hex exactly as given there.
GET_VERSION = "A0 03 01 72 EA"
REALTIME_INVENTORY = "A0 04 01 89 01 D1"
WORK_ANTENNA_1 = "A0 04 01 74 00 E7"
SESSION_S1_TARGET_A = "A0 06 FF 8B 01 00 01 CE"
WORK_ANTENNA_OK = "A0 04 01 74 10 D7"
FAST_SWITCH_4 = "A0 0D 01 8A 00 01 01 01 02 01 03 01 00 01 BD"
FAST_SWITCH_8 = "A0 15 01 8A 00 01 01 01 02 01 03 01 04 01 05 01 06 01 07 01 00 01 9B"
TAG_ON_ANTENNA_6 = "A0 13 01 89 8D 30 00 E2 80 11 60 60 00 02 0A 1B 2C 3D 4E CB 2A"
FAST_SWITCH_END = "A0 0A 01 8A 00 00 FA 00 00 07 08 C2"
QUOTED = [
    GET_VERSION,
    REALTIME_INVENTORY,
    WORK_ANTENNA_1,
    SESSION_S1_TARGET_A,
    WORK_ANTENNA_OK,
    FAST_SWITCH_4,
    FAST_SWITCH_8,
    TAG_ON_ANTENNA_6,
    FAST_SWITCH_END,
]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# ----------------------------------------------------------------- checksum and building


@pytest.mark.parametrize("frame", QUOTED)
def test_checksum_matches_every_quoted_frame(frame: str) -> None:
    raw = h(frame)
    assert raw[0] == 0xA0 and raw[1] == len(raw) - 2
    assert checksum(raw[:-1]) == raw[-1]
    assert (sum(raw) & 0xFF) == 0  # two's complement: the whole frame sums to zero


def test_checksum_is_twos_complement_of_the_sum() -> None:
    assert checksum(b"") == 0
    assert checksum(b"\x01") == 0xFF
    assert checksum(h("A0 03 01 72")) == 0xEA
    assert checksum(bytes(range(256))) == (-sum(range(256))) & 0xFF


@pytest.mark.parametrize(
    ("address", "cmd", "data", "expected"),
    [
        (0x01, 0x72, "", GET_VERSION),
        (0x01, 0x89, "01", REALTIME_INVENTORY),
        (0x01, 0x74, "00", WORK_ANTENNA_1),
        (0xFF, 0x8B, "01 00 01", SESSION_S1_TARGET_A),
        (0x01, 0x74, "10", WORK_ANTENNA_OK),
        (0x01, 0x8A, "00 01 01 01 02 01 03 01 00 01", FAST_SWITCH_4),
        (0x01, 0x8A, "00 01 01 01 02 01 03 01 04 01 05 01 06 01 07 01 00 01", FAST_SWITCH_8),
        (0x01, 0x89, "8D 30 00 E2 80 11 60 60 00 02 0A 1B 2C 3D 4E CB", TAG_ON_ANTENNA_6),
        (0x01, 0x8A, "00 00 FA 00 00 07 08", FAST_SWITCH_END),
    ],
)
def test_build_frame_reproduces_quoted_frames(
    address: int, cmd: int, data: str, expected: str
) -> None:
    assert build_frame(address, cmd, h(data)) == h(expected)
    assert R2000Frame(address, cmd, h(data)).to_bytes() == h(expected)


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="cmd"):
        build_frame(1, 0x100)
    with pytest.raises(ValueError, match="address"):
        build_frame(-1, 0x72)
    with pytest.raises(ValueError, match=f"maximum is {MAX_DATA}"):
        build_frame(1, 0x89, bytes(MAX_DATA + 1))
    assert len(build_frame(1, 0x89, bytes(MAX_DATA))) == 0xFF + 2


def test_command_tables_per_firmware_variant() -> None:
    std, alt = COMMAND_SETS["standard"], COMMAND_SETS["alt87"]
    assert (std.real_time_inventory, std.fast_switch_inventory, std.session_inventory) == (
        0x89, 0x8A, 0x8B,
    )  # fmt: skip
    assert (alt.fast_switch_inventory, alt.session_inventory) == (0x87, 0x8A)
    assert std.set_work_antenna == alt.set_work_antenna == 0x74
    assert (std.set_temporary_power, std.set_output_power, std.set_antenna_group) == (
        0x66, 0x76, 0x6C,
    )  # fmt: skip


# ----------------------------------------------------------------- fields


def test_quoted_tag_frame_decodes_to_antenna_6_at_916_mhz() -> None:
    (frame,) = R2000Parser().feed(h(TAG_ON_ANTENNA_6))
    assert (frame.address, frame.cmd) == (0x01, 0x89)
    tag = parse_tag_frame(frame.data)
    assert tag.epc_hex == "E28011606000020A1B2C3D4E"
    assert tag.pc == 0x3000 and tag.phase is None
    assert tag.antenna == 6  # FreqAnt bits 01 + RSSI MSB set (ports 5-8)
    assert freq_index_to_khz(tag.frequency_index) == 916000
    assert tag.rssi == 0x4B - 130  # raw 75: table form below 90
    assert parse_tag_frame(frame.data, group=1).antenna == 14  # same frame in group 9-16


def test_tag_frame_with_phase_and_with_a_pc_that_lies() -> None:
    epc = h("300833B2DDD9014000000001")
    with_phase = bytes([0x1D]) + h("3000") + epc + bytes([0x50]) + h("0123")
    tag = parse_tag_frame(with_phase)
    assert (tag.epc, tag.phase, tag.antenna, tag.frequency_index) == (epc, 0x0123, 2, 7)
    # PC says 2 words but 6 follow: the checksummed frame length wins.
    lying = bytes([0x00]) + h("1000") + epc + bytes([0x50])
    assert parse_tag_frame(lying).epc == epc
    with pytest.raises(FrameError, match="at least 4"):
        parse_tag_frame(h("00 30 00"))


def test_rssi_table_form_round_trips() -> None:
    assert rssi_to_dbm(90) == -39 and rssi_to_dbm(89) == -41  # the datasheet's step
    assert rssi_to_dbm(0xCB) == -55  # the antenna high bit is not part of the RSSI
    for dbm in range(-128, -1):
        raw = dbm_to_rssi(dbm)
        assert 0 <= raw <= 0x7F
        assert rssi_to_dbm(raw) == (-39 if dbm == -40 else dbm)


def test_frequency_index_table() -> None:
    assert [freq_index_to_khz(i) for i in (0, 6, 7, 8, 59)] == [
        865000, 868000, 902000, 902500, 928000,
    ]  # fmt: skip
    for i in range(60):
        assert khz_to_freq_index(freq_index_to_khz(i)) == i
    with pytest.raises(ValueError):
        freq_index_to_khz(64)
    with pytest.raises(ValueError):
        khz_to_freq_index(915250)


def test_antenna_encoding_for_4_8_and_16_ports() -> None:
    for port in range(1, 17):
        low, high, group = encode_antenna(port)
        freq_ant, rssi_byte = (20 << 2) | low, (high << 7) | 60
        assert decode_antenna(freq_ant, rssi_byte, group) == port
    assert encode_antenna(4) == (3, 0, 0)
    assert encode_antenna(5) == (0, 1, 0)
    assert encode_antenna(9) == (0, 0, 1)
    assert encode_antenna(16) == (3, 1, 1)
    with pytest.raises(ValueError, match="1..16"):
        encode_antenna(17)


def test_error_text() -> None:
    assert error_text(0x22) == "antenna missing"
    assert error_text(0x10) == "success"
    assert error_text(0x99) == "unknown error"


# ----------------------------------------------------------------- parser


def test_parser_handles_byte_by_byte() -> None:
    parser = R2000Parser()
    out: list[R2000Frame] = []
    for b in h(TAG_ON_ANTENNA_6 + FAST_SWITCH_END):
        out += parser.feed(bytes([b]))
    assert [f.cmd for f in out] == [0x89, 0x8A]
    assert out[1].data == h("00 00 FA 00 00 07 08")
    assert parser.resyncs == 0 and parser.checksum_errors == 0


def test_parser_drops_bad_checksum_and_resyncs() -> None:
    bad = bytearray(h(TAG_ON_ANTENNA_6))
    bad[10] ^= 0x01
    parser = R2000Parser()
    frames = parser.feed(b"\x00\x13junk" + bytes(bad) + h(WORK_ANTENNA_OK))
    assert frames == [R2000Frame(0x01, 0x74, b"\x10")]
    assert parser.checksum_errors == 1
    assert parser.resyncs >= 2  # the junk, then the damaged frame


def test_parser_does_not_stall_behind_a_false_start() -> None:
    # "A0 40" in noise claims a 66-byte frame; the real one after it must still come out.
    parser = R2000Parser()
    assert parser.feed(h("A0 40") + h(GET_VERSION)) == [R2000Frame(0x01, 0x72, b"")]
    assert parser.buffered == 0


def test_parser_rejects_impossible_lengths_and_reports_partials() -> None:
    parser = R2000Parser()
    assert parser.feed(h("A0 02 A0 01") + h(GET_VERSION)) == [R2000Frame(0x01, 0x72, b"")]
    assert parser.resyncs == 4  # each impossible header, each junk byte run after it
    assert parser.feed(h(TAG_ON_ANTENNA_6)[:9]) == []
    assert parser.pending_frame == (9, 21)
    parser.reset()
    assert parser.pending_frame is None and parser.buffered == 0


# ----------------------------------------------------------------- properties

frames_st = st.builds(
    R2000Frame,
    address=st.integers(0, 255),
    cmd=st.integers(0, 255),
    data=st.binary(max_size=80),
)
junk = st.lists(st.one_of(st.just(0xA0), st.integers(0, 255)), max_size=12).map(bytes)
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _valid_frame_at(stream: bytes, i: int) -> bool:
    """Brute-force reference: does a complete checksum-valid frame start at ``i``?"""
    if i + 2 > len(stream) or stream[i] != 0xA0 or stream[i + 1] < 3:
        return False
    end = i + stream[i + 1] + 2
    return end <= len(stream) and checksum(stream[i : end - 1]) == stream[end - 1]


@PROPERTY_SETTINGS
@given(data=st.data(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_frames_split_anywhere_with_junk_parse_back(data, cuts: list[int]) -> None:
    frames = data.draw(st.lists(frames_st, max_size=6))
    stream = bytearray(data.draw(junk))
    starts = set()
    for frame in frames:
        starts.add(len(stream))
        stream += frame.to_bytes()
        stream += data.draw(junk)
    stream = bytes(stream)
    # Noise (or frame content) that happens to hold a checksum-valid frame is
    # indistinguishable from a real one (1 in 256 per candidate with an 8-bit check);
    # such inputs say nothing about the parser.
    assume(not any(_valid_frame_at(stream, i) for i in range(len(stream)) if i not in starts))

    parser = R2000Parser()
    out: list[R2000Frame] = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += parser.feed(stream[a:b])
    assert out == frames


@PROPERTY_SETTINGS
@given(chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    parser = R2000Parser()
    for chunk in chunks:
        for frame in parser.feed(chunk):
            assert len(frame.data) <= MAX_DATA
            assert frame.to_bytes()[0] == 0xA0
            try:
                parse_tag_frame(frame.data)
            except FrameError:
                pass  # a clear error is fine; anything else is a bug
    assert parser.checksum_errors >= 0 and parser.resyncs >= 0
    assert parser.buffered <= sum(map(len, chunks))
