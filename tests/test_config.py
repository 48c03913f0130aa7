"""Config: documented defaults, and one-line errors that name the bad key."""

from __future__ import annotations

import pytest

from controller.config import Config, ConfigError, load_config, parse_config, to_toml


def test_defaults_are_valid_and_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(to_toml(Config()))
    assert load_config(path) == Config()


def test_example_config_in_provisioning_is_valid():
    from pathlib import Path

    example = Path(__file__).parent.parent / "provisioning" / "smartcab.example.toml"
    config = load_config(example)
    assert config.rfid.protocol == "mercury"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"rfid": {"power_dbm": 40}}, "rfid.power_dbm"),
        ({"rfid": {"powr_dbm": 20}}, "rfid.powr_dbm"),
        ({"rfid": {"antennas": [1, 1]}}, "rfid.antennas"),
        ({"rfid": {"antennas": [0]}}, "rfid.antennas"),
        ({"rfid": {"protocol": "llrp"}}, "rfid.protocol"),
        ({"rfid": {"baudrate": 1234}}, "rfid.baudrate"),
        ({"gpio": {"lock_pin": "17"}}, "gpio.lock_pin"),
        ({"gpio": {"door_pin": 17}}, "gpio.door_pin"),  # same pin as the lock
        ({"gpio": {"lock_active_high": 1}}, "gpio.lock_active_high"),
        ({"cabinet": {"name": "cab/1"}}, "cabinet.name"),
        ({"cabinet": {"unlock_s": 0}}, "cabinet.unlock_s"),
        ({"nfc": {"path": "com3"}}, "nfc.path"),
        ({"mqtt": {"port": 0}}, "mqtt.port"),
        ({"mqqt": {}}, "[mqqt]"),
        ({"web": 5}, "web"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    message = str(err.value)
    assert message.startswith(f"config: {key}:"), message
    assert "\n" not in message


def test_not_fitted_pins_and_int_to_float():
    c = parse_config({"gpio": {"buzzer_pin": -1}, "cabinet": {"unlock_s": 5}})
    assert c.gpio.pin("buzzer_pin") is None
    assert c.gpio.pin("lock_pin") == 17
    assert c.cabinet.unlock_s == 5.0 and isinstance(c.cabinet.unlock_s, float)


def test_unreadable_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[rfid\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
