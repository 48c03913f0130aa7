"""The shared RF model: scenarios, Gen2 session flags, read statistics, timing, clock."""

from __future__ import annotations

import threading
import time

import pytest

from readers.rfid.rf_model import (
    SCENARIO_DIR,
    FaultSpec,
    Gen2Settings,
    Link,
    RfModel,
    Scenario,
    ScenarioError,
    TagSpec,
    Timing,
    VirtualClock,
)

pytestmark = pytest.mark.timeout(60)


def model(n_tags: int = 0, ports: tuple[int, ...] = (1,), **kwargs) -> RfModel:
    tags = [TagSpec(f"E280{i:020X}", {p: Link(1.0, -50) for p in ports}) for i in range(n_tags)]
    return RfModel(Scenario(antenna_ports=8, seed=3, tags=tags, **kwargs))


def epcs(visit) -> set[str]:
    return {r.epc for r in visit.reads}


# ----------------------------------------------------------------- scenario files


def test_shipped_example_scenario_loads() -> None:
    s = Scenario.load(SCENARIO_DIR / "cabinet8.toml")
    assert s.antenna_ports == 8 and s.seed == 8
    inside = [t for t in s.tags if not t.stray]
    strays = [t for t in s.tags if t.stray]
    assert len(inside) == 123 and len(strays) == 2
    assert all(len(t.antennas) == 2 for t in inside[3:])  # the population: 2 antennas each
    assert all(0.9 <= link.p <= 1.0 for t in inside[3:] for link in t.antennas.values())
    assert s.tags[0].antennas == {3: Link(0.35, -71)}
    assert s.tags[2].antennas == {1: Link(1.0, -38)}  # a bare number is a mean RSSI, p = 1
    assert s.faults == [FaultSpec("corrupt", probability=0.01)]
    assert s.gen2.reference_power_dbm == 27.0 and s.timing.tags_per_second == 400.0
    # Seeded: loading twice gives the same world.
    assert Scenario.load(SCENARIO_DIR / "cabinet8.toml").tags == s.tags


def test_scenario_from_toml_with_every_section() -> None:
    s = Scenario.from_toml(
        """
        seed = 5
        antenna_ports = 4
        dead_antennas = [2]
        [timing]
        tags_per_second = 250
        baudrate = 921600
        [gen2]
        s2_persistence_s = 3.5
        [[tag]]
        epc = "aaaa0001"
        antennas = {1 = {p = 0.5, rssi = -60}, 4 = -44}
        [[fault]]
        kind = "unplug"
        on_read = 3
        """
    )
    assert (s.seed, s.antenna_ports, s.dead_antennas) == (5, 4, {2})
    assert s.timing == Timing(tags_per_second=250, baudrate=921600)
    assert s.gen2 == Gen2Settings(s2_persistence_s=3.5)
    assert s.tags == [TagSpec("AAAA0001", {1: Link(0.5, -60), 4: Link(1.0, -44)})]
    assert s.faults == [FaultSpec("unplug", on_read=3)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sede = 1", r"unknown key 'sede' \(known: .*seed"),
        ("[timing]\ntags_per_sec = 3", r"timing: unknown key 'tags_per_sec'"),
        ("[gen2]\ns4_persistence_s = 1", r"gen2: unknown key 's4_persistence_s'"),
        ('[[tag]]\nepc = "AAAA"\nantena = {1 = -50}', r"tag\[0\]: unknown key 'antena'"),
        ('[[tag]]\nepc = "AAAA"\nantennas = {1 = {p = 0.5, rsi = -50}}', r"unknown key 'rsi'"),
        ('[[stray]]\nepc = "AAAA"\ncolour = 1', r"stray\[0\]: unknown key 'colour'"),
        ('[[fault]]\nkind = "drop"\nwhen = 3', r"fault\[0\]: unknown key 'when'"),
        ("[[population]]\ncount = 2\nspread = 1", r"population\[0\]: unknown key 'spread'"),
        ('[[tag]]\nepc = "XYZ1"', r"tag\[0\]: EPC 'XYZ1' is not a hex string"),
        ("[[tag]]\nantennas = {1 = -50}", r"tag\[0\]: missing key 'epc'"),
        ('[[tag]]\nepc = "AAAA"\nantennas = {17 = -50}', r"antenna port must be 1..16, got 17"),
        ('[[tag]]\nepc = "AAAA"\nantennas = {1 = {p = 1.5}}', r"read probability p must be 0..1"),
        ('[[tag]]\nepc = "AAAA"\nantennas = {1 = 5}', r"mean RSSI must be -128..0"),
        ('[[fault]]\nkind = "explode"\non_read = 1', r"fault kind 'explode'"),
        ('[[fault]]\nkind = "drop"', r"exactly one of on_read"),
        ('[[fault]]\nkind = "drop"\non_read = 2\nprobability = 0.5', r"exactly one of on_read"),
        ("antenna_ports = 17", r"antenna_ports must be 1..16"),
        ("[timing]\ntags_per_second = 0", r"timing.tags_per_second must be > 0"),
        ("[timing]\nbaudrate = 'fast'", r"timing.baudrate must be a number"),
        ("dead_antennas = 3", r"dead_antennas must be a list"),
        ('[[tag]]\nepc = "AAAA"\n[[tag]]\nepc = "aaaa"', r"tag AAAA is listed twice"),
        ("seed = ", r"not valid TOML"),
    ],
)
def test_bad_scenarios_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        Scenario.from_toml(text, source="bad.toml")


