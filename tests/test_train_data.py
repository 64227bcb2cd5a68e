"""The pair loader: one epoch over all ranks and workers sees every sample exactly once."""

import collections

import pytest

from train.data import DataConfig, PairStream, assign, make_loader


def test_assignment_is_disjoint_and_complete():
    urls = [f"s{i}.tar" for i in range(7)]
    for world, workers in ((1, 1), (2, 1), (2, 2), (3, 2), (4, 2)):
        parts = [assign(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
        if len(urls) >= world * workers:  # whole shards, each to exactly one reader
            owned = [u for mine, (mod, _) in parts for u in mine]
            assert sorted(owned) == urls and all(mod == 1 for _, (mod, _) in parts)
        else:  # every reader opens all shards and keeps every N-th sample: remainders 0..N-1 once each
            assert sorted(rem for _, (mod, rem) in parts) == list(range(world * workers))
            assert all(mine == urls and mod == world * workers for mine, (mod, _) in parts)


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (3, 2)])
def test_one_epoch_every_sample_once_across_ranks(pipeline_dirs, world, workers):
    import webdataset as wds

    from train.data import shard_urls

    shards = pipeline_dirs["shards"]
    all_keys = [s["__key__"] for s in wds.WebDataset(shard_urls(shards), shardshuffle=False)]
    seen = collections.Counter()
    for rank in range(world):
        cfg = DataConfig(shards=shards, batch_size=4, num_workers=workers, shuffle_buffer=8)
        for x, cond, keys in make_loader(cfg, rank, world, epochs=1):
            assert x.shape[1:] == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
            assert cond.shape[1] == 1280
            seen.update(keys)
    assert sorted(seen) == sorted(all_keys) and max(seen.values()) == 1


def test_self_pairing_computes_the_targets_own_embedding(pipeline_dirs):
    cfg = DataConfig(shards=pipeline_dirs["shards"], pairing="self", encoder="tiny-clip", num_workers=0, shuffle_buffer=1)
    x, cond, key = next(iter(PairStream(cfg, epochs=1)))
    assert cond.shape == (64,) and abs(float(cond.norm()) - 1) < 1e-4


def test_shards_stream_from_an_fsspec_url(pipeline_dirs):
    """Shards on a non-local filesystem (fsspec memory://, standing in for s3:// or gs://)."""
    import glob
    import os

    import fsspec

    from train.data import condition_dim, shard_urls

    mem = fsspec.filesystem("memory")
    local = sorted(glob.glob(os.path.join(pipeline_dirs["shards"], "*.tar")))
    for f in local + [os.path.join(pipeline_dirs["shards"], n) for n in ("manifest.json", "_SUCCESS")]:
        mem.pipe(f"/remote-shards/{os.path.basename(f)}", open(f, "rb").read())
    mem.pipe("/remote-shards/pairs-999999-000000.tar", b"a stale shard the manifest does not list")
    urls = shard_urls("memory://remote-shards")
    assert [u.rsplit("/", 1)[-1] for u in urls] == [os.path.basename(f) for f in local]  # the manifest's list
    mem.rm("/remote-shards/_SUCCESS")
    with pytest.raises(FileNotFoundError, match="not a complete shards output"):
        shard_urls("memory://remote-shards")
    mem.pipe("/remote-shards/_SUCCESS", open(os.path.join(pipeline_dirs["shards"], "_SUCCESS"), "rb").read())
    cfg = DataConfig(shards="memory://remote-shards", num_workers=0, shuffle_buffer=2, batch_size=4)
    assert condition_dim(cfg) == 1280  # stored embeddings: the manifest's encoder was found remotely
    keys = [k for _, _, keys in make_loader(cfg, epochs=1) for k in keys]
    import webdataset as wds

    expected = [s["__key__"] for s in wds.WebDataset(local, shardshuffle=False)]
    assert sorted(keys) == sorted(expected)
