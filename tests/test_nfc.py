"""Badge reader against the wire-level simulator (nfcpy udp driver on both sides)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import nfc
import pytest

from readers.nfc import BadgeReader, BadgeSimulator, free_udp_port

pytestmark = pytest.mark.timeout(60)

# A new card is found within one udp poll (nfcpy's udp reader waits 1 s per SENS_REQ), so
# 3 s is a generous "it did not hang" bound, not a latency requirement.
REPORT_BOUND_S = 3.0
# Long enough that no card runs out before the reader finds it; tests remove() it earlier.
HOLD_S = 6.0

TT2_4 = "A1B2C3D4"
TT2_7_NXP = "04A1B2C3D4E5F6"
TT4A_4 = "5A6B7C8D"
TT4A_7 = "04112233445566"


class Recorder:
    """on_badge callback that records UIDs and lets a test wait for a count."""

    def __init__(self, fail_first: int = 0) -> None:
        self.uids: list[str] = []
        self.times: list[float] = []
        self.calls = 0
        self._fail_first = fail_first
        self._cond = threading.Condition()

    def __call__(self, uid: str) -> None:
        with self._cond:
            self.calls += 1
            self.uids.append(uid)
            self.times.append(time.monotonic())
            self._cond.notify_all()
            if self.calls <= self._fail_first:
                raise RuntimeError("on_badge blew up (on purpose)")

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.uids) >= count, timeout)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition that has no event of its own (e.g. a status string)."""
    end = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= end:
            return False
        pause.wait(0.01)
    return True


@pytest.fixture
def port() -> int:
    return free_udp_port()


@pytest.fixture
def sim(port: int) -> Iterator[BadgeSimulator]:
    simulator = BadgeSimulator(port)
    yield simulator
    simulator.close()


@pytest.fixture
def make_reader() -> Iterator[Callable[..., BadgeReader]]:
    started: list[BadgeReader] = []

    def make(path: str, on_badge: Callable[[str], None], **kwargs: float) -> BadgeReader:
        reader = BadgeReader(path, on_badge, **kwargs)
        reader.start()
        started.append(reader)
        return reader

    yield make
    for reader in started:
        assert reader.stop(timeout=3.0), f"reader on {reader.path} did not stop"


@pytest.fixture
def ready_reader(
    port: int, make_reader: Callable[..., BadgeReader]
) -> Callable[..., tuple[BadgeReader, Recorder]]:
    def make(**kwargs: float) -> tuple[BadgeReader, Recorder]:
        recorder = Recorder()
        reader = make_reader(f"udp:localhost:{port}", recorder, **kwargs)
        assert wait_until(lambda: reader.status == "ready", 2.0), reader.status
        return reader, recorder

    return make


def tap(sim: BadgeSimulator, recorder: Recorder, uid: str, kind: str, linger: float) -> None:
    """Present a card until it is reported, keep holding it for `linger`, then lift it.

    While it lingers no second report may arrive (the reader keeps re-reading a held card).
    """
    expected = len(recorder.uids) + 1
    sim.present(uid, kind, seconds=HOLD_S)
    assert recorder.wait_for(expected, REPORT_BOUND_S), f"{kind} {uid} was not reported"
    assert recorder.uids[-1] == uid
    assert not recorder.wait_for(expected + 1, linger), f"held {uid} reported again"
    assert sim.remove()


@pytest.mark.parametrize(
    ("uid", "kind", "tag_type"),
    [
        (TT2_4, "tt2", "4-byte Type 2"),
        (TT2_7_NXP, "tt2", "7-byte NXP Type 2"),
        (TT4A_4, "tt4a", "4-byte Type 4A"),
        (TT4A_7, "tt4a", "7-byte Type 4A"),
    ],
    ids=["tt2-uid4", "tt2-uid7-nxp", "tt4a-uid4", "tt4a-uid7"],
)
def test_presented_card_is_reported_exactly_once(
    sim: BadgeSimulator,
    ready_reader: Callable[..., tuple[BadgeReader, Recorder]],
    uid: str,
    kind: str,
    tag_type: str,
) -> None:
    reader, recorder = ready_reader()  # default 3 s hold-off
    sim.present(uid.lower(), kind, seconds=HOLD_S)  # lower-case in, upper-case out
    assert recorder.wait_for(1, REPORT_BOUND_S), f"{tag_type} {uid} not reported"
    # Keep holding: the reader re-activates the card every poll but must not report again.
    assert not recorder.wait_for(2, 0.6)
    assert sim.remove()
    assert recorder.uids == [uid]
    assert reader.status == "ready"


