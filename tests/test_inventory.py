"""The inventory algorithm against the reader simulators over a real pty, with the
probabilistic RF model: weak evidence makes a unit uncertain, never taken."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.config import InventoryConfig, RfidConfig
from controller.inventory import Inventory, TagHistory, miss_probability
from readers.rfid import open_reader
from readers.rfid.mercury_sim import MercurySimulator
from readers.rfid.r2000_sim import R2000Simulator
from readers.rfid.rf_model import Link

pytestmark = pytest.mark.timeout(120)

SIMULATORS = {"mercury": MercurySimulator, "r2000": R2000Simulator}


def epc(i: int) -> str:
    return f"E2801160600002{i:010X}"


@pytest.fixture(params=sorted(SIMULATORS))
def cabinet(request) -> Iterator[tuple[object, Inventory]]:
    sim = SIMULATORS[request.param](antenna_ports=8, seed=7)
    sim.start()
    rfid = RfidConfig(protocol=request.param, port=sim.port, dwell_ms=200, timeout_s=1.0)
    inv = Inventory(
        open_reader(rfid.protocol, rfid.port, timeout_s=rfid.timeout_s),
        rfid,
        InventoryConfig(idle_scan_minutes=0),
    )
    yield sim, inv
    inv.close()
    sim.stop()


class Belief:
    """What the controller believes is inside, kept the way the cabinet keeps it."""

    def __init__(self) -> None:
        self.inside: dict[str, TagHistory] = {}

    def apply(self, scan) -> None:
        for e in scan.gone:
            del self.inside[e]
        for e in scan.tags:
            self.inside[e] = scan.history_update(e, self.inside.get(e, {}))


def test_weak_tags_are_never_declared_taken(cabinet):
    """40 tags read with p=0.5 on two antennas: 15 scans with nothing removed, 0 takes."""
    sim, inv = cabinet
    for i in range(40):
        a = i % 8 + 1
        sim.add_tag(epc(i), {a: Link(0.5, -55), a % 8 + 1: Link(0.5, -62)})
    belief = Belief()
    for _ in range(15):
        scan = inv.scan(belief.inside)
        assert not scan.failed, scan.faults
        assert scan.gone == {}, f"false take: {scan.gone}"
        belief.apply(scan)
    assert set(belief.inside) == {epc(i) for i in range(40)}


def test_removed_units_are_gone_with_low_miss_probability(cabinet):
    sim, inv = cabinet
    for i in range(30):
        sim.add_tag(epc(i), {i % 8 + 1: Link(0.9, -50)})
    belief = Belief()
    for _ in range(5):
        belief.apply(inv.scan(belief.inside))
    for i in (3, 11):
        sim.remove_tag(epc(i))
    scan = inv.scan(belief.inside)
    assert set(scan.gone) == {epc(3), epc(11)}
    assert all(p <= inv.policy.max_miss_probability for p in scan.gone.values())
    assert scan.reverify_rounds >= 1  # it looked again before concluding
    assert not scan.uncertain


def test_strays_outside_the_door_do_not_count(cabinet):
    sim, inv = cabinet
    sim.add_tag(epc(1), {1: -50})
    sim.add_stray(epc(2), {1: Link(0.6, -88)})
    scan = inv.scan({})
    assert set(scan.tags) == {epc(1)}
    assert epc(2) not in scan.tags


def test_dead_antenna_makes_its_units_uncertain_not_taken(cabinet):
    sim, inv = cabinet
    sim.add_tag(epc(1), {3: -50})  # only antenna 3 sees it
    sim.add_tag(epc(2), {5: -50, 6: -60})
    belief = Belief()
    for _ in range(3):
        belief.apply(inv.scan(belief.inside))
    sim.disconnect_antenna(3)
    sim.remove_tag(epc(1))
    sim.remove_tag(epc(2))
    scan = inv.scan(belief.inside)
    assert 3 in scan.degraded and not scan.complete
    assert epc(1) in scan.uncertain and epc(1) not in scan.gone
    assert epc(2) in scan.gone  # its own antennas are healthy


def test_sentinel_not_seen_degrades_its_antenna(cabinet):
    sim, inv = cabinet
    inv.sentinels = {2: "AAAA0000000000000000AAAA"}
    sim.add_tag("AAAA0000000000000000AAAA", {2: -45})
    sim.add_tag(epc(1), {2: -50})
    scan = inv.scan({})
    assert scan.complete and set(scan.tags) == {epc(1)}  # the sentinel is not a unit
    sim.remove_tag("AAAA0000000000000000AAAA")
    scan = inv.scan({})
    assert scan.degraded == {2: "sentinel tag not seen"}


@pytest.mark.parametrize("fault", ["unplug", "reboot", "drop"])
def test_reader_faults_conclude_nothing(cabinet, fault):
    sim, inv = cabinet
    for i in range(10):
        sim.add_tag(epc(i), {i % 8 + 1: -50})
    belief = Belief()
    for _ in range(3):  # the cabinet has learnt how well it reads its tags
        belief.apply(inv.scan(belief.inside))
    sim.remove_tag(epc(4))
    if fault == "unplug":
        sim.unplug()
    elif fault == "reboot":
        sim.inject_reboot(after=3)
    else:
        sim.drop_next_reply(after=2)
    scan = inv.scan(belief.inside)
    # Never a false take: at most the unit that really left is concluded gone, and
    # a scan the fault broke concludes nothing.
    assert set(scan.gone) <= {epc(4)}
    if scan.failed:
        assert scan.faults and scan.gone == {} and epc(4) in scan.withheld
    if fault == "unplug":
        assert scan.failed
    elif scan.failed:
        # The next scan reopens the reader and settles it.
        scan = inv.scan(belief.inside)
        assert not scan.failed and set(scan.gone) == {epc(4)}


def test_miss_probability_uses_each_antennas_history():
    history = {1: (90, 100), 2: (0, 100)}
    # Antenna 2 never reads it: its passes are no evidence of absence.
    assert miss_probability(history, {2: 20}) > 0.5
    assert miss_probability(history, {1: 6}) < 1e-5
    # No history: the Jeffreys prior, (1/2)(3/2)/2 (5/2)/3 for three misses in a row.
    assert miss_probability({}, {1: 3}) == pytest.approx(0.3125)
    # A short history is not over-trusted: 21 reads in 23 passes, then 6 misses, is
    # far likelier than the point estimate 0.9 would say (0.1^6 = 1e-6).
    assert miss_probability({8: (21, 23)}, {8: 6}) > 1e-5
