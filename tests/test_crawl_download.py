"""crawl download against the loopback test web: reasons, URL policy, kill-and-rerun resume."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from core.config import CrawlConfig, DownloadConfig
from core.stageio import read_stats, read_table
from crawl.download import reason_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "message,reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("Use of image disallowed by X-Robots-Tag directive", "opt_out"),
        ("<urlopen error url policy: redirect to http://169.254.169.254/ refused (private_address)>", "redirect_refused"),
        ("<urlopen error [Errno 111] Connection refused>", "download_error"),
    ],
)
def test_reason_mapping(message, reason):
    assert reason_for(message) == reason


@pytest.fixture(scope="module")
def links_dir(pipeline_dirs):
    """extract's links of the test web (allow_hosts 127.0.0.1), the session's run (conftest), read only."""
    return pipeline_dirs["links"]


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, links_dir, test_web):
    from crawl.download import run_download

    out = str(tmp_path_factory.mktemp("download"))
    before = test_web.requests()
    stats = run_download(links_dir, out, DownloadConfig(allow_hosts=("127.0.0.1",), timeout=1.5, processes=1, threads=8))
    fetched = {path: n - before.get(path, 0) for path, n in test_web.requests().items() if n > before.get(path, 0)}
    return out, stats, fetched


def _kept_links(out):
    occ = read_table(out, "occurrences").to_pandas()
    return occ[occ.reason.isna()]


def test_every_planted_download_failure_has_its_reason(downloaded, links_dir, test_web):
    out, stats, _ = downloaded
    links = read_table(links_dir, "links").to_pandas()
    kept = _kept_links(out)
    rejected = read_table(out, "rejected").to_pandas()
    assert stats["input"] == len(links) == len(kept) + len(rejected)
    assert sorted(kept.link_id.tolist() + rejected.record_id.tolist()) == sorted(links.link_id)
    got = dict(zip(rejected.url, rejected.reason))
    for url, (stage, reason) in test_web.bad.items():
        if stage == "download":
            assert got.get(url) == reason, url
    assert set(got) == {u for u, (s, _) in test_web.bad.items() if s == "download"}
    # each link resolves to its image; page_url, alt and position stay with the link
    images = read_table(out, "downloads").to_pandas().set_index("image_id")
    row = kept[kept.image_url.str.endswith("/go/redirect.jpg")].iloc[0]  # the redirect was followed
    assert images.loc[row.image_id].image_bytes == test_web.routes["/img/t1/target.jpg"].body
    photo = kept[kept.image_url == next(iter(test_web.good))].iloc[0]
    assert photo.page_url in test_web.pages and photo.alt.startswith("photo")
    assert read_stats(out)["rejected"] == stats["rejected"]


def test_each_image_url_is_fetched_once_and_identical_bytes_kept_once(downloaded, test_web):
    out, stats, fetched = downloaded
    kept = _kept_links(out)
    images = read_table(out, "downloads").to_pandas()
    occurrences = read_table(out, "occurrences").to_pandas()  # kept links and boilerplate evidence
    assert occurrences.image_url.value_counts().max() == len(test_web.pages)  # the logo: on every page ...
    assert max(fetched.values()) == 1  # ... and, like every image URL, requested once
    # /img/dup/exact.jpg serves the bytes of /img/t0/p0_0.jpg: one image, two links
    exact = kept[kept.image_url.str.endswith("/img/dup/exact.jpg")].image_id.iloc[0]
    assert exact == kept[kept.image_url.str.endswith("/img/t0/p0_0.jpg")].image_id.iloc[0]
    assert images.image_id.is_unique and len(images) == stats["images"] < stats["urls_downloaded"]
    assert set(kept.image_id) <= set(images.image_id)
    assert (images.set_index("image_id").links[kept.image_id.unique()] > 0).all()
    # each site's pages in the crawl (every page with a link): the denominator of the site rules
    sites = read_table(out, "sites").to_pylist()
    assert sites == [{"site": "127.0.0.1", "pages": len(test_web.pages)}]


def test_links_that_cannot_make_a_pair_are_never_fetched(downloaded, test_web):
    """The plan rejects them before img2dataset runs: nothing was requested for them."""
    out, stats, fetched = downloaded
    rejected = read_table(out, "rejected").to_pandas()
    for reason in ("declared_too_small", "not_raster", "boilerplate_url_global"):
        urls = set(rejected[rejected.reason == reason].url)
        assert urls, reason
        for url in urls:
            path = url[len(test_web.base_url):]
            # the logo is fetched once as boilerplate evidence; the others never
            assert fetched.get(path, 0) == (1 if reason == "boilerplate_url_global" else 0), url
    # one request per fetched URL (the redirect's target is the one extra request), and the site's
    # robots.txt and tdmrep.json asked once (issue 31)
    assert fetched["/robots.txt"] == fetched["/.well-known/tdmrep.json"] == 1
    assert stats["urls_evidence"] == 1 and stats["urls_selected"] + stats["urls_evidence"] == sum(n for p, n in fetched.items() if p not in ("/img/t1/target.jpg", "/robots.txt", "/.well-known/tdmrep.json"))


def test_private_links_refused_without_allow_list(tmp_path, links_dir):
    from crawl.download import run_download

    stats = run_download(links_dir, str(tmp_path), DownloadConfig())
    assert stats["kept"] == 0 and stats["rejected"] == {"private_address": stats["input"]}
    assert not glob.glob(str(tmp_path / "img2dataset" / "*.parquet"))  # nothing was fetched


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return [sys.executable, "-m", "webpairs.cli", *args], env


def test_kill_and_rerun_has_no_duplicate_and_no_missing_image(tmp_path, links_dir):
    out = str(tmp_path / "dl")
    partial = str(tmp_path / ".dl.partial")  # where a running download writes (swapped in at the end)
    cmd, env = _cli("crawl", "download", links_dir, "--out", out, "--allow-hosts", "127.0.0.1", "--samples-per-shard", "10", "--processes", "1", "--threads", "2", "--timeout", "1.5")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(os.path.join(partial, "img2dataset", "*_stats.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: img2dataset's workers too
    proc.wait()
    finished_before = set(glob.glob(os.path.join(partial, "img2dataset", "*_stats.json")))
    assert finished_before, "no shard finished before the kill"
    assert not os.path.exists(out) and os.path.exists(os.path.join(tmp_path, ".dl.lock"))  # nothing complete-looking
    mtimes = {os.path.basename(f): os.path.getmtime(f) for f in finished_before}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # finished shards were not redone: the rerun resumed in the partial folder, then swapped it in
    assert all(os.path.getmtime(os.path.join(out, "img2dataset", f)) == m for f, m in mtimes.items())
    assert sorted(os.listdir(tmp_path)) == ["dl"]
    links = read_table(links_dir, "links").to_pandas()
    kept = _kept_links(out)
    rejected = read_table(out, "rejected").to_pandas()
    ids = kept.link_id.tolist() + rejected.record_id.tolist()
    assert len(ids) == len(set(ids)) == len(links)
    assert set(ids) == set(links.link_id)


def test_a_failing_url_rejects_every_link_to_it_and_a_good_one_is_fetched_once(tmp_path):
    """Two pages link the same missing image and the same photo: one request each; the missing
    image's two links are rejected with its reason, the photo's two links resolve to one image."""
    import pyarrow.parquet as pq

    from core.records import LINK_SCHEMA, LinkRecord, rows_to_table
    from core.stageio import finish_stage
    from crawl.download import run_download
    from webpairs.testweb import Route, _jpeg, generated_photo, serve_routes

    routes = {"/photo.jpg": Route(body=_jpeg(generated_photo(0, 0))), "/other0.jpg": Route(body=_jpeg(generated_photo(1, 0))), "/other1.jpg": Route(body=_jpeg(generated_photo(1, 1)))}
    with serve_routes(routes) as base:
        hits = serve_routes.last_handler.hits
        rows = [LinkRecord(f"http://www.example.com/{p}", base + src, position=k).to_row() for p in range(2) for k, src in enumerate(("/missing.jpg", "/photo.jpg", f"/other{p}.jpg"))]
        links = tmp_path / "links"
        (links / "links").mkdir(parents=True)
        pq.write_table(rows_to_table(rows, LINK_SCHEMA), links / "links" / "part-0.parquet")
        (links / "stats.json").write_text(f'{{"stage": "extract", "input": {len(rows)}, "kept": {len(rows)}, "rejected": {{}}}}')
        finish_stage(str(links), "extract")
        stats = run_download(str(links), str(tmp_path / "dl"), DownloadConfig(allow_hosts=("127.0.0.1",), processes=1, threads=4))
    assert dict(hits) == {"/missing.jpg": 1, "/photo.jpg": 1, "/other0.jpg": 1, "/other1.jpg": 1, "/robots.txt": 1, "/.well-known/tdmrep.json": 1}  # the site's files once (issue 31)
    assert stats["input"] == 6 and stats["kept"] == 4 and stats["rejected"] == {"http_404": 2}
    occ = read_table(str(tmp_path / "dl"), "occurrences").to_pandas()
    photo = occ[occ.image_url == base + "/photo.jpg"]
    assert len(photo) == 2 and photo.image_id.nunique() == 1
    assert stats["urls"] == 4 and stats["urls_downloaded"] == 3 and stats["images"] == 3


def test_a_killed_process_that_imported_the_download_stage_leaves_no_wandb_folders(tmp_path):
    """img2dataset imports wandb, which makes two temporary folders at import and removes them only
    at a normal exit; img2dataset's spawned workers are terminated, so each left two empty
    `tmp*wandb-*` folders in /tmp. A process that imports the stage and is killed (SIGKILL, no
    exit handlers, like a terminated worker) must leave its TMPDIR as empty as it found it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the stage's own default
    env.update(TMPDIR=str(tmp), PYTHONPATH=ROOT)
    code = "import os, signal, crawl.download, wandb; print('imported', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert "imported" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp)) == []