def test_tap_latency(
    sim: BadgeSimulator, ready_reader: Callable[..., tuple[BadgeReader, Recorder]]
) -> None:
    _, recorder = ready_reader()
    cards = [(TT2_4, "tt2"), (TT4A_4, "tt4a"), (TT2_7_NXP, "tt2")]
    idle_samples = []
    for i, (uid, kind) in enumerate(cards):
        # Empty field first (no phantom reports), for a different time each round so the
        # taps land at different points of the reader's poll cycle.
        assert not recorder.wait_for(i + 1, 0.5 + 0.35 * i), "report with no card present"
        presented = time.monotonic()
        sim.present(uid, kind, seconds=HOLD_S)
        assert recorder.wait_for(i + 1, REPORT_BOUND_S)
        idle_samples.append(recorder.times[i] - presented)
        assert sim.remove()
    # A card swap: the next card arrives while the reader is still polling actively.
    presented = time.monotonic()
    sim.present(TT4A_7, "tt4a", seconds=HOLD_S)
    assert recorder.wait_for(len(cards) + 1, REPORT_BOUND_S)
    swap_sample = recorder.times[-1] - presented
    assert sim.remove()
    print(
        "\ntap -> on_badge latency over udp: idle reader "
        + ", ".join(f"{s * 1000:.0f} ms" for s in idle_samples)
        + f"; card swap {swap_sample * 1000:.0f} ms"
    )
    assert recorder.uids == [uid for uid, _ in cards] + [TT4A_7]


def test_held_card_does_not_storm(
    make_reader: Callable[..., BadgeReader],
) -> None:
    # Independent reader/simulator pairs run side by side to save time, a Type 2 and a
    # Type 4A card each with the hold-off under test and with none. The no-hold-off control
    # pairs show that a held card really is re-read all the time, so the single report of
    # the others is de-duplication at work, not a reader gone quiet.
    holdoff = 0.8
    hold = 3.5  # > 4 hold-off windows
    pairs = []
    for uid, kind in [(TT2_4, "tt2"), (TT4A_4, "tt4a")]:
        for holdoff_s in (holdoff, 0.0):
            port = free_udp_port()
            recorder = Recorder()
            reader = make_reader(f"udp:localhost:{port}", recorder, holdoff_s=holdoff_s)
            pairs.append((uid, kind, holdoff_s, BadgeSimulator(port), reader, recorder))
    try:
        for uid, kind, _, sim, reader, _ in pairs:
            assert wait_until(lambda r=reader: r.status == "ready", 2.0)
            sim.present(uid, kind, seconds=hold)
        for *_, sim, _, _ in pairs:
            assert sim.wait_done(hold + 2.0)
    finally:
        for *_, sim, _, _ in pairs:
            sim.close()
    for uid, kind, holdoff_s, _, _, recorder in pairs:
        if holdoff_s:
            # Designed behaviour: a card that stays in the field is reported once.
            assert recorder.uids == [uid], kind
        else:
            assert set(recorder.uids) == {uid}
            assert len(recorder.uids) >= 10, f"{kind} control saw only {len(recorder.uids)}"
            # No lost polls while held (a lost one costs nfcpy's udp reader a full second).
            gaps = [b - a for a, b in zip(recorder.times, recorder.times[1:], strict=False)]
            assert max(gaps) < 0.5, f"{kind}: {max(gaps):.2f} s without a read while held"


def test_card_is_reported_again_after_being_away(
    sim: BadgeSimulator, ready_reader: Callable[..., tuple[BadgeReader, Recorder]]
) -> None:
    _, recorder = ready_reader(holdoff_s=0.5)
    tap(sim, recorder, TT2_4, "tt2", linger=0.2)
    # Away for longer than the hold-off: the next tap is a new tap.
    assert not recorder.wait_for(2, 0.7)
    tap(sim, recorder, TT2_4, "tt2", linger=0.2)
    assert recorder.uids == [TT2_4, TT2_4]


