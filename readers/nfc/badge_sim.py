"""Badge simulator: an nfcpy frontend on the ``udp`` driver that emulates an NFC card.

How the pair connects (from nfcpy's ``nfc/clf/udp.py``): the *listening* (card) side binds
``0.0.0.0:<port>``; the *reader* side sends every poll from a fresh ephemeral socket to
``<host>:<port>`` and the card answers to whatever address the frame came from. So::

    port = free_udp_port()
    sim = BadgeSimulator(port)                                  # card side, binds the port
    reader = BadgeReader(f"udp:localhost:{port}", on_badge)     # reader side, sends to it
    reader.start()
    sim.present("04A1B2C3D4E5F6")                               # tap a badge

Either may start first. The port is bound only while a card is presented, so "no card" is
what the reader sees in between (its frames go nowhere). One simulator per port.

The card is emulated with nfcpy's low-level card-emulation API, because ``nfc.tag.emulate``
only covers Type 3: ``clf.listen(LocalTarget("106A", ...))`` lets the udp driver answer the
anticollision (SENS_REQ, SDD_REQ and SEL_REQ for every cascade level) with the chosen UID and
return the first real command, which this module answers with ``clf.exchange``:

* ``tt2``: ``READ`` (``30 nn``) returns 16 bytes of a 64-byte memory (UID pages, an NDEF
  capability container, an empty NDEF message). Every other command goes unanswered, as on a
  plain Type 2 tag, so nfcpy reports a UID starting with ``04`` as a ``MifareUltralight``.
* ``tt4a``: RATS gets an ATS, an R(NAK) presence check an R(ACK), any APDU the status word
  ``6A82`` (no NDEF application), S(DESELECT) its echo.

The card binds ``0.0.0.0``, i.e. every interface (nfcpy's choice): for tests and demos only.

Timing facts to design tests around:

* nfcpy's udp reader waits a fixed 1 s for an answer to each SENS_REQ, and a SENS_REQ sent
  while no card was bound is lost, so a new card is found up to ~1.05 s after
  :meth:`BadgeSimulator.present` (about 0.5 s on average). Present cards for longer than
  that, or until the reader reports them and then call :meth:`BadgeSimulator.remove`.
* A frame that reaches the port while the card re-binds between two ``listen()`` calls is
  lost (that costs the reader one poll, 1 s). So a presentation stays in one ``listen()``
  through any number of anticollisions, and after answering a command it waits for the next
  one on the same socket (``exchange``). It re-binds only after leaving a command unanswered
  (the reader then waits out its own timeout first) or after the reader's RFOFF. nfcpy sends
  its next SENS_REQ right behind an RFOFF, so a reader should switch the field off and pause
  before polling again after talking to a card; :class:`~readers.nfc.badge.BadgeReader`
  does, a bare ``connect()`` loop may lose one poll per re-read of a Type 4A card.
* A presentation may outlive ``seconds`` by up to 0.5 s (the driver's minimum receive wait)
  but answers at most one frame after its deadline, which cannot complete an activation.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import socket
import string
import threading
import time
from dataclasses import dataclass, field

import nfc
import nfc.clf

log = logging.getLogger(__name__)

KINDS = ("tt2", "tt4a")

# ISO 14443-3 SEL_RES (SAK): bit 0x20 announces ISO-DEP (Type 4A); 0x00 is a Type 2 tag.
_SEL_RES = {"tt2": 0x00, "tt4a": 0x20}

# ATS: TL=5, T0=0x78 (TA, TB, TC follow; FSCI 8 = 256-byte frames), TA=0x00 (106 kbps only),
# TB=0x80 (FWI 8, about 77 ms frame waiting time: ample for a Python peer; SFGI 0),
# TC=0x00 (no NAD, no CID).
_ATS = bytes([0x05, 0x78, 0x00, 0x80, 0x00])

# Answer to an ISO-DEP APDU: status word 6A82 "file not found", i.e. a badge without NDEF.
_SW_NOT_FOUND = bytes([0x6A, 0x82])

_TT2_PAGES = 16  # 64 bytes, the size of a MIFARE Ultralight
_TT2_READ = 0x30
_TT2_NAK = bytes([0x00])  # 4-bit NAK "invalid argument", as a one-byte frame

# Frame sent to our own port to make a pending listen() return when a card is taken away
# early: any non-anticollision frame ends nfcpy's Type A listen loop.
_WAKE_FRAME = b"106A 00"


def free_udp_port() -> int:
    """Return a UDP port that is free on all interfaces now, outside the ephemeral range.

    Outside, because the reader side sends every poll from a fresh kernel-chosen ephemeral
    port: a simulator port inside that range is now and then taken, for up to one poll, by
    a reader's own socket.
    """
    low, high = _ephemeral_port_range()
    candidates = list(range(20000, low)) if low > 21000 else list(range(high + 1, 65536))
    for port in random.sample(candidates, min(50, len(candidates))):
        if not nfcpy_udp_port_ok(port):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))  # crowded host: settle for any free port
        return probe.getsockname()[1]


def nfcpy_udp_port_ok(port: int) -> bool:
    """True if nfcpy's udp driver can use ``port``.

    nfcpy 1.0.4 turns the port back into text with ``getnameinfo`` without
    ``NI_NUMERICSERV`` and then calls ``int()`` on it, so any port that has a service name
    in ``/etc/services`` (e.g. 30865 "csync2") makes opening the frontend fail.
    """
    return socket.getnameinfo(("127.0.0.1", port), socket.NI_NUMERICHOST)[1].isdigit()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux default


def parse_uid(uid: str) -> bytes:
    """Validate a badge UID given as hex (4 or 7 bytes) and return its bytes."""
    if not isinstance(uid, str):
        raise TypeError(f"uid must be a hex string, got {type(uid).__name__}")
    text = uid.strip()
    if not text or any(c not in string.hexdigits for c in text):
        raise ValueError(
            f"uid must be hexadecimal digits only (e.g. '04A1B2C3D4E5F6'), got {uid!r}"
        )
    if len(text) % 2:
        raise ValueError(f"uid must have an even number of hex digits, got {uid!r}")
    raw = bytes.fromhex(text)
    if len(raw) not in (4, 7):
        raise ValueError(f"uid must be 4 or 7 bytes (8 or 14 hex digits), got {len(raw)} bytes")
    if raw[0] == 0x88:
        # 0x88 is the ISO 14443-3 cascade tag; a UID may not start with it.
        raise ValueError(f"uid may not start with 88 (the ISO 14443 cascade tag), got {uid!r}")
    return raw


@dataclass
class _Presentation:
    uid: bytes
    kind: str
    deadline: float  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class BadgeSimulator:
    """Emulate NFC badges (Type 2 or Type 4A) on nfcpy's ``udp`` driver at ``port``.

    Pair with ``BadgeReader(f"udp:localhost:{port}", ...)``; see the module docstring.
    """

    def __init__(self, port: int, host: str = "localhost") -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"port must be an integer 1..65535, got {port!r}")
        if not nfcpy_udp_port_ok(port):
            raise ValueError(
                f"port {port} has a service name in /etc/services, which nfcpy's udp driver"
                " cannot handle; pick another (free_udp_port() does)"
            )
        if not isinstance(host, str) or not host.strip() or ":" in host:
            raise ValueError(f"host must be a host name or IPv4 address, got {host!r}")
        try:
            socket.gethostbyname(host)  # the udp driver resolves it the same way
        except OSError as exc:
            raise ValueError(f"cannot resolve host {host!r}: {exc}") from exc
        self._port = port
        self._path = f"udp:{host.strip()}:{port}"
        self._lock = threading.Lock()
        self._current: _Presentation | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The UDP port the card binds while presented."""
        return self._port

    def present(self, uid: str, kind: str = "tt2", seconds: float = 2.0) -> None:
        """Hold a card with ``uid`` in the field for ``seconds`` (returns at once).

        ``kind`` is ``"tt2"`` (Type 2 tag, SEL_RES 00) or ``"tt4a"`` (Type 4A, SEL_RES 20).
        Raises ValueError on bad arguments and RuntimeError if a card is already presented,
        the simulator is closed, or the port is taken.
        """
        raw = parse_uid(uid)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("BadgeSimulator is closed")
            if self._current is not None and not self._current.done.is_set():
                raise RuntimeError("a card is already presented; wait_done() or remove() first")
            self._check_port_free()
            pres = _Presentation(raw, kind, time.monotonic() + float(seconds))
            self._current = pres
            threading.Thread(
                target=self._run, args=(pres,), name=f"nfc-card[{self._port}]", daemon=True
            ).start()

    def wait_done(self, timeout: float) -> bool:
        """Wait until the current card is gone; True if it is (or none was presented)."""
        pres = self._current
        return pres is None or pres.done.wait(timeout)

    def remove(self, timeout: float = 2.0) -> bool:
        """Take the current card away now; True once it is gone."""
        pres = self._current
        if pres is None or pres.done.is_set():
            return True
        pres.cancel.set()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            end = time.monotonic() + timeout
            while True:
                # Repeat: the frame is ignored if it lands mid-cascade or between listens.
                waker.sendto(_WAKE_FRAME, ("127.0.0.1", self._port))
                if pres.done.wait(min(0.05, max(0.0, end - time.monotonic()))):
                    return True
                if time.monotonic() >= end:
                    log.warning(
                        "card on port %d did not go away within %.1f s", self._port, timeout
                    )
                    return False

    def close(self, timeout: float = 2.0) -> None:
        """Remove any card and refuse further presentations."""
        with self._lock:
            self._closed = True
        self.remove(timeout)

    def __enter__(self) -> BadgeSimulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- card thread -----------------------------------------------------------------------

    def _check_port_free(self) -> None:
        # Early, synchronous check so a clash is an exception, not a silent card (nfcpy's
        # listen() only logs a failed bind and returns None). EADDRINUSE is retried for a
        # little over one udp poll, as a reader's short-lived send socket may hold the port
        # when it lies in the ephemeral range (nfcpy's default 54321 does).
        give_up = time.monotonic() + 1.2
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(("0.0.0.0", self._port))
                    return
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() >= give_up:
                        raise RuntimeError(
                            f"cannot present a card: UDP port {self._port}: {exc}"
                        ) from exc
            time.sleep(0.05)

    def _run(self, pres: _Presentation) -> None:
        clf = None
        warned_bind = False
        try:
            clf = nfc.ContactlessFrontend(self._path)
            target = _local_target(pres)
            while not pres.cancel.is_set():
                remaining = pres.deadline - time.monotonic()
                if remaining <= 0:
                    break
                started = time.monotonic()
                activated = clf.listen(target, remaining)
                if pres.cancel.is_set():
                    break
                if activated is None:
                    if time.monotonic() - started < 0.05 and remaining > 0.05:
                        # listen() returned at once: it could not bind (port taken).
                        if not warned_bind:
                            log.warning("card on port %d: port busy, retrying", self._port)
                            warned_bind = True
                        pres.cancel.wait(0.05)
                    continue
                command = activated.tt4_cmd or activated.tt2_cmd
                if command is not None:  # None: e.g. an NFC-DEP ATR_REQ, not for a badge
                    self._serve(clf, pres, bytes(command))
        except Exception:
            log.exception("card emulation on port %d failed", self._port)
        finally:
            if clf is not None:
                try:
                    clf.close()  # unbinds the port: the card has left the field
                except Exception:
                    log.exception("closing the card frontend on port %d failed", self._port)
            pres.done.set()

    def _serve(self, clf: nfc.ContactlessFrontend, pres: _Presentation, command: bytes) -> None:
        """Answer commands on an activated link until the reader ends it or goes quiet."""
        while not pres.cancel.is_set():
            response = respond(pres.kind, pres.uid, command)
            if response is None:
                # Silence (an unsupported command): the reader times out and senses again,
                # so re-binding in listen() now is safe; it happens well before that.
                return
            remaining = pres.deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                # Send the answer and wait for the next command on the same bound socket,
                # so a command sent right after our answer (a presence check, the next
                # APDU) cannot fall into a re-bind gap.
                received = clf.exchange(response, remaining)
            except nfc.clf.BrokenLinkError:
                return  # RFOFF: the reader switched the field off; be ready for a new poll
            except nfc.clf.CommunicationError as exc:
                log.debug("card on port %d: %s", self._port, exc)
                return  # deadline reached (timeout) or a malformed frame
            if received is None:
                return
            command = bytes(received)


