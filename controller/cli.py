"""The ``smartcab`` command."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from controller import __version__
from controller.config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/smartcab/smartcab.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smartcab",
        description="Controller for an RFID smart storage cabinet.",
    )
    p.add_argument("--version", action="version", version=f"smartcab {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the cabinet on its real hardware")
    run.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})"
    )

    demo = sub.add_parser("demo", help="run a simulated cabinet with a demo register")
    demo.add_argument("--http", default="127.0.0.1:8080", help="admin page HOST:PORT")
    demo.add_argument("--mqtt", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")
    demo.add_argument("--no-mqtt", action="store_true", help="run without an MQTT broker")
    demo.add_argument(
        "--data-dir", default=None, help="keep the demo's data here (default: a new temp dir)"
    )
    demo.add_argument("--site", default="demo", help="site name in MQTT topics")
    demo.add_argument("--name", default="cabinet-1", help="cabinet name in MQTT topics")
    demo.add_argument(
        "--protocol",
        default="mercury",
        choices=["mercury", "r2000"],
        help="which reader the simulated cabinet has (ThingMagic Mercury or R2000 0xA0)",
    )
    demo.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated reader speed: 1 = real time, 0 = instant (benchmarks)",
    )

    adm = sub.add_parser("set-admin", help="create or reset an admin account for the web page")
    adm.add_argument("--config", default=DEFAULT_CONFIG)
    adm.add_argument("--username", default="admin")
    adm.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )

    chk = sub.add_parser("check-config", help="validate a config file and print it")
    chk.add_argument("--config", default=DEFAULT_CONFIG)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except (ConfigError, ValueError) as exc:
        print(f"smartcab: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    # Imports are local so that `smartcab --help` and config errors stay fast.
    from controller.app import CabinetApp, StartupError

    if args.command == "check-config":
        from controller.config import to_toml

        print(to_toml(load_config(args.config)), end="")
        return 0
    if args.command == "set-admin":
        from werkzeug.security import generate_password_hash

        from controller.store import Store

        config = load_config(args.config)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass("New admin password: ")
        if len(password) < 8:
            print("smartcab: the password must have at least 8 characters", file=sys.stderr)
            return 2
        store = Store(config.db_path, site=config.cabinet.site, cabinet=config.cabinet.name)
        store.migrate()
        store.set_admin(args.username, generate_password_hash(password))
        store.close()
        print(f"admin account {args.username!r} set")
        return 0
    if args.command == "run":
        config = load_config(args.config)
        try:
            app = CabinetApp(config)
        except StartupError as exc:
            print(f"smartcab: {exc}", file=sys.stderr)
            return 2
        app.start()
        app.serve_forever()
        return 0
    if args.command == "demo":
        from provisioning.demo import Demo

        demo = Demo(
            http=args.http,
            mqtt=None if args.no_mqtt else args.mqtt,
            data_dir=args.data_dir,
            site=args.site,
            name=args.name,
            time_scale=args.time_scale,
            protocol=args.protocol,
        )
        demo.serve_forever()
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
