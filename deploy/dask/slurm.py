"""Run webpairs' Beam stages on a SLURM cluster with dask-jobqueue.

    python deploy/dask/slurm.py --jobs 16 -- webpairs filter $RUN/download --out $RUN/filter
    python deploy/dask/slurm.py --jobs 32 -- webpairs run "$CC/warc.paths.gz" --out $RUN

It starts a Dask scheduler on this (login or batch) node, submits `--jobs` SLURM jobs that each run
one Dask worker process per core (`--cores`, `--memory`, `--partition`, `--account`, `--time`),
then runs the command after `--` with `--runner dask --dask-address <the scheduler>` appended,
and cancels the jobs when it ends. `--print-script` shows the sbatch script and submits nothing.
Each worker job runs in the project's venv (`--venv`, default: the one this script runs from),
so the workers have the same pins as the driver.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def make_cluster(cores: int, memory: str, partition: str, account: str, walltime: str, venv: str):
    """A dask-jobqueue SLURMCluster whose workers are the project's venv, one process per core. Its
    scheduler runs in this process, with one source bundle per worker at a time
    (core/dask_runner.SCHEDULER_CONFIG)."""
    import dask
    from dask_jobqueue import SLURMCluster

    from core.dask_runner import SCHEDULER_CONFIG

    with dask.config.set(SCHEDULER_CONFIG):
        return SLURMCluster(
            cores=cores,
            processes=cores,  # one single-threaded worker process per core: Beam DoFns hold the GIL
            memory=memory,
            queue=partition or None,
            account=account or None,
            walltime=walltime,
            python=os.path.join(venv, "bin", "python"),
            job_script_prologue=[
                f"source {os.path.join(venv, 'bin', 'activate')}",
                "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}",
                # glibc's malloc thresholds in the workers, not the nanny's, Arrow's system pool and two malloc arenas (core/dask_runner.WORKER_CONFIG)
                "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None, 'ARROW_DEFAULT_MEMORY_POOL': 'system', 'MALLOC_ARENA_MAX': '2'}\"",
            ],
            local_directory="$TMPDIR",
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (each one node's worth of workers)")
    ap.add_argument("--cores", type=int, default=16, help="cores per job = Dask worker processes per job")
    ap.add_argument("--memory", default="64GB", help="memory per job")
    ap.add_argument("--partition", default="", help="SLURM partition (queue)")
    ap.add_argument("--account", default="", help="SLURM account")
    ap.add_argument("--time", default="08:00:00", help="wall time per job")
    ap.add_argument("--venv", default=os.path.dirname(os.path.dirname(sys.executable)), help="the project's venv on the shared file system")
    ap.add_argument("--print-script", action="store_true", help="print the sbatch script and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the webpairs command to run on the cluster")
    args = ap.parse_args(argv)
    command = [c for c in args.command if c != "--"]
    cluster = make_cluster(args.cores, args.memory, args.partition, args.account, args.time, args.venv)
    try:
        if args.print_script or not command:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        return subprocess.call(command + ["--runner", "dask", "--dask-address", cluster.scheduler_address])
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
