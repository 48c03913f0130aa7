"""Inventory accuracy: N transactions against the real ``Inventory`` and a simulated reader.

A cabinet of ``--units`` tagged units on 8 antennas (each tag seen by 1-3
antennas, read with probability ``--p`` per antenna visit, i.e. per-visit miss
0.3 by default), a few stray tags outside the door with RSSI below the -80 dBm
floor, some units with an extra weak (below-floor) link, units just taken
lying outside the door (weak reads) during their scan, and one antenna
disconnected in ``--dead-share`` of the scans. Each transaction takes and
returns 0-3 units at random (a return re-places the unit at random), lets
``--gap-s`` simulated seconds pass (the door session: Gen2 flags decay) and
scans with ``expected`` = the controller's belief, kept exactly as
``Cabinet._record_scan`` keeps the presence table (gone -> removed; uncertain
-> kept, flagged once; seen -> present with ``history_update``).

Counted against ground truth: false ``unit_taken`` (gone while inside), false
``unit_returned`` (newly accepted, not inside), missed takes (not gone by the
end of the next transaction's scan), missed returns (not seen in its own
scan), ``unit_uncertain`` events, passes and simulated seconds per scan.

Run: python tests/bench/bench_inventory_accuracy.py [--transactions 10000]
     [--protocol mercury|r2000] [--units 150] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field

from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from inventory_sim import CountingReader, epc_of, make_reader, start_simulator

from controller.config import InventoryConfig, RfidConfig
from controller.inventory import Inventory, Scan, TagHistory
from readers.rfid.rf_model import Gen2Settings, Link, Scenario, TagSpec, Timing

ANTENNAS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass
class Belief:
    """The controller's presence row for one tag (as in the store)."""

    history: TagHistory
    uncertain_since: int | None = None  # transaction that flagged it


@dataclass
class Counts:
    """What the benchmark counts."""

    transactions: int = 0
    takes: int = 0
    returns: int = 0
    false_takes: int = 0
    false_returns: int = 0
    false_unknown: int = 0  # a stray EPC accepted as inside
    false_presence: int = 0  # a believed tag that is outside accepted as seen
    takes_on_time: int = 0
    takes_late: int = 0  # gone in the next transaction's scan (after uncertain)
    missed_takes: int = 0
    returns_on_time: int = 0
    missed_returns: int = 0
    late_appeared: int = 0  # inside, not believed, accepted in a later scan
    uncertain_inside: int = 0  # unit_uncertain about a unit that was inside
    uncertain_taken: int = 0  # unit_uncertain about a unit that had left
    uncertain_dead: int = 0  # ... because every antenna that reads it was down
    doubted_then_returned: int = 0  # a take reported uncertain, back before it settled
    doubts: dict[str, tuple[int, str]] = field(default_factory=dict)  # epc -> (tx, why)
    confirmed: int = 0
    unit_scans: int = 0  # expected tags looked at, summed over scans
    degraded_scans: int = 0
    baseline_missed: int = 0
    unbelieved_takes: int = 0  # taken while the controller did not believe it inside
    stray_share: float = 0.0  # below-floor share of per-pass sightings
    passes: list[int] = field(default_factory=list)
    sim_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def random_links(rng: random.Random, p: float) -> dict[int, Link]:
    """1-3 antennas that see a unit, read with ``p`` per visit."""
    ants = rng.sample(ANTENNAS, rng.choice((1, 1, 2, 2, 2, 3)))
    return {a: Link(p=p, rssi=round(rng.uniform(-68, -42))) for a in ants}


def with_weak_link(rng: random.Random, links: dict[int, Link]) -> dict[int, Link]:
    """``links`` plus a below-floor read on another antenna (a present tag's weak read)."""
    other = [a for a in ANTENNAS if a not in links]
    out = dict(links)
    if other:
        out[rng.choice(other)] = Link(p=0.2, rssi=rng.choice((-86, -85, -84, -83)))
    return out


def weak_link(rng: random.Random) -> dict[int, Link]:
    """A tag outside the door: one antenna, weak (below -80 dBm even with 2 dB of noise)."""
    return {rng.choice(ANTENNAS): Link(p=0.5, rssi=rng.choice((-87, -85, -84, -83)))}


