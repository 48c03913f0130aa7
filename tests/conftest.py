"""Shared fixtures: a real mosquitto on a free loopback port, an MQTT collector,
and the simulated demo cabinet.

A missing mosquitto or chromium is a test failure, never a skip: `.ci/run`
installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Broker:
    """A mosquitto process with persistence, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {workdir}/",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_type error",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto" and then cannot write its
            # persistence file in our root-owned tmp dir; sessions would be lost.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "mosquitto.log", "ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    log = (self.workdir / "mosquitto.log").read_text()
                    pytest.fail(f"mosquitto exited: {log}")
                time.sleep(0.05)
        pytest.fail("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class Collector:
    """An ERP-like subscriber with a persistent session, collecting JSON messages."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self.raw: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"erp-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.topic = topic
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect_async("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            pytest.fail("test subscriber could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.raw.append(msg)
            self.messages.append(json.loads(msg.payload))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def unique(self) -> list[dict[str, Any]]:
        """Messages in arrival order, duplicates (same event_id) dropped."""
        seen: set[str] = set()
        out = []
        for m in self.snapshot():
            if m["event_id"] not in seen:
                seen.add(m["event_id"])
                out.append(m)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector_factory() -> Iterator[Callable[[int, str], Collector]]:
    made: list[Collector] = []

    def make(port: int, topic: str) -> Collector:
        c = Collector(port, topic)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class Http:
    """A tiny JSON client for the demo's endpoints (what the browser panel does)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        return self._send(req)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self._send(urllib.request.Request(self.base + path))

    @staticmethod
    def _send(req: urllib.request.Request) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def demo_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start simulated cabinets (``provisioning.demo.Demo``) that are stopped afterwards."""
    from provisioning.demo import Demo

    made: list[Demo] = []

    def make(
        mqtt_port: int | None = None, setup: Callable[[Demo], None] | None = None, **kwargs: Any
    ) -> Demo:
        demo = Demo(
            http="127.0.0.1:0",
            mqtt=f"127.0.0.1:{mqtt_port}" if mqtt_port else None,
            data_dir=str(tmp_path / f"demo{len(made)}"),
            time_scale=0.0,
            nfc_holdoff_s=0.2,
            **kwargs,
        )
        made.append(demo)
        if setup:
            setup(demo)  # e.g. place tags differently before the baseline scan
        demo.start()
        if not demo.wait_idle(30):
            pytest.fail("demo cabinet did not finish its baseline scan")
        demo.http = Http(demo.url)
        return demo

    yield make
    for d in made:
        d.stop()
