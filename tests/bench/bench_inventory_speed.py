"""Inventory speed and controller cost: 1,000 tags on 8 antennas, 400 tags/s.

A steady-state cabinet (the store already holds every unit with a read
history from ``--warmup`` earlier scans). Each measured transaction takes 2
units and returns 1, lets ``--gap-s`` simulated seconds pass, then runs what
the cabinet runs after the door closes: ``store.presence()``, the real
``Inventory.scan`` against the simulator over its pty (``time_scale=0``) and
``Cabinet._record_scan`` committed to a real SQLite ``Store``.

Printed per config:

* simulated seconds of the scan (``sim.clock.now()`` before/after: reader
  time, serial transfer included) and its ratio to the air-time lower bound
  (every tag read once: tags / tags_per_second);
* controller CPU per scan: ``time.thread_time()`` of the main thread, which
  runs the driver (serial I/O, frame parsing) and the inventory algorithm;
  the simulator answers from its own thread, so its CPU is *not* included
  (``time.process_time()`` of the whole process, simulator included, is
  printed next to it);
* the commit (presence read + ``_record_scan`` in one write transaction):
  main-thread CPU and wall seconds. The wall time of the commit is real time
  (fsync, synchronous=FULL), not simulated, and is added to the simulated scan
  time for "close -> events committed".

Run: python tests/bench/bench_inventory_speed.py [--scans 5] [--protocol r2000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from inventory_sim import epc_of, make_reader, start_simulator

from controller.cabinet import Cabinet
from controller.config import InventoryConfig, RfidConfig
from controller.inventory import Inventory
from controller.store import Store
from readers.rfid.rf_model import Link, Scenario, TagSpec, Timing

ANTENNAS = (1, 2, 3, 4, 5, 6, 7, 8)
RATE = 400.0


@dataclass
class Sample:
    """One measured scan."""

    sim_s: float
    passes: int
    reverify: int
    found: int
    gone: int
    uncertain: int
    cpu_ctrl_s: float
    cpu_proc_s: float
    commit_cpu_s: float
    commit_wall_s: float


def links(rng: random.Random, p: float) -> dict[int, Link]:
    """1-3 antennas that see a tag."""
    ants = rng.sample(ANTENNAS, rng.choice((1, 2, 2, 3)))
    return {a: Link(p=p, rssi=round(rng.uniform(-68, -42))) for a in ants}


def run(
    args: argparse.Namespace, rfid: RfidConfig, policy: InventoryConfig, store_dir: Path
) -> list[Sample]:
    rng = random.Random(args.seed)
    units = [epc_of(i) for i in range(args.tags)]
    scenario = Scenario(
        antenna_ports=8,
        seed=args.seed,
        tags=[TagSpec(e, links(rng, args.p)) for e in units],
        timing=Timing(tags_per_second=RATE, baudrate=args.baud),
    )
    sim = start_simulator(args.protocol, scenario)
    inv = Inventory(make_reader(args.protocol, sim), rfid, policy)
    store = Store(store_dir / "cabinet.db")
    store.migrate()
    stub: Any = SimpleNamespace(_who_took=Cabinet._who_took)
    with store.write():
        pid = store.add_product("BIN", "Parts bin")
        for i, epc in enumerate(units):
            store.add_unit(f"U-{i:05d}", pid, epc)
        uid = store.add_user("Bench User")
    user = store._one("SELECT * FROM users WHERE id = ?", [uid])
    inside, outside = list(units), []
    samples: list[Sample] = []
    try:
        scan = inv.scan({})
        with store.write():
            for epc, tag in scan.tags.items():
                unit = store.unit_by_epc(epc)
                hist = scan.history_update(epc, {})
                store.set_present(epc, unit["id"] if unit else None, tag.antennas, tag.rssi, hist)
        for n in range(args.warmup + args.scans):
            for _ in range(2):
                epc = inside.pop(rng.randrange(len(inside)))
                sim.remove_tag(epc)
                outside.append(epc)
            if len(outside) > 2:
                epc = outside.pop(0)
                sim.add_tag(epc, links(rng, args.p))
                inside.append(epc)
            sim.clock.advance(args.gap_s)
            with store.write():
                sid = store.open_session("badge", uid, None)
            session = {"id": sid, "user": user, "kind": "badge"}
            c0, p0 = time.thread_time(), time.process_time()
            presence = store.presence()
            expected = {epc: row["history"] for epc, row in presence.items()}
            t0 = sim.clock.now()
            scan = inv.scan(expected)
            sim_s = sim.clock.now() - t0
            c1, p1, w1 = time.thread_time(), time.process_time(), time.monotonic()
            with store.write():
                Cabinet._record_scan(stub, store, scan, presence, session)
            c2, w2 = time.thread_time(), time.monotonic()
            if n < args.warmup:
                continue
            samples.append(
                Sample(
                    sim_s=sim_s,
                    passes=scan.rounds,
                    reverify=scan.reverify_rounds,
                    found=len(scan.tags),
                    gone=len(scan.gone),
                    uncertain=len(scan.uncertain),
                    cpu_ctrl_s=c1 - c0,
                    cpu_proc_s=p1 - p0,
                    commit_cpu_s=c2 - c1,
                    commit_wall_s=w2 - w1,
                )
            )
    finally:
        inv.close()
        sim.stop()
        store.close()
    return samples


def show(name: str, args: argparse.Namespace, samples: list[Sample]) -> None:
    def mean(key: str) -> float:
        return statistics.mean(getattr(s, key) for s in samples)

    bound = args.tags / RATE
    sim_s = mean("sim_s")
    print(
        f"[{name}] {args.protocol}, {args.tags} tags, p={args.p}, {args.baud} Bd, "
        f"{len(samples)} scans"
    )
    print(
        f"  scan simulated s: mean={sim_s:.2f} max={max(s.sim_s for s in samples):.2f}; "
        f"air-time bound {bound:.2f} s; ratio={sim_s / bound:.2f}x"
    )
    print(
        f"  passes: main={mean('passes'):.1f} reverify={mean('reverify'):.1f}; per scan: "
        f"found={mean('found'):.0f} gone={mean('gone'):.1f} uncertain={mean('uncertain'):.1f}"
    )
    ctrl = mean("cpu_ctrl_s") + mean("commit_cpu_s")
    print(
        f"  controller CPU/scan (main thread: presence read, driver, algorithm): "
        f"{mean('cpu_ctrl_s'):.3f} s; + commit CPU {mean('commit_cpu_s'):.3f} s = {ctrl:.3f} s"
        f" = {ctrl / sim_s * 100:.2f} % of the simulated scan"
    )
    print(
        f"  process CPU during the scan (controller + simulator thread): "
        f"{mean('cpu_proc_s'):.3f} s; commit wall {mean('commit_wall_s') * 1000:.1f} ms; "
        f"close -> events committed = {sim_s + mean('commit_wall_s'):.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=("mercury", "r2000"), default="mercury")
    ap.add_argument("--tags", type=int, default=1000)
    ap.add_argument("--p", type=float, default=1.0, help="read probability per antenna visit")
    ap.add_argument("--scans", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="scans that build history first")
    ap.add_argument("--gap-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--baud", type=int, default=115200, help="simulated serial link speed")
    args = ap.parse_args()
    per_antenna = args.tags * 2 / len(ANTENNAS)  # about 2 antennas per tag
    tuned_dwell = int(per_antenna / RATE * 1000 / 2)  # half an antenna's population per visit
    configs = [
        ("default", RfidConfig(protocol=args.protocol), InventoryConfig()),
        (
            f"tuned dwell={tuned_dwell} ms, reverify dwell 100 ms",
            RfidConfig(protocol=args.protocol, dwell_ms=tuned_dwell),
            InventoryConfig(max_rounds=8, reverify_dwell_ms=100, reverify_rounds=12),
        ),
    ]
    for name, rfid, policy in configs:
        w0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            samples = run(args, rfid, policy, Path(tmp))
        show(name, args, samples)
        print(f"  wall: {time.monotonic() - w0:.1f} s")


if __name__ == "__main__":
    main()
