"""Helpers shared by the benchmarks: paths, timing, and a result table."""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def need_shared(sub: str) -> str:
    path = os.path.join(SHARED, sub)
    if not os.path.exists(path):
        sys.exit(f"benchmark needs {path} (clone ../shared beside the project)")
    return path


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def report(name: str, rows: list[tuple[str, float, str]], ratio: float, goal: float) -> dict:
    """Print a small table and the ratio against its goal; returns a dict for run_all."""
    print(f"\n== {name} ==")
    for label, value, unit in rows:
        print(f"  {label:45s} {value:10.1f} {unit}")
    verdict = "meets" if ratio >= goal else "BELOW"
    print(f"  {'ratio':45s} {ratio:10.2f}   (goal >= {goal}: {verdict})")
    return {"benchmark": name, "ratio": ratio, "goal": goal, "rows": rows}
