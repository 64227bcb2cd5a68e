import pyarrow.parquet as pq
import pytest

from core import config
from core.records import (
    IMAGE_SCHEMA,
    LINK_SCHEMA,
    PAIR_SCHEMA,
    REJECTED_SCHEMA,
    ImageRecord,
    LinkRecord,
    PairRecord,
    Rejected,
    rows_to_table,
    stable_id,
)


def _roundtrip(tmp_path, rows, schema):
    path = tmp_path / "t.parquet"
    pq.write_table(rows_to_table(rows, schema), path)
    table = pq.read_table(path)
    assert table.schema.equals(schema)
    return table.to_pylist()


def test_link_record_roundtrip(tmp_path):
    rec = LinkRecord("http://a.org/p", "http://a.org/i.jpg", alt="ä cat", position=3, width=320, source_file="f.warc.gz", source_offset=1234)
    (row,) = _roundtrip(tmp_path, [rec.to_row()], LINK_SCHEMA)
    assert row["link_id"] == stable_id("http://a.org/p", "http://a.org/i.jpg")
    assert LinkRecord(**{k: v for k, v in row.items() if k != "link_id"}) == rec
    assert row["height"] is None


def test_image_record_roundtrip_keeps_float16_embedding(tmp_path):
    rec = ImageRecord("ab", "p", "u", "alt", 0, 10, 20, "JPEG", "s" * 64, "f" * 16, [0.6, 0.8], "tiny-clip", 0.25, b"\xff\xd8")
    (row,) = _roundtrip(tmp_path, [rec.to_row()], IMAGE_SCHEMA)
    assert row["embedding"] == pytest.approx([0.6, 0.8], abs=1e-3)  # float16 precision
    assert row["image_bytes"] == b"\xff\xd8"
    assert row["clip_score"] == pytest.approx(0.25)


def test_pair_and_rejected_roundtrip(tmp_path):
    pair = PairRecord("p", "a", "b", 0.5)
    (row,) = _roundtrip(tmp_path, [pair.to_row()], PAIR_SCHEMA)
    assert row["pair_id"] == pair.pair_id != PairRecord("p", "b", "a", 0.5).pair_id  # ordered pairs
    rej = Rejected("id1", "filter", "too_small", "12x12")
    (row,) = _roundtrip(tmp_path, [rej.to_row()], REJECTED_SCHEMA)
    assert row == {"record_id": "id1", "stage": "filter", "reason": "too_small", "detail": "12x12", "url": ""}


def test_config_from_yaml_sections_flat_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("filter:\n  min_side: 100\n  min_clip_score: 0.28\ncrawl:\n  allow_hosts: [127.0.0.1]\n")
    cfg = config.load(config.FilterConfig, str(f), section="filter", batch_size="8")
    assert (cfg.min_side, cfg.min_clip_score, cfg.batch_size) == (100, 0.28, 8)
    assert config.load(config.CrawlConfig, str(f), section="crawl").allow_hosts == ("127.0.0.1",)
    flat = tmp_path / "flat.yaml"
    flat.write_text("sim_low: 0.3\n")
    assert config.load(config.PairConfig, str(flat), section="pair").sim_low == 0.3
    assert config.load(config.CrawlConfig, None, allow_hosts="127.0.0.1,10.0.0.0/8").allow_hosts == ("127.0.0.1", "10.0.0.0/8")


def test_config_errors_are_clear(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("filter:\n  min_sid: 3\n")
    with pytest.raises(config.ConfigError, match="unknown FilterConfig key.*min_sid"):
        config.load(config.FilterConfig, str(f), section="filter")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(config.FilterConfig, str(tmp_path / "nope.yaml"))
    f.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load(config.FilterConfig, str(f))
