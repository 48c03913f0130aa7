"""The cabinet's own I/O: strike relay, door reed switch, LEDs and buzzer.

Every class is composed of gpiozero devices and takes ``pin_factory=``, so the same code runs
on a Pi (default factory) and in tests or a simulator (``MockFactory``). Nothing here makes
decisions: the controller says what to do, and the door reports its changes by callback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from gpiozero import LED, Buzzer, DigitalInputDevice, DigitalOutputDevice
from gpiozero.pins import Factory

log = logging.getLogger(__name__)


class _Closeable:
    """Adds ``with`` support to classes that define ``close()``."""

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Lock(_Closeable):
    """A fail-secure electric strike driven through a relay.

    The relay is energised only to *release* the strike, and only for a timed pulse;
    it is de-energised (locked) from construction on. Software alone cannot make this
    fail-secure: when the process dies, or gpiozero closes the pin at exit (on lgpio
    the pin is returned to a floating input), or the power is cut, nobody drives the pin.
    The cabinet stays locked only if the hardware agrees:

    * the relay board's input pull resistor must hold an undriven input in the
      *de-energised* state (pull-down for an active-high board, pull-up for an
      active-low one; set ``active_high`` to match), and
    * the strike itself must be fail-secure (locked when unpowered), not fail-safe.

    The pulse is timed by a gpiozero background thread, so a hung (but living) process
    could hold the relay on; the systemd watchdog is the backstop for that.
    """

    def __init__(
        self, pin: int, *, active_high: bool = True, pin_factory: Factory | None = None
    ) -> None:
        # Serialises release/secure/close across the controller's threads.
        self._guard = threading.Lock()
        # initial_value=False: locked from the moment the pin becomes an output. None
        # would keep whatever level the pin happened to have, which may be "released".
        self._relay = DigitalOutputDevice(
            pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
        )

    def release(self, seconds: float) -> None:
        """Energise the relay for *seconds*, then lock again by itself.

        Returns at once with the relay already energised. Calling it again during a
        pulse restarts the pulse from now, without a gap.
        """
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"release time must be a positive number of seconds, not {seconds!r}")
        with self._guard:
            # on() first so the relay is energised when we return; blink() alone would
            # set it slightly later from its thread. Stopping an older pulse while it is
            # on leaves the pin on, so restarting a pulse never flickers the strike.
            self._relay.on()
            self._relay.blink(on_time=seconds, off_time=0, n=1, background=True)

    def secure(self) -> None:
        """De-energise the relay now, ending any pulse."""
        with self._guard:
            self._relay.off()

    @property
    def released(self) -> bool:
        """True while the relay is energised (the strike is free)."""
        if self._relay.closed:
            return False
        return bool(self._relay.is_active)

    def close(self) -> None:
        """Secure the lock, then release the pin. Safe to call twice."""
        with self._guard:
            if self._relay.closed:
                return
            self._relay.off()
            self._relay.close()


class DoorSensor(_Closeable):
    """A door reed switch, debounced in software.

    ``is_open`` is the debounced state. ``on_change(is_open)`` is called once per
    debounced change, from this sensor's own background thread (never concurrently
    with itself); it may be assigned after construction. Exceptions it raises are
    logged, not propagated.

    Debounce: every edge (re)starts a ``debounce_s`` timer; when the pin has been quiet
    that long its level is read, and reported only if it differs from the last report.
    So chatter produces one report for its final state, or none if it ends where it
    started. gpiozero's ``bounce_time`` is not used: mock pins ignore it, and it drops
    the edges after the first one, which can leave the last (real) state unseen.

    ``closed_when_low``: a switch to GND with a pull-up reads low when the door is shut.
    ``pull_up``: True/False for the Pi's internal pull-up/down, None for an external
    resistor (the pin is then left floating by the Pi).
    ``resync_s``: while no edge is pending the pin is re-read this often, so an edge
    lost by the GPIO driver is still noticed (None disables this).
    """

    def __init__(
        self,
        pin: int,
        *,
        closed_when_low: bool = True,
        pull_up: bool | None = True,
        debounce_s: float = 0.05,
        on_change: Callable[[bool], None] | None = None,
        resync_s: float | None = 1.0,
        pin_factory: Factory | None = None,
    ) -> None:
        if not (math.isfinite(debounce_s) and debounce_s >= 0):
            raise ValueError(f"debounce_s must be >= 0, not {debounce_s!r}")
        if resync_s is not None and not (math.isfinite(resync_s) and resync_s > 0):
            raise ValueError(f"resync_s must be > 0 or None, not {resync_s!r}")
        self.on_change: Callable[[bool], None] | None = on_change
        self._closed_when_low = closed_when_low
        self._debounce_s = debounce_s
        self._resync_s = resync_s
        self._cond = threading.Condition()
        self._deadline: float | None = None  # when the pending debounce timer expires
        self._closed = False
        # We read the raw level ourselves, so active_state only matters to gpiozero's
        # bookkeeping; it must be given exactly when the pin floats.
        self._input = DigitalInputDevice(
            pin,
            pull_up=pull_up,
            active_state=True if pull_up is None else None,
            pin_factory=pin_factory,
        )
        try:
            self._is_open = self._read_open()
            # Both directions just restart the timer; the level is read when it expires.
            self._input.when_activated = self._on_edge
            self._input.when_deactivated = self._on_edge
            self._worker = threading.Thread(
                target=self._run, name=f"door-sensor-{pin}", daemon=True
            )
            self._worker.start()
        except BaseException:
            self._input.close()
            raise

    @property
    def is_open(self) -> bool:
        """The debounced door state: True when open."""
        return self._is_open

    def _read_open(self) -> bool:
        level_high = bool(self._input.pin.state)
        closed = (not level_high) if self._closed_when_low else level_high
        return not closed

    def _on_edge(self) -> None:
        # Runs in the GPIO driver's thread (or the caller's, for mock pins): keep it short.
        with self._cond:
            if self._closed:
                return
            self._deadline = time.monotonic() + self._debounce_s
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._deadline is None:
                    signalled = self._cond.wait(self._resync_s)
                    if self._closed or signalled or self._deadline is not None:
                        continue
                    resync = True  # quiet for resync_s: look for a missed edge
                else:
                    remaining = self._deadline - time.monotonic()
                    if remaining > 0:
                        self._cond.wait(remaining)
                        continue
                    self._deadline = None
                    resync = False
            # Read and report outside the lock so edges arriving meanwhile are not held up.
            is_open = self._read_open()
            if is_open == self._is_open:
                continue
            if resync:
                # A level change without an edge still has to be stable for debounce_s.
                with self._cond:
                    if self._deadline is None:
                        self._deadline = time.monotonic() + self._debounce_s
                continue
            self._is_open = is_open
            self._report(is_open)

    def _report(self, is_open: bool) -> None:
        callback = self.on_change
        if callback is None or self._closed:
            return
        try:
            callback(is_open)
        except Exception:
            log.exception("door on_change callback failed (is_open=%s)", is_open)

    def close(self) -> None:
        """Stop reporting and release the pin. Safe to call twice, even from on_change."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._input.when_activated = None
        self._input.when_deactivated = None
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=5)
        self._input.close()


