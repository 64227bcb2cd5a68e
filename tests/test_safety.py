"""The nsfw score (issue 32, point 3): LAION's CLIP-based NSFW head on the image embedding.

The heads are LAION's PyTorch state dicts (LAION-AI/CLIP-based-NSFW-Detector, models/*.pth: keys
norm.mean, norm.variance, linear_1..N). A randomly initialised head of that format is served by a
loopback model hub (tests/hubserver.py, the encoders' download tests' hub) and downloaded by
`webpairs filter` on first use; the reference computation here is LAION's torch module
(src/models.py) typed out again, run on the embeddings filter stored (or recomputed from the stored
image bytes for --safety-encoder). Every check reads every row or sample back with pyarrow, DuckDB
or tarfile."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import hubserver
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "LAION-AI/CLIP-based-NSFW-Detector"
HEAD_FILE = "models/clip_tiny-clip_random_binary_nsfw_head.pth"  # LAION's naming, for tiny-clip's 64-d embeddings
PHOTOS = 12  # on 3 pages of one site; the first photo also on the second page (two links, one image)


class _LaionHead:
    """LAION's src/models.py (NSFWModel_B32 / NSFWModel_L14) for any widths, as a torch module:
    the reference the scores are checked against."""

    def __new__(cls, dims):
        import torch

        class Normalization(torch.nn.Module):
            def __init__(self, shape):
                super().__init__()
                self.register_buffer("mean", torch.zeros(shape))
                self.register_buffer("variance", torch.ones(shape))

            def forward(self, x):
                return (x - self.mean) / (self.variance.sqrt() + 1e-10)

        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = Normalization([dims[0]])
                self.n = len(dims) - 1
                for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]), 1):
                    setattr(self, f"linear_{i}", torch.nn.Linear(a, b))

            def forward(self, x):
                x = self.norm(x)
                for i in range(1, self.n + 1):
                    x = getattr(self, f"linear_{i}")(x)
                    x = torch.relu(x) if i < self.n else torch.sigmoid(x)
                return x

        return Head()


def _state(dims, seed: int, adapt=None):
    """A random head in LAION's state-dict layout; its normalisation adapted to `adapt` (embeddings)
    when given, as Keras' Normalization.adapt did for LAION's heads, so that scores spread over (0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    if adapt is None:
        sd["norm.mean"] = torch.randn(dims[0], generator=g) * 0.02
        sd["norm.variance"] = torch.rand(dims[0], generator=g) * 0.01 + 0.002
    else:
        sd["norm.mean"] = torch.as_tensor(adapt.mean(axis=0), dtype=torch.float32)
        sd["norm.variance"] = torch.as_tensor(adapt.var(axis=0), dtype=torch.float32)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]), 1):
        sd[f"linear_{i}.weight"] = torch.randn(b, a, generator=g) * (2.0 / a) ** 0.5
        sd[f"linear_{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


def _reference(path: str, embeddings) -> np.ndarray:
    """LAION's module with the file's weights on float32 embeddings -> (B,) scores."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    n = sum(1 for k in state if k.endswith(".weight"))
    dims = [state["linear_1.weight"].shape[1]] + [state[f"linear_{i}.weight"].shape[0] for i in range(1, n + 1)]
    model = _LaionHead(dims)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(embeddings, dtype=np.float32))).numpy()[:, 0]


def test_laions_heads_fit_openai_clip_b32_and_l14_only():
    from core.safety import HEADS_URL, head_url

    base = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/models/"
    assert HEADS_URL == base
    for name in ("open_clip:ViT-B-32", "open_clip:ViT-B-32:openai", "open_clip:ViT-B-32-quickgelu:openai"):
        assert head_url(name) == base + "clip_ViT-B-32_openai_binary_nsfw_head.pth"
    for name in ("open_clip:ViT-L-14", "open_clip:ViT-L-14:openai"):
        assert head_url(name) == base + "clip_ViT-L-14_openai_binary_nsfw_head.pth"
    for name in ("open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:ViT-B-16", "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "efficientnet-lite0", "tiny-clip", "timm:vit_small_patch14_dinov2.lvd142m", "none"):
        assert head_url(name) is None, name


@pytest.mark.parametrize("dims", [(512, 32, 32, 1), (768, 64, 512, 256, 1)], ids=["ViT-B-32", "ViT-L-14"])
def test_laion_head_layouts_score_as_laions_torch_module(tmp_path, dims):
    """LAION's two layouts (B32: 512-32-32-1, L14: 768-64-512-256-1), written as torch.save writes
    their .pth files: NumPy's scores equal the torch module's on every one of 200 embeddings."""
    import torch

    from core.safety import load_head
    from filter.embed import nsfw_scores

    path = str(tmp_path / "head.pth")
    torch.save(_state(list(dims), seed=len(dims)), path)
    head = load_head(path)
    assert head.dim == dims[0] and len(head.layers) == len(dims) - 1
    emb = np.random.default_rng(0).normal(size=(200, dims[0])).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got, want = head(emb), _reference(path, emb)
    assert got.shape == (200,) and np.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert 0 < got.min() and got.max() < 1 and got.std() > 0.05
    half = emb.astype(np.float16).astype(np.float32)  # what filter stores, and what it scores
    assert np.allclose(nsfw_scores(head, emb), _reference(path, half), atol=1e-6, rtol=1e-5)


def test_files_that_are_not_heads_are_refused_in_one_sentence(tmp_path):
    import torch

    from core.safety import SafetyUnavailable, fetch_head, load_head

    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    torch.save({"weight": torch.zeros(3)}, str(tmp_path / "other.pth"))
    bad = _state([64, 32, 2], seed=1)  # two outputs: not a binary head
    torch.save(bad, str(tmp_path / "two.pth"))
    for name, words in (("junk.pth", "not a readable NSFW head"), ("other.pth", "not a LAION NSFW head"), ("two.pth", "2 outputs")):
        with pytest.raises(SafetyUnavailable, match=words) as err:
            load_head(str(tmp_path / name))
        assert "\n" not in str(err.value)
    with pytest.raises(SafetyUnavailable, match="does not exist"):
        fetch_head(str(tmp_path / "missing.pth"))


# ---- a download output of real photos, and the head on a loopback hub ------------------------


def _photo_names(photos_dir: str) -> list[str]:
    return sorted(os.listdir(photos_dir))[::25][:PHOTOS]


@pytest.fixture(scope="module")
def download_dir(tmp_path_factory, photos_dir):
    from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA
    from core.stageio import finish_stage

    root = tmp_path_factory.mktemp("safety") / "download"
    (root / "downloads").mkdir(parents=True)
    (root / "occurrences").mkdir()
    names = _photo_names(photos_dir)
    rows, links = [], []
    for i, name in enumerate(names):
        page = f"http://photos.example/p{i // 4}.html"
        rows.append({"image_id": f"img{i:02d}", "image_url": f"http://photos.example/{name}", "page_url": page, "alt": name.split("_", 1)[1].split(".")[0],
                     "position": i % 4, "image_bytes": open(os.path.join(photos_dir, name), "rb").read(), "sha256": None, "links": 2 if i == 0 else 1})
        links.append({"link_id": f"link{i:02d}", "page_url": page, "site": "photos.example", "image_url": rows[-1]["image_url"], "alt": rows[-1]["alt"], "position": i % 4, "image_id": f"img{i:02d}"})
    links.append(dict(links[0], link_id="link-shared", page_url="http://photos.example/p1.html", position=4))  # the same image on another page
    pq.write_table(pa.Table.from_pylist(rows, schema=DOWNLOAD_SCHEMA), root / "downloads" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(links, schema=DOWNLOAD_OCCURRENCE_SCHEMA), root / "occurrences" / "part-0.parquet")
    (root / "stats.json").write_text(json.dumps({"stage": "download", "input": len(links), "kept": len(links), "rejected": {}}))
    finish_stage(str(root), "download")
    return str(root)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, photos_dir):
    import torch
    from PIL import Image

    from core.encoders import load_encoder

    tiny = load_encoder("tiny-clip")  # the head's normalisation adapted to tiny-clip's embeddings of other photos
    others = sorted(os.listdir(photos_dir))[1::25][:40]
    adapt = tiny.embed_images(np.stack([tiny.preprocess(Image.open(os.path.join(photos_dir, n)).convert("RGB")) for n in others]))
    path = tmp_path_factory.mktemp("hub") / "head.pth"
    torch.save(_state([64, 32, 32, 1], seed=7, adapt=adapt), str(path))  # tiny-clip's width, LAION's B32 layout
    server, url, served = hubserver.serve(REPO, {HEAD_FILE: path.read_bytes()})
    yield {"url": f"{url}/{REPO}/resolve/main/{HEAD_FILE}", "served": served, "bytes": path.read_bytes()}
    server.shutdown()


def _env(torch_home: str, online: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=ROOT, TORCH_HOME=torch_home)
    if not online:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _webpairs(env, *args):
    return subprocess.run([sys.executable, "-m", "webpairs.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def _head_requests(served) -> int:
    return sum(1 for p in served if p.split("?")[0].endswith(HEAD_FILE))


@pytest.fixture(scope="module")
def online(tmp_path_factory, download_dir, hub):
    """`webpairs filter --encoder tiny-clip --safety-head URL` online: the head downloads once."""
    root = tmp_path_factory.mktemp("safety-run")
    torch_home = str(root / "torch")
    before = _head_requests(hub["served"])
    done = _webpairs(_env(torch_home, online=True), "filter", download_dir, "--out", str(root / "run" / "filter"), "--encoder", "tiny-clip", "--safety-head", hub["url"], "--batch-size", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": str(root / "run"), "filter": str(root / "run" / "filter"), "torch_home": torch_home, "requests": _head_requests(hub["served"]) - before, "stderr": done.stderr}


def _images(filter_dir: str) -> dict:
    """filter's images/ rows by image id, each with the bytes its pointer names (read with pyarrow)."""
    from downloads import pointed_bytes

    rows = pq.read_table(os.path.join(filter_dir, "images")).to_pylist()
    for r, data in zip(rows, pointed_bytes(rows)):
        r["image_bytes"] = data
    return {r["image_id"]: r for r in rows}


def test_head_downloads_on_first_use_and_offline_reads_only_the_cache(online, hub, download_dir, tmp_path):
    from core.safety import cached_path

    assert online["requests"] == 1  # downloaded on first use, once
    assert "nsfw" not in online["stderr"]  # a head applies: nothing to say
    cached = [os.path.join(d, f) for d, _, files in os.walk(online["torch_home"]) for f in files]
    assert len(cached) == 1 and open(cached[0], "rb").read() == hub["bytes"]
    n = len(hub["served"])
    # offline with an empty cache: one line, nothing asked of the hub, no output
    empty = _webpairs(_env(str(tmp_path / "empty-torch"), online=True), "--offline", "filter", download_dir, "--out", str(tmp_path / "f0"), "--encoder", "tiny-clip", "--safety-head", hub["url"])
    lines = empty.stderr.strip().splitlines()
    assert empty.returncode == 2 and len(lines) == 1, empty.stderr[-2000:]
    assert lines[0].startswith("webpairs filter: error: ") and "offline mode is on" in lines[0] and "not in the cache" in lines[0]
    assert len(hub["served"]) == n and not (tmp_path / "f0").exists()
    # offline with the filled cache: the same scores, still nothing asked
    again = _webpairs(_env(online["torch_home"], online=False), "--offline", "filter", download_dir, "--out", str(tmp_path / "f1"), "--encoder", "tiny-clip", "--safety-head", hub["url"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(hub["served"]) == n
    first, second = _images(online["filter"]), _images(str(tmp_path / "f1"))
    assert set(first) == set(second)  # the same scores (to float noise: batches may form differently)
    assert np.allclose([first[k]["nsfw"] for k in first], [second[k]["nsfw"] for k in first], atol=1e-4)
    env = _env(online["torch_home"], online=False)
    script = f"from core.safety import cached_path; print(cached_path({hub['url']!r}))"
    where = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60).stdout.strip()
    assert where == cached[0] and cached_path(hub["url"]).endswith(os.path.basename(HEAD_FILE))


def test_every_score_is_the_head_on_the_stored_embedding(online, hub, tmp_path):
    path = tmp_path / "head.pth"
    path.write_bytes(hub["bytes"])
    rows = list(_images(online["filter"]).values())
    assert len(rows) == PHOTOS
    emb = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])  # float16 as stored
    want = _reference(str(path), emb)
    got = np.array([r["nsfw"] for r in rows], dtype=np.float32)
    assert np.allclose(got, want, atol=2e-6, rtol=1e-5), np.abs(got - want).max()
    assert (got > 0).all() and (got < 1).all() and got.std() > 0.05  # the scores differ from image to image