def test_scenario_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("[gen2]\nsesion = 2\n")
    with pytest.raises(ScenarioError, match=r"scenario mine.toml: gen2: unknown key 'sesion'"):
        Scenario.load(path)
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        Scenario.load(tmp_path / "missing.toml")


def test_population_is_seeded_and_within_its_ranges() -> None:
    text = """
    seed = 11
    [[population]]
    count = 50
    epc_prefix = "3008"
    antennas = [2, 3, 4]
    per_tag = 2
    p = [0.4, 0.6]
    rssi = [-70, -60]
    """
    a, b = Scenario.from_toml(text), Scenario.from_toml(text)
    assert a.tags == b.tags and len(a.tags) == 50
    assert len({t.epc for t in a.tags}) == 50 and all(t.epc.startswith("3008") for t in a.tags)
    assert all(len(t.epc) == 24 for t in a.tags)
    for t in a.tags:
        assert len(t.antennas) == 2 and set(t.antennas) <= {2, 3, 4}
        assert all(0.4 <= k.p <= 0.6 and -70 <= k.rssi <= -60 for k in t.antennas.values())
    other = Scenario.from_toml(text.replace("seed = 11", "seed = 12"))
    assert other.tags != a.tags


# ----------------------------------------------------------------- Gen2 sessions


def test_s2_target_a_reads_nothing_after_a_full_round_until_the_target_flips() -> None:
    rf = model(30)
    all_tags = set(rf.tags())
    assert epcs(rf.visit(1, session=2, target="A", rounds=1)) == all_tags
    assert all(rf.flag(e, 2) == "B" for e in all_tags)
    assert rf.visit(1, session=2, target="A", rounds=3).reads == []  # flags still B
    assert epcs(rf.visit(1, session=2, target="B", rounds=1)) == all_tags  # flipped back to A
    assert epcs(rf.visit(1, session=2, target="A", rounds=1)) == all_tags
    # Other sessions are independent: S3 never saw an inventory.
    assert epcs(rf.visit(1, session=3, target="A", rounds=1)) == all_tags


