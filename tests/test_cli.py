"""The `smartcab` command: help, config errors, and no web page without an admin."""

from __future__ import annotations

import subprocess
import sys

import pytest

from controller.config import CabinetConfig, Config, GpioConfig, RfidConfig, to_toml

pytestmark = pytest.mark.timeout(60)


def smartcab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=30,
    )


def test_help_lists_the_commands():
    out = smartcab("--help")
    assert out.returncode == 0
    for command in ("run", "demo", "set-admin", "check-config"):
        assert command in out.stdout


def test_bad_config_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "smartcab.toml"
    path.write_text("[rfid]\npower_dbm = 45\n")
    out = smartcab("run", "--config", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "smartcab: config: rfid.power_dbm: must be between 0 and 31.5"
    ]
    path.write_text("[gpio]\nlock_pn = 4\n")
    out = smartcab("check-config", "--config", str(path))
    assert out.returncode == 2 and "gpio.lock_pn: unknown key" in out.stderr


def config_file(tmp_path) -> str:
    config = Config(
        cabinet=CabinetConfig(data_dir=str(tmp_path / "data")),
        gpio=GpioConfig(pin_factory="mock"),
        rfid=RfidConfig(port=str(tmp_path / "no-reader")),
    )
    path = tmp_path / "smartcab.toml"
    path.write_text(to_toml(config))
    return str(path)


def test_run_refuses_a_web_page_without_an_admin(tmp_path):
    out = smartcab("run", "--config", config_file(tmp_path))
    assert out.returncode == 2
    assert "no admin account" in out.stderr and "set-admin" in out.stderr


def test_set_admin_then_check_config(tmp_path):
    path = config_file(tmp_path)
    out = smartcab("set-admin", "--config", path, "--password-stdin", stdin="short\n")
    assert out.returncode == 2 and "at least 8" in out.stderr
    out = smartcab("set-admin", "--config", path, "--password-stdin", stdin="a long secret\n")
    assert out.returncode == 0, out.stderr
    from controller.store import Store

    store = Store(tmp_path / "data" / "smartcab.db")
    assert store.has_admin() and store.admin_hash("admin").startswith(("scrypt:", "pbkdf2:"))
    store.close()
    out = smartcab("check-config", "--config", path)
    assert out.returncode == 0 and 'pin_factory = "mock"' in out.stdout


def test_demo_options_reach_the_simulated_cabinet(tmp_path):
    """`smartcab demo` starts with the reader and speed asked for, and serves the page."""
    import json
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--http",
            f"127.0.0.1:{port}",
            "--no-mqtt",
            "--data-dir",
            str(tmp_path),
            "--protocol",
            "r2000",
            "--time-scale",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "admin page" in line and "password" in line
        config = (tmp_path / "smartcab.toml").read_text()
        assert 'protocol = "r2000"' in config
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/state", timeout=5) as r:
                state = json.loads(r.read())
            if state["idle"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state["idle"] and len(state["inside"]) == 25
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