def _pair_and_shards(filter_dir: str, run: str) -> tuple[str, str]:
    from core.config import PairConfig, ShardConfig
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    pair, shards = os.path.join(run, "pair"), os.path.join(run, "shards")
    run_pair(filter_dir, pair, PairConfig(sim_low=-1.0, sim_high=1.0, copies=False))
    run_shards(pair, shards, ShardConfig(samples_per_shard=7))
    return pair, shards


def test_the_score_flows_to_pair_rows_the_index_every_sample_report_and_browser(online, tmp_path):
    import duckdb

    from browse.data import RunData
    from browse.report import collect, render_html, summary_text

    images = _images(online["filter"])
    pair, shards = _pair_and_shards(online["filter"], online["run"])
    pairs = {r["pair_id"]: r for r in pq.read_table(os.path.join(pair, "pairs")).to_pylist()}
    assert len(pairs) >= 30
    for p in pairs.values():
        assert p["cond_nsfw"] == images[p["cond_image_id"]]["nsfw"] and p["target_nsfw"] == images[p["target_image_id"]]["nsfw"]
    paired = {r["image_id"]: r["nsfw"] for r in pq.read_table(os.path.join(pair, "images"), columns=["image_id", "nsfw"]).to_pylist()}
    assert paired and all(v == images[k]["nsfw"] for k, v in paired.items())
    # the index, read with DuckDB, per key
    index = duckdb.sql(f"SELECT key, shard, \"offset\", size, cond_nsfw, target_nsfw FROM read_parquet('{shards}/index/*.parquet')").fetchall()
    assert {k for k, *_ in index} == set(pairs)
    for key, _, _, _, cond, target in index:
        assert (cond, target) == (pairs[key]["cond_nsfw"], pairs[key]["target_nsfw"]), key
    # every sample's json, read with tarfile
    seen = set()
    for name in sorted(f for f in os.listdir(shards) if f.endswith(".tar")):
        with tarfile.open(os.path.join(shards, name)) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    key = m.name.split(".", 1)[0]
                    assert (meta["cond_nsfw"], meta["target_nsfw"]) == (pairs[key]["cond_nsfw"], pairs[key]["target_nsfw"]), key
                    seen.add(key)
    assert seen == set(pairs)
    # the report's histogram: every kept image's score in its bin (bins counted here with DuckDB)
    data = collect(online["run"])
    hist = data["safety"]["nsfw"]
    bins = dict(duckdb.sql(f"SELECT least(floor(nsfw * 10), 9)::INT AS b, count(*) FROM read_parquet('{online['filter']}/images/*.parquet') GROUP BY b").fetchall())
    assert hist["scored"] == PHOTOS and hist["counts"] == [bins.get(b, 0) for b in range(10)]
    assert hist["edges"] == [round(0.1 * i, 2) for i in range(11)]
    assert "nsfw score (12 images" in summary_text(data)
    html = render_html(data)
    assert "id='nsfw-histogram'" in html and "id='plot-nsfw'" in html and "<h2>Safety</h2>" in html
    # the browser: a pair's score is the higher of its two images'; nmin/nmax select exactly those
    score = {k: max(p["cond_nsfw"], p["target_nsfw"]) for k, p in pairs.items()}
    cut = float(np.median(list(score.values())))
    browse = RunData(online["run"])
    try:
        high = browse.pairs(nmin=cut, limit=200)
        low = browse.pairs(nmax=cut, limit=200)
        assert {r["key"] for r in high["rows"]} == {k for k, v in score.items() if v >= cut} and high["total"] == len(high["rows"])
        assert {r["key"] for r in low["rows"]} == {k for k, v in score.items() if v <= cut} and 0 < low["total"] < len(score)
        assert all(r["nsfw"] == pytest.approx(score[r["key"]]) for r in high["rows"] + low["rows"])
    finally:
        browse.close()


