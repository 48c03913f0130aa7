"""Device libraries for the cabinet's readers.

Nothing in this package imports ``controller``: like a Home Assistant device
library, it only speaks to hardware (or to a simulator that speaks the same
bytes) and reports plain data.
"""