def run(args: argparse.Namespace) -> Counts:
    rng = random.Random(args.seed)
    units = [epc_of(i) for i in range(args.units)]
    placed = {}
    for epc in units:
        links = random_links(rng, args.p)
        if rng.random() < args.weak_share:
            links = with_weak_link(rng, links)
        placed[epc] = links
    strays = [epc_of(i, "E2809999") for i in range(args.strays)]
    scenario = Scenario(
        antenna_ports=8,
        seed=args.seed,
        tags=[TagSpec(e, placed[e]) for e in units]
        + [TagSpec(e, weak_link(rng), stray=True) for e in strays],
        timing=Timing(tags_per_second=400.0),
        gen2=Gen2Settings(miss_probability=args.reply_miss),
    )
    sim = start_simulator(args.protocol, scenario)
    policy = InventoryConfig()
    reader = CountingReader(make_reader(args.protocol, sim), policy.rssi_floor_dbm)
    inv = Inventory(reader, RfidConfig(protocol=args.protocol, port=sim.port), policy)  # type: ignore[arg-type]
    c = Counts()
    inside = set(units)
    outside: list[str] = []
    belief: dict[str, Belief] = {}
    pending: dict[str, int] = {}  # taken unit -> transaction of the take, until declared gone
    try:
        # Start-up baseline (Cabinet._baseline): whatever the first scan sees.
        scan = inv.scan({})
        for epc in scan.tags:
            if epc in inside:
                belief[epc] = Belief(scan.history_update(epc, {}))
        c.baseline_missed = len(inside - set(belief))
        wall0 = time.monotonic()
        total = args.transactions + 1  # one last scan settles the last transaction
        for tx in range(total):
            last = tx == args.transactions
            taken: list[str] = []
            returned: list[str] = []
            nearby: list[str] = []
            if not last:
                c.transactions += 1
                for _ in range(rng.randint(0, 3)):
                    if outside:
                        epc = outside.pop(rng.randrange(len(outside)))
                        links = random_links(rng, args.p)
                        if rng.random() < args.weak_share:
                            links = with_weak_link(rng, links)
                        sim.add_tag(epc, links)
                        inside.add(epc)
                        returned.append(epc)
                for _ in range(rng.randint(0, 3)):
                    candidates = sorted(inside - set(returned))
                    if not candidates:
                        break
                    epc = rng.choice(candidates)
                    sim.remove_tag(epc)
                    inside.discard(epc)
                    outside.append(epc)
                    taken.append(epc)
                    if epc in belief:
                        pending[epc] = tx
                    else:
                        c.unbelieved_takes += 1
                    if rng.random() < args.nearby_share:
                        sim.add_stray(epc, weak_link(rng))  # left on the counter by the door
                        nearby.append(epc)
                c.takes += len(taken)
                c.returns += len(returned)
            sim.clock.advance(args.gap_s)
            dead = None
            if rng.random() < args.dead_share:
                dead = rng.choice(ANTENNAS)
                sim.disconnect_antenna(dead)
            before_belief = set(belief)
            expected = {epc: b.history for epc, b in belief.items()}
            t0, w0 = sim.clock.now(), time.monotonic()
            scan = inv.scan(expected)
            c.sim_s.append(sim.clock.now() - t0)
            c.wall_s.append(time.monotonic() - w0)
            c.passes.append(scan.rounds + scan.reverify_rounds)
            c.unit_scans += len(expected)
            c.degraded_scans += bool(scan.degraded)
            if dead is not None:
                sim.disconnect_antenna(dead, False)
            for epc in nearby:
                sim.remove_tag(epc)
            record(c, tx, scan, belief, inside, pending, set(returned), before_belief, strays)
            for epc, since in list(pending.items()):
                if since < tx:  # the scan after the take's own scan is over
                    del pending[epc]
                    doubted, why = c.doubts.get(epc, (-1, "never doubted"))
                    if epc in inside and doubted >= since:
                        c.doubted_then_returned += 1
                        continue
                    c.missed_takes += 1
                    c.notes.append(f"tx {tx}: take of {epc} (tx {since}) never declared: {why}")
            if args.progress and tx and tx % args.progress == 0:
                rate = (time.monotonic() - wall0) / tx
                print(f"... {tx} transactions, {rate * 1000:.0f} ms each", flush=True)
        c.stray_share = reader.weak_sightings / max(1, reader.sightings)
    finally:
        inv.close()
        sim.stop()
    return c