def test_s2_flag_survives_an_antenna_switch_but_decays_without_rf() -> None:
    rf = model(10, ports=(1, 2))
    assert len(rf.visit(1, session=2, target="A", rounds=1).reads) == 10
    # Same pass, next antenna: the tags already answered on antenna 1 stay quiet.
    assert rf.visit(2, session=2, target="A", rounds=1).reads == []
    rf.clock.advance(4.0)  # less than the 5 s S2 persistence without RF
    assert rf.visit(2, session=2, target="A", rounds=1).reads == []
    rf.clock.advance(5.5)  # now more than 5 s since the tags last saw RF
    assert len(rf.visit(2, session=2, target="A", rounds=1).reads) == 10


def test_s2_flag_holds_while_the_tag_stays_energised() -> None:
    rf = model(5)
    rf.visit(1, session=2, target="A", rounds=1)
    for _ in range(30):  # 30 x 0.5 s of RF on the tags: they never lose power long enough
        rf.clock.advance(0.5)
        assert rf.visit(1, session=2, target="A", budget_s=0.2).reads == []


def test_s0_does_not_persist_between_visits() -> None:
    rf = model(20, ports=(1, 2))
    for port in (1, 2, 1, 2):
        assert len(rf.visit(port, session=0, target="A", rounds=1).reads) == 20
    assert all(rf.flag(e, 0) == "A" for e in rf.tags())


def test_s1_flags_decay_after_their_persistence_even_with_rf_on() -> None:
    rf = model(8)
    rf.visit(1, session=1, target="A", rounds=1)
    assert rf.visit(1, session=1, target="A", rounds=1).reads == []
    rf.clock.advance(1.0)
    assert rf.flag(next(iter(rf.tags())), 1) == "B"
    rf.clock.advance(1.5)  # 2.5 s > the 2 s S1 persistence
    assert rf.flag(next(iter(rf.tags())), 1) == "A"
    assert len(rf.visit(1, session=1, target="A", rounds=1).reads) == 8


def test_toggle_target_reads_every_tag_whatever_its_flag() -> None:
    rf = model(12)
    rf.visit(1, session=2, target="A", rounds=1)  # everything in B now
    visit = rf.visit(1, session=2, target="AB", budget_s=0.2)
    assert len(visit.reads) == 12
    # 12 tags at 400 tags/s take 30 ms a round: a 200 ms toggle reads each several times.
    assert all(r.count >= 4 for r in visit.reads)


def test_a_removed_tag_keeps_its_flags_if_it_comes_back_quickly() -> None:
    rf = model(1)
    (epc,) = rf.tags()
    rf.visit(1, session=2, target="A", rounds=1)
    rf.remove_tag(epc)
    assert rf.tags() == {}
    rf.add_tag(epc, {1: -50})
    assert rf.visit(1, session=2, target="A", rounds=1).reads == []
    rf.clock.advance(6)
    assert len(rf.visit(1, session=2, target="A", rounds=1).reads) == 1


# ----------------------------------------------------------------- statistics


def test_read_probability_per_visit_matches_p() -> None:
    rf = RfModel(Scenario(seed=21, tags=[TagSpec("BEEF0001", {1: Link(0.3, -55)})]))
    visits = 2000
    seen = sum(bool(rf.visit(1, session=0, target="A", rounds=1).reads) for _ in range(visits))
    # Binomial(2000, 0.3): mean 600, sd 20.5; +-4 sd.
    assert 518 <= seen <= 682, seen


def test_miss_probability_loses_single_replies() -> None:
    rf = model(200, gen2=Gen2Settings(miss_probability=0.25))
    got = len(rf.visit(1, session=2, target="A", rounds=1).reads)
    assert 110 <= got <= 190, got  # about 150 of 200
    # The ones missed are still in A and answer in a later round of the same visit.
    rest = rf.visit(1, session=2, target="A", rounds=30)
    assert got + len(rest.reads) == 200


