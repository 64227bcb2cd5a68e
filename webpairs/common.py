"""Pieces every command module shares: the stage parser, the Beam note, the stats line.

`cli` (the entry point) imports the command modules, and they import this; nothing imports `cli`.
"""

from __future__ import annotations

import argparse

BEAM_NOTE = (
    "Other --flags are passed to Apache Beam as pipeline options (a flag neither this command nor Beam "
    "knows is an error naming the nearest known flag); the default runner is the "
    "in-process FnApiRunner (e.g. --direct_num_workers 2, or --runner PortableRunner "
    "--job_endpoint localhost:8099 --environment_type LOOPBACK). --runner dask runs the Beam stages "
    "on dask.distributed: --dask-address tcp://HOST:PORT submits to a cluster, otherwise a LocalCluster "
    "of --dask-workers N processes (default: the cores) is started for the stage."
)


def stage_parser(sub, name: str, help_text: str, input_help: str) -> argparse.ArgumentParser:
    """A Beam stage's subcommand: INPUT, --out, --config, and the Beam note in its help."""
    p = sub.add_parser(name, help=help_text, description=f"{help_text}\n\n{BEAM_NOTE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=input_help)
    p.add_argument("--out", required=True, help="output directory (a stage directory: parquet, rejected/, stats.json, _SUCCESS); written atomically, locked while the stage runs")
    p.add_argument("--config", help="YAML file with this stage's keys (or a section named after the stage)")
    return p


def print_stats(stats: dict, seconds: float) -> None:
    """One line of a stage's reconciled counts."""
    rejected = ", ".join(f"{k}={v}" for k, v in stats["rejected"].items()) or "none"
    print(f"{stats['stage']}: input={stats['input']} kept={stats['kept']} rejected: {rejected} ({seconds:.1f}s)")