def test_max_nsfw_rejects_exactly_the_images_above_it(online, hub, download_dir, tmp_path, monkeypatch):
    """--max-nsfw T (in process, the head from the cache: conftest keeps the hub clients offline):
    every link of an image scoring above T is rejected as nsfw, every other kept, counts reconcile."""
    from core.config import FilterConfig
    from core.stageio import read_stats
    from filter.pipeline import run_filter

    monkeypatch.setenv("TORCH_HOME", online["torch_home"])
    scores = {k: r["nsfw"] for k, r in _images(online["filter"]).items()}
    cut = float(np.median(list(scores.values())))
    above = {k for k, v in scores.items() if v > cut}
    out = str(tmp_path / "strict")
    stats = run_filter(download_dir, out, FilterConfig(encoder="tiny-clip", safety_head=hub["url"], max_nsfw=cut))
    links = pq.read_table(os.path.join(download_dir, "occurrences")).to_pylist()
    rejected = pq.read_table(os.path.join(out, "rejected")).to_pylist()
    want = {link["link_id"] for link in links if link["image_id"] in above}
    assert {r["record_id"] for r in rejected} == want and all(r["reason"] == "nsfw" and r["stage"] == "filter" for r in rejected)
    for r in rejected:
        image = next(link["image_id"] for link in links if link["link_id"] == r["record_id"])
        assert f"{scores[image]:.4f} > {cut}" in r["detail"]
    kept = _images(out)
    assert set(kept) == set(scores) - above and all(kept[k]["nsfw"] <= cut for k in kept)
    occ = {r["link_id"]: r["filter_reason"] for r in pq.read_table(os.path.join(out, "occurrences")).to_pylist()}
    assert {k for k, v in occ.items() if v == "nsfw"} == want
    assert stats["rejected"] == {"nsfw": len(want)} and stats["input"] == len(links) == stats["kept"] + len(want)
    assert read_stats(out)["images_kept"] == len(scores) - len(above)