def record(
    c: Counts,
    tx: int,
    scan: Scan,
    belief: dict[str, Belief],
    inside: set[str],
    pending: dict[str, int],
    returned: set[str],
    before: set[str],
    strays: list[str],
) -> None:
    """Apply ``scan`` to the belief as Cabinet._record_scan does, and judge it."""
    for epc, p_miss in sorted(scan.gone.items()):
        b = belief.pop(epc)
        if epc in inside:
            c.false_takes += 1
            c.notes.append(
                f"tx {tx}: FALSE TAKE {epc} p_miss={p_miss:.2g} history={b.history} "
                f"passes={scan.passes} degraded={scan.degraded}"
            )
        elif epc in pending:
            if pending.pop(epc) == tx:
                c.takes_on_time += 1
            else:
                c.takes_late += 1
    for epc, why in sorted(scan.uncertain.items()):
        b = belief[epc]
        c.doubts[epc] = (tx, f"{why}; history={b.history}; passes={scan.passes}")
        if b.uncertain_since is not None:
            continue
        b.uncertain_since = tx
        c.uncertain_dead += why.startswith("every antenna")
        if epc in inside:
            c.uncertain_inside += 1
        else:
            c.uncertain_taken += 1
    for epc in sorted(scan.tags):
        old = belief.get(epc)
        hist = old.history if old else {}
        belief[epc] = Belief(scan.history_update(epc, hist))
        if old is not None:
            if old.uncertain_since is not None:
                c.confirmed += 1
            if epc not in inside:
                c.false_presence += 1
                c.notes.append(f"tx {tx}: {epc} is outside but was accepted as seen")
            continue
        if epc in strays:
            c.false_unknown += 1
            c.notes.append(f"tx {tx}: stray {epc} accepted as inside {scan.tags[epc].reads}")
        elif epc not in inside:
            c.false_returns += 1
            c.notes.append(f"tx {tx}: FALSE RETURN {epc} reads={scan.tags[epc].reads}")
        elif epc in returned:
            c.returns_on_time += 1
        else:
            c.late_appeared += 1
    for epc in returned:
        if epc not in scan.tags and epc not in before:
            c.missed_returns += 1
            c.notes.append(f"tx {tx}: return of {epc} not seen in its scan")


def report(c: Counts, args: argparse.Namespace, wall: float) -> None:
    uncertain = c.uncertain_inside + c.uncertain_taken
    events = c.takes + c.returns
    print(
        f"inventory accuracy: protocol={args.protocol} transactions={c.transactions} "
        f"units={args.units} antennas=8 p={args.p} strays={args.strays} "
        f"dead_share={args.dead_share} seed={args.seed}"
    )
    print(
        f"  true events: takes={c.takes} returns={c.returns}; degraded scans={c.degraded_scans}; "
        f"stray (below-floor) share of sightings={c.stray_share * 100:.2f} %; "
        f"baseline missed={c.baseline_missed}; takes of unbelieved units={c.unbelieved_takes}"
    )
    print(
        f"  false unit_taken={c.false_takes}  false unit_returned={c.false_returns}  "
        f"false unknown_tag={c.false_unknown}  outside-but-seen={c.false_presence}"
    )
    print(
        f"  takes: gone in own scan={c.takes_on_time} gone in next scan={c.takes_late} "
        f"reported uncertain and returned before settled={c.doubted_then_returned} "
        f"missed={c.missed_takes}"
    )
    print(
        f"  returns: seen in own scan={c.returns_on_time} missed={c.missed_returns} "
        f"(later accepted as appeared={c.late_appeared})"
    )
    print(
        f"  unit_uncertain={uncertain} (unit inside={c.uncertain_inside}, unit gone="
        f"{c.uncertain_taken}; all antennas down={c.uncertain_dead}); confirmed later="
        f"{c.confirmed}"
    )
    print(
        f"  uncertain rate: per transaction={uncertain / max(1, c.transactions) * 100:.2f} %, "
        f"per true event={uncertain / max(1, events) * 100:.2f} %, per unit-scan="
        f"{uncertain / max(1, c.unit_scans) * 100:.4f} %"
    )
    print(
        f"  passes/scan: mean={statistics.mean(c.passes):.2f} max={max(c.passes)}; "
        f"simulated s/scan: mean={statistics.mean(c.sim_s):.2f} max={max(c.sim_s):.2f}; "
        f"wall ms/scan: mean={statistics.mean(c.wall_s) * 1000:.1f}; total wall={wall:.0f} s"
    )
    for note in c.notes[: args.show]:
        print("  -", note)
    if len(c.notes) > args.show:
        print(f"  ... {len(c.notes) - args.show} more")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transactions", type=int, default=10_000)
    ap.add_argument("--protocol", choices=("mercury", "r2000"), default="mercury")
    ap.add_argument("--units", type=int, default=150)
    ap.add_argument("--p", type=float, default=0.7, help="read probability per antenna visit")
    ap.add_argument("--reply-miss", type=float, default=0.0, help="gen2 per-reply loss")
    ap.add_argument("--strays", type=int, default=1, help="stray tags outside the door")
    ap.add_argument("--weak-share", type=float, default=0.05, help="units with a weak extra link")
    ap.add_argument("--nearby-share", type=float, default=0.1, help="takes left by the door")
    ap.add_argument("--dead-share", type=float, default=0.05)
    ap.add_argument("--gap-s", type=float, default=20.0, help="simulated door session")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--progress", type=int, default=0, help="print every N transactions")
    ap.add_argument("--show", type=int, default=20, help="detail lines printed")
    args = ap.parse_args()
    w0 = time.monotonic()
    counts = run(args)
    report(counts, args, time.monotonic() - w0)


if __name__ == "__main__":
    main()
