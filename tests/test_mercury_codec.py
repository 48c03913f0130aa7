"""Mercury codec: CRC, frame building and parsing against captured/quoted frames."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from readers.rfid.base import FrameError
from readers.rfid.mercury import (
    MAX_COMMAND_DATA,
    MAX_REPLY_DATA,
    Frame,
    FrameParser,
    TagRecord,
    build_command,
    build_reply,
    build_tag_buffer_reply_data,
    crc,
    decode_antenna,
    encode_antenna,
    encode_tag_record,
    gen2_crc,
    parse_tag_buffer,
    status_text,
)

# Every frame quoted in research/rfid.md section 1.1.3 (verification vectors, incl. the
# two M5e manual examples) and 1.1.9 (emulator examples), hex exactly as given there.
VECTORS_1_1_3 = [
    "FF 00 03 1D 0C",
    "FF 00 2A 1D 25",
    "FF 03 91 02 01 01 42 C5",
    "FF 05 22 00 00 13 01 F4 2B 19",
    "FF 07 22 00 00 00 00 13 00 00 00 01 8B 58",
    "FF 03 29 01 FF 00 1B 03",
    "FF 1E 29 00 00 01 FF 00 01 11 DD 11 0E 08 30 00 00 00 08 00 00 05 00 00 0F 00 40 10 00 "
    "59 6F 59 6F F3 13 16 C0",
    "FF 10 2F 00 00 01 22 00 00 05 07 22 10 00 1B 03 E8 01 FF DD 2B",
    "FF 01 97 0D 4B B0",
    "FF 02 92 0A 8C 4B D5",
    "FF 04 06 00 01 C2 00 A4 60",
    "FF 04 9B 05 01 01 00 A2 FD",
    "FF 04 22 00 01 03 E8 3F 8E",
    "FF 01 22 00 00 02 46 BA",
]
SEARCH_LIST_1_8 = "FF 11 91 02 01 01 02 02 03 03 04 04 05 05 06 06 07 07 08 08 AD 68"
PER_PORT_POWER = "FF 0F 91 04 01 09 C4 09 C4 00 00 02 09 C4 09 C4 00 00 9D A1"
SESSION_S2 = "FF 03 9B 05 00 02 DC EA"
TARGET_AB = "FF 04 9B 05 01 00 00 A3 FD"
READ_MULTIPLE_1000 = "FF 05 22 00 00 13 03 E8 29 05"
GET_BUFFER_0007 = "FF 03 29 00 07 00 F3 22"
TWO_RECORD_REPLY = (
    "FF 2E 29 00 00 00 07 00 02 03 CC 11 00 80 30 00 E2 80 11 60 60 00 02 0A 1B 2C 3D 4E F4 D0 "
    "01 BD 33 00 80 30 00 30 08 33 B2 DD D9 01 40 00 00 00 01 29 9A 33 1E"
)
EMPTY_INVENTORY = "FF 00 22 04 00 84 E0"
VECTORS_1_1_9 = [
    SEARCH_LIST_1_8,
    PER_PORT_POWER,
    SESSION_S2,
    TARGET_AB,
    READ_MULTIPLE_1000,
    GET_BUFFER_0007,
    TWO_RECORD_REPLY,
    EMPTY_INVENTORY,
]
ONE_RECORD_REPLY = VECTORS_1_1_3[6]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# ----------------------------------------------------------------- CRC


@pytest.mark.parametrize("frame", VECTORS_1_1_3 + VECTORS_1_1_9)
def test_crc_matches_every_quoted_frame(frame: str) -> None:
    raw = h(frame)
    assert raw[0] == 0xFF
    assert crc(raw[1:-2]) == int.from_bytes(raw[-2:], "big")


def test_crc_rejects_the_manual_typo_frame() -> None:
    # The research notes flag this M5e manual example as wrong: A7 03 is correct.
    raw = h("FF 04 61 00 00 01 01 00 01 A7 02")
    assert crc(raw[1:-2]) == 0xA703
    assert crc(raw[1:-2]) != int.from_bytes(raw[-2:], "big")


def test_crc_is_not_ccitt_false() -> None:
    # CRC-16/CCITT-FALSE of "123456789" is 0x29B1; the ThingMagic variant differs.
    assert crc(b"123456789") != 0x29B1
    assert crc(b"") == 0xFFFF


def test_gen2_tag_crc() -> None:
    assert gen2_crc(h("10 00 59 6F 59 6F")) == 0xF313
    # CRC-16/GENIBUS check value.
    assert gen2_crc(b"123456789") == 0xD64E


# ----------------------------------------------------------------- building


@pytest.mark.parametrize(
    ("opcode", "data", "expected"),
    [
        (0x03, "", "FF 00 03 1D 0C"),
        (0x2A, "", "FF 00 2A 1D 25"),
        (0x91, "02" + "".join(f"{p:02X}{p:02X}" for p in range(1, 9)), SEARCH_LIST_1_8),
        (0x91, "04 01 09C4 09C4 0000 02 09C4 09C4 0000", PER_PORT_POWER),
        (0x9B, "05 00 02", SESSION_S2),
        (0x9B, "05 01 0000", TARGET_AB),
        (0x22, "00 0013 03E8", READ_MULTIPLE_1000),
        (0x22, "00 0013 01F4", "FF 05 22 00 00 13 01 F4 2B 19"),
        (0x29, "0007 00", GET_BUFFER_0007),
        (0x97, "0D", "FF 01 97 0D 4B B0"),
        (0x92, (2700).to_bytes(2, "big").hex(), "FF 02 92 0A 8C 4B D5"),
    ],
)
def test_build_command_reproduces_quoted_frames(opcode: int, data: str, expected: str) -> None:
    assert build_command(opcode, h(data)) == h(expected)


def test_build_reply_reproduces_quoted_replies() -> None:
    assert build_reply(0x22, 0x0400) == h(EMPTY_INVENTORY)
    assert build_reply(0x22, 0, h("00 0013 00000001")) == h(VECTORS_1_1_3[4])
    assert build_reply(0x29, 0, h(TWO_RECORD_REPLY)[5:-2]) == h(TWO_RECORD_REPLY)


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="opcode"):
        build_command(0x100)
    with pytest.raises(ValueError, match="maximum is 250"):
        build_command(0x22, bytes(MAX_COMMAND_DATA + 1))
    with pytest.raises(ValueError, match="maximum is 248"):
        build_reply(0x29, 0, bytes(MAX_REPLY_DATA + 1))
    with pytest.raises(ValueError, match="status"):
        build_reply(0x29, 0x10000)
    assert len(build_command(0x22, bytes(MAX_COMMAND_DATA))) == 255
    assert len(build_reply(0x29, 0, bytes(MAX_REPLY_DATA))) == 255


def test_tag_records_rebuild_the_quoted_two_record_reply() -> None:
    epc1, epc2 = h("E28011606000020A1B2C3D4E"), h("300833B2DDD9014000000001")
    records = [
        encode_tag_record(
            TagRecord(epc=epc, pc=0x3000, tag_crc=gen2_crc(b"\x30\x00" + epc), read_count=n,
                      rssi=rssi, antenna_byte=encode_antenna(ant)),
            0x0007,
        )
        for epc, n, rssi, ant in [(epc1, 3, -52, 1), (epc2, 1, -67, 3)]
    ]  # fmt: skip
    data = build_tag_buffer_reply_data(0x0007, records)
    assert build_reply(0x29, 0, data) == h(TWO_RECORD_REPLY)


def test_antenna_byte_encoding() -> None:
    assert encode_antenna(1) == 0x11
    assert encode_antenna(3) == 0x33
    assert encode_antenna(15) == 0xFF
    assert encode_antenna(16) == 0x00  # port 16 wraps to nibble 0
    for port in range(1, 17):
        assert decode_antenna(encode_antenna(port)) == port
    with pytest.raises(ValueError, match="1..16"):
        encode_antenna(17)


def test_status_text() -> None:
    assert status_text(0x0503) == "antenna not connected"
    assert status_text(0x0400) == "no tags found"
    assert status_text(0x0423) == "Gen2 tag error"
    assert status_text(0x1234) == "unknown status"


# ----------------------------------------------------------------- parsing


def test_parser_decodes_the_two_record_reply() -> None:
    parser = FrameParser()
    frames = parser.feed(h(TWO_RECORD_REPLY))
    assert len(frames) == 1
    assert (frames[0].opcode, frames[0].status) == (0x29, 0)
    records = parse_tag_buffer(frames[0].data, expect_flags=0x0007)
    assert [r.epc_hex for r in records] == ["E28011606000020A1B2C3D4E", "300833B2DDD9014000000001"]
    assert [r.rssi for r in records] == [-52, -67]
    assert [r.antenna for r in records] == [1, 3]
    assert [r.read_count for r in records] == [3, 1]
    assert all(r.crc_ok for r in records)
    assert parser.crc_errors == 0 and parser.resyncs == 0


def test_parser_decodes_the_real_01ff_record() -> None:
    frames = FrameParser().feed(h(ONE_RECORD_REPLY))
    assert len(frames) == 1
    (rec,) = parse_tag_buffer(frames[0].data, expect_flags=0x01FF)
    assert rec.epc_hex == "596F596F"
    assert (rec.read_count, rec.rssi, rec.antenna) == (17, -35, 1)
    assert (rec.frequency_khz, rec.timestamp_ms, rec.protocol, rec.gpio) == (919600, 8, 5, 0x0F)
    assert rec.pc == 0x1000 and rec.tag_crc == 0xF313 and rec.crc_ok


def test_parser_handles_byte_by_byte_and_commands() -> None:
    parser = FrameParser(replies=False)
    out: list[Frame] = []
    for b in h("FF FF FF FF FF FF FF FF" + SESSION_S2 + READ_MULTIPLE_1000):
        out += parser.feed(bytes([b]))
    assert out == [Frame(0x9B, None, h("05 00 02")), Frame(0x22, None, h("00 0013 03E8"))]
    assert parser.resyncs == 0  # a wake-up preamble is not noise


def test_parser_drops_bad_crc_and_resyncs() -> None:
    bad = bytearray(h(TWO_RECORD_REPLY))
    bad[20] ^= 0x01
    parser = FrameParser()
    frames = parser.feed(bytes(bad) + h(EMPTY_INVENTORY))
    assert frames == [Frame(0x22, 0x0400, b"")]
    assert parser.crc_errors == 1
    assert parser.resyncs >= 1


def test_parser_does_not_stall_behind_a_false_start() -> None:
    # "FF 30" in noise claims a 55-byte frame; the real one after it must still come out.
    parser = FrameParser()
    assert parser.feed(h("12 FF 30") + h(EMPTY_INVENTORY)) == [Frame(0x22, 0x0400, b"")]
    assert parser.buffered == 0


def test_parser_reports_a_pending_partial_frame() -> None:
    parser = FrameParser()
    assert parser.feed(h(TWO_RECORD_REPLY)[:10]) == []
    assert parser.pending_frame == (10, 0x2E + 7)
    parser.reset()
    assert parser.pending_frame is None and parser.buffered == 0


def test_parse_tag_buffer_rejects_inconsistent_data() -> None:
    data = h(TWO_RECORD_REPLY)[5:-2]
    with pytest.raises(FrameError, match="too short"):
        parse_tag_buffer(data[:-3])
    with pytest.raises(FrameError, match="asked for 0x01FF"):
        parse_tag_buffer(data, expect_flags=0x01FF)
    with pytest.raises(FrameError, match="stray"):
        parse_tag_buffer(data + b"\x00")
    # PC announcing 8 words (16 bytes) in a 16-byte block (room for 12).
    bad_pc = data.replace(h("30 00 E2 80"), h("40 00 E2 80"))
    with pytest.raises(FrameError, match="PC 0x4000"):
        parse_tag_buffer(bad_pc)
    with pytest.raises(FrameError, match="unsupported metadata"):
        parse_tag_buffer(h("1000 00 00"))


# ----------------------------------------------------------------- properties

reply_frames = st.builds(
    Frame,
    opcode=st.integers(0, 255),
    status=st.integers(0, 0xFFFF),
    data=st.binary(max_size=MAX_REPLY_DATA),
)
command_frames = st.builds(
    Frame,
    opcode=st.integers(0, 255),
    status=st.none(),
    data=st.binary(max_size=MAX_COMMAND_DATA),
)
junk = st.lists(st.one_of(st.just(0xFF), st.integers(0, 255)), max_size=12).map(bytes)
PROPERTY_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _valid_frame_at(stream: bytes, i: int, replies: bool) -> bool:
    """Brute-force reference: does a complete CRC-valid frame start at ``i``?"""
    overhead, max_len = (7, MAX_REPLY_DATA) if replies else (5, MAX_COMMAND_DATA)
    if i + 2 > len(stream) or stream[i] != 0xFF or stream[i + 1] > max_len:
        return False
    end = i + stream[i + 1] + overhead
    return end <= len(stream) and crc(stream[i + 1 : end - 2]) == int.from_bytes(
        stream[end - 2 : end], "big"
    )


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    replies=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
)
def test_frames_split_anywhere_with_junk_parse_back(data, replies: bool, cuts: list[int]) -> None:
    frames = data.draw(st.lists(reply_frames if replies else command_frames, max_size=6))
    stream = bytearray(data.draw(junk))
    starts = set()
    for frame in frames:
        starts.add(len(stream))
        stream += frame.to_bytes()
        stream += data.draw(junk)
    stream = bytes(stream)
    # Noise that happens to contain a CRC-valid frame is indistinguishable from
    # a real frame (1 in 65536 per candidate); such inputs say nothing about the parser.
    assume(
        not any(_valid_frame_at(stream, i, replies) for i in range(len(stream)) if i not in starts)
    )

    parser = FrameParser(replies=replies)
    out: list[Frame] = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += parser.feed(stream[a:b])
    assert out == frames


@PROPERTY_SETTINGS
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), replies=st.booleans())
def test_random_bytes_never_raise(chunks: list[bytes], replies: bool) -> None:
    parser = FrameParser(replies=replies)
    for chunk in chunks:
        for frame in parser.feed(chunk):
            assert len(frame.data) <= (MAX_REPLY_DATA if replies else MAX_COMMAND_DATA)
            assert (frame.status is None) is (not replies)
    assert parser.crc_errors >= 0 and parser.resyncs >= 0
    assert parser.buffered <= sum(map(len, chunks))