class Indicator(_Closeable):
    """Green LED, red LED and buzzer feedback; any of them may be absent (pin None).

    All patterns run on gpiozero background threads, so every method returns at once.
    A new pattern takes over the parts it uses. While ``alarm(True)`` is on, the red LED
    and buzzer belong to the alarm: ``granted()`` and ``denied()`` leave them alone.
    The buzzer is switched on/off, so fit an *active* buzzer (one with its own oscillator).
    """

    GRANTED_S = 2.0
    BEEP_S = 0.1
    DENIED_ON_S = 0.2
    DENIED_OFF_S = 0.2
    DENIED_COUNT = 3
    ALARM_PERIOD_S = 0.5
    BUSY_PERIOD_S = 0.2

    def __init__(
        self,
        green_pin: int | None = None,
        red_pin: int | None = None,
        buzzer_pin: int | None = None,
        *,
        led_active_high: bool = True,
        buzzer_active_high: bool = True,
        pin_factory: Factory | None = None,
    ) -> None:
        self._guard = threading.Lock()
        self._alarm = False
        self.green: LED | None = None
        self.red: LED | None = None
        self.buzzer: Buzzer | None = None
        try:
            if green_pin is not None:
                self.green = LED(green_pin, active_high=led_active_high, pin_factory=pin_factory)
            if red_pin is not None:
                self.red = LED(red_pin, active_high=led_active_high, pin_factory=pin_factory)
            if buzzer_pin is not None:
                self.buzzer = Buzzer(
                    buzzer_pin, active_high=buzzer_active_high, pin_factory=pin_factory
                )
        except BaseException:
            self._close_parts()
            raise

    @property
    def alarm_on(self) -> bool:
        """True between ``alarm(True)`` and ``alarm(False)`` / ``idle()``."""
        return self._alarm

    def granted(self) -> None:
        """Green on for about 2 s and one short beep."""
        with self._guard:
            if self.green is not None:
                self.green.blink(on_time=self.GRANTED_S, off_time=0, n=1)
            if not self._alarm:
                if self.red is not None:
                    self.red.off()
                if self.buzzer is not None:
                    self.buzzer.beep(on_time=self.BEEP_S, off_time=0, n=1)

    def denied(self) -> None:
        """Red blinks three times with three short beeps."""
        with self._guard:
            if self.green is not None:
                self.green.off()
            if self._alarm:
                return
            period = self.DENIED_ON_S + self.DENIED_OFF_S
            if self.red is not None:
                self.red.blink(self.DENIED_ON_S, self.DENIED_OFF_S, n=self.DENIED_COUNT)
            if self.buzzer is not None:
                # Same period as the red blink so each beep matches a flash.
                self.buzzer.beep(self.BEEP_S, period - self.BEEP_S, n=self.DENIED_COUNT)

    def alarm(self, on: bool) -> None:
        """Blink red and sound the buzzer until ``alarm(False)``."""
        with self._guard:
            self._alarm = on
            t = self.ALARM_PERIOD_S
            if on:
                if self.red is not None:
                    self.red.blink(t, t)
                if self.buzzer is not None:
                    self.buzzer.beep(t, t)
            else:
                if self.red is not None:
                    self.red.off()
                if self.buzzer is not None:
                    self.buzzer.off()

    def busy(self, on: bool) -> None:
        """Blink green while a scan is running; ``busy(False)`` turns it off."""
        with self._guard:
            if self.green is None:
                return
            if on:
                self.green.blink(self.BUSY_PERIOD_S, self.BUSY_PERIOD_S)
            else:
                self.green.off()

    def idle(self) -> None:
        """Everything off, including an alarm."""
        with self._guard:
            self._alarm = False
            for part in self._parts():
                part.off()

    def _parts(self) -> list[DigitalOutputDevice]:
        return [p for p in (self.green, self.red, self.buzzer) if p is not None]

    def _close_parts(self) -> None:
        for part in self._parts():
            part.close()  # gpiozero's close stops the blink thread and is idempotent

    def close(self) -> None:
        """Turn everything off and release the pins. Safe to call twice."""
        with self._guard:
            self._alarm = False
            for part in self._parts():
                if not part.closed:
                    part.off()
            self._close_parts()


