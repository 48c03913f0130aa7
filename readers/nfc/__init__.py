"""NFC badge reading (nfcpy) and a wire-level badge simulator for tests and demos.

``BadgeReader(f"udp:localhost:{port}", ...)`` pairs with ``BadgeSimulator(port)``; on the
cabinet the reader gets a hardware path such as ``tty:AMA0:pn532`` instead.
"""

from .badge import BadgeReader
from .badge_sim import BadgeSimulator, free_udp_port

__all__ = ["BadgeReader", "BadgeSimulator", "free_udp_port"]
