"""Choosing a gpiozero pin factory from a configuration string."""

from __future__ import annotations

from importlib.metadata import entry_points

from gpiozero import Device
from gpiozero.pins import Factory
from gpiozero.pins.mock import MockFactory

# gpiozero registers its factories (and any third-party ones) under this
# entry-point group; looking names up there keeps us in step with gpiozero.
_FACTORY_GROUP = "gpiozero_pin_factories"


def available_pin_factories() -> list[str]:
    """Names accepted by :func:`make_pin_factory` besides ``""``, sorted."""
    return sorted({ep.name for ep in entry_points(group=_FACTORY_GROUP)})


def make_pin_factory(name: str) -> Factory | None:
    """Return the pin factory called *name* (case-insensitive).

    * ``""`` -> ``None``: devices then use gpiozero's default (``GPIOZERO_PIN_FACTORY``
      or the lgpio -> rpigpio -> pigpio -> native order).
    * ``"mock"`` -> a :class:`~gpiozero.pins.mock.MockFactory`. If ``Device.pin_factory``
      already is one it is reused; otherwise a new one is installed there. Either way a
      simulator driving ``Device.pin_factory.pin(n)`` and our devices see the same pins.
    * ``"lgpio"``, ``"rpigpio"``, ``"pigpio"``, ``"native"`` (or any other registered
      factory) -> a new instance, loaded through gpiozero's entry points. Loading may raise
      if that factory's library is missing or the board is not a Pi.

    Raises :class:`ValueError` for an unknown name, listing the choices.
    """
    key = name.strip().lower()
    if key == "":
        return None
    if key == "mock":
        current = Device.pin_factory
        if isinstance(current, MockFactory):
            return current
        factory = MockFactory()
        Device.pin_factory = factory
        return factory
    for ep in entry_points(group=_FACTORY_GROUP):
        if ep.name == key:
            return ep.load()()
    choices = ", ".join(['"" (gpiozero default)', *available_pin_factories()])
    raise ValueError(f"unknown pin factory {name!r}; choose one of: {choices}")
