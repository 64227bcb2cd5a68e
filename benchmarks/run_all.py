"""Run every benchmark (each `benchmarks/*.py` but `_*.py` and this file; README.md) and print one
table of ratios against their goals. `--smoke`: each at its smallest size (timings mean nothing)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import _common  # noqa: F401 - sets sys.path and environment

HERE = os.path.dirname(os.path.abspath(__file__))
# Loaded by path under bench_* names: benchmarks/filter.py and train.py share names with packages.
# The stages' order first; any other benchmark (found by the file name convention) after them.
ORDER = ["crawl_extract", "crawl_download", "fetch_plan", "filter", "pairing", "boilerplate", "dask_scaling", "train", "browse", "scale"]
FOUND = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py")) if not os.path.basename(p).startswith("_") and os.path.basename(p) != "run_all.py")
BENCHMARKS = [n for n in ORDER if n in FOUND] + [n for n in FOUND if n not in ORDER]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    smoke = "--smoke" in sys.argv[1:]
    results = []
    for name in BENCHMARKS:
        sys.argv = [name] + (["--smoke"] if smoke else [])
        out = _load(name).main()
        results += out if isinstance(out, list) else [out]
    print("\n== all benchmarks ==")
    print(f"  {'benchmark':62s} {'ratio':>7s} {'goal':>6s}")
    for r in results:
        print(f"  {r['benchmark']:62s} {r['ratio']:7.2f} {r['goal']:6.1f}  {'ok' if r['ratio'] >= r['goal'] else 'BELOW'}")
        if "memory_growth" in r:
            print(f"  {'  peak memory growth 10x/1x':62s} {r['memory_growth']:7.2f} {1.5:6.1f}  {'ok' if r['memory_growth'] <= 1.5 else 'ABOVE'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
