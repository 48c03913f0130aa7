"""The cabinet's logic: state machine, inventory and diff, events, store, ERP link."""

__version__ = "0.1.0"
