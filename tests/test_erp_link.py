"""ERP requests and commands over a real mosquitto, answered by a running cabinet."""

from __future__ import annotations

import json
import queue
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.erp import sign_request
from provisioning.demo import DEMO_USERS
from tests.cabinet_driver import state, tap
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)

KEY = "a test key of at least 16 bytes"


class Erp:
    """An ERP client using MQTT 5 request/response."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.replies: queue.Queue[tuple[bytes, dict]] = queue.Queue()
        self.reply_topic = f"erp/replies/{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.replies.put(
            (m.properties.CorrelationData, json.loads(m.payload))
        )
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(self.reply_topic, qos=1)
        self.client.loop_start()

    def request(self, op: str, body: dict, *, sign: bool = False) -> dict:
        site, cabinet = self.prefix.split("/")[1:3]
        if sign:
            body = sign_request(KEY.encode(), site, cabinet, op, body, client="erp-test")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = uuid.uuid4().bytes
        self.client.publish(f"{self.prefix}/req/{op}", json.dumps(body), qos=1, properties=props)
        correlation, reply = self.replies.get(timeout=20)
        assert correlation == props.CorrelationData
        return reply

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def erp_cabinet(broker, demo_factory):
    demo = demo_factory(broker.port, command_key=KEY)
    wait_until(lambda: state(demo).get("mqtt") == "connected", 10, "the cabinet's MQTT link")
    erp = Erp(broker.port, demo.config.topic_prefix)
    yield demo, erp
    erp.close()


def test_reads_answer_over_mqtt(erp_cabinet):
    demo, erp = erp_cabinet
    assert erp.request("ping", {})["ok"] is True
    status = erp.request("get_status", {})
    assert status["ok"] and status["result"]["cabinet"] == demo.config.cabinet.name
    events = erp.request("get_events", {"since_seq": 0})["result"]
    assert events["events"][0]["type"] == "inventory_baseline"
    inventory = erp.request("get_inventory", {})["result"]
    assert len(inventory["inside"]) == 25
    bad = erp.request("get_events", {"since_seq": -1})
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request"


def test_commands_need_a_signature_and_act_on_the_cabinet(erp_cabinet):
    demo, erp = erp_cabinet
    lock_pin = demo.hw.factory.pin(demo.config.gpio.lock_pin)
    lock_pin.clear_states()
    store = demo.app.open_store()
    bob_id = store.check_badge(DEMO_USERS[1].badge).user_id
    store.close()
    refused = erp.request("remote_unlock", {"user_id": bob_id, "reason": "forgot badge"})
    assert refused["ok"] is False and refused["error"]["code"] == "unauthorised"
    assert not any(s.state for s in lock_pin.states)
    done = erp.request("remote_unlock", {"user_id": bob_id, "reason": "forgot badge"}, sign=True)
    assert done["ok"] is True, done
    assert state(demo)["state"] == "unlocked" and lock_pin.state
    store = demo.app.open_store()
    event = store.recent_events(1, type="remote_unlock")[0]
    store.close()
    assert event["user"]["name"] == "Bob Nguyen"
    assert event["data"] == {"requested_by": "erp-test", "reason": "forgot badge"}


def test_lockdown_denies_badges_until_release(erp_cabinet):
    demo, erp = erp_cabinet
    assert erp.request("lockdown", {"reason": "audit"}, sign=True)["ok"] is True
    tap(demo, DEMO_USERS[0].badge)
    wait_until(
        lambda: (state(demo).get("last_denied") or {}).get("reason") == "cabinet locked down",
        10,
        "the badge to be refused",
    )
    assert state(demo)["lock"] == "locked"
    assert erp.request("release", {"reason": "audit done"}, sign=True)["ok"] is True
    scan = erp.request("scan_now", {}, sign=True)
    assert scan["ok"] is True and scan["result"]["tags"] == 25
