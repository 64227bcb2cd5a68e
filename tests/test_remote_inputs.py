"""Common Crawl where it lives (issue 14, part 1), offline: a loopback HTTP server and a real S3 API
(moto's server mode) on 127.0.0.1 hold a Common-Crawl-shaped tree (`warc.paths.gz`, `wat.paths.gz`
and the WARC/WAT files of ../shared/data/warc). The HTTP server answers one ranged read with a 503
and cuts another connection mid-body; both runs must give the links of the local-file run."""

import gzip
import http.server
import os
import shutil
import threading
import uuid

import pytest

from core.config import CrawlConfig
from core.stageio import read_stats, read_table
from crawl.extract import run_extract
from crawl.warc import expand_inputs, manifest_prefix, read_manifest

SNAPSHOT = "crawl-data/CC-MAIN-2024-10"
LINK_COLUMNS = ["link_id", "page_url", "image_url", "alt", "position", "kind", "width", "height", "source_offset"]


@pytest.fixture(scope="module")
def cc_tree(tmp_path_factory, warc_dir):
    """A local copy of the tree: {relative path: bytes} plus the folder that holds it."""
    root = tmp_path_factory.mktemp("cc")
    warcs, wats = [], []
    for name in sorted(os.listdir(warc_dir)):
        rel = f"{SNAPSHOT}/segments/1700000000.{len(warcs) + len(wats)}/{'wat' if name.endswith('.wat') else 'warc'}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(warc_dir, name), root / rel)
        (wats if name.endswith(".wat") else warcs).append(rel)
    (root / SNAPSHOT / "warc.paths.gz").write_bytes(gzip.compress(("\n".join(warcs) + "\n").encode()))
    (root / SNAPSHOT / "wat.paths.gz").write_bytes(gzip.compress(("\n".join(wats) + "\n").encode()))
    return root, warcs, wats


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the tree with byte ranges (as data.commoncrawl.org does) and injects the faults the
    server's `faults` set names, once each: "503" on the first ranged read of a file ending
    `.warc.gz`, "reset" cutting the first ranged read of a plain `.warc` after half its body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, "rb").read()
        rng = self.headers.get("Range")
        start, end = 0, len(data) - 1
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a or 0), min(int(b) if b else len(data) - 1, len(data) - 1)
            server = self.server
            with server.lock:
                if "503" in server.faults and path.endswith(".warc.gz"):
                    server.faults.discard("503")
                    server.injected.append(("503", self.path))
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "reset" in server.faults and path.endswith(".warc") and end - start > 1000:
                    server.faults.discard("reset")
                    server.injected.append(("reset", self.path))
                    self.send_response(206)
                    self.send_header("Content-Length", str(end - start + 1))
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    self.end_headers()
                    self.wfile.write(data[start : start + (end - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    self.close_connection = True
                    return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@pytest.fixture()
def http_tree(cc_tree):
    root, _, _ = cc_tree
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.faults, server.injected, server.lock = {"503", "reset"}, [], threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _links(folder: str):
    return read_table(folder, "links", LINK_COLUMNS).sort_by("link_id")


@pytest.fixture(scope="module")
def local_run(cc_tree, tmp_path_factory):
    """The same manifests read from local files: {"warc"|"wat": (links folder, stats)}."""
    root, _, _ = cc_tree
    tmp = tmp_path_factory.mktemp("local")
    return {kind: (str(tmp / kind), run_extract(str(root / SNAPSHOT / f"{kind}.paths.gz"), str(tmp / kind), CrawlConfig())) for kind in ("warc", "wat")}


def _same_links(remote: dict, local_run: dict) -> None:
    for kind, folder in remote.items():
        assert _links(folder).equals(_links(local_run[kind][0])), kind


def test_manifest_paths_resolve_against_the_snapshot_root(cc_tree):
    root, warcs, wats = cc_tree
    assert manifest_prefix("https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-10/warc.paths.gz") == "https://data.commoncrawl.org/"
    assert manifest_prefix("s3://commoncrawl/crawl-data/CC-MAIN-2024-10/wat.paths.gz") == "s3://commoncrawl/"
    manifest = str(root / SNAPSHOT / "warc.paths.gz")
    assert read_manifest(manifest) == [str(root) + "/" + w for w in warcs]
    assert read_manifest(manifest, "https://data.commoncrawl.org/") == ["https://data.commoncrawl.org/" + w for w in warcs]
    assert expand_inputs(manifest, max_files=2, files_from=1) == [str(root) + "/" + w for w in warcs[1:3]]
    assert expand_inputs(str(root / SNAPSHOT / "wat.paths.gz")) == [str(root) + "/" + w for w in wats]


def test_common_crawl_over_http_with_a_503_and_a_reset(http_tree, local_run, tmp_path):
    server, base = http_tree
    stats = run_extract(f"{base}{SNAPSHOT}/warc.paths.gz", str(tmp_path / "links"), CrawlConfig())
    wat = run_extract(f"{base}{SNAPSHOT}/wat.paths.gz", str(tmp_path / "wat"), CrawlConfig())
    assert sorted(kind for kind, _ in server.injected) == ["503", "reset"]  # both faults happened ...
    assert stats["failed_files"] == 0 and stats["files"] == local_run["warc"][1]["files"] == 6  # ... and were survived
    _same_links({"warc": str(tmp_path / "links"), "wat": str(tmp_path / "wat")}, local_run)
    assert stats == local_run["warc"][1] and wat == local_run["wat"][1]
    sources = set(read_table(str(tmp_path / "links"), "links", ["source_file"]).column(0).to_pylist())
    assert all(s.startswith(base + SNAPSHOT + "/segments/") for s in sources)


def test_a_file_that_keeps_failing_is_recorded_and_the_job_goes_on(http_tree, tmp_path, capsys):
    server, base = http_tree
    server.faults.clear()
    listing = tmp_path / "some.paths"
    listing.write_text(f"{SNAPSHOT}/segments/gone/warc/missing.warc.gz\n" + f"{SNAPSHOT}/segments/1700000000.6/warc/whirlwind.warc.gz\n")
    stats = run_extract(str(listing), str(tmp_path / "out"), CrawlConfig(paths_prefix=base, retries=1))
    assert stats["failed_files"] == 1 and stats["rejected"]["failed_file"] == 1 and stats["kept"] > 0
    rejected = read_table(str(tmp_path / "out"), "rejected").to_pandas()
    failed = rejected[rejected.reason == "failed_file"]
    assert failed.url.tolist() == [base + SNAPSHOT + "/segments/gone/warc/missing.warc.gz"]
    # every file failing is an error of the command, in one line, after the output says why
    from webpairs.cli import main

    only = tmp_path / "none.paths"
    only.write_text(f"{SNAPSHOT}/segments/gone/warc/missing.warc.gz\n")
    assert main(["crawl", "extract", str(only), "--out", str(tmp_path / "o2"), "--paths-prefix", base, "--max-files", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("webpairs crawl extract: error: extract: none of the 1 input files")
    assert read_stats(str(tmp_path / "o2"))["failed_files"] == 1


@pytest.fixture()
def s3_tree(cc_tree, monkeypatch):
    from moto.server import ThreadedMotoServer

    root, _, _ = cc_tree
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="commoncrawl", ACL="public-read")  # public, like the real one
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            s3.upload_file(path, "commoncrawl", os.path.relpath(path, root), ExtraArgs={"ACL": "public-read"})
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull + ".absent")  # anonymous, as for the public bucket
    monkeypatch.setenv("WEBPAIRS_S3_ENDPOINT", endpoint)
    yield endpoint
    server.stop()


def test_common_crawl_over_s3(s3_tree, cc_tree, local_run, tmp_path):
    from core.remote import storage_options

    assert storage_options("s3://commoncrawl/x")["anon"] is True
    stats = run_extract(f"s3://commoncrawl/{SNAPSHOT}/warc.paths.gz", str(tmp_path / "links"), CrawlConfig())
    wat = run_extract(f"s3://commoncrawl/{SNAPSHOT}/wat.paths.gz", str(tmp_path / "wat"), CrawlConfig())
    _same_links({"warc": str(tmp_path / "links"), "wat": str(tmp_path / "wat")}, local_run)
    assert stats == local_run["warc"][1] and wat == local_run["wat"][1]
    sources = set(read_table(str(tmp_path / "links"), "links", ["source_file"]).column(0).to_pylist())
    assert all(s.startswith(f"s3://commoncrawl/{SNAPSHOT}/segments/") for s in sources)
    # the glob form of the second command
    globbed = run_extract(f"s3://commoncrawl/{SNAPSHOT}/segments/*/warc/*.warc.gz", str(tmp_path / "glob"), CrawlConfig())
    assert globbed["files"] == len([w for w in cc_tree[1] if w.endswith(".warc.gz")]) == 4 and globbed["failed_files"] == 0


@pytest.fixture()
def s3_out(s3_tree, monkeypatch):
    """A writable bucket on the same moto server (credentials set, as a real writer has them): (s3fs, bucket)."""
    import fsspec
    from s3fs import S3FileSystem

    for var, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # the server is named by WEBPAIRS_S3_ENDPOINT alone (s3_tree)
        monkeypatch.setenv(var, "unset")  # recorded first, so that teardown also drops the stage's export
        monkeypatch.delenv(var)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": s3_tree})
    bucket = f"out-{uuid.uuid4().hex[:12]}"  # moto's state outlives its server: a fresh bucket per test
    fs.mkdir(bucket)
    S3FileSystem.clear_instance_cache()  # the stage's own s3fs must reach this test's server, not a cached one's
    yield fs, bucket
    S3FileSystem.clear_instance_cache()


def _rows_by_folder(fs, root: str) -> dict:
    """Every row of every parquet file under `root`, read with pyarrow through `fs`: {subfolder: sorted rows}."""
    import pyarrow.parquet as pq

    rows: dict = {}
    for path in fs.find(root, withdirs=False):
        if path.endswith(".parquet"):
            folder = path[len(root.rstrip("/")) + 1 :].split("/")[0]
            rows.setdefault(folder, []).extend(repr(sorted(r.items())) for r in pq.read_table(path, filesystem=fs).to_pylist())
    return {k: sorted(v) for k, v in rows.items()}


def test_a_stage_writes_its_output_to_s3_and_swaps_it_on_a_rerun(s3_out, cc_tree, local_run):
    import json

    import fsspec

    fs, bucket = s3_out
    manifest = str(cc_tree[0] / SNAPSHOT / "warc.paths.gz")
    local_folder, local_stats = local_run["warc"]
    expected = _rows_by_folder(fsspec.filesystem("file"), local_folder)
    assert set(expected) == {"links", "rejected"} and all(expected.values())
    for attempt in ("first run", "rerun over the output (the swap)"):
        stats = run_extract(manifest, f"s3://{bucket}/run/links", CrawlConfig())
        assert stats == local_stats, attempt
        assert _rows_by_folder(fs, f"{bucket}/run/links") == expected, attempt
        fs.invalidate_cache()
        keys = sorted(fs.find(bucket, withdirs=False))
        assert all(k.startswith(f"{bucket}/run/links/") for k in keys), (attempt, keys)  # no .links.partial / .links.old left
        on_s3 = json.loads(fs.cat(f"{bucket}/run/links/stats.json"))
        assert on_s3 == local_stats and on_s3["input"] == on_s3["kept"] + sum(on_s3["rejected"].values())
        listed = json.loads(fs.cat(f"{bucket}/run/links/_SUCCESS"))["files"]
        assert sorted([f"{bucket}/run/links/{f}" for f in listed] + [f"{bucket}/run/links/_SUCCESS"]) == keys, attempt


@pytest.mark.parametrize("killed", ["parking the old output", "moving the new one in", "removing the old one"])
def test_a_swap_killed_mid_way_on_s3_is_put_right_by_the_next_run(s3_out, killed):
    from core.stageio import StageOutput

    fs, bucket = s3_out
    old_files = {"_SUCCESS": b"old", "links/a.parquet": b"old-a", "links/b.parquet": b"old-b", "stats.json": b"old-s"}
    new_files = {"_SUCCESS": b"new", "links/a.parquet": b"new-a", "links/c.parquet": b"new-c", "stats.json": b"new-s"}
    out, old, partial = f"{bucket}/run/links", f"{bucket}/run/.links.old", f"{bucket}/run/.links.partial"
    if killed == "parking the old output":  # two old files parked, the rest (with _SUCCESS) still in place
        state = {old: {k: v for k, v in old_files.items() if k.startswith("links/")}, out: {k: v for k, v in old_files.items() if not k.startswith("links/")}, partial: new_files}
        want = old_files
    elif killed == "moving the new one in":  # old parked whole, new half moved (without its _SUCCESS)
        state = {old: old_files, out: {"links/a.parquet": b"new-a"}, partial: {k: v for k, v in new_files.items() if k != "links/a.parquet"}}
        want = old_files
    else:  # the new output in place, the parked old one half removed
        state = {old: {"links/b.parquet": b"old-b"}, out: new_files}
        want = new_files
    for prefix, files in state.items():
        for rel, data in files.items():
            fs.pipe(f"{prefix}/{rel}", data)
    fs.invalidate_cache()
    with StageOutput(f"s3://{out}", "extract") as so:
        fs.invalidate_cache()
        assert {k[len(out) + 1 :]: fs.cat(k) for k in fs.find(out, withdirs=False)} == want, killed
        assert not fs.exists(old) and so.path == f"s3://{partial}"


def test_shards_written_to_s3_read_back_as_the_local_run(s3_out, pipeline_dirs, tmp_path):
    """Shards to an object store: its fetch files (`_fetched/`, written with Beam's S3 filesystem)
    and its tars go to the bucket; read back through s3fs with tarfile, every member of every
    shard and the manifest's checksums are the local run's, and nothing but what `_SUCCESS` lists
    is left in the bucket (no `_fetched/`, no partial folder)."""
    import hashlib
    import io
    import json
    import tarfile

    from core.config import ShardConfig
    from shards.writer import run_shards

    fs, bucket = s3_out
    local = run_shards(pipeline_dirs["pair"], str(tmp_path / "shards"), ShardConfig(samples_per_shard=25))
    remote = run_shards(pipeline_dirs["pair"], f"s3://{bucket}/run/shards", ShardConfig(samples_per_shard=25))
    assert remote == local and local["kept"] > 25
    fs.invalidate_cache()
    keys = sorted(fs.find(bucket, withdirs=False))
    listed = json.loads(fs.cat(f"{bucket}/run/shards/_SUCCESS"))["files"]
    assert sorted([f"{bucket}/run/shards/{f}" for f in listed] + [f"{bucket}/run/shards/_SUCCESS"]) == keys
    assert not [k for k in keys if "_fetched" in k or ".partial" in k]

    def members(read, names):
        out = {}
        for name in names:
            with tarfile.open(fileobj=io.BytesIO(read(name))) as tar:
                out.update({(name, m.name, m.offset): hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()})
        return out

    tars = sorted(f for f in listed if f.endswith(".tar"))
    assert tars == sorted(f for f in os.listdir(tmp_path / "shards") if f.endswith(".tar")) and len(tars) > 1
    assert members(lambda n: fs.cat(f"{bucket}/run/shards/{n}"), tars) == members(lambda n: (tmp_path / "shards" / n).read_bytes(), tars)
    shas = lambda m: [(s["shard"], s["samples"], s["sha256"]) for s in m["shards"]]  # noqa: E731
    assert shas(json.loads(fs.cat(f"{bucket}/run/shards/manifest.json"))) == shas(json.load(open(tmp_path / "shards" / "manifest.json")))