def test_strays_are_seen_only_sometimes_and_weakly() -> None:
    s = Scenario.from_toml(
        """
        seed = 4
        [[tag]]
        epc = "AAAA0001"
        antennas = {1 = -45}
        [[stray]]
        epc = "5555"
        antennas = {1 = {p = 0.2, rssi = -79}}
        """
    )
    rf = RfModel(s)
    assert set(rf.tags()) == {"AAAA0001"}
    assert set(rf.tags(include_strays=True)) == {"AAAA0001", "5555"}
    stray_reads = []
    inside = 0
    for _ in range(400):
        visit = rf.visit(1, session=0, target="A", rounds=1)
        inside += any(r.epc == "AAAA0001" for r in visit.reads)
        stray_reads += [r for r in visit.reads if r.epc == "5555"]
    assert inside == 400
    assert 50 <= len(stray_reads) <= 110, len(stray_reads)  # about 80 of 400
    assert all(-81 <= r.rssi <= -77 for r in stray_reads)


def test_rssi_noise_stays_within_its_bound() -> None:
    rf = model(50, gen2=Gen2Settings(rssi_noise_db=3.0))
    values = [r.rssi for _ in range(20) for r in rf.visit(1, target="A", rounds=1).reads]
    assert min(values) >= -53 and max(values) <= -47
    assert len(set(values)) >= 5  # it really is noisy


def test_power_shifts_rssi_and_weak_tags_drop_below_sensitivity() -> None:
    g = Gen2Settings(reference_power_dbm=27.0, sensitivity_dbm=-80.0, rssi_noise_db=0.0)
    rf = RfModel(
        Scenario(
            tags=[TagSpec("AAAA", {1: Link(1, -50)}), TagSpec("BBBB", {1: Link(1, -78)})],
            gen2=g,
        )
    )
    full = rf.visit(1, target="A", rounds=1, power_dbm=27.0)
    assert {r.epc: r.rssi for r in full.reads} == {"AAAA": -50, "BBBB": -78}
    low = rf.visit(1, target="A", rounds=1, power_dbm=22.0)
    assert {r.epc: r.rssi for r in low.reads} == {"AAAA": -55}  # BBBB at -83: not decoded


def test_dead_antenna_reads_nothing_and_energises_nothing() -> None:
    rf = model(5, dead_antennas={1})
    visit = rf.visit(1, session=2, target="A", rounds=1)
    assert (visit.connected, visit.reads) == (False, [])
    assert visit.duration_s == pytest.approx(0.022)  # RF-on latency + switch, then refused
    rf.set_antenna_disconnected(1, False)
    assert len(rf.visit(1, session=2, target="A", rounds=1).reads) == 5
    assert not rf.antenna_connected(9)  # beyond the wired ports


# ----------------------------------------------------------------- timing and clock


def test_clock_advances_by_the_modelled_time_without_sleeping() -> None:
    rf = model(1000, timing=Timing(tags_per_second=400.0, rf_on_ms=20, antenna_switch_ms=2))
    wall = time.monotonic()
    visit = rf.visit(1, session=2, target="A", rounds=1)
    assert len(visit.reads) == 1000
    # 1000 tags at 400 tags/s = 2.5 s of singulation, plus RF-on and switch.
    assert visit.duration_s == pytest.approx(2.5 + 0.022)
    assert rf.clock.now() == 0.0  # the caller spends it (a front end, with its serial time)
    rf.spend(visit.duration_s)
    rf.serial(1000 * 21)  # 1000 R2000 tag frames at 115200 baud
    assert rf.clock.now() == pytest.approx(2.522 + 21000 * 10 / 115200)
    assert time.monotonic() - wall < 2.0  # time_scale 0: nothing was slept


def test_a_time_budget_caps_what_one_visit_can_read() -> None:
    rf = model(300)
    visit = rf.visit(1, session=2, target="A", budget_s=0.25)
    assert len(visit.reads) == 100  # 0.25 s at 400 tags/s
    assert visit.duration_s == pytest.approx(0.022 + 0.25)  # Mercury searches the whole timeout
    assert len(rf.visit(1, session=2, target="A", budget_s=1.0).reads) == 200  # the rest