def test_two_cards_in_a_row_are_reported_in_order(
    sim: BadgeSimulator, ready_reader: Callable[..., tuple[BadgeReader, Recorder]]
) -> None:
    _, recorder = ready_reader()
    tap(sim, recorder, TT2_4, "tt2", linger=0.2)
    tap(sim, recorder, TT4A_7, "tt4a", linger=0.2)
    assert recorder.uids == [TT2_4, TT4A_7]


def test_ten_alternating_taps_are_all_reported(
    sim: BadgeSimulator, ready_reader: Callable[..., tuple[BadgeReader, Recorder]]
) -> None:
    holdoff = 0.3
    _, recorder = ready_reader(holdoff_s=holdoff)
    cards = [(TT2_7_NXP, "tt2"), (TT4A_4, "tt4a")]
    expected = []
    for i in range(10):
        uid, kind = cards[i % 2]
        # Lingering past the hold-off also keeps the *other* card away long enough for its
        # next tap to count as new.
        tap(sim, recorder, uid, kind, linger=holdoff + 0.05)
        expected.append(uid)
    assert recorder.uids == expected


def test_on_badge_exception_is_not_fatal(
    sim: BadgeSimulator,
    port: int,
    make_reader: Callable[..., BadgeReader],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="readers.nfc.badge")
    recorder = Recorder(fail_first=1)
    reader = make_reader(f"udp:localhost:{port}", recorder)
    assert wait_until(lambda: reader.status == "ready", 2.0)
    sim.present(TT2_4, "tt2", seconds=HOLD_S)
    assert recorder.wait_for(1, REPORT_BOUND_S)
    assert sim.remove()
    tap(sim, recorder, TT4A_4, "tt4a", linger=0.1)
    assert recorder.uids == [TT2_4, TT4A_4]
    assert reader.status == "ready"
    logged = [r for r in caplog.records if r.name == "readers.nfc.badge"]
    assert any("on_badge" in r.getMessage() and r.exc_info for r in logged)


