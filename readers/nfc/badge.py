"""NFC badge reader: polls an nfcpy frontend and reports badge UIDs.

:class:`BadgeReader` owns one ``nfc.ContactlessFrontend`` in a daemon thread. It polls for
ISO 14443 Type A cards only, reports the UID of every Type 2 or Type 4A tag it activates to an
``on_badge(uid)`` callback, and suppresses repeats of a UID that is still (or was only just)
in the field.

The same code runs against real hardware (``tty:AMA0:pn532``, ``usb:072f:2200``) and against
the simulator in :mod:`readers.nfc.badge_sim` (``udp:localhost:<port>``); the path is the only
difference.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable

import nfc
import nfc.tag.tt2
import nfc.tag.tt4

log = logging.getLogger(__name__)

# Pause before every sense. On hardware this paces the poll loop (a PN532 answers "no card"
# within milliseconds, so without it the loop would spin) and gives a just-read card a moment
# before the field is cycled again. Short enough that it adds little to tap latency.
POLL_GAP_S = 0.05


class BadgeReader:
    """Report NFC badge taps from an nfcpy reader, with per-UID de-duplication.

    ``on_badge`` is called from the reader thread with the UID as upper-case hex. A UID is
    reported again only after it has been unseen for ``holdoff_s`` seconds, so a badge held
    against the reader is reported once.
    """

    def __init__(
        self,
        path: str,
        on_badge: Callable[[str], None],
        *,
        holdoff_s: float = 3.0,
        retry_s: float = 2.0,
    ) -> None:
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"path must be a non-empty nfcpy device path string, got {path!r}")
        _check_udp_path(path.strip())
        if not callable(on_badge):
            raise TypeError(f"on_badge must be callable, got {on_badge!r}")
        if not _is_finite_number(holdoff_s) or holdoff_s < 0:
            raise ValueError(f"holdoff_s must be a finite number >= 0, got {holdoff_s!r}")
        if not _is_finite_number(retry_s) or retry_s <= 0:
            raise ValueError(f"retry_s must be a finite number > 0, got {retry_s!r}")
        self._path = path.strip()
        self._on_badge = on_badge
        self._holdoff_s = float(holdoff_s)
        self._retry_s = float(retry_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._status = "starting"
        # UID -> monotonic time it was last activated; only the reader thread touches it.
        self._last_seen: dict[str, float] = {}

    @property
    def path(self) -> str:
        """The nfcpy device path this reader opens."""
        return self._path

    @property
    def status(self) -> str:
        """``"starting"``, ``"ready"`` or ``"error: <message>"``."""
        with self._lock:
            return self._status

    def start(self) -> None:
        """Start the polling thread (returns at once; watch :attr:`status`)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("BadgeReader is already running")
            self._stop.clear()
            self._status = "starting"
            self._thread = threading.Thread(
                target=self._run, name=f"nfc-badge[{self._path}]", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop polling, join the thread and close the frontend.

        Returns True if the thread ended within ``timeout``. nfcpy checks for termination
        between sense attempts, so this can take as long as one attempt (about 1 s on the
        ``udp`` driver, milliseconds on hardware).
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            # The thread closes the frontend itself on its way out; closing it from here
            # would block on the frontend's lock, which the in-progress sense holds.
            log.warning("NFC reader thread on %s did not stop within %.1f s", self._path, timeout)
            return False
        return True

    # -- reader thread ---------------------------------------------------------------------

    def _set_status(self, status: str) -> None:
        with self._lock:
            self._status = status

    def _run(self) -> None:
        last_error: str | None = None
        while not self._stop.is_set():
            try:
                clf = nfc.ContactlessFrontend(self._path)
            except Exception as exc:  # no device, permission, bad path: all retried
                message = f"cannot open NFC reader {self._path!r}: {_describe(exc)}"
                if message != last_error:
                    # Logged once per distinct failure: the retry loop would flood the log.
                    log.error("%s (retrying every %.1f s)", message, self._retry_s)
                    last_error = message
                self._set_status(f"error: {message}")
                self._stop.wait(self._retry_s)
                continue

            log.info("NFC reader ready on %s", self._path)
            last_error = None
            self._set_status("ready")
            try:
                self._poll(clf)
            except Exception as exc:
                message = f"NFC reader {self._path!r} failed: {_describe(exc)}"
                log.exception("%s; reopening in %.1f s", message, self._retry_s)
                last_error = message
                self._set_status(f"error: {message}")
            finally:
                _close_quietly(clf)
            if not self._stop.is_set():
                self._stop.wait(self._retry_s)

    def _poll(self, clf: nfc.ContactlessFrontend) -> None:
        options = {
            # Type A only: each technology costs a full sense attempt per cycle, and badges
            # are ISO 14443A (on the udp driver every silent technology costs 1 s).
            "targets": ["106A"],
            # Return the Tag as soon as it is activated instead of waiting for removal; the
            # hold-off below does the de-duplication.
            "on-connect": lambda tag: False,
            # One sense per connect-loop turn so `terminate` (stop + pacing) runs after every
            # attempt; the pacing itself is POLL_GAP_S inside `_terminate`.
            "iterations": 1,
            "interval": POLL_GAP_S,
            "beep-on-connect": False,
        }
        while not self._stop.is_set():
            tag = clf.connect(rdwr=options, terminate=self._terminate)
            if tag is None:
                continue  # terminated: the loop condition sees the stop flag
            if tag is False:
                # connect() swallows IOError (and logs it) and returns False: the device
                # is gone or stopped answering.
                raise OSError("reader stopped responding (see the nfc.clf log)")
            self._handle_tag(tag)
            # Switch the field off now (sense() with no targets only mutes), so the pause in
            # _terminate falls between field-off and the next poll. Otherwise nfcpy's next
            # sense() sends field-off and the next SENS_REQ back to back, and a card gets no
            # time to reset (ISO 14443 asks for at least 5 ms; an emulated card on the udp
            # driver needs the moment to re-arm its listener).
            clf.sense()

    def _terminate(self) -> bool:
        # nfcpy calls this before every sense attempt. Waiting on the stop event both paces
        # the poll and makes stop() wake the loop at once.
        return self._stop.wait(POLL_GAP_S)

    def _handle_tag(self, tag: nfc.tag.Tag) -> None:
        if not isinstance(tag, nfc.tag.tt2.Type2Tag | nfc.tag.tt4.Type4ATag):
            log.debug("ignoring non-badge tag %s", tag)
            return
        uid = tag.identifier.hex().upper()
        now = time.monotonic()
        previous = self._last_seen.get(uid)
        self._last_seen[uid] = now
        self._forget_stale(now)
        if previous is not None and now - previous < self._holdoff_s:
            return  # still held (or only just lifted): already reported
        log.info("badge %s (%s)", uid, type(tag).__name__)
        try:
            self._on_badge(uid)
        except Exception:
            log.exception("on_badge(%r) raised; continuing", uid)

    def _forget_stale(self, now: float) -> None:
        # Entries older than the hold-off no longer suppress anything; dropping them keeps
        # the table bounded however many distinct badges pass by.
        stale = [u for u, seen in self._last_seen.items() if now - seen >= self._holdoff_s]
        for uid in stale:
            del self._last_seen[uid]


def _check_udp_path(path: str) -> None:
    # nfcpy 1.0.4's udp driver turns the port into a service name when /etc/services has
    # one (e.g. 30865 -> "csync2") and then fails on int(); say so up front rather than
    # retrying a cryptic error forever.
    parts = path.split(":")
    if parts[0] != "udp" or len(parts) < 3 or not parts[2]:
        return
    if not parts[2].isdigit() or not 1 <= int(parts[2]) <= 65535:
        raise ValueError(f"udp path needs a port number 1..65535, got {path!r}")
    if not socket.getnameinfo(("127.0.0.1", int(parts[2])), socket.NI_NUMERICHOST)[1].isdigit():
        raise ValueError(
            f"port {parts[2]} in {path!r} has a service name in /etc/services, which nfcpy's"
            " udp driver cannot handle; use another port"
        )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_quietly(clf: nfc.ContactlessFrontend) -> None:
    try:
        clf.close()
    except Exception:
        log.exception("closing the NFC frontend failed")
