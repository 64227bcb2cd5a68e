"""The queries behind `webpairs browse`: DuckDB over a run's parquet outputs, read-only.

At start-up one light table of pairs is built (the shards' index joined to pair's rows for URLs and
alt texts, plus each page's site), and the rejects of every stage are counted by reason; every page
of the browser is then one parameterised query. Image bytes never pass through DuckDB for pairs:
they are read from the shard tars by the offsets the index records (`image`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from typing import Optional

import pyarrow.parquet as pq

from core.stageio import stage_files
from browse.quality import _bytes_by_link
from browse.report import STAGE_ORDER, find_stage_dirs

PAGE_SIZE = 24
HOST_RE = r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)"
ORDERS = {"random": "rpos", "similarity": "similarity, key", "-similarity": "similarity DESC, key", "page": "page_url, key", "-nsfw": "nsfw DESC NULLS LAST, key"}  # random: a fixed shuffle of the run
BOILERPLATE = ("boilerplate_url_site", "boilerplate_url_global", "boilerplate_site", "boilerplate_global")
# where the image of a rejected link is: (stage whose occurrences map link -> image, stage and part holding the
# bytes or, filter's images, the pointers to them in download's downloads/: `quality._bytes_by_link` follows them)
REJECT_IMAGES = {"download": ("download", "download", "downloads"), "filter": ("download", "download", "downloads"), "pair": ("filter", "filter", "images")}


class BrowseError(ValueError):
    """A run directory the browser cannot read, or a bad query parameter; one sentence."""


def _files(d: Optional[str], part: str) -> list[str]:
    return stage_files(d, part) if d and os.path.isdir(os.path.join(d, part)) else []


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


class RunData:
    """A run directory opened for browsing (thread-safe: each query gets its own DuckDB cursor)."""

    def __init__(self, run_dir: str, memory_limit: str = "512MB"):
        import duckdb

        self.run_dir = os.path.abspath(run_dir)
        self.dirs = find_stage_dirs(self.run_dir)
        if "shards" not in self.dirs:
            raise BrowseError(f"{run_dir} holds no complete `webpairs shards` output (run `webpairs run` or `webpairs shards` first)")
        self.shards_dir = self.dirs["shards"]
        with open(os.path.join(self.shards_dir, "manifest.json")) as fh:
            self.manifest = json.load(fh)
        self.shard_names = {s["shard"] for s in self.manifest["shards"]}
        # a database file in a temporary folder (never in the run): DuckDB compresses its columns and
        # keeps only what queries touch in memory, so a million pairs stay a few hundred MB
        self._tmp = tempfile.TemporaryDirectory(prefix="webpairs-browse-")
        self.con = duckdb.connect(os.path.join(self._tmp.name, "browse.duckdb"), config={"memory_limit": memory_limit, "temp_directory": self._tmp.name})
        self._summary: Optional[dict] = None
        self._build()

    def close(self) -> None:
        self.con.close()
        self._tmp.cleanup()

    # ---- start-up ---------------------------------------------------------------------------

    def _build(self) -> None:
        con = self.con
        index = _files(self.shards_dir, "index")
        if not index:
            raise BrowseError(f"{self.shards_dir} has no index/*.parquet")
        pairs = _files(self.dirs.get("pair"), "pairs")
        texts = "p.cond_url, p.target_url, p.cond_alt, p.target_alt" if pairs else "NULL AS cond_url, NULL AS target_url, NULL AS cond_alt, NULL AS target_alt"
        join = f"LEFT JOIN read_parquet({_sql_list(pairs)}) p ON p.pair_id = i.key" if pairs else ""
        con.execute(f"CREATE TABLE pairs0 AS SELECT i.key, i.shard, i.offset, i.size, i.page_url, i.similarity, {texts}, {self._faces_sql()} AS faces, {self._nsfw_sql(index)} AS nsfw FROM read_parquet({_sql_list(index)}) i {join}")
        self._page_sites()
        con.execute("CREATE TABLE pairs AS SELECT p.*, coalesce(s.site, '') AS site, hash(p.key) AS rnd, row_number() OVER (ORDER BY hash(p.key), p.key) AS rpos FROM pairs0 p LEFT JOIN page_site s USING (page_url)")
        con.execute("DROP TABLE pairs0")
        self._rejects()
        self._copies()
        self._sites()

    def _faces_sql(self) -> str:
        """Faces on a pair (both images, filter's face count; issue 32), NULL where not counted."""
        images = _files(self.dirs.get("filter"), "images")
        if not images or "faces" not in pq.ParquetFile(images[0]).schema_arrow.names:
            return "NULL::INTEGER"
        self.con.execute(f"CREATE TABLE faces AS SELECT image_id, max(faces) AS faces FROM read_parquet({_sql_list(images)}) GROUP BY image_id")
        return "(SELECT sum(f.faces) FROM faces f WHERE f.image_id IN (i.cond_image_id, i.target_image_id))::INTEGER"

    def _nsfw_sql(self, index: list[str]) -> str:
        """A pair's nsfw score: the higher of its two images' (the index carries both; issue 32),
        NULL where filter had no safety head or the index predates the score."""
        if "cond_nsfw" not in pq.ParquetFile(index[0]).schema_arrow.names:
            return "NULL::FLOAT"
        return "greatest(i.cond_nsfw, i.target_nsfw)"

    def _page_sites(self) -> None:
        """page_site(page_url, site): from the occurrences stages wrote (they carry the site), and
        for pages only the index knows, the registered domain computed here (core/sites.py)."""
        import pyarrow as pa

        from core.sites import site_of

        sources = [f for stage in ("download", "filter") for f in _files(self.dirs.get(stage), "occurrences")]
        if sources:
            self.con.execute(f"CREATE TABLE page_site AS SELECT DISTINCT page_url, site FROM read_parquet({_sql_list(sources)})")
        else:
            self.con.execute("CREATE TABLE page_site (page_url VARCHAR, site VARCHAR)")
        # pages no occurrence names: the site of each distinct host (hosts are few, pages many)
        self.con.execute(f"CREATE TEMP TABLE missing AS SELECT page_url, lower(regexp_extract(page_url, '{HOST_RE}', 1)) AS host FROM (SELECT DISTINCT page_url FROM pairs0) ANTI JOIN page_site USING (page_url)")
        hosts = [r[0] for r in self.con.execute("SELECT DISTINCT host FROM missing").fetchall()]
        if hosts:
            self.con.register("host_site", pa.table({"host": hosts, "site": [site_of(f"http://{h}/") if h else "" for h in hosts]}))
            self.con.execute("INSERT INTO page_site SELECT m.page_url, h.site FROM missing m JOIN host_site h USING (host)")
            self.con.unregister("host_site")
        self.con.execute("DROP TABLE missing")
        self.con.execute("CREATE TABLE link_site AS SELECT DISTINCT link_id, site FROM read_parquet(" + _sql_list(sources) + ")" if sources else "CREATE TABLE link_site (link_id VARCHAR, site VARCHAR)")

    def _rejects(self) -> None:
        files = [f for stage in STAGE_ORDER for f in _files(self.dirs.get(stage), "rejected")]
        if files:
            self.con.execute(f"CREATE VIEW rejects AS SELECT record_id, stage, reason, detail, url FROM read_parquet({_sql_list(files)}, union_by_name = true)")
        else:
            self.con.execute("CREATE VIEW rejects AS SELECT NULL::VARCHAR AS record_id, NULL::VARCHAR AS stage, NULL::VARCHAR AS reason, NULL::VARCHAR AS detail, NULL::VARCHAR AS url WHERE false")
        self.con.execute("CREATE TABLE reasons AS SELECT stage, reason, count(*) AS n FROM rejects GROUP BY ALL")

    def _copies(self) -> None:
        """copies: pair's copies/ (one row per link of a removed dress, naming the kept dress)."""
        files = _files(self.dirs.get("pair"), "copies")
        if files:
            self.con.execute(f"CREATE TABLE copies AS SELECT * FROM read_parquet({_sql_list(files)})")
        else:
            self.con.execute("CREATE TABLE copies (link_id VARCHAR, page_url VARCHAR, site VARCHAR, image_id VARCHAR, image_url VARCHAR, width INTEGER, height INTEGER, bytes_file VARCHAR, bytes_row_group INTEGER, "
                             "kept_image_id VARCHAR, kept_image_url VARCHAR, kept_width INTEGER, kept_height INTEGER, kept_bytes_file VARCHAR, kept_bytes_row_group INTEGER, stand_in BOOLEAN)")

    def copy_groups(self, site: str = "", offset: int = 0, limit: int = PAGE_SIZE) -> dict:
        """One page of copy groups (the largest first), each with its kept dress first and the
        dresses removed, on one site or anywhere; with the number of groups per site."""
        where = "WHERE kept_image_id IN (SELECT kept_image_id FROM copies WHERE site = $site)" if site else ""
        params = {"site": site} if site else {}
        total = self._rows(f"SELECT count(DISTINCT kept_image_id) AS n FROM copies {where}", params)[0]["n"]
        params.update(lim=max(1, min(int(limit), 200)), off=max(0, int(offset)))
        groups = self._rows(
            f"""SELECT kept_image_id, any_value(kept_image_url) AS kept_url, any_value(kept_width) AS kept_width, any_value(kept_height) AS kept_height,
                       list(DISTINCT site ORDER BY site) AS sites, count(DISTINCT image_id) AS removed, count(*) AS links
                FROM copies {where} GROUP BY kept_image_id ORDER BY removed DESC, kept_image_id LIMIT $lim OFFSET $off""", params)
        if groups:
            members = self._rows("SELECT kept_image_id, image_id, any_value(image_url) AS url, any_value(width) AS width, any_value(height) AS height, list(DISTINCT site ORDER BY site) AS sites FROM copies "
                                 "WHERE kept_image_id IN (SELECT unnest($ids)) GROUP BY ALL ORDER BY kept_image_id, image_id", {"ids": [g["kept_image_id"] for g in groups]})
            for g in groups:
                g["members"] = [{"image_id": g["kept_image_id"], "url": g["kept_url"], "width": g["kept_width"], "height": g["kept_height"], "kept": True}] + [
                    {**{k: m[k] for k in ("image_id", "url", "width", "height", "sites")}, "kept": False} for m in members if m["kept_image_id"] == g["kept_image_id"]]
        per_site = self._rows("SELECT site, count(DISTINCT kept_image_id) AS groups, count(DISTINCT image_id) AS removed, count(*) FILTER (WHERE stand_in) AS stand_ins FROM copies GROUP BY site ORDER BY groups DESC, site LIMIT 1000")
        return {"total": total, "offset": params["off"], "groups": groups, "per_site": per_site}

    def copy_image(self, image_id: str) -> Optional[bytes]:
        """The bytes of a dress of a copy group (kept or removed), through the pointer pair recorded
        into filter's images and filter's into download's downloads/; None for an id that is not in
        a copy group."""
        from core.stageio import fetch_rows

        found = self._rows("SELECT bytes_file AS f, bytes_row_group AS g FROM copies WHERE image_id = $id UNION ALL SELECT kept_bytes_file, kept_bytes_row_group FROM copies WHERE kept_image_id = $id LIMIT 1", {"id": image_id})
        if not found or found[0]["f"] is None:
            return None
        filter_dir = self.dirs.get("filter")
        allowed = set(_files(filter_dir, "images")) if filter_dir else set()
        if allowed and found[0]["f"] not in allowed:  # only the run's own filter files
            return None
        return fetch_rows([(found[0]["f"], found[0]["g"])], "image_id", ["image_bytes"], {image_id}).get(image_id, {}).get("image_bytes")

    def _sites(self) -> None:
        """Per site: pages in the crawl, images kept, pairs, links removed as boilerplate."""
        con = self.con
        site_pages = _files(self.dirs.get("download"), "sites") or _files(self.dirs.get("filter"), "sites")
        pages = f"SELECT site, pages FROM read_parquet({_sql_list(site_pages)})" if site_pages else "SELECT site, count(*) AS pages FROM page_site GROUP BY site"
        images = _files(self.dirs.get("pair"), "images")
        img = f"SELECT s.site, count(DISTINCT i.image_id) AS images FROM read_parquet({_sql_list(images)}) i JOIN page_site s USING (page_url) GROUP BY s.site" if images else "SELECT NULL::VARCHAR AS site, 0 AS images WHERE false"
        bp = ", ".join(f"'{r}'" for r in BOILERPLATE)
        con.execute(f"""CREATE TABLE sites AS
            WITH pg AS ({pages}), im AS ({img}),
                 pr AS (SELECT site, count(*) AS pairs FROM pairs GROUP BY site),
                 bl AS (SELECT l.site, count(*) AS boilerplate FROM rejects r JOIN link_site l ON l.link_id = r.record_id WHERE r.reason IN ({bp}) GROUP BY l.site)
            SELECT site, coalesce(pg.pages, 0) AS pages, coalesce(im.images, 0) AS images, coalesce(pr.pairs, 0) AS pairs, coalesce(bl.boilerplate, 0) AS boilerplate
            FROM pg FULL JOIN im USING (site) FULL JOIN pr USING (site) FULL JOIN bl USING (site)""")

    # ---- queries ----------------------------------------------------------------------------

    def _rows(self, sql: str, params=None) -> list[dict]:
        cur = self.con.cursor()
        try:
            result = cur.execute(sql, params or {})
            names = [d[0] for d in result.description]
            return [dict(zip(names, row)) for row in result.fetchall()]
        finally:
            cur.close()

    def summary(self) -> dict:
        if self._summary is None:
            self._summary = self._count()
        return dict(self._summary)

    def _count(self) -> dict:
        row = self._rows("SELECT count(*) AS pairs, count(DISTINCT page_url) AS pages, count(DISTINCT site) AS sites, min(similarity) AS smin, max(similarity) AS smax FROM pairs")[0]
        row["rejects"] = self._rows("SELECT coalesce(sum(n), 0) AS n FROM reasons")[0]["n"]
        row["run"] = self.run_dir
        return row

    def pairs(self, site: str = "", page: str = "", smin: Optional[float] = None, smax: Optional[float] = None, order: str = "random", offset: int = 0, limit: int = PAGE_SIZE, fmin: Optional[int] = None, fmax: Optional[int] = None,
              nmin: Optional[float] = None, nmax: Optional[float] = None) -> dict:
        """One page of pairs and the number of pairs that match the filters. `random` is one fixed
        shuffle of the run (a hash of the pair id), so pages do not overlap as a user pages on.
        nmin/nmax bound the pair's nsfw score (the higher of its two images'; unscored pairs never match)."""
        if order not in ORDERS:
            raise BrowseError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        where, params = [], {}
        for name, value, clause in (("site", site, "site = $site"), ("page", page, "page_url = $page"), ("smin", smin, "similarity >= $smin"), ("smax", smax, "similarity <= $smax"), ("fmin", fmin, "faces >= $fmin"), ("fmax", fmax, "faces <= $fmax"),
                                     ("nmin", nmin, "nsfw >= $nmin"), ("nmax", nmax, "nsfw <= $nmax")):
            if value not in (None, ""):
                where.append(clause)
                params[name] = value
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        total = self._rows(f"SELECT count(*) AS n FROM pairs {cond}", params)[0]["n"]
        params.update(lim=max(1, min(int(limit), 200)), off=max(0, int(offset)))
        if order == "random" and not where:  # any page of the whole shuffle: a range of its positions, no top-N
            rows = self._rows("SELECT key, page_url, site, similarity, faces, nsfw, cond_url, target_url, cond_alt, target_alt FROM pairs WHERE rpos > $off AND rpos <= $off + $lim ORDER BY rpos", params)
            return {"total": total, "offset": params["off"], "rows": rows}
        rows = self._rows(f"SELECT key, page_url, site, similarity, faces, nsfw, cond_url, target_url, cond_alt, target_alt FROM pairs {cond} ORDER BY {ORDERS[order]} LIMIT $lim OFFSET $off", params)
        return {"total": total, "offset": params["off"], "rows": rows}

    def stratified(self, per_band: int = 4) -> list[dict]:
        """Example pairs spread over the run: the similarity range cut into thirds of the pairs (low,
        middle, high), and in each band one pair per page, taking sites in turn, so that a few
        examples show as many sites and pages as they can. Deterministic (hashes of the ids)."""
        return self._rows(
            """WITH b AS (SELECT *, ntile(3) OVER (ORDER BY similarity, key) AS tercile FROM pairs),
                    p AS (SELECT *, row_number() OVER (PARTITION BY tercile, page_url ORDER BY rnd) AS in_page FROM b),
                    s AS (SELECT *, row_number() OVER (PARTITION BY tercile, site, in_page ORDER BY hash(page_url, tercile), rnd) AS in_site FROM p),
                    r AS (SELECT *, row_number() OVER (PARTITION BY tercile ORDER BY in_page, in_site, hash(site, tercile)) AS pick FROM s)
               SELECT ['low', 'middle', 'high'][tercile] AS band, key, site, page_url, similarity, cond_url, target_url, cond_alt, target_alt
               FROM r WHERE pick <= $n ORDER BY tercile, pick""",
            {"n": int(per_band)},
        )

    def reasons(self) -> list[dict]:
        order = ", ".join(f"'{s}'" for s in STAGE_ORDER)
        return self._rows(f"SELECT stage, reason, n FROM reasons ORDER BY list_position([{order}], stage), n DESC, reason")

    def rejects(self, stage: str, reason: str, offset: int = 0, limit: int = PAGE_SIZE) -> dict:
        params = {"stage": stage, "reason": reason}
        total = self._rows("SELECT coalesce(sum(n), 0) AS n FROM reasons WHERE stage = $stage AND reason = $reason", params)[0]["n"]
        params.update(lim=max(1, min(int(limit), 200)), off=max(0, int(offset)))
        rows = self._rows("SELECT r.record_id, r.url, r.detail, l.site FROM (SELECT * FROM rejects WHERE stage = $stage AND reason = $reason ORDER BY record_id LIMIT $lim OFFSET $off) r LEFT JOIN link_site l ON l.link_id = r.record_id ORDER BY r.record_id", params)
        for r in rows:
            r["image"] = stage in REJECT_IMAGES
        return {"total": total, "offset": params["off"], "rows": rows}

    def sites(self, offset: int = 0, limit: int = 100) -> dict:
        total = self._rows("SELECT count(*) AS n FROM sites")[0]["n"]
        rows = self._rows("SELECT * FROM sites ORDER BY pairs DESC, pages DESC, site LIMIT $lim OFFSET $off", {"lim": max(1, min(int(limit), 1000)), "off": max(0, int(offset))})
        return {"total": total, "rows": rows}

    # ---- images -----------------------------------------------------------------------------

    def pair_image(self, key: str, side: str) -> Optional[bytes]:
        """The condition or target JPEG of a pair, read from its shard by the index's byte range
        (the tar members of one sample), never unpacked to disk. None when there is no such pair."""
        if side not in ("cond", "target"):
            return None
        found = self._rows("SELECT shard, \"offset\", size FROM pairs WHERE key = $key", {"key": key})
        if not found:
            return None
        shard, offset, size = found[0]["shard"], found[0]["offset"], found[0]["size"]
        if shard not in self.shard_names or os.path.basename(shard) != shard:  # only the manifest's own files
            return None
        with open(os.path.join(self.shards_dir, shard), "rb") as fh:
            fh.seek(offset)
            chunk = fh.read(size)
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024), mode="r:") as tar:  # the sample's members only
            for member in tar:
                if member.isfile() and member.name.endswith(f".{side}.jpg"):
                    return tar.extractfile(member).read()
        return None

    def reject_image(self, stage: str, record_id: str) -> Optional[bytes]:
        """The image a stage had for a rejected link (download's evidence fetch, filter's download,
        pair's filtered image); None where the stage never had one."""
        if stage not in REJECT_IMAGES:
            return None
        links_stage, images_stage, part = REJECT_IMAGES[stage]
        if links_stage not in self.dirs or images_stage not in self.dirs:
            return None
        found = self._rows("SELECT 1 FROM rejects WHERE stage = $stage AND record_id = $id LIMIT 1", {"stage": stage, "id": record_id})
        if not found:
            return None
        return _bytes_by_link(self.dirs[links_stage], self.dirs[images_stage], part, {record_id}).get(record_id)