@pytest.mark.parametrize("failure", ["returns-false", "raises"])
def test_reader_recovers_when_the_frontend_fails(
    sim: BadgeSimulator,
    port: int,
    make_reader: Callable[..., BadgeReader],
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    real_connect = nfc.ContactlessFrontend.connect
    failed = threading.Event()

    def flaky_connect(self: nfc.ContactlessFrontend, **options: object) -> object:
        if not failed.is_set():
            failed.set()
            if failure == "raises":
                raise OSError(5, "Input/output error")
            return False  # what connect() returns after swallowing a device IOError
        return real_connect(self, **options)

    monkeypatch.setattr(nfc.ContactlessFrontend, "connect", flaky_connect)
    recorder = Recorder()
    reader = make_reader(f"udp:localhost:{port}", recorder, retry_s=0.3)
    assert wait_until(lambda: reader.status.startswith("error: "), 2.0), reader.status
    assert wait_until(lambda: reader.status == "ready", 2.0), reader.status
    tap(sim, recorder, TT2_4, "tt2", linger=0.1)
    assert recorder.uids == [TT2_4]


@pytest.mark.parametrize("path", ["usb:ffff:ffff", "tty:doesnotexist:pn532"])
def test_missing_device_gives_error_status_and_stops_promptly(
    path: str, make_reader: Callable[..., BadgeReader]
) -> None:
    reader = make_reader(path, Recorder(), retry_s=0.1)
    assert wait_until(lambda: reader.status.startswith("error: "), 2.0), reader.status
    assert path in reader.status
    # Still retrying, not crashed, several retry periods later.
    assert not wait_until(lambda: not reader.status.startswith("error: "), 0.4)
    started = time.monotonic()
    assert reader.stop(timeout=2.0)
    assert time.monotonic() - started < 0.5


def test_idle_udp_reader_stops_within_one_poll(
    port: int, make_reader: Callable[..., BadgeReader]
) -> None:
    reader = make_reader(f"udp:localhost:{port}", Recorder())
    assert wait_until(lambda: reader.status == "ready", 2.0)
    started = time.monotonic()
    assert reader.stop(timeout=3.0)
    assert time.monotonic() - started < 1.5  # at most one 1 s udp sense attempt


@pytest.mark.parametrize(
    ("uid", "message"),
    [
        ("XYZ12345", "hexadecimal"),
        ("A1B2C3", "4 or 7 bytes"),
        ("A1B2C3D4E5", "4 or 7 bytes"),
        ("A1B2C3D", "even number"),
        ("", "hexadecimal"),
        ("A1:B2:C3:D4", "hexadecimal"),
        ("88B2C3D4", "cascade tag"),
    ],
)
def test_present_rejects_bad_uid(sim: BadgeSimulator, uid: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sim.present(uid)
    assert sim.wait_done(0)  # nothing was started


def test_present_rejects_bad_kind_and_duration(sim: BadgeSimulator) -> None:
    with pytest.raises(ValueError, match="kind"):
        sim.present(TT2_4, kind="tt3")
    with pytest.raises(ValueError, match="seconds"):
        sim.present(TT2_4, seconds=0)
    with pytest.raises(ValueError, match="seconds"):
        sim.present(TT2_4, seconds=float("nan"))
    with pytest.raises(TypeError):
        sim.present(0xA1B2C3D4)  # type: ignore[arg-type]


def test_present_refuses_a_second_card_and_a_taken_port(port: int) -> None:
    with BadgeSimulator(port) as simulator:
        simulator.present(TT2_4, seconds=HOLD_S)
        with pytest.raises(RuntimeError, match="already presented"):
            simulator.present(TT4A_4, "tt4a")
        assert simulator.remove()
        assert simulator.wait_done(0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("0.0.0.0", port))
        with BadgeSimulator(port) as simulator, pytest.raises(RuntimeError, match=str(port)):
            simulator.present(TT2_4)


def test_constructors_reject_bad_arguments() -> None:
    path = f"udp:localhost:{free_udp_port()}"
    with pytest.raises(ValueError, match="path"):
        BadgeReader("", lambda uid: None)
    with pytest.raises(TypeError, match="callable"):
        BadgeReader(path, "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holdoff_s"):
        BadgeReader(path, lambda uid: None, holdoff_s=-1)
    with pytest.raises(ValueError, match="retry_s"):
        BadgeReader(path, lambda uid: None, retry_s=0)
    with pytest.raises(ValueError, match="port"):
        BadgeSimulator(70000)
    # nfcpy's udp driver cannot open ports that /etc/services names (e.g. 22 "ssh").
    named = next(
        p
        for p in range(1, 65536)
        if not socket.getnameinfo(("127.0.0.1", p), socket.NI_NUMERICHOST)[1].isdigit()
    )
    with pytest.raises(ValueError, match="service name"):
        BadgeSimulator(named)
    with pytest.raises(ValueError, match="service name"):
        BadgeReader(f"udp:localhost:{named}", lambda uid: None)
    with pytest.raises(ValueError, match="port number"):
        BadgeReader("udp:localhost:abc", lambda uid: None)
    with pytest.raises(ValueError, match="host"):
        BadgeSimulator(free_udp_port(), host="no-such-host.invalid")


@pytest.mark.parametrize(("uid", "kind"), [(TT2_7_NXP, "tt2"), (TT4A_4, "tt4a")])
def test_emulated_card_answers_reader_commands(sim: BadgeSimulator, uid: str, kind: str) -> None:
    # Plain nfcpy as the reader: activation, then the commands a reader sends to a held
    # card (Type 2 page READ, presence checks for both types).
    sim.present(uid, kind, seconds=HOLD_S)
    clf = nfc.ContactlessFrontend(f"udp:localhost:{sim.port}")
    give_up = time.monotonic() + REPORT_BOUND_S
    try:
        tag = clf.connect(
            rdwr={"targets": ["106A"], "on-connect": lambda tag: False, "iterations": 1},
            terminate=lambda: time.monotonic() > give_up,
        )
        assert tag, "card not activated"
        assert tag.identifier.hex().upper() == uid
        if kind == "tt2":
            pages = tag.read(0)
            assert len(pages) == 16
            assert pages[0:3] == bytes.fromhex(uid)[0:3]  # NXP layout: UID0-2, BCC0
            assert pages[12] == 0xE1  # capability container: NDEF magic number
        assert tag.is_present
        assert sim.remove()
        assert not tag.is_present
    finally:
        clf.close()
