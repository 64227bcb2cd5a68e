"""A misspelt flag is an error (issue 32): a flag that neither webpairs nor Beam's pipeline options
know used to go to Beam, which discarded it, and the run went on without it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "webpairs.cli", *args], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "argv,flag,nearest",
    [
        (["run", "in.warc.gz", "--out", "OUT", "--blocklst", "list.txt"], "--blocklst", "--blocklist"),
        (["run", "in.warc.gz", "--out", "OUT", "--blocklist", "list.txt", "--blocklist-pdq-distanse=20"], "--blocklist-pdq-distanse", "--blocklist-pdq-distance"),
        (["filter", "DL", "--out", "OUT", "--encodr", "efficientnet-lite0"], "--encodr", "--encoder"),
        (["filter", "DL", "--out", "OUT", "--direct-num-workers", "2"], "--direct-num-workers", "--direct_num_workers"),
        (["pair", "FI", "--out", "OUT", "--runnr=dask"], "--runnr", "--runner"),
        (["crawl", "download", "LINKS", "--out", "OUT", "--blocklistt", "x"], "--blocklistt", "--blocklist"),
    ],
)
def test_an_unknown_flag_is_one_line_naming_the_nearest_known_one(tmp_path, capsys, argv, flag, nearest):
    from webpairs.cli import main

    argv = [str(tmp_path / a) if a.isupper() or a.endswith((".gz", ".txt")) else a for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"webpairs {argv[0]}") and f"unknown flag {flag} " in lines[0] and lines[0].endswith(f"did you mean {nearest}?")
    assert not os.path.exists(tmp_path / "OUT")


def test_known_beam_flags_still_pass_and_config_beam_flags_are_checked(tmp_path):
    proc = _cli("filter", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--direct_num_workers=1", "--runner", "FnApiRunner")
    assert proc.returncode == 2 and "unknown flag" not in proc.stderr and "missing" in proc.stderr  # got as far as the input
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beam:\n  dask-wrkers: 2\n")
    proc = _cli("filter", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--config", str(cfg))
    assert proc.returncode == 2 and "unknown flag --dask-wrkers" in proc.stderr and "did you mean --dask-workers?" in proc.stderr
