"""Tests for firmware/: cabinet I/O on gpiozero's MockFactory, pin factories, systemd notify."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from gpiozero import Device, GPIOPinInUse
from gpiozero.pins.mock import MockFactory, MockPin

import firmware
from firmware import (
    CabinetIO,
    DoorSensor,
    Indicator,
    Lock,
    SystemdNotifier,
    make_pin_factory,
    watchdog_interval_s,
)

# Plain GPIOs without fixed pulls (GPIO2/3 have board pull-ups on a real Pi and in the mock).
LOCK, DOOR, GREEN, RED, BUZZER = 17, 27, 22, 23, 24
DEBOUNCE = 0.05
# The door fixture's debounce: chatter/glitch tests need edges that are "quick" compared
# with it even when the machine is busy, so it gets a wider margin than DEBOUNCE.
DOOR_DEBOUNCE = 0.15
TIMEOUT = 3.0  # generous bound for anything that should happen "soon"


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll *predicate* until true or *timeout*; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.005)
    return True


def levels(pin: MockPin) -> list[bool]:
    """Every level the mock pin has had, oldest first."""
    return [s.state for s in pin.states]


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory()
    yield f
    f.reset()
    f.close()


@pytest.fixture
def closing() -> Iterator[Callable]:
    """Register objects to close after the test, even when it fails."""
    objs: list = []

    def add(obj):
        objs.append(obj)
        return obj

    yield add
    for obj in reversed(objs):
        obj.close()


@pytest.fixture
def door(factory: MockFactory, closing) -> tuple[DoorSensor, MockPin, queue.Queue]:
    """A door sensor that starts (debounced) closed, with reports going to a queue."""
    reports: queue.Queue = queue.Queue()
    sensor = closing(DoorSensor(DOOR, debounce_s=DOOR_DEBOUNCE, pin_factory=factory))
    pin = factory.pin(DOOR)
    # The pull-up drives the mock pin high (= open) on construction; close the door first.
    pin.drive_low()
    assert wait_until(lambda: not sensor.is_open)
    sensor.on_change = reports.put
    return sensor, pin, reports


def assert_no_report(reports: queue.Queue) -> None:
    # Absence can only be shown by waiting: several debounce periods is ample.
    with pytest.raises(queue.Empty):
        reports.get(timeout=DOOR_DEBOUNCE * 3)


# --- Lock -----------------------------------------------------------------------------------


def test_lock_is_locked_after_construction_and_close(factory: MockFactory) -> None:
    pin = factory.pin(LOCK)
    pin.drive_high()  # the pin happens to be high before we claim it (e.g. a pull-up)
    pin.clear_states()
    lock = Lock(LOCK, pin_factory=factory)
    assert pin.state is False
    assert lock.released is False
    lock.release(5)
    assert pin.state is True
    lock.close()
    assert pin.state is False
    assert lock.released is False
    lock.close()  # idempotent
    assert levels(pin) == [True, False, True, False]


def test_lock_release_pulse_ends_by_itself(factory: MockFactory, closing) -> None:
    lock = closing(Lock(LOCK, pin_factory=factory))
    pin = factory.pin(LOCK)
    start = time.monotonic()
    lock.release(0.2)
    assert pin.state is True and lock.released
    assert wait_until(lambda: pin.state is False)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert not lock.released
    assert levels(pin) == [False, True, False]
    assert 0.19 <= pin.states[2].timestamp < 1.0  # how long the relay was energised


def test_lock_active_low_inverts_levels(factory: MockFactory, closing) -> None:
    lock = closing(Lock(LOCK, active_high=False, pin_factory=factory))
    pin = factory.pin(LOCK)
    assert pin.state is True  # de-energised on an active-low relay board
    lock.release(0.1)
    assert pin.state is False and lock.released
    assert wait_until(lambda: pin.state is True)
    assert levels(pin)[-3:] == [True, False, True]
    lock.close()
    assert pin.state is True


def test_lock_secure_ends_pulse_early(factory: MockFactory, closing) -> None:
    lock = closing(Lock(LOCK, pin_factory=factory))
    pin = factory.pin(LOCK)
    lock.release(10)
    assert pin.state is True
    lock.secure()
    assert pin.state is False and not lock.released
    # The pulse thread has been stopped, so nothing can switch the relay back on.
    assert levels(pin) == [False, True, False]


def test_lock_new_release_restarts_pulse_without_gap(factory: MockFactory, closing) -> None:
    lock = closing(Lock(LOCK, pin_factory=factory))
    pin = factory.pin(LOCK)
    lock.release(0.3)
    time.sleep(0.15)  # part-way through the first pulse, on purpose
    lock.release(0.3)
    assert wait_until(lambda: pin.state is False)
    assert levels(pin) == [False, True, False]  # never dropped in between
    on_time = pin.states[2].timestamp
    assert on_time >= 0.4  # 0.15 + 0.3, not 0.3


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_lock_rejects_bad_release_time(factory: MockFactory, closing, bad: float) -> None:
    lock = closing(Lock(LOCK, pin_factory=factory))
    with pytest.raises(ValueError):
        lock.release(bad)
    assert factory.pin(LOCK).state is False


# --- DoorSensor -----------------------------------------------------------------------------


def test_door_closed_when_low_with_pull_up(factory: MockFactory, closing) -> None:
    reports: queue.Queue = queue.Queue()
    threads: list[threading.Thread] = []

    def on_change(is_open: bool) -> None:
        threads.append(threading.current_thread())
        reports.put(is_open)

    sensor = closing(
        DoorSensor(DOOR, debounce_s=DEBOUNCE, on_change=on_change, pin_factory=factory)
    )
    pin = factory.pin(DOOR)
    assert pin.state is True  # pulled up: switch open = door open
    assert sensor.is_open is True
    pin.drive_low()  # reed switch closes to GND
    assert reports.get(timeout=TIMEOUT) is False
    assert sensor.is_open is False
    pin.drive_high()
    assert reports.get(timeout=TIMEOUT) is True
    assert sensor.is_open is True
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_door_closed_when_high_polarity(factory: MockFactory, closing) -> None:
    reports: queue.Queue = queue.Queue()
    sensor = closing(
        DoorSensor(
            DOOR,
            closed_when_low=False,
            pull_up=False,
            debounce_s=DEBOUNCE,
            on_change=reports.put,
            pin_factory=factory,
        )
    )
    pin = factory.pin(DOOR)
    assert pin.state is False  # pulled down
    assert sensor.is_open is True
    pin.drive_high()
    assert reports.get(timeout=TIMEOUT) is False
    assert sensor.is_open is False


def test_door_chatter_then_stable_reports_once(door) -> None:
    sensor, pin, reports = door
    for _ in range(2):
        pin.drive_high()
        pin.drive_low()
    pin.drive_high()  # five edges, ending open
    assert reports.get(timeout=TIMEOUT) is True
    assert sensor.is_open is True
    assert_no_report(reports)


def test_door_chatter_ending_where_it_started_reports_nothing(door) -> None:
    sensor, pin, reports = door
    for _ in range(2):
        pin.drive_high()
        pin.drive_low()
    pin.drive_high()
    pin.drive_low()  # ends closed, as it began
    assert_no_report(reports)
    assert sensor.is_open is False


def test_door_glitch_shorter_than_debounce_is_ignored(door) -> None:
    sensor, pin, reports = door
    pin.drive_high()
    time.sleep(0.01)  # a real (short) glitch, well under the debounce time
    pin.drive_low()
    assert_no_report(reports)
    assert sensor.is_open is False
    # ...and the sensor is still live.
    pin.drive_high()
    assert reports.get(timeout=TIMEOUT) is True


def test_door_is_open_is_debounced(door) -> None:
    sensor, pin, reports = door
    pin.drive_high()
    assert sensor.is_open is False  # not yet: the timer is still running
    assert reports.get(timeout=TIMEOUT) is True
    assert sensor.is_open is True


def test_door_callback_errors_are_logged(door, caplog) -> None:
    sensor, pin, reports = door
    calls: list[bool] = []

    def broken(is_open: bool) -> None:
        calls.append(is_open)
        raise RuntimeError("boom")

    sensor.on_change = broken
    with caplog.at_level(logging.ERROR, logger="firmware.cabinet_io"):
        pin.drive_high()
        assert wait_until(lambda: any("on_change" in r.getMessage() for r in caplog.records))
    assert calls == [True]
    assert sensor.is_open is True
    sensor.on_change = reports.put  # the worker survived the exception
    pin.drive_low()
    assert reports.get(timeout=TIMEOUT) is False


def test_door_resync_catches_a_lost_edge(factory: MockFactory, closing) -> None:
    reports: queue.Queue = queue.Queue()
    sensor = closing(
        DoorSensor(
            DOOR, debounce_s=DEBOUNCE, resync_s=0.1, on_change=reports.put, pin_factory=factory
        )
    )
    pin = factory.pin(DOOR)
    assert sensor.is_open is True
    pin.edges = "none"  # the driver drops the interrupt
    pin.drive_low()
    assert reports.get(timeout=TIMEOUT) is False
    assert sensor.is_open is False


def test_door_close_stops_reports(factory: MockFactory) -> None:
    reports: queue.Queue = queue.Queue()
    sensor = DoorSensor(DOOR, debounce_s=DEBOUNCE, on_change=reports.put, pin_factory=factory)
    sensor.close()
    sensor.close()
    assert not any(t.name.startswith("door-sensor") for t in threading.enumerate())
    # The pin is free again.
    DoorSensor(DOOR, pin_factory=factory).close()
    assert reports.empty()


def test_door_rejects_negative_debounce(factory: MockFactory) -> None:
    with pytest.raises(ValueError):
        DoorSensor(DOOR, debounce_s=-0.1, pin_factory=factory)


# --- Indicator ------------------------------------------------------------------------------


@pytest.fixture
def indicator(factory: MockFactory, closing) -> Indicator:
    ind = closing(Indicator(GREEN, RED, BUZZER, pin_factory=factory))
    # Shorter patterns keep the tests fast; the methods read these through self.
    ind.GRANTED_S = 0.15
    ind.BEEP_S = 0.03
    ind.DENIED_ON_S = ind.DENIED_OFF_S = 0.04
    ind.ALARM_PERIOD_S = 0.03
    ind.BUSY_PERIOD_S = 0.03
    return ind


def test_indicator_granted(factory: MockFactory, indicator: Indicator) -> None:
    green, red, buzzer = (factory.pin(p) for p in (GREEN, RED, BUZZER))
    start = time.monotonic()
    indicator.granted()
    assert time.monotonic() - start < 0.1  # non-blocking
    assert wait_until(lambda: levels(green) == [False, True, False])
    assert wait_until(lambda: levels(buzzer) == [False, True, False])
    assert levels(red) == [False]
    assert green.states[2].timestamp >= 0.1  # green stayed on for GRANTED_S


def test_indicator_granted_default_green_time(factory: MockFactory, closing) -> None:
    ind = closing(Indicator(GREEN, pin_factory=factory))
    green = factory.pin(GREEN)
    ind.granted()
    assert wait_until(lambda: green.state is True)
    assert Indicator.GRANTED_S == pytest.approx(2.0)
    ind.idle()
    assert green.state is False


def test_indicator_denied(factory: MockFactory, indicator: Indicator) -> None:
    green, red, buzzer = (factory.pin(p) for p in (GREEN, RED, BUZZER))
    start = time.monotonic()
    indicator.denied()
    assert time.monotonic() - start < 0.1
    three_blinks = [False, True, False, True, False, True, False]
    assert wait_until(lambda: levels(red) == three_blinks)
    assert wait_until(lambda: levels(buzzer) == three_blinks)
    assert levels(green) == [False]


def test_indicator_alarm_until_cleared(factory: MockFactory, indicator: Indicator) -> None:
    red, buzzer = factory.pin(RED), factory.pin(BUZZER)
    indicator.alarm(True)
    assert indicator.alarm_on
    assert wait_until(lambda: len(red.states) >= 5 and len(buzzer.states) >= 5)
    indicator.granted()  # the alarm keeps the red LED and buzzer...
    assert wait_until(lambda: len(red.states) >= 9)
    indicator.denied()  # ...and is not cut short to denied()'s three blinks
    base = len(red.states)
    assert wait_until(lambda: len(red.states) >= base + 10)
    assert wait_until(lambda: len(buzzer.states) >= base + 10)
    indicator.alarm(False)
    assert red.state is False and buzzer.state is False
    assert not indicator.alarm_on


def test_indicator_busy_and_idle(factory: MockFactory, indicator: Indicator) -> None:
    green = factory.pin(GREEN)
    indicator.busy(True)
    assert wait_until(lambda: len(green.states) >= 5)
    indicator.busy(False)
    assert green.state is False
    indicator.busy(True)
    indicator.alarm(True)
    indicator.idle()
    assert not indicator.alarm_on
    assert all(factory.pin(p).state is False for p in (GREEN, RED, BUZZER))


def test_indicator_missing_pins_are_fine(factory: MockFactory, closing) -> None:
    nothing = closing(Indicator(pin_factory=factory))
    red_only = closing(Indicator(red_pin=RED, pin_factory=factory))
    for ind in (nothing, red_only):
        ind.granted()
        ind.denied()
        ind.busy(True)
        ind.busy(False)
        ind.alarm(True)
        ind.alarm(False)
        ind.idle()
    assert nothing.green is None and nothing.red is None and nothing.buzzer is None
    assert red_only.red is not None and factory.pin(RED).state is False
    nothing.close()
    nothing.close()


# --- CabinetIO ------------------------------------------------------------------------------


def test_cabinet_io_composes_and_closes(factory: MockFactory) -> None:
    cab = CabinetIO(
        lock_pin=LOCK,
        door_pin=DOOR,
        door_debounce_s=DEBOUNCE,
        green_led_pin=GREEN,
        red_led_pin=RED,
        buzzer_pin=BUZZER,
        pin_factory=factory,
    )
    assert isinstance(cab.lock, Lock)
    assert isinstance(cab.door, DoorSensor)
    assert isinstance(cab.indicator, Indicator)
    reports: queue.Queue = queue.Queue()
    cab.door.on_change = reports.put
    factory.pin(DOOR).drive_low()
    assert reports.get(timeout=TIMEOUT) is False
    cab.lock.release(30)
    cab.indicator.alarm(True)
    assert factory.pin(LOCK).state is True
    cab.close()
    assert factory.pin(LOCK).state is False
    assert factory.pin(RED).state is False
    cab.close()  # idempotent
    # Every pin was released: they can all be claimed again.
    Lock(LOCK, pin_factory=factory).close()
    Indicator(GREEN, RED, BUZZER, pin_factory=factory).close()
    DoorSensor(DOOR, pin_factory=factory).close()


def test_cabinet_io_minimal_and_context_manager(factory: MockFactory) -> None:
    with CabinetIO(lock_pin=LOCK, door_pin=DOOR, pin_factory=factory) as cab:
        assert cab.indicator.green is None
        cab.indicator.granted()
        cab.lock.release(30)
    assert factory.pin(LOCK).state is False


def test_cabinet_io_failed_construction_releases_the_lock(factory: MockFactory) -> None:
    with pytest.raises(GPIOPinInUse) as err:
        CabinetIO(lock_pin=LOCK, door_pin=DOOR, green_led_pin=DOOR, pin_factory=factory)
    assert factory.pin(LOCK).state is False
    # gpiozero reserves pins by weak reference; keeping the traceback (and with it the
    # half-built object) alive shows the pins were released by close(), not by GC.
    assert err.tb is not None
    Lock(LOCK, pin_factory=factory).close()
    DoorSensor(DOOR, pin_factory=factory).close()
    del err


# --- pin factories --------------------------------------------------------------------------


def test_make_pin_factory_default_is_none() -> None:
    assert make_pin_factory("") is None


def test_make_pin_factory_mock_shares_existing(factory: MockFactory, monkeypatch) -> None:
    monkeypatch.setattr(Device, "pin_factory", factory)
    assert make_pin_factory("mock") is factory
    assert make_pin_factory("MOCK") is factory


def test_make_pin_factory_mock_installs_new(monkeypatch) -> None:
    monkeypatch.setattr(Device, "pin_factory", None)
    made = make_pin_factory("mock")
    try:
        assert isinstance(made, MockFactory)
        assert Device.pin_factory is made
        assert make_pin_factory("mock") is made
    finally:
        made.close()


def test_make_pin_factory_unknown_name() -> None:
    with pytest.raises(ValueError) as err:
        make_pin_factory("gpio-bogus")
    message = str(err.value)
    assert "gpio-bogus" in message
    for name in ("lgpio", "rpigpio", "pigpio", "native", "mock"):
        assert name in message
    assert set(firmware.available_pin_factories()) >= {"lgpio", "mock", "native"}


# --- systemd notify -------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "n.sock")
    sock.bind(path)
    sock.settimeout(TIMEOUT)
    yield sock, path
    sock.close()


def test_notifier_sends_messages(listener, monkeypatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("3 readers up\nDB ok")
    assert sock.recv(4096) == b"STATUS=3 readers up DB ok"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_abstract_socket(monkeypatch) -> None:
    name = f"smartcab-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notifier_is_silent_without_socket(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def no_socket(*args, **kwargs):
        raise AssertionError("no socket should be opened")

    monkeypatch.setattr("firmware.watchdog.socket.socket", no_socket)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False


def test_notifier_send_failure_is_logged_not_raised(tmp_path, caplog) -> None:
    notifier = SystemdNotifier(str(tmp_path / "missing.sock"))
    with caplog.at_level(logging.WARNING, logger="firmware.watchdog"):
        assert notifier.ready() is False
    assert any("READY=1" in r.getMessage() for r in caplog.records)


def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
