#!/usr/bin/env python3
"""An example ERP-side consumer of smartcab events (paho-mqtt 2, MQTT 5).

It subscribes to every cabinet's events with a shared subscription
(``$share/<group>/smartcab/+/+/events``) on a persistent session (Clean Start off,
a Session Expiry Interval), so QoS 1 events wait on the broker while it is down.
Per cabinet it drops duplicates (by ``event_id``), buffers events that arrive
early, detects ``seq`` gaps, and fills them with ``get_events`` requests (MQTT 5
ResponseTopic + CorrelationData). It hands events to a callback in ``seq`` order,
each exactly once.

Usage as a script (prints one JSON event per line)::

    python examples/erp_consumer.py --host broker.example --port 1883 \\
        --client-id erp-1 --group erp --state /var/lib/erp/smartcab-seq.json

Things to know when building on it:

* The callback runs on paho's network thread, before the PUBACK of the message
  that completed it. Make it durable (e.g. write to the ERP's database) and quick.
* ``checkpoints()`` gives each cabinet's next expected ``seq``; persist it (the
  script's ``--state``) and pass it back as ``start_seqs`` so a restart resumes
  there. A cabinet with no checkpoint starts at seq 1: its whole history is
  fetched with ``get_events``.
* A shared subscription spreads one cabinet's events over all group members.
  Ordering needs one owner per cabinet. Either use a broker strategy that keeps a
  topic on one member (EMQX ``hash_topic``), partition by site
  (``--topic 'smartcab/<site>/+/events'``), or keep the checkpoint and
  de-duplication in the shared database. With mosquitto's round-robin, every member
  sees the others' events as gaps and fills them itself. That is correct but does
  the work N times.
* An event lost at the tail (nothing newer arrives) is found by the periodic
  ``get_events`` poll (``sync_every_s``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("erp_consumer")

CabinetKey = tuple[str, str]  # (site, cabinet)
_TOPIC = re.compile(r"^smartcab/([^/]+)/([^/]+)/events$")


class CabinetStream:
    """Ordering, de-duplication and gap detection for one cabinet's events (no I/O).

    ``offer`` returns the events that can now be delivered, in ``seq`` order.
    ``due_fill`` says when to ask the cabinet for ``get_events`` (and from where).
    ``fill_result`` takes the answer. Time is passed in, so tests control it.
    """

    def __init__(
        self,
        next_seq: int = 1,
        *,
        gap_grace_s: float = 2.0,
        fill_timeout_s: float = 10.0,
        sync_every_s: float | None = None,
        remember_ids: int = 10_000,
        max_buffer: int = 100_000,
    ) -> None:
        if next_seq < 1:
            raise ValueError("next_seq starts at 1")
        self.next_seq = next_seq
        self.gap_grace_s = gap_grace_s
        self.fill_timeout_s = fill_timeout_s
        self.sync_every_s = sync_every_s
        self.remember_ids = remember_ids
        self.max_buffer = max_buffer
        self.known_last_seq = next_seq - 1  # newest seq we know exists at the cabinet
        self.delivered = 0
        self.duplicates = 0
        self.stale = 0  # older than next_seq under an unknown event_id (evicted id or reset)
        self.dropped = 0  # beyond max_buffer; fetched again by a fill
        self._buffer: dict[int, dict[str, Any]] = {}
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._gap_since: float | None = None
        self._fill_sent: float | None = None
        self._last_activity: float | None = None

    # -- input ----------------------------------------------------------------------

    def offer(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """Take one event; return what is deliverable now (possibly nothing)."""
        self._last_activity = now
        event_id, seq = event["event_id"], event["seq"]
        if event_id in self._ids:
            self.duplicates += 1
            return []
        if seq < self.next_seq or seq in self._buffer:
            self.stale += 1
            return []
        self.known_last_seq = max(self.known_last_seq, seq)
        if seq != self.next_seq and len(self._buffer) >= self.max_buffer:
            self.dropped += 1  # not remembered, so the refetched copy is accepted
            self._update_gap(now)
            return []
        self._remember(event_id)
        self._buffer[seq] = event
        out = []
        while self.next_seq in self._buffer:
            out.append(self._buffer.pop(self.next_seq))
            self.next_seq += 1
        self.delivered += len(out)
        if out:
            self._gap_since = None  # the head moved: a remaining gap gets a fresh grace
        self._update_gap(now)
        return out

    def fill_result(
        self, events: list[dict[str, Any]], last_seq: int, now: float
    ) -> list[dict[str, Any]]:
        """Take a ``get_events`` answer; return what is deliverable now."""
        self._fill_sent = None
        out: list[dict[str, Any]] = []
        for event in events:
            out.extend(self.offer(event, now))
        self.known_last_seq = max(self.known_last_seq, last_seq)
        self._update_gap(now)
        if self.gap() is not None:
            self._gap_since = now - self.gap_grace_s  # more pages: ask again at once
        return out

    def fill_failed(self) -> None:
        """The request was refused or unanswerable; retry after ``fill_timeout_s``."""

    # -- state -------------------------------------------------------------------------

    def gap(self) -> tuple[int, int] | None:
        """The first missing seq range (inclusive), or None."""
        if self.known_last_seq < self.next_seq:
            return None
        end = min(self._buffer) - 1 if self._buffer else self.known_last_seq
        return (self.next_seq, end)

    def due_fill(self, now: float) -> int | None:
        """``since_seq`` for a ``get_events`` request if one should go out now."""
        if self._fill_sent is not None and now - self._fill_sent < self.fill_timeout_s:
            return None
        gap = self.gap()
        if gap is not None:
            if self._gap_since is None or now - self._gap_since < self.gap_grace_s:
                return None
        elif self.sync_every_s is None or (
            # never heard from (e.g. resumed from a checkpoint): sync at once
            self._last_activity is not None and now - self._last_activity < self.sync_every_s
        ):
            return None
        self._fill_sent = now
        self._last_activity = now
        return self.next_seq - 1

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _update_gap(self, now: float) -> None:
        if self.gap() is None:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = now

    def _remember(self, event_id: str) -> None:
        self._ids[event_id] = None
        while len(self._ids) > self.remember_ids:
            self._ids.popitem(last=False)


def _valid_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("event_id"), str)
        and isinstance(event.get("seq"), int)
        and not isinstance(event.get("seq"), bool)
        and event["seq"] >= 1
    )


class ErpConsumer:
    """Shared-subscription consumer of all cabinets' events; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        on_event: Callable[[dict[str, Any]], None],
        group: str = "erp",
        topic: str = "smartcab/+/+/events",
        session_expiry_s: int = 3600,
        start_seqs: dict[CabinetKey, int] | None = None,
        gap_grace_s: float = 2.0,
        fill_timeout_s: float = 10.0,
        sync_every_s: float | None = 300.0,
        page_size: int = 500,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", client_id):
            raise ValueError("client_id: 1-64 letters, digits, '-' or '_'")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", group):
            raise ValueError("group: 1-64 letters, digits, '-' or '_'")
        if not 1 <= page_size <= 500:
            raise ValueError("page_size must be between 1 and 500")
        self.host, self.port = host, port
        self.on_event = on_event
        self.subscription = f"$share/{group}/{topic}"
        self.reply_topic = f"erp/replies/{client_id}"
        self.session_expiry_s = session_expiry_s
        self.page_size = page_size
        self._stream_args = {
            "gap_grace_s": gap_grace_s,
            "fill_timeout_s": fill_timeout_s,
            "sync_every_s": sync_every_s,
        }
        self._streams: dict[CabinetKey, CabinetStream] = {
            key: CabinetStream(seq, **self._stream_args) for key, seq in (start_seqs or {}).items()
        }
        self._pending: dict[bytes, CabinetKey] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.requests_sent = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        self.client.reconnect_delay_set(0.2, 10)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._ticker = threading.Thread(target=self._tick, name="erp-consumer", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        # clean_start=False on every connect: paho's default would wipe the session the
        # first time this process connects, losing events queued while we were away.
        self.client.connect_async(self.host, self.port, clean_start=False, properties=props)
        self.client.loop_start()
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._ticker.is_alive():
            self._ticker.join(5)

    def checkpoints(self) -> dict[CabinetKey, int]:
        """Each cabinet's next expected seq: persist it to resume after a restart."""
        with self._lock:
            return {key: s.next_seq for key, s in self._streams.items()}

    def stats(self) -> dict[str, int]:
        with self._lock:
            streams = list(self._streams.values())
        return {
            "cabinets": len(streams),
            "delivered": sum(s.delivered for s in streams),
            "duplicates": sum(s.duplicates for s in streams),
            "stale": sum(s.stale for s in streams),
            "buffered": sum(s.buffered for s in streams),
            "requests": self.requests_sent,
        }

    # -- paho's thread ------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("connect refused: %s", reason)
            return
        client.subscribe([(self.subscription, 1), (self.reply_topic, 1)])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription refused: %s", [str(r) for r in reasons])
            return
        self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.reply_topic:
                self._on_reply(msg)
            else:
                self._on_event(msg)
        except Exception:
            # An exception here would stop paho's loop; log it and keep consuming.
            log.exception("failed to handle a message on %s", msg.topic)

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        match = _TOPIC.match(msg.topic)
        try:
            event = json.loads(msg.payload)
        except ValueError:
            event = None
        if match is None or not _valid_event(event):
            log.warning("ignoring malformed event on %s", msg.topic)
            return
        key = (match.group(1), match.group(2))
        if (event.get("site"), event.get("cabinet")) != key:
            log.warning("ignoring event whose site/cabinet do not match %s", msg.topic)
            return
        with self._lock:
            ready = self._stream(key).offer(event, time.monotonic())
        self._deliver(ready)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            key = self._pending.pop(corr, None) if corr else None
        if key is None:
            return  # a late or foreign reply
        try:
            body = json.loads(msg.payload)
            result = body["result"] if body.get("ok") else None
        except (ValueError, AttributeError, KeyError, TypeError):
            result = None
        with self._lock:
            stream = self._stream(key)
            if not isinstance(result, dict) or not isinstance(result.get("events"), list):
                log.warning("get_events for %s/%s failed: %.200s", *key, msg.payload)
                stream.fill_failed()
                return
            events = [
                e
                for e in result["events"]
                if _valid_event(e) and (e.get("site"), e.get("cabinet")) == key
            ]
            last_seq = result.get("last_seq")
            last = last_seq if isinstance(last_seq, int) else 0
            ready = stream.fill_result(events, last, time.monotonic())
            if last < stream.next_seq - 1:
                log.warning("%s/%s has last_seq %d below ours: was it reset?", *key, last)
        self._deliver(ready)

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        # Only paho's thread delivers, so per-cabinet order holds without the lock.
        for event in events:
            self.on_event(event)

    def _stream(self, key: CabinetKey) -> CabinetStream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = CabinetStream(1, **self._stream_args)
        return stream

    # -- the ticker: gap fills and periodic syncs ----------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(0.05):
            if not self.client.is_connected():
                continue
            now = time.monotonic()
            with self._lock:
                due = [(key, s.due_fill(now)) for key, s in self._streams.items()]
            for key, since in due:
                if since is not None:
                    self._request_events(key, since)

    def _request_events(self, key: CabinetKey, since_seq: int) -> None:
        corr = uuid.uuid4().bytes
        with self._lock:
            # forget unanswered requests for this cabinet: their replies are now stale
            for old in [c for c, k in self._pending.items() if k == key]:
                del self._pending[old]
            self._pending[corr] = key
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        # A request nobody answers in time must not run later.
        props.MessageExpiryInterval = max(1, int(self._stream_args["fill_timeout_s"]))
        body = json.dumps({"since_seq": since_seq, "limit": self.page_size})
        site, cabinet = key
        self.client.publish(
            f"smartcab/{site}/{cabinet}/req/get_events", body, qos=1, properties=props
        )
        self.requests_sent += 1
        log.info("asked %s/%s for events after seq %d", site, cabinet, since_seq)


# -- the script -------------------------------------------------------------------------------


def _load_state(path: Path | None) -> dict[CabinetKey, int]:
    if path is None or not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {tuple(k.split("/", 1)): int(v) for k, v in raw.items()}  # type: ignore[misc]


def _save_state(path: Path | None, seqs: dict[CabinetKey, int]) -> None:
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({f"{s}/{c}": n for (s, c), n in sorted(seqs.items())}))
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--client-id", required=True, help="stable: it names the session")
    parser.add_argument("--group", default="erp", help="shared subscription group")
    parser.add_argument("--topic", default="smartcab/+/+/events")
    parser.add_argument("--session-expiry", type=int, default=3600, metavar="S")
    parser.add_argument("--state", type=Path, help="JSON file of next seq per cabinet")
    parser.add_argument("--username")
    parser.add_argument("--password", default=os.environ.get("SMARTCAB_ERP_PASSWORD"))
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def print_event(event: dict[str, Any]) -> None:
        print(json.dumps(event, separators=(",", ":")), flush=True)

    try:
        consumer = ErpConsumer(
            args.host,
            args.port,
            client_id=args.client_id,
            group=args.group,
            topic=args.topic,
            on_event=print_event,
            session_expiry_s=args.session_expiry,
            start_seqs=_load_state(args.state),
            username=args.username,
            password=args.password,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (ValueError, OSError) as exc:
        print(f"erp_consumer: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    consumer.start()
    try:
        while not stop.wait(5.0):
            _save_state(args.state, consumer.checkpoints())
    finally:
        consumer.stop()
        _save_state(args.state, consumer.checkpoints())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
