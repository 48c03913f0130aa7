"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) with the stdlib only.

The protocol is one datagram of newline-separated ``KEY=value`` lines sent to the
AF_UNIX socket named in ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket).
Outside systemd the variable is unset and every call is a no-op, so the same code runs
in development and tests.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state notifications to systemd.

    Send ``ready()`` once everything is up, ``watchdog()`` every
    :func:`watchdog_interval_s` seconds *from the main loop* (a side thread would keep
    a hung loop alive), ``status(text)`` for ``systemctl status``, and ``stopping()``
    on shutdown. Send errors are logged, not raised: a missed keep-alive is handled by
    systemd itself.
    """

    def __init__(self, address: str | None = None) -> None:
        """*address* defaults to ``$NOTIFY_SOCKET``; empty or unset disables sending."""
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            # Linux abstract namespace: the leading "@" stands for a NUL byte.
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        elif address:
            # e.g. "vsock:..." (VMs); not something a Pi service is given.
            log.warning("unsupported NOTIFY_SOCKET %r; systemd notifications disabled", address)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send raw ``KEY=value`` lines; True if a datagram was sent."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode("utf-8"))
        except OSError as exc:
            log.warning("systemd notify %r failed: %s", message, exc)
            return False
        return True

    def ready(self) -> bool:
        """Startup is complete (``READY=1``)."""
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        """Keep-alive (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """One-line status for ``systemctl status`` (``STATUS=...``)."""
        # A newline would start a new assignment in the datagram.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``watchdog()`` calls, or None when no watchdog is configured.

    Half of ``WATCHDOG_USEC``, as systemd recommends. None as well when
    ``WATCHDOG_PID`` names another process (the watchdog is not ours) or the value
    is not a positive integer.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
