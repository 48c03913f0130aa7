"""Door closed -> last event of that session received by an MQTT subscriber.

200 tags on 8 antennas in the reader simulator, a real mosquitto on a free port.
Each round: badge in, open, take 2 units and return 1, close; the clock runs
from the door pin going to "closed" until the subscriber has that session's
last event. Run with the reader in real time (default config: 2 rounds x 8
antennas x 200 ms) and instant (software cost only).

Run: python tests/bench/bench_close_to_event.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from common import summary_ms
from paho.mqtt.enums import CallbackAPIVersion

from provisioning.demo import DEMO_USERS, Demo, demo_epc, placement
from tests.conftest import Broker

TAGS = 200


def run(broker: Broker, time_scale: float, rounds: int, dwell_ms: int, reader_rounds: int):
    demo = Demo(
        http="127.0.0.1:0",
        mqtt=f"127.0.0.1:{broker.port}",
        data_dir=tempfile.mkdtemp(),
        time_scale=time_scale,
        nfc_holdoff_s=0.2,
        rounds=reader_rounds,
        dwell_ms=dwell_ms,
    )
    # Fill the cabinet to 200 tagged units before it starts.
    store = demo.app.open_store()
    with store.write():
        pid = store.add_product("BIN", "Parts bin")
        for i in range(len(demo.hw.placements) - 1, TAGS):
            epc = demo_epc(i)
            store.add_unit(f"B-{i:04d}", pid, epc)
            demo.hw.know(epc, placement(i), True)
    store.close()
    arrived: list[tuple[float, dict]] = []
    got = threading.Condition()

    def on_message(c, u, msg):
        with got:
            arrived.append((time.monotonic(), json.loads(msg.payload)))
            got.notify_all()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(f"{demo.config.topic_prefix}/events", qos=1)
    sub.loop_start()
    demo.start()
    demo.wait_idle(60)
    board = demo.app.board
    inside = sorted(demo.rfid.tags())
    out: list[str] = []
    times = []
    try:
        for r in range(rounds):
            demo.app.cabinet.badge(DEMO_USERS[r % 2].badge)
            board.wait_for(lambda s: s.get("state") == "unlocked", 5)
            demo.hw.set_door(True)
            board.wait_for(lambda s: s.get("state") == "open", 5)
            take = [inside.pop(), inside.pop()]
            back = out[:1]
            out = out[1:] + take
            inside.extend(back)
            demo.hw.move_tags(add=back, remove=take)
            expected = 1 + len(take) + len(back)  # door_closed + takes + returns
            with got:
                before = len(arrived)
            t0 = time.monotonic()
            demo.hw.set_door(False)
            with got:
                done = before + expected
                if not got.wait_for(lambda done=done: len(arrived) >= done, 60):
                    raise SystemExit("events did not arrive")
                times.append(arrived[before + expected - 1][0] - t0)
    finally:
        sub.loop_stop()
        demo.stop()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            real = run(broker, 1.0, args.rounds, dwell_ms=200, reader_rounds=2)
            print(summary_ms("close -> last event, reader in real time (2 x 8 x 200 ms)", real))
            fast = run(broker, 0.0, args.rounds, dwell_ms=200, reader_rounds=2)
            print(summary_ms("close -> last event, instant reader (software only)     ", fast))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