def test_static_q_far_from_the_population_is_slower() -> None:
    dynamic = model(200).visit(1, target="A", rounds=1).duration_s
    tight = model(200).visit(1, target="A", rounds=1, q=4).duration_s  # 16 slots for 200 tags
    assert tight > 5 * dynamic


def test_visits_in_one_command_chain_in_time() -> None:
    rf = model(10, ports=(1, 2))
    a = rf.visit(1, session=2, target="A", budget_s=0.1)
    rf.visit(2, session=2, target="B", budget_s=0.1, rf_on=False)
    assert a.duration_s == pytest.approx(0.122)
    # The second visit started after the first, though nobody spent time in between.
    assert min(rf._flags[e].last_energized for e in rf.tags()) == pytest.approx(0.122 + 0.102)


def test_scaled_clock_sleeps_the_scaled_time_and_follows_the_wall() -> None:
    clock = VirtualClock(time_scale=0.05)
    wall = time.monotonic()
    assert clock.spend(2.0)  # 2 simulated s -> 0.1 s of sleep
    slept = time.monotonic() - wall
    assert 0.09 <= slept < 1.0
    assert clock.now() == pytest.approx(slept / 0.05, rel=0.2)
    stop = threading.Event()
    stop.set()
    assert clock.spend(10.0, stop) is False  # a stopping simulator is not held up
    with pytest.raises(ValueError, match="time_scale"):
        VirtualClock(-1)
    with pytest.raises(ValueError, match="advance"):
        clock.advance(-1)


# ----------------------------------------------------------------- faults and threads


def test_faults_fire_on_the_nth_read_or_with_their_probability() -> None:
    rf = RfModel(Scenario(seed=2, faults=[FaultSpec("reboot", on_read=3)]))
    assert [rf.next_read_fault() for _ in range(5)] == [None, None, "reboot", None, None]
    rf.add_fault(FaultSpec("drop", probability=0.1))
    fired = [rf.next_read_fault() for _ in range(2000)]
    assert set(fired) == {None, "drop"}
    assert 140 <= fired.count("drop") <= 260
    assert rf.read_commands == 2005
    with pytest.raises(TypeError):
        rf.add_fault("drop")  # type: ignore[arg-type]


def test_mutation_api_is_safe_while_the_reader_inventories() -> None:
    rf = model(0, gen2=Gen2Settings())
    errors: list[BaseException] = []
    done = threading.Event()

    def shuffle_tags() -> None:
        try:
            i = 0
            while not done.is_set():
                rf.add_tag(f"CAFE{i % 50:04X}", {1 + i % 4: -50})
                rf.move_tag(f"CAFE{i % 50:04X}", {1 + (i + 1) % 4: Link(0.9, -60)})
                if i % 3 == 0:
                    rf.remove_tag(f"CAFE{(i * 7) % 50:04X}")
                rf.set_antenna_disconnected(4, i % 2 == 0)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=shuffle_tags)
    thread.start()
    try:
        for n in range(300):
            rf.visit(1 + n % 4, session=n % 4, target="AB"[n % 2], rounds=1)
    finally:
        done.set()
        thread.join(5)
    assert not thread.is_alive() and errors == []
    with pytest.raises(KeyError, match="not in the simulated world"):
        rf.move_tag("DEAD", {1: -50})


def test_visit_rejects_bad_arguments() -> None:
    rf = model(1)
    with pytest.raises(ValueError, match="exactly one of budget_s and rounds"):
        rf.visit(1)
    with pytest.raises(ValueError, match="target"):
        rf.visit(1, target="C", rounds=1)
    with pytest.raises(ValueError, match="session"):
        rf.visit(1, session=4, rounds=1)
    with pytest.raises(ValueError, match="1..16"):
        rf.visit(0, rounds=1)
