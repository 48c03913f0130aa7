"""The example ERP consumer: CabinetStream's ordering, de-duplication and gap filling, and
the whole consumer against a real mosquitto with a responder built on RequestHandler."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.erp import ErpSecurity, RequestHandler, RequestMeta
from controller.store import Store
from tests.conftest import wait_until

_PATH = Path(__file__).parents[1] / "examples" / "erp_consumer.py"
_spec = importlib.util.spec_from_file_location("erp_consumer", _PATH)
assert _spec and _spec.loader
erp_consumer = importlib.util.module_from_spec(_spec)
sys.modules["erp_consumer"] = erp_consumer  # dataclasses and typing look modules up
_spec.loader.exec_module(erp_consumer)
CabinetStream = erp_consumer.CabinetStream
ErpConsumer = erp_consumer.ErpConsumer


def ev(seq: int, event_id: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id or f"id-{seq}", "seq": seq, "site": "s", "cabinet": "c"}


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


# -- CabinetStream -------------------------------------------------------------------------


def test_in_order_events_pass_and_duplicates_are_dropped() -> None:
    s = CabinetStream()
    assert seqs(s.offer(ev(1), 0)) == [1]
    assert s.offer(ev(1), 0) == []  # again after delivery
    assert seqs(s.offer(ev(2), 0)) == [2]
    assert seqs(s.offer(ev(3), 0)) == [3]
    assert s.offer(ev(3), 0) == []
    assert (s.next_seq, s.delivered, s.duplicates) == (4, 3, 2)
    assert s.gap() is None and s.due_fill(100) is None


def test_out_of_order_events_are_buffered_then_released_in_order() -> None:
    s = CabinetStream(gap_grace_s=5)
    assert s.offer(ev(3), 0) == []
    assert s.offer(ev(3), 0) == []  # duplicate while buffered
    assert s.offer(ev(2), 1) == []
    assert s.buffered == 2 and s.gap() == (1, 1)
    assert s.due_fill(2) is None  # still within the grace period
    assert seqs(s.offer(ev(1), 3)) == [1, 2, 3]
    assert s.gap() is None and s.buffered == 0 and s.duplicates == 1


def test_a_gap_is_detected_and_filled() -> None:
    s = CabinetStream(gap_grace_s=2, fill_timeout_s=10)
    s.offer(ev(1), 0)
    assert s.offer(ev(3), 0) == []
    assert s.gap() == (2, 2)
    assert s.due_fill(1.9) is None
    assert s.due_fill(2.0) == 1  # get_events since_seq=1
    assert s.due_fill(5.0) is None  # one request in flight
    assert s.due_fill(12.0) == 1  # unanswered: asked again after the timeout
    # the answer includes the buffered 3: delivered once
    assert seqs(s.fill_result([ev(2), ev(3)], last_seq=3, now=12.5)) == [2, 3]
    assert s.gap() is None and s.due_fill(100) is None and s.delivered == 3


def test_a_big_gap_is_filled_page_by_page() -> None:
    s = CabinetStream(gap_grace_s=1)
    s.offer(ev(10), 0)
    assert s.gap() == (1, 9)
    assert s.due_fill(1) == 0
    got = s.fill_result([ev(i) for i in range(1, 5)], last_seq=12, now=1.5)
    assert seqs(got) == [1, 2, 3, 4]
    assert s.gap() == (5, 9)
    assert s.due_fill(1.5) == 4  # more pages: at once, no new grace
    got = s.fill_result([ev(i) for i in range(5, 13)], last_seq=12, now=1.6)
    assert seqs(got) == list(range(5, 13))
    assert s.next_seq == 13 and s.gap() is None


def test_the_tail_is_found_by_the_periodic_sync() -> None:
    s = CabinetStream(sync_every_s=30)
    s.offer(ev(1), 0)
    assert s.due_fill(10) is None
    assert s.due_fill(31) == 1
    assert seqs(s.fill_result([ev(2)], last_seq=2, now=31.5)) == [2]
    assert s.due_fill(40) is None


def test_a_resumed_stream_ignores_older_events_and_syncs_at_once() -> None:
    s = CabinetStream(next_seq=10, sync_every_s=60)
    assert s.due_fill(0) == 9
    s.fill_result([], last_seq=9, now=0.1)
    assert s.offer(ev(5), 1) == [] and s.stale == 1
    assert seqs(s.offer(ev(10), 1)) == [10]


def test_an_old_seq_under_a_new_event_id_is_not_delivered_again() -> None:
    s = CabinetStream()
    for i in (1, 2, 3):
        s.offer(ev(i), 0)
    assert s.offer(ev(2, "other-id"), 1) == [] and s.stale == 1
    s.offer(ev(5), 1)
    assert s.offer(ev(5, "another-id"), 1) == [] and s.stale == 2


def test_a_full_buffer_drops_events_that_a_fill_brings_back() -> None:
    s = CabinetStream(max_buffer=2, gap_grace_s=0)
    for i in (3, 4, 5):
        assert s.offer(ev(i), 0) == []
    assert s.buffered == 2 and s.dropped == 1 and s.gap() == (1, 2)
    assert s.due_fill(0) == 0
    got = s.fill_result([ev(i) for i in range(1, 6)], last_seq=5, now=0)
    assert seqs(got) == [1, 2, 3, 4, 5]


def test_remembered_ids_are_bounded() -> None:
    s = CabinetStream(remember_ids=3)
    for i in range(1, 11):
        s.offer(ev(i), 0)
    assert len(s._ids) == 3
    with pytest.raises(ValueError):
        CabinetStream(next_seq=0)


@settings(max_examples=150, deadline=None, database=None)
@given(
    n=st.integers(1, 40),
    data=st.data(),
    page=st.integers(1, 7),
)
def test_any_arrival_order_with_losses_and_duplicates_delivers_each_once_in_order(
    n: int, data: st.DataObject, page: int
) -> None:
    events = [ev(i) for i in range(1, n + 1)]
    arrivals = data.draw(st.lists(st.sampled_from(events), max_size=3 * n))  # any order, dups, gaps
    lost = data.draw(st.integers(0, 3))  # how many get_events requests go unanswered
    s = CabinetStream(gap_grace_s=1, fill_timeout_s=3, sync_every_s=5)
    out: list[dict[str, Any]] = []
    now = 0.0
    queue = list(arrivals)
    for _ in range(20 * n + 200):
        now += 0.5
        if queue and data.draw(st.booleans()):
            out += s.offer(queue.pop(0), now)
        since = s.due_fill(now)
        if since is not None:
            if lost and data.draw(st.booleans()):
                lost -= 1
            else:
                out += s.fill_result(events[since : since + page], last_seq=n, now=now)
        if len(out) == n:
            break
    for late in queue:  # whatever still arrives is a duplicate by now
        out += s.offer(late, now)
    assert seqs(out) == list(range(1, n + 1))
    assert len({e["event_id"] for e in out}) == n


# -- against mosquitto ---------------------------------------------------------------------


class Responder:
    """Answers requests for several cabinets with RequestHandler over MQTT 5."""

    def __init__(self, port: int, handlers: dict[tuple[str, str], RequestHandler]) -> None:
        self.handlers = handlers
        self.requests: list[tuple[str, str, str, dict[str, Any]]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="responder", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("smartcab/+/+/req/+", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10), "responder could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        _, site, cabinet, _, op = msg.topic.split("/")
        self.requests.append((site, cabinet, op, json.loads(msg.payload)))
        meta = RequestMeta(
            getattr(msg.properties, "ResponseTopic", None),
            getattr(msg.properties, "CorrelationData", None),
        )
        reply = self.handlers[(site, cabinet)].handle(op, msg.payload, meta)
        if reply is not None:
            props = Properties(PacketTypes.PUBLISH)
            if reply.correlation_data is not None:
                props.CorrelationData = reply.correlation_data
            client.publish(reply.topic, reply.payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class NoCommands:
    def remote_unlock(self, user_id: int, requested_by: str, reason: str) -> dict:
        raise AssertionError("not used")

    def lockdown(self, on: bool, requested_by: str, reason: str) -> dict:
        raise AssertionError("not used")

    def scan_now(self) -> dict:
        raise AssertionError("not used")

    def status(self) -> dict:
        raise AssertionError("not used")


def make_cabinet(tmp_path: Path, name: str, count: int) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path / f"{name}.db"
    store = Store(path, site="s1", cabinet=name)
    store.migrate()
    with store.write():
        events = [store.append_event("door_opened", data={"n": i}) for i in range(count)]
    store.close()
    return path, events


def test_consumer_delivers_each_event_once_in_order_and_fills_gaps(
    broker: Any, tmp_path: Path
) -> None:
    paths, events = {}, {}
    for name, count in (("c1", 6), ("c2", 4)):
        paths[name], events[name] = make_cabinet(tmp_path, name, count)
    handlers = {
        ("s1", name): RequestHandler(
            "s1",
            name,
            lambda p=paths[name], n=name: Store(p, site="s1", cabinet=n),
            NoCommands(),
            ErpSecurity(None),
        )
        for name in paths
    }
    responder = Responder(broker.port, handlers)
    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_event(event: dict[str, Any]) -> None:
        with lock:
            got.append(event)

    def delivered(cabinet: str) -> list[int]:
        with lock:
            return [e["seq"] for e in got if e["cabinet"] == cabinet]

    client_id = f"erp-{uuid.uuid4().hex[:8]}"
    consumer = ErpConsumer(
        "127.0.0.1",
        broker.port,
        client_id=client_id,
        group="erp-test",
        on_event=on_event,
        gap_grace_s=0.3,
        fill_timeout_s=3,
        sync_every_s=None,
    )
    consumer.start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        assert consumer.ready.wait(10), "consumer could not subscribe"

        def publish(cabinet: str, order: list[int]) -> None:
            for seq in order:
                body = json.dumps(events[cabinet][seq - 1])
                publisher.publish(f"smartcab/s1/{cabinet}/events", body, qos=1).wait_for_publish(5)

        # c1: duplicates and seq 4 never published (a gap only get_events can fill);
        # c2: out of order with duplicates.
        publish("c1", [1, 2, 2, 3, 5, 6, 5])
        publish("c2", [2, 1, 3, 3, 4, 1])
        wait_until(lambda: len(delivered("c1")) >= 6 and len(delivered("c2")) >= 4, 15, "events")
        threading.Event().wait(0.5)  # anything extra would arrive now
        assert delivered("c1") == [1, 2, 3, 4, 5, 6]
        assert delivered("c2") == [1, 2, 3, 4]
        with lock:
            by_id = {e["event_id"]: e for e in got}
        assert len(by_id) == 10
        assert all(by_id[e["event_id"]] == e for e in events["c1"] + events["c2"])
        fills = [r for r in responder.requests if r[2] == "get_events"]
        assert fills and fills[0][:2] == ("s1", "c1") and fills[0][3]["since_seq"] == 3
        stats = consumer.stats()
        assert stats["duplicates"] + stats["stale"] >= 4 and stats["buffered"] == 0
        checkpoints = consumer.checkpoints()
        assert checkpoints == {("s1", "c1"): 7, ("s1", "c2"): 5}
    finally:
        consumer.stop()

    # The persistent session keeps what is published while the consumer is away.
    store = Store(paths["c1"], site="s1", cabinet="c1")
    with store.write():
        late = store.append_event("door_closed")
    store.close()
    publisher.publish("smartcab/s1/c1/events", json.dumps(late), qos=1).wait_for_publish(5)
    again = ErpConsumer(
        "127.0.0.1",
        broker.port,
        client_id=client_id,
        group="erp-test",
        on_event=on_event,
        start_seqs=checkpoints,
        sync_every_s=None,
    )
    again.start()
    try:
        wait_until(lambda: len(delivered("c1")) >= 7, 15, "the event queued while away")
        threading.Event().wait(0.3)
        assert delivered("c1") == [1, 2, 3, 4, 5, 6, 7] and delivered("c2") == [1, 2, 3, 4]
    finally:
        again.stop()
        publisher.loop_stop()
        responder.close()
