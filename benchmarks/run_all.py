"""Run every stage benchmark and print one table of ratios against their goals."""

from __future__ import annotations

import sys

import _common  # noqa: F401 - sets sys.path and environment
import crawl_download
import crawl_extract
import filter as filter_bench
import pairing


def main() -> int:
    results = []
    for name, module in (("crawl_extract", crawl_extract), ("crawl_download", crawl_download), ("filter", filter_bench), ("pairing", pairing)):
        sys.argv = [name]
        out = module.main()
        results += out if isinstance(out, list) else [out]
    print("\n== all benchmarks ==")
    print(f"  {'benchmark':60s} {'ratio':>7s} {'goal':>6s}")
    for r in results:
        print(f"  {r['benchmark']:60s} {r['ratio']:7.2f} {r['goal']:6.1f}  {'ok' if r['ratio'] >= r['goal'] else 'BELOW'}")
        if "memory_growth" in r:
            print(f"  {'  peak memory growth 10x/1x':60s} {r['memory_growth']:7.2f} {1.5:6.1f}  {'ok' if r['memory_growth'] <= 1.5 else 'ABOVE'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