def _local_target(pres: _Presentation) -> nfc.clf.LocalTarget:
    # SENS_RES (ATQA) as nfcpy orders it: first byte bits 7-6 give the UID size (00 single,
    # 01 double) and bit 2 the bit-frame anticollision; second byte 00 (not a Type 1 tag).
    sens_res = bytearray([0x04 if len(pres.uid) == 4 else 0x44, 0x00])
    return nfc.clf.LocalTarget(
        "106A",
        sens_res=sens_res,
        sdd_res=bytearray(pres.uid),
        sel_res=bytearray([_SEL_RES[pres.kind]]),
    )


def respond(kind: str, uid: bytes, command: bytes) -> bytes | None:
    """The emulated card's answer to one reader command, or None to stay silent."""
    if not command:
        return None
    if kind == "tt2":
        if len(command) == 2 and command[0] == _TT2_READ:
            page = command[1]
            if page >= _TT2_PAGES:
                return _TT2_NAK
            memory = _tt2_memory(uid)
            start = page * 4
            # READ returns four pages and wraps around at the end of memory, like an
            # Ultralight.
            return (memory + memory)[start : start + 16]
        # Anything else (AUTHENTICATE 1A, GET_VERSION 60, HALT 50...) is unsupported on a
        # plain Type 2 tag, which stays silent; nfcpy then times out and re-senses.
        return None
    pcb = command[0]
    if command[0] == 0xE0 and len(command) == 2:
        return _ATS  # RATS
    if pcb & 0xF6 == 0xB2:
        return bytes([0xA2 | (pcb & 0x01)])  # R(NAK) presence check -> R(ACK)
    if pcb & 0xEE == 0x02:
        if pcb & 0x10:
            return bytes([0xA2 | (pcb & 0x01)])  # chained I-block: acknowledge
        return bytes([0x02 | (pcb & 0x01)]) + _SW_NOT_FOUND  # I-block with an APDU
    if pcb == 0xC2:
        return bytes([0xC2])  # S(DESELECT)
    return None


def _tt2_memory(uid: bytes) -> bytes:
    """64 bytes of Type 2 tag memory: UID pages, capability container, empty NDEF."""
    if len(uid) == 7:
        # NXP layout: UID0-2 + BCC0 (with the cascade tag), UID3-6, BCC1 + internal + lock.
        bcc0 = 0x88 ^ uid[0] ^ uid[1] ^ uid[2]
        bcc1 = uid[3] ^ uid[4] ^ uid[5] ^ uid[6]
        head = uid[0:3] + bytes([bcc0]) + uid[3:7] + bytes([bcc1, 0x48, 0x00, 0x00])
    else:
        bcc = uid[0] ^ uid[1] ^ uid[2] ^ uid[3]
        head = uid + bytes([bcc]) + bytes(7)
    capability = bytes([0xE1, 0x10, 0x06, 0x00])  # NDEF v1.0, 48 data bytes, read/write
    ndef = bytes([0x03, 0x00, 0xFE])  # empty NDEF message TLV, terminator TLV
    memory = head + capability + ndef
    return memory + bytes(_TT2_PAGES * 4 - len(memory))
