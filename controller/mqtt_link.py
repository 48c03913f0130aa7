"""The ERP link: the outbox relay and the retained status, over paho-mqtt 2 (MQTT 5).

Delivery rules (see ``../shared/research/ecosystem.md`` §1.2-1.4 for why):

* Events are already committed in the ``outbox`` table when they get here. The
  relay publishes them at QoS 1 in ``seq`` order and deletes a row only when
  paho reports the broker's PUBACK (``on_publish`` with a success reason code).
* Within one process lifetime a row is handed to paho once; paho itself re-sends
  in-flight messages after a reconnect. After a restart every row still in the
  outbox is published again: duplicates are possible by design, the consumer
  de-duplicates on ``event_id`` and sees gaps through ``seq``.
* ``status`` is retained; the Last Will replaces it with ``offline`` if the
  process dies, and a clean stop publishes ``offline`` itself.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller import __version__
from controller.cabinet import StatusBoard
from controller.config import Config
from controller.erp import Reply, RequestHandler, RequestMeta
from controller.store import Store, utcnow

log = logging.getLogger(__name__)

WINDOW = 64  # QoS 1 messages in flight at once
STATUS_MIN_INTERVAL_S = 0.2


class Outbox:
    """The relay between the ``outbox`` table and the broker; runs on its own thread."""

    def __init__(self, config: Config, open_store: Callable[[], Store], board: StatusBoard) -> None:
        self.config = config
        self.open_store = open_store
        self.board = board
        self.prefix = config.topic_prefix
        mc = config.mqtt
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=mc.client_id or f"smartcab-{config.cabinet.site}-{config.cabinet.name}",
            protocol=mqtt.MQTTv5,
        )
        if mc.username:
            self.client.username_pw_set(mc.username, mc.password or None)
        if mc.tls_ca:
            self.client.tls_set(
                ca_certs=mc.tls_ca, certfile=mc.tls_cert or None, keyfile=mc.tls_key or None
            )
        self.client.will_set(
            f"{self.prefix}/status", self._status_payload("offline"), qos=1, retain=True
        )
        self.client.max_inflight_messages_set(WINDOW)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        # Set before start(): answers ERP requests on <prefix>/req/<op>.
        self.handler: RequestHandler | None = None
        self._requests: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=1000)
        self._acks: queue.Queue[tuple[int, bool]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._last_sent = 0  # highest seq handed to paho in this process
        self._status_version = -1
        self._thread: threading.Thread | None = None
        self.delivered = 0  # rows acknowledged since start (for benchmarks and the page)

    # -- paho's thread: only flags and queues --------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.board.update(mqtt=f"refused: {reason}")
            return
        self._connected.set()
        if self.handler is not None:
            client.subscribe(f"{self.prefix}/req/+", qos=1)
        self._status_version = -1  # republish status on every connect
        self.board.update(mqtt="connected")
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected.clear()
        self.board.update(mqtt=f"disconnected ({reason})")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        self._acks.put((mid, not reason.is_failure))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Requests are answered on their own thread: a command may wait for the
        # cabinet thread, and paho's thread must keep acknowledging publishes.
        try:
            self._requests.put_nowait(msg)
        except queue.Full:
            log.warning("ERP request dropped: %d requests already waiting", self._requests.qsize())

    def _serve_requests(self) -> None:
        while (msg := self._requests.get()) is not None:
            assert self.handler is not None
            props = getattr(msg, "properties", None)
            meta = RequestMeta(
                getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None)
            )
            op = msg.topic.rsplit("/", 1)[-1]
            reply = self.handler.handle(op, msg.payload, meta)
            if reply is not None:
                self._send_reply(reply)

    def _send_reply(self, reply: Reply) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if reply.correlation_data is not None:
            props.CorrelationData = reply.correlation_data
        props.ContentType = "application/json"
        self.client.publish(reply.topic, reply.payload, qos=1, properties=props)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.board.update(mqtt="connecting")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async(
            self.config.mqtt.host,
            self.config.mqtt.port,
            keepalive=self.config.mqtt.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        if self.handler is not None:
            threading.Thread(target=self._serve_requests, name="erp-requests", daemon=True).start()

    def wake(self) -> None:
        """New rows are in the outbox (called by the cabinet after a commit)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (the Will is not sent on a clean disconnect) and stop."""
        self._stop.set()
        self._wake.set()
        try:
            self._requests.put_nowait(None)  # ends the request worker
        except queue.Full:
            pass  # the worker is a daemon thread; it ends with the process
        if self._thread:
            self._thread.join(timeout)
        if self._connected.is_set():
            info = self.client.publish(
                f"{self.prefix}/status", self._status_payload("offline"), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # -- the relay thread ----------------------------------------------------------

    def _run(self) -> None:
        store = self.open_store()
        try:
            while not self._stop.is_set():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                try:
                    self._drain_acks(store)
                    if self._connected.is_set():
                        self._publish_status(store)
                        self._send(store)
                except Exception:
                    log.exception("outbox relay error; retrying")
                    self._stop.wait(1.0)
        finally:
            store.close()

    def _drain_acks(self, store: Store) -> None:
        done: list[int] = []
        while True:
            try:
                mid, ok = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # status messages are not tracked
            if ok:
                done.append(seq)
            else:
                # The broker refused it: send it again, from that point, in order.
                log.warning("broker refused event seq %d; will re-send", seq)
                self._last_sent = min(self._last_sent, seq - 1)
        if done:
            store.outbox_ack(done)
            self.delivered += len(done)
            self.board.update(outbox=store.outbox_depth())

    def _send(self, store: Store) -> None:
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        rows = store.outbox_batch(self._last_sent, room)
        for row in rows:
            info = self.client.publish(row["topic"], row["payload"], qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("publish of seq %d failed: %s", row["seq"], info.rc)
                break
            # NO_CONN still queues the message inside paho, which sends it on reconnect.
            self._inflight[info.mid] = row["seq"]
            self._last_sent = row["seq"]
        if len(rows) == room:
            self._wake.set()  # more waiting: come back as soon as acks free the window

    def _publish_status(self, store: Store) -> None:
        if self.board.version == self._status_version:
            return
        self._status_version = self.board.version
        payload = self._status_payload("online", store)
        self.client.publish(f"{self.prefix}/status", payload, qos=1, retain=True)

    def status(self) -> dict[str, Any]:
        """The status message as a dict (the ERP's get_status answer)."""
        store = self.open_store()
        try:
            return json.loads(self._status_payload("online", store))
        finally:
            store.close()

    def _status_payload(self, state: str, store: Store | None = None) -> str:
        body: dict[str, Any] = {
            "state": state,
            "site": self.config.cabinet.site,
            "cabinet": self.config.cabinet.name,
            "version": __version__,
            "ts": utcnow(),
        }
        if store is not None:
            snap = self.board.snapshot()
            body.update(
                {
                    "cabinet_state": snap.get("state"),
                    "door": snap.get("door"),
                    "lock": snap.get("lock"),
                    "reader": snap.get("reader"),
                    "alarm": snap.get("alarm"),
                    "last_scan": snap.get("last_scan"),
                    "outbox": store.outbox_depth(),
                }
            )
        return json.dumps(body, separators=(",", ":"))
