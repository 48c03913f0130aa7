"""The cabinet's own dumb I/O: lock relay, door switch, LEDs, buzzer and systemd notify.

The controller tells this package what to do; it reports door changes by callback.
It never imports ``controller`` or ``readers``.
"""

from firmware.cabinet_io import CabinetIO, DoorSensor, Indicator, Lock
from firmware.pins import available_pin_factories, make_pin_factory
from firmware.watchdog import SystemdNotifier, watchdog_interval_s

__all__ = [
    "CabinetIO",
    "DoorSensor",
    "Indicator",
    "Lock",
    "SystemdNotifier",
    "available_pin_factories",
    "make_pin_factory",
    "watchdog_interval_s",
]
