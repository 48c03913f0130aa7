"""Inventory: decide what is inside the cabinet from noisy multi-antenna reads.

A scan has three steps:

1. **Main rounds.** Passes over every antenna with the Gen2 dual target (A then
   B within each antenna step), so a tag answers whatever state its session
   flag is in and every pass is an independent chance to read it. The scan
   stops after ``min_rounds`` once ``quiet_rounds`` passes in a row found no
   new tag, or at ``max_rounds`` / ``time_cap_s``.
2. **Re-verification.** A tag that was inside before and is not seen now is
   looked for again with targeted passes on the antennas that usually see it,
   with a longer dwell, until the chance that it is inside but unread falls
   below ``max_miss_probability`` (or the pass budget runs out).
3. **Classification.** Each missing tag is ``gone`` (confidently absent),
   ``uncertain`` (evidence too weak, or every antenna that reads it is faulty:
   the cabinet says so and looks again later instead of blaming a person), or
   ``withheld`` (the reader failed: nothing is concluded from the scan).

The chance that a present tag is missed is estimated from its own history per
antenna (``TagHistory``) as a Beta posterior predictive, with a prior taken from
how well that antenna reads the other tags it usually sees, so a short history
is neither over-trusted nor useless. Reads below an
antenna's RSSI floor, or tags with fewer than ``min_reads`` reads, are strays
(a tool held just outside the door) and never count as inside. An antenna the
reader reports as failed, or whose sentinel tag is not seen, is degraded: its
passes are not counted as evidence of absence.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.config import InventoryConfig, RfidConfig
from readers.rfid import InventoryResult, ReaderError, RfidReader, TagReport

log = logging.getLogger(__name__)

# antenna -> (passes in which the tag was read, passes run on that antenna)
TagHistory = dict[int, tuple[int, int]]

HISTORY_CAP = 200  # passes remembered per antenna; older evidence is halved away
HOME_SHARE = 0.2  # an antenna that read the tag in this share of passes is one of its homes


@dataclass
class Scan:
    """One inventory and what it concluded."""

    scan_id: str
    tags: dict[str, TagReport] = field(default_factory=dict)  # accepted as inside
    strays: dict[str, TagReport] = field(default_factory=dict)  # seen, but only weakly
    passes: dict[int, int] = field(default_factory=dict)  # antenna -> passes run on it
    seen_passes: dict[str, dict[int, int]] = field(default_factory=dict)  # epc -> ant -> n
    degraded: dict[int, str] = field(default_factory=dict)  # antenna -> why
    failed: bool = False  # the reader could not complete the scan
    faults: list[str] = field(default_factory=list)
    gone: dict[str, float] = field(default_factory=dict)  # epc -> miss probability
    uncertain: dict[str, str] = field(default_factory=dict)  # epc -> why
    withheld: dict[str, str] = field(default_factory=dict)  # epc -> why
    rounds: int = 0
    reverify_rounds: int = 0
    duration_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed and not self.degraded

    def evidence(self, epc: str) -> dict:
        """The reads behind a sighting, for the event payload."""
        tag = self.tags[epc]
        return {
            "scan_id": self.scan_id,
            "antennas": tag.antennas,
            "reads": tag.count,
            "rssi": tag.rssi,
            "passes_seen": sum(self.seen_passes.get(epc, {}).values()),
        }

    def absence(self, epc: str) -> dict:
        """The search behind a conclusion of absence, for the event payload."""
        return {
            "scan_id": self.scan_id,
            "passes": {str(a): n for a, n in sorted(self.passes.items())},
            "miss_probability": self.gone.get(epc),
            "degraded": {str(a): why for a, why in sorted(self.degraded.items())},
        }

    def history_update(self, epc: str, before: TagHistory) -> TagHistory:
        """The tag's history with this scan's passes added (for tags inside)."""
        seen = self.seen_passes.get(epc, {})
        out = dict(before)
        for antenna, n in self.passes.items():
            s, t = out.get(antenna, (0, 0))
            s, t = s + seen.get(antenna, 0), t + n
            while t > HISTORY_CAP:
                s, t = s // 2, t // 2
            out[antenna] = (s, t)
        return out


def read_probability(history: TagHistory, antenna: int) -> float:
    """Estimated chance that one pass on ``antenna`` reads the tag (posterior mean)."""
    s, t = history.get(antenna, (0, 0))
    return (s + 0.5) / (t + 1.0)


# antenna -> Beta prior (a, b) of a tag's per-pass read rate on that antenna
Prior = dict[int, tuple[float, float]]
JEFFREYS = (0.5, 0.5)
PRIOR_STRENGTH = 10.0  # the population's read rate counts as this many passes of evidence


def population_prior(histories: Mapping[str, TagHistory]) -> Prior:
    """Per antenna, how well it reads the tags it usually sees, as a Beta prior.

    A tag seen in 2 of 2 passes says little on its own; that its antenna reads
    its neighbours in 99 % of passes says a lot. Borrowing that strength lets a
    new tag be judged sooner without trusting its own short history too much.
    """
    reads: dict[int, list[int]] = {}
    for history in histories.values():
        for antenna in homes(history):
            s, t = history[antenna]
            acc = reads.setdefault(antenna, [0, 0])
            acc[0] += s
            acc[1] += t
    prior: Prior = {}
    for antenna, (s, t) in reads.items():
        rate = (s + 1.0) / (t + 2.0)
        prior[antenna] = (PRIOR_STRENGTH * rate, PRIOR_STRENGTH * (1.0 - rate))
    return prior


def miss_probability(
    history: TagHistory, passes: Mapping[int, int], prior: Prior | None = None
) -> float:
    """Chance that a tag still inside went unread through ``passes``.

    Per antenna the read rate is uncertain: with ``s`` reads in ``t`` passes and
    a Beta(a0, b0) prior (the antenna's population prior for an antenna that is
    one of the tag's homes, else Jeffreys), the chance of ``n`` misses in a row is
    the posterior predictive prod_{i<n} (b + i) / (a + b + i) with a = a0 + s,
    b = b0 + t - s. Plugging in a point estimate instead is over-confident after
    a short history and would blame a person for a tag that was merely hard to read.
    """
    home = homes(history)
    log_p = 0.0
    for antenna, n in passes.items():
        s, t = history.get(antenna, (0, 0))
        a0, b0 = (prior or {}).get(antenna, JEFFREYS) if antenna in home else JEFFREYS
        a, b = a0 + s, b0 + t - s
        for i in range(n):
            log_p += math.log((b + i) / (a + b + i))
    return math.exp(log_p)


def homes(history: TagHistory) -> set[int]:
    """Antennas that usually read the tag."""
    return {a for a, (s, t) in history.items() if t and s / t >= HOME_SHARE}


class Inventory:
    """Owns the RFID reader: opens it lazily and turns its reads into :class:`Scan`s."""

    def __init__(
        self, reader: RfidReader, config: RfidConfig, policy: InventoryConfig | None = None
    ) -> None:
        self.reader = reader
        self.config = config
        self.policy = policy or InventoryConfig()
        self.sentinels = {int(a): epc for a, epc in self.policy.sentinels.items()}
        self.ready = False
        self.status = "not opened"
        self.model = ""
        self.last_antenna_reads: dict[int, int] = {}
        self.prior: Prior = {}

    def open(self) -> bool:
        """Open and configure the reader; False (with ``status`` set) if it is not there."""
        try:
            info = self.reader.open()
            self.reader.configure(
                self.config.antennas,
                self.config.power_dbm,
                self.config.region,
                self.config.session,
            )
        except (ReaderError, OSError) as exc:
            self.reader.close()
            self.ready = False
            self.status = f"error: {exc}"
            log.warning("RFID reader not available: %s", exc)
            return False
        self.ready = True
        self.model = f"{info.model} fw {info.firmware}"
        self.status = "ok"
        return True

    def close(self) -> None:
        self.reader.close()
        self.ready = False

    # -- the scan ---------------------------------------------------------------

    def scan(self, expected: Mapping[str, TagHistory] | None = None) -> Scan:
        """Run a full inventory, looking harder for the ``expected`` tags that are missing.

        Never raises for reader trouble: it is in ``failed``/``faults``/``degraded``.
        """
        expected = expected or {}
        self.prior = population_prior(expected)
        scan = Scan(scan_id=str(uuid.uuid4()))
        started = time.monotonic()
        self.last_antenna_reads = {}
        if not self.ready and not self.open():
            scan.failed = True
            scan.faults.append(self.status)
        else:
            try:
                self._main_rounds(scan, started)
                self._reverify(scan, expected)
            except (ReaderError, OSError) as exc:
                # Reopen next time: the link may have been unplugged and replugged.
                self.reader.close()
                self.ready = False
                self.status = f"error: {exc}"
                scan.failed = True
                scan.faults.append(str(exc))
                log.warning("inventory failed: %s", exc)
        self._check_sentinels(scan)
        self._classify(scan, expected)
        if not scan.failed:
            self.status = (
                "ok"
                if not scan.degraded
                else "degraded: "
                + "; ".join(f"antenna {a}: {why}" for a, why in sorted(scan.degraded.items()))
            )
        scan.duration_s = time.monotonic() - started
        return scan

    def _pass(self, scan: Scan, dwell_ms: int, antennas: list[int] | None) -> int:
        """One pass; merges it into ``scan`` and returns how many new tags it accepted."""
        # Dual target on every pass: a tag answers whatever state its session flag
        # was left in, so each pass is an independent chance to read it. With single
        # targets a missed tag keeps its flag and hides from the next pass too, which
        # correlates misses and would make the read-rate estimate lie.
        result = self.reader.inventory(1, dwell_ms, antennas=antennas, target="AB")
        return self._merge(scan, result, antennas or list(self.config.antennas))

    def _main_rounds(self, scan: Scan, started: float) -> None:
        p = self.policy
        quiet = 0
        for n in range(p.max_rounds):
            if n and time.monotonic() - started > p.time_cap_s:
                scan.faults.append(f"time cap {p.time_cap_s} s reached after {n} passes")
                break
            new = self._pass(scan, self.config.dwell_ms, None)
            scan.rounds += 1
            quiet = quiet + 1 if new == 0 and n else 0
            if scan.rounds >= p.min_rounds and quiet >= p.quiet_rounds:
                break

    def _reverify(self, scan: Scan, expected: Mapping[str, TagHistory]) -> None:
        p = self.policy
        for _ in range(p.reverify_rounds):
            doubtful = [
                epc
                for epc in expected
                if epc not in scan.tags
                and epc not in self.sentinels.values()
                and miss_probability(expected[epc], self._evidence_passes(scan), self.prior)
                > p.max_miss_probability
            ]
            if not doubtful:
                return
            healthy = [a for a in self.config.antennas if a not in scan.degraded]
            targets = sorted(set().union(*(homes(expected[e]) for e in doubtful)) & set(healthy))
            if not targets:
                return  # nothing useful left to look with
            self._pass(scan, p.reverify_dwell_ms, targets)
            scan.reverify_rounds += 1

    def _merge(self, scan: Scan, result: InventoryResult, antennas: list[int]) -> int:
        for antenna, why in result.antenna_errors.items():
            scan.degraded.setdefault(antenna, why)
        for antenna in antennas:
            if antenna not in result.antenna_errors:
                scan.passes[antenna] = scan.passes.get(antenna, 0) + 1
        for antenna, n in result.antenna_reads.items():
            self.last_antenna_reads[antenna] = self.last_antenna_reads.get(antenna, 0) + n
        new = 0
        for epc, report in result.tags.items():
            strong = {a: r for a, r in report.reads.items() if r.rssi >= self.policy.floor(a)}
            if strong:
                seen = scan.seen_passes.setdefault(epc, {})
                for a in strong:
                    seen[a] = seen.get(a, 0) + 1
            merged = scan.tags.get(epc) or scan.strays.get(epc) or TagReport(epc)
            for a, r in report.reads.items():
                merged.add(a, r.count, r.rssi)
            strong_reads = sum(
                r.count for a, r in merged.reads.items() if r.rssi >= self.policy.floor(a)
            )
            if strong_reads >= self.policy.min_reads:
                if epc not in scan.tags:
                    scan.strays.pop(epc, None)
                    scan.tags[epc] = merged
                    new += 1
            else:
                scan.strays[epc] = merged
        return new

    def _check_sentinels(self, scan: Scan) -> None:
        for antenna, epc in self.sentinels.items():
            tag = scan.tags.pop(epc, None)
            scan.strays.pop(epc, None)
            if antenna in scan.degraded or scan.failed:
                continue
            if tag is None or antenna not in tag.reads:
                scan.degraded[antenna] = "sentinel tag not seen"

    def _evidence_passes(self, scan: Scan) -> dict[int, int]:
        return {a: n for a, n in scan.passes.items() if a not in scan.degraded}

    def _classify(self, scan: Scan, expected: Mapping[str, TagHistory]) -> None:
        passes = self._evidence_passes(scan)
        for epc, history in expected.items():
            if epc in scan.tags or epc in self.sentinels.values():
                continue
            if scan.failed:
                scan.withheld[epc] = "the reader failed during the scan"
                continue
            home = homes(history)
            if home and home <= set(scan.degraded):
                scan.uncertain[epc] = "every antenna that reads it is faulty: " + ", ".join(
                    str(a) for a in sorted(home)
                )
                continue
            p_miss = miss_probability(history, passes, self.prior)
            if p_miss <= self.policy.max_miss_probability:
                scan.gone[epc] = p_miss
            else:
                scan.uncertain[epc] = f"miss probability {p_miss:.2g} after the search"