def test_without_a_head_filter_says_so_once_and_stores_no_score(download_dir, tmp_path, caplog):
    from core.config import FilterConfig
    from core.stageio import StageError
    from filter.pipeline import run_filter

    with caplog.at_level(logging.INFO):
        run_filter(download_dir, str(tmp_path / "plain"), FilterConfig(encoder="tiny-clip"))
    said = [r for r in caplog.records if "nsfw" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "\n" not in said[0].getMessage()
    assert "tiny-clip has no NSFW safety head" in said[0].getMessage() and "--safety-encoder open_clip:ViT-B-32" in said[0].getMessage()
    assert all(r["nsfw"] is None for r in _images(str(tmp_path / "plain")).values())
    # a threshold that cannot apply is an error, never skipped
    for cfg, words in ((FilterConfig(encoder="tiny-clip", max_nsfw=0.5), "needs an nsfw score, but encoder tiny-clip has no NSFW safety head"),
                       (FilterConfig(encoder="none", max_nsfw=0.5), "encoder none embeds nothing"),
                       (FilterConfig(encoder="tiny-clip", safety_encoder="none", max_nsfw=0.5), "the safety encoder is none"),
                       (FilterConfig(encoder="none", safety_encoder="tiny-clip"), "--encoder none embeds none")):
        with pytest.raises(StageError, match=words):
            run_filter(download_dir, str(tmp_path / "never"), cfg)
    assert not (tmp_path / "never").exists()


def test_max_nsfw_flags_and_config_keys_are_checked(tmp_path):
    from core import config
    from webpairs.run import RunConfig

    (tmp_path / "c.yaml").write_text("filter: {max_nsfw: 0.3, safety_encoder: tiny-clip, safety_head: /x/head.pth}\n")
    cfg = RunConfig.load(str(tmp_path / "c.yaml"))
    assert (cfg.filter.max_nsfw, cfg.filter.safety_encoder, cfg.filter.safety_head) == (0.3, "tiny-clip", "/x/head.pth")
    assert RunConfig.load(str(tmp_path / "c.yaml"), max_nsfw=0.6).filter.max_nsfw == 0.6  # a flag wins
    with pytest.raises(config.ConfigError, match="max_nsfw"):
        config.load(config.FilterConfig, max_nsfw=1.5)
    env = _env(str(tmp_path / "torch"), online=False)
    for command in (["filter", str(tmp_path), "--out", str(tmp_path / "f")], ["run", str(tmp_path), "--out", str(tmp_path / "r")]):
        done = _webpairs(env, *command, "--max-nsfw", "2")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "max_nsfw" in lines[0] and "out of range" in lines[0], done.stderr[-1500:]
    from webpairs.cli import build_parser

    parser, _ = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices  # noqa: SLF001
    for command in ("filter", "run"):
        helped = subs[command].format_help()
        assert all(flag in helped for flag in ("--max-nsfw", "--safety-encoder", "--safety-encoder-weights", "--safety-head")), command


def test_safety_encoder_scores_a_second_embedding(online, hub, download_dir, tmp_path, monkeypatch):
    """--encoder efficientnet-lite0 (no head) --safety-encoder tiny-clip: the stored embedding is
    efficientnet's, the score is the head on tiny-clip's embedding of the same image (recomputed
    here from the stored bytes)."""
    from PIL import Image, ImageOps

    from core.config import FilterConfig
    from core.encoders import load_encoder
    from core.stageio import StageError
    from filter.pipeline import run_filter

    monkeypatch.setenv("TORCH_HOME", online["torch_home"])
    out = str(tmp_path / "second")
    run_filter(download_dir, out, FilterConfig(encoder="efficientnet-lite0", safety_encoder="tiny-clip", safety_head=hub["url"], faces="off"))
    rows = list(_images(out).values())
    assert len(rows) == PHOTOS and all(len(r["embedding"]) == 1280 and r["encoder"] == "efficientnet-lite0" for r in rows)
    tiny = load_encoder("tiny-clip")
    pixels = np.stack([tiny.preprocess(ImageOps.exif_transpose(Image.open(io.BytesIO(r["image_bytes"]))).convert("RGB")) for r in rows])
    emb = tiny.embed_images(pixels).astype(np.float16).astype(np.float32)
    path = tmp_path / "head.pth"
    path.write_bytes(hub["bytes"])
    want = _reference(str(path), emb)
    got = np.array([r["nsfw"] for r in rows], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    # the same scores as the run whose main encoder was tiny-clip
    first = _images(online["filter"])
    assert np.allclose(got, [first[r["image_id"]]["nsfw"] for r in rows], atol=1e-4)
    # a head whose width is not the encoder's is refused at start
    with pytest.raises(StageError, match="reads 64-d embeddings and efficientnet-lite0 makes 1280-d"):
        run_filter(download_dir, str(tmp_path / "never"), FilterConfig(encoder="efficientnet-lite0", safety_head=hub["url"]))
