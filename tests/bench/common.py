"""Helpers shared by the benchmarks (run them as scripts, from the repository root)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{name}: n={len(ms)} median={statistics.median(ms):.1f} ms "
        f"p90={percentile(ms, 90):.1f} ms p99={percentile(ms, 99):.1f} ms "
        f"max={max(ms):.1f} ms"
    )