class CabinetIO(_Closeable):
    """The whole cabinet I/O, built from plain configuration values.

    Attributes: ``lock`` (:class:`Lock`), ``door`` (:class:`DoorSensor`, set
    ``door.on_change``), ``indicator`` (:class:`Indicator`).
    """

    def __init__(
        self,
        *,
        lock_pin: int,
        lock_active_high: bool = True,
        door_pin: int,
        door_closed_when_low: bool = True,
        door_debounce_s: float = 0.05,
        door_pull_up: bool | None = True,
        green_led_pin: int | None = None,
        red_led_pin: int | None = None,
        buzzer_pin: int | None = None,
        led_active_high: bool = True,
        buzzer_active_high: bool = True,
        pin_factory: Factory | None = None,
    ) -> None:
        self._closed = False
        # The lock comes first so the strike is driven to "locked" as early as possible.
        self.lock = Lock(lock_pin, active_high=lock_active_high, pin_factory=pin_factory)
        try:
            self.door = DoorSensor(
                door_pin,
                closed_when_low=door_closed_when_low,
                pull_up=door_pull_up,
                debounce_s=door_debounce_s,
                pin_factory=pin_factory,
            )
            try:
                self.indicator = Indicator(
                    green_led_pin,
                    red_led_pin,
                    buzzer_pin,
                    led_active_high=led_active_high,
                    buzzer_active_high=buzzer_active_high,
                    pin_factory=pin_factory,
                )
            except BaseException:
                self.door.close()
                raise
        except BaseException:
            self.lock.close()
            raise

    def close(self) -> None:
        """Secure the lock, then release every pin. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.lock.close()
        finally:
            try:
                self.door.close()
            finally:
                self.indicator.close()
