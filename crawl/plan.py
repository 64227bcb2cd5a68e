"""The download plan: which links are worth a fetch, and each distinct image URL fetched once.

Downloading is the largest cost of a real run, and most links can never make a pair. Before
`crawl download` calls img2dataset:

1. **Per link, in batches** (pyarrow, `check_links`): the URL policy, a declared (rendered) side under
   `min_side` (`declared_too_small`), a non-raster extension such as .svg or .ico (`not_raster`).
   The checked links, with their page's site, go to `_plan/links/`.
2. **Across links, out of core** (DuckDB with a memory limit, spilling to disk; `make_plan`): the URL
   half of pair's boilerplate rules on the candidates (an image URL on more than `boilerplate_pages`
   pages anywhere: `boilerplate_url_global`; on at least `site_share` of its site's pages and at
   least `site_min_pages` of them: `boilerplate_url_site`), then per page the first
   `max_links_per_page` candidates by position (`page_cap`) and pages left with fewer than
   `min_links_per_page` candidates (`page_too_few_links`). Every link gets its reason (null:
   selected) in `_plan/plan/`.
   Before those rules, each site (origin) of a candidate is asked once for its robots.txt and
   tdmrep.json (crawl/consent.py) and the URLs it refuses leave the candidates
   (`robots_disallowed`, `tdm_reserved`): never fetched, not even as evidence.
3. **One fetch per distinct URL**: the selected links' distinct URLs, hosts interleaved, go to
   img2dataset as input shards of `samples_per_shard` URLs (its distributors spread them; a rerun
   makes the same shards, so img2dataset's incremental resume applies).
4. **After the fetch** (`resolve`): each URL's result (bytes hashed, or its failure), identical bytes
   kept once (downloads/: one row per image), and every selected link resolved to its image
   (occurrences/) or rejected with its URL's reason.

A URL flagged as boilerplate is, by default, still fetched once (not once per page): its links stay
rejected, but they appear in occurrences/ with their reason as evidence, so that pair's content rule
still sees the logo in every size it is on (`boilerplate_evidence: false`: never fetched). Any other
rejected link whose URL is fetched anyway is evidence in the same way, at no cost. Pages are counted
over every link: sites/ holds each site's pages in the crawl, the denominator of the site rules here
and in pair.

Nothing here holds the crawl in Python: batches are bounded, and DuckDB spills what does not fit.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import DownloadConfig
from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA, REJECTED_SCHEMA, SITE_SCHEMA, write_downloads
from core.sites import site_of
from crawl.urls import AllowList, policy_reason

STAGE = "download"
BATCH = 16_384  # rows a step holds as Python objects at once (65,536 cost ~75 MB more at the size of a Common Crawl file: issue 34)
DECLARED_TOO_SMALL = "declared_too_small"
NOT_RASTER = "not_raster"
BOILERPLATE_URL_GLOBAL = "boilerplate_url_global"
BOILERPLATE_URL_SITE = "boilerplate_url_site"
PAGE_CAP = "page_cap"
PAGE_TOO_FEW_LINKS = "page_too_few_links"

CHECKED_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()), ("page_url", pa.string()), ("site", pa.string()), ("image_url", pa.string()), ("alt", pa.string()), ("position", pa.int32()),
        ("declared_width", pa.int32()), ("declared_height", pa.int32()), ("reason", pa.string()), ("detail", pa.string()),
    ]
)
PLAN_SCHEMA = CHECKED_SCHEMA  # the same row, with the reason of the cross-link rules filled in
URL_SCHEMA = pa.schema([("image_url", pa.string())])  # img2dataset's input
URL_REASON_SCHEMA = pa.schema([("image_url", pa.string()), ("reason", pa.string()), ("detail", pa.string())])  # URLs a site refuses
RESULT_SCHEMA = pa.schema([("image_url", pa.string()), ("sha256", pa.string()), ("image_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def link_reason(image_url: str, width: Optional[int], height: Optional[int], allow: AllowList, cfg: DownloadConfig) -> Optional[tuple[str, str]]:
    """(reason, detail) when one link is not worth a fetch on its own; None otherwise."""
    reason = policy_reason(image_url, allow)
    if reason is not None:
        return reason, "refused by the URL policy"
    if cfg.skip_extensions:
        path = urlsplit(image_url).path.lower()
        ext = path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
        if ext in cfg.skip_extensions:
            return NOT_RASTER, f".{ext} is not a raster image filter can use"
    if cfg.min_side:
        small = [f"{name} {v}" for name, v in (("width", width), ("height", height)) if v is not None and 0 < v < cfg.min_side]
        if small:
            return DECLARED_TOO_SMALL, f"declared {', '.join(small)} < {cfg.min_side}"
    return None


def check_links(link_files: list[str], out_dir: str, allow: AllowList, cfg: DownloadConfig, progress: Optional[Callable[[int], None]] = None) -> int:
    """Step 1: every link checked on its own, batch by batch, into `out_dir` (one file per input
    file); returns the number of links."""
    from apache_beam.io.filesystems import FileSystems

    os.makedirs(out_dir, exist_ok=True)
    n = 0
    columns = ["link_id", "page_url", "image_url", "alt", "position", "width", "height"]
    for i, path in enumerate(link_files):
        with FileSystems.open(path) as fh, pq.ParquetWriter(os.path.join(out_dir, f"part-{i:05d}.parquet"), CHECKED_SCHEMA) as writer:
            for batch in pq.ParquetFile(fh).iter_batches(BATCH, columns=columns):
                # only the columns the checks read become Python objects; the others pass through as
                # Arrow arrays (fewer objects made and freed: the process's memory grew with the batches)
                widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
                reasons = [link_reason(u, w, h, allow, cfg) for u, w, h in zip(batch.column("image_url").to_pylist(), widths, heights)]
                pages = pc.unique(batch.column("page_url"))
                sites = pa.array([site_of(u) for u in pages.to_pylist()], pa.string()).take(pc.index_in(batch.column("page_url"), value_set=pages))
                cols = {name: batch.column(name) for name in ("link_id", "page_url", "image_url", "alt", "position")}
                cols.update(site=sites, declared_width=batch.column("width"), declared_height=batch.column("height"),
                            reason=pa.array([r[0] if r else None for r in reasons], pa.string()), detail=pa.array([r[1] if r else None for r in reasons], pa.string()))
                writer.write_table(pa.Table.from_pydict(cols).select(CHECKED_SCHEMA.names).cast(CHECKED_SCHEMA))
                n += batch.num_rows
                if progress:
                    progress(batch.num_rows)
    return n


MEMORY_PER_THREAD = 64 * 10**6  # (DuckDB's MB) DuckDB threads the plan runs: one per this much of its memory limit
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def memory_bytes(memory: str) -> int:
    """Bytes of a size such as "64MB" or "4 GiB" (DuckDB's units; download checks the spelling)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", memory, re.I)
    if m is None:
        raise ValueError(f"not a size: {memory!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset), not
    the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def connect(tmp_dir: str, memory: str):
    """A DuckDB connection that stays under `memory` and spills to `tmp_dir` beyond it, with one
    thread per MEMORY_PER_THREAD of it (at least one, at most one per core): each thread's hash
    tables and sort runs take memory of their own, so a small limit shared by many threads is
    exceeded (at one Common Crawl file's size the plan grew the process by 119 MB with 128 MB and
    two threads, 84 MB with 64 MB and two, 78 MB with 64 MB and one; 64 MB with two threads ran out
    of memory with the queries of issue 34's second sitting)."""
    import duckdb

    os.makedirs(tmp_dir, exist_ok=True)
    threads = max(1, min(usable_cores(), memory_bytes(memory) // MEMORY_PER_THREAD))
    config = {"memory_limit": memory, "temp_directory": tmp_dir, "preserve_insertion_order": False, "threads": threads}
    return duckdb.connect(os.path.join(tmp_dir, "plan.duckdb"), config=config)


def write_query(con, sql: str, path: str, schema: pa.Schema, rows_per_file: int = 0, params: Optional[list] = None) -> int:
    """Stream a query's rows into parquet with exactly `schema`: one file `path`, or with
    `rows_per_file`, files `path`-00000.parquet, -00001, ... of that many rows. Returns the rows."""
    reader = con.execute(sql, params or []).to_arrow_reader(BATCH)
    n, index, writer, in_file = 0, 0, None, 0

    def open_next():
        nonlocal index
        name = f"{path}-{index:05d}.parquet" if rows_per_file else path
        index += 1
        return pq.ParquetWriter(name, schema)

    try:
        for batch in reader:
            table = pa.Table.from_batches([batch]).cast(schema)
            while table.num_rows:
                if writer is None:
                    writer, in_file = open_next(), 0
                take = table.num_rows if not rows_per_file else min(table.num_rows, rows_per_file - in_file)
                writer.write_table(table.slice(0, take))
                table, in_file, n = table.slice(take), in_file + take, n + take
                if rows_per_file and in_file == rows_per_file:
                    writer.close()
                    writer = None
        if writer is None and not rows_per_file:  # an empty result is still a valid file
            writer = open_next()
    finally:
        if writer is not None:
            writer.close()
    return n


def _sql_list(values: Iterable[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def ask_sites(con, plan_dir: str, sites) -> int:
    """Consent (crawl/consent.py): every origin of a candidate link asked once (robots.txt,
    tdmrep.json), then each distinct candidate URL judged on its origin's answers;
    `plan_dir`/consent.parquet holds the refused URLs with their reason. Returns the URLs refused."""
    from crawl.consent import origin_of

    def distinct_urls():
        for batch in con.execute("SELECT DISTINCT image_url FROM checked WHERE reason IS NULL").to_arrow_reader(BATCH):
            yield batch.column(0).to_pylist()

    origins = set()
    for urls in distinct_urls():
        origins.update(origin_of(u) for u in urls)
    origins.discard(None)
    sites.ask(origins)
    path = os.path.join(plan_dir, "consent.parquet")
    n = 0
    with pq.ParquetWriter(path, URL_REASON_SCHEMA) as writer:
        for urls in distinct_urls():
            refused = [(u, r) for u, r in ((u, sites.refusal(u)) for u in urls) if r is not None]
            if refused:
                writer.write_table(pa.Table.from_pydict({"image_url": [u for u, _ in refused], "reason": [r[0] for _, r in refused], "detail": [r[1] for _, r in refused]}, schema=URL_REASON_SCHEMA))
                n += len(refused)
    return n


def make_plan(con, checked_dir: str, plan_dir: str, cfg: DownloadConfig, sites=None) -> dict:
    """Step 2 and 3: the sites' consent (`sites`, crawl/consent.py's SiteRules; None: not asked),
    the cross-link rules, `plan_dir`/plan.parquet (every link, its reason) and `plan_dir`/urls/ (the
    distinct selected URLs as img2dataset input shards). Returns counts."""
    links = _sql_list(sorted(glob.glob(os.path.join(checked_dir, "*.parquet"))))
    con.execute(f"CREATE OR REPLACE TEMP VIEW checked AS SELECT * FROM read_parquet({links})")
    if sites is not None:
        ask_sites(con, plan_dir, sites)
        con.execute(f"CREATE OR REPLACE TEMP TABLE consent AS SELECT * FROM read_parquet('{os.path.join(plan_dir, 'consent.parquet')}')")
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE consent (image_url VARCHAR, reason VARCHAR, detail VARCHAR)")
    # a URL the site refuses is never fetched, not even as boilerplate evidence: it leaves the candidates
    # (a view, read where it is used: as a table it held ~100 MB of DuckDB's memory at one Common Crawl file's size)
    con.execute("CREATE OR REPLACE TEMP VIEW cand AS SELECT link_id, page_url, site, image_url, position FROM checked WHERE reason IS NULL AND image_url NOT IN (SELECT image_url FROM consent)")
    # pages are counted over every link (whatever its own check said), as pair counts them: a
    # site's pages are all its pages in the crawl, a URL's pages all the pages that link it
    con.execute("CREATE OR REPLACE TEMP TABLE site_pages AS SELECT site, count(DISTINCT page_url) AS pages FROM checked GROUP BY site")
    if cfg.url_boilerplate:
        con.execute(
            """CREATE OR REPLACE TEMP TABLE url_flag AS
            WITH site_url_pages AS (SELECT site, image_url, count(*) AS pages FROM (SELECT DISTINCT site, image_url, page_url FROM checked) GROUP BY site, image_url),
                 -- a page has one site (check_links derives it from the page URL), so a URL's pages are the sum over its sites:
                 -- one distinct count over the links instead of two
                 url_pages AS (SELECT image_url, sum(pages)::BIGINT AS pages FROM site_url_pages GROUP BY image_url)
            SELECT su.site, su.image_url,
                   CASE WHEN u.pages > $k THEN $global
                        WHEN su.pages >= $share * sp.pages AND su.pages >= $min_pages THEN $site END AS reason,
                   CASE WHEN u.pages > $k THEN 'image URL on ' || u.pages || ' pages (> ' || $k || ')'
                        ELSE 'image URL on ' || su.pages || ' of the ' || sp.pages || ' pages of ' || su.site END AS detail
            FROM site_url_pages su JOIN url_pages u USING (image_url) JOIN site_pages sp USING (site)
            WHERE u.pages > $k OR (su.pages >= $share * sp.pages AND su.pages >= $min_pages)""",
            {"k": cfg.boilerplate_pages, "share": cfg.site_share, "min_pages": cfg.site_min_pages, "global": BOILERPLATE_URL_GLOBAL, "site": BOILERPLATE_URL_SITE},
        )
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE url_flag (site VARCHAR, image_url VARCHAR, reason VARCHAR, detail VARCHAR)")
    write_query(con, "SELECT site, pages FROM site_pages ORDER BY site", os.path.join(plan_dir, "sites.parquet"), SITE_SCHEMA)
    cap = cfg.max_links_per_page or 2**31 - 1
    con.execute(
        """CREATE OR REPLACE TEMP TABLE page_rule AS
        WITH left_over AS (SELECT c.link_id, c.page_url, c.position FROM cand c ANTI JOIN url_flag f ON c.site = f.site AND c.image_url = f.image_url),
             page_n AS (SELECT page_url, count(*) AS n FROM left_over GROUP BY page_url),
             ranked AS (SELECT l.link_id, p.n, row_number() OVER (PARTITION BY l.page_url ORDER BY l.position, l.link_id) AS rank
                        FROM left_over l JOIN page_n p USING (page_url) WHERE p.n > $cap AND NOT least(p.n, $cap) < $min_links)
        SELECT l.link_id, $few AS reason, p.n || ' candidate link(s) left on the page (< ' || $min_links || ')' AS detail
        FROM left_over l JOIN page_n p USING (page_url) WHERE least(p.n, $cap) < $min_links
        UNION ALL
        SELECT link_id, $capped, 'link ' || rank || ' of ' || n || ' on the page (cap ' || $cap || ')' FROM ranked WHERE rank > $cap""",
        {"cap": cap, "min_links": cfg.min_links_per_page, "few": PAGE_TOO_FEW_LINKS, "capped": PAGE_CAP},
    )
    os.makedirs(os.path.join(plan_dir, "urls"), exist_ok=True)
    plan_file = os.path.join(plan_dir, "plan.parquet")
    write_query(
        con,
        """SELECT k.link_id, k.page_url, k.site, k.image_url, k.alt, k.position, k.declared_width, k.declared_height,
                  coalesce(k.reason, c.reason, f.reason, p.reason) AS reason, coalesce(k.detail, c.detail, f.detail, p.detail) AS detail
           FROM checked k LEFT JOIN consent c ON k.reason IS NULL AND k.image_url = c.image_url
                          LEFT JOIN url_flag f ON k.site = f.site AND k.image_url = f.image_url
                          LEFT JOIN page_rule p ON k.link_id = p.link_id""",  # coalesce: a link's own reason first, then the site's consent
        plan_file, PLAN_SCHEMA,
    )
    con.execute(f"CREATE OR REPLACE TEMP VIEW plan AS SELECT * FROM read_parquet('{plan_file}')")
    evidence = _evidence_condition(cfg)
    # hosts interleaved (each host's k-th URL, then its k+1-th...): every shard and every stretch of
    # a shard mixes hosts, so the per-host connection limit (crawl/polite.py) holds up no other host
    n_urls = write_query(
        con,
        f"""WITH u AS (SELECT DISTINCT image_url FROM plan WHERE reason IS NULL OR {evidence}),
                 h AS (SELECT image_url, lower(regexp_extract(image_url, '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)', 1)) AS host FROM u)
            SELECT image_url FROM h ORDER BY row_number() OVER (PARTITION BY host ORDER BY image_url), host, image_url""",
        os.path.join(plan_dir, "urls", "part"), URL_SCHEMA, rows_per_file=cfg.samples_per_shard,
    )
    counts = con.execute("SELECT count(*), count(DISTINCT image_url), count(*) FILTER (WHERE reason IS NULL), count(DISTINCT image_url) FILTER (WHERE reason IS NULL) FROM plan").fetchone()
    reasons = dict(con.execute("SELECT reason, count(*) FROM plan WHERE reason IS NOT NULL GROUP BY reason").fetchall())
    return {"links": counts[0], "urls": counts[1], "links_selected": counts[2], "urls_selected": counts[3], "urls_evidence": n_urls - counts[3], "urls_fetched": n_urls, "plan_reasons": reasons}


def _evidence_condition(cfg: DownloadConfig) -> str:
    """SQL: the plan rows fetched only as boilerplate evidence (false when that is off)."""
    return f"reason IN ('{BOILERPLATE_URL_GLOBAL}', '{BOILERPLATE_URL_SITE}')" if cfg.url_boilerplate and cfg.boilerplate_evidence else "false"


def shard_results(shard_file: str, reason_for: Callable[[str], str]) -> tuple[pa.Table, str]:
    """One img2dataset shard -> (RESULT_SCHEMA rows: each URL's image id or failure, the name of the
    shard's image column)."""
    table = pq.read_table(shard_file)
    image_col = "jpg" if "jpg" in table.column_names else [c for c in table.column_names if c in ("png", "webp")][0]
    rows = {name: [] for name in RESULT_SCHEMA.names}
    for url, status, data, error in zip(table.column("url").to_pylist(), table.column("status").to_pylist(), table.column(image_col).to_pylist(), table.column("error_message").to_pylist()):
        rows["image_url"].append(url)
        if status == "success" and data is not None:
            digest = hashlib.sha256(data).hexdigest()
            rows["sha256"].append(digest), rows["image_id"].append(digest[:16]), rows["reason"].append(None), rows["detail"].append(None)
        else:
            rows["sha256"].append(None), rows["image_id"].append(None), rows["reason"].append(reason_for(error)), rows["detail"].append((error or "")[:500])
    return pa.Table.from_pydict(rows, schema=RESULT_SCHEMA), image_col


def resolve(con, plan_dir: str, shards: list[tuple[str, str]], out_dir: str) -> dict:
    """Step 4: from the plan and each finished img2dataset shard (path, image column) with its
    results in `plan_dir`/results/: downloads/ (one row per distinct image), occurrences/ (each
    selected link that resolved to one) and rejected/fetch.parquet (the others, with their URL's
    reason). Returns counts."""
    results = _sql_list(sorted(glob.glob(os.path.join(plan_dir, "results", "*.parquet"))))
    con.execute(f"CREATE OR REPLACE TEMP VIEW plan AS SELECT * FROM read_parquet('{os.path.join(plan_dir, 'plan.parquet')}')")
    con.execute("CREATE OR REPLACE TEMP TABLE sel AS SELECT * FROM plan WHERE reason IS NULL")
    # evidence: every rejected link whose URL is fetched anyway (for another link, or once because
    # it is flagged) is an occurrence too, so that pair counts a picture on every page it is on
    url_files = sorted(glob.glob(os.path.join(plan_dir, "urls", "*.parquet")))
    fetched = f"SELECT image_url FROM read_parquet({_sql_list(url_files)})" if url_files else "SELECT NULL::VARCHAR AS image_url WHERE false"
    con.execute(f"CREATE OR REPLACE TEMP TABLE seen AS SELECT * FROM plan WHERE image_url IN ({fetched})")
    if shards:
        con.execute(f"CREATE OR REPLACE TEMP TABLE res AS SELECT * FROM read_parquet({results})")
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE res (image_url VARCHAR, sha256 VARCHAR, image_id VARCHAR, reason VARCHAR, detail VARCHAR)")
    # one row per distinct bytes: its first URL in sort order, and that URL's first link
    con.execute(
        """CREATE OR REPLACE TEMP TABLE rep AS
        WITH first_url AS (SELECT sha256, min(image_id) AS image_id, min(image_url) AS image_url FROM res WHERE sha256 IS NOT NULL GROUP BY sha256)
        SELECT f.sha256, f.image_id, f.image_url, arg_min(s.page_url, s.link_id) AS page_url, arg_min(s.alt, s.link_id) AS alt, arg_min(s.position, s.link_id) AS position
        FROM first_url f JOIN seen s USING (image_url) GROUP BY ALL"""
    )
    con.execute("CREATE OR REPLACE TEMP TABLE image_links AS SELECT r.sha256, count(*) FILTER (WHERE s.reason IS NULL) AS links FROM seen s JOIN res r USING (image_url) WHERE r.sha256 IS NOT NULL GROUP BY r.sha256")
    for name in ("downloads", "occurrences", "rejected", "sites"):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    import shutil

    shutil.copyfile(os.path.join(plan_dir, "sites.parquet"), os.path.join(out_dir, "sites", "part-0.parquet"))
    images = 0
    for shard_file, image_col in shards:  # one shard's bytes in memory at a time (pyarrow), never DuckDB's
        shard = os.path.basename(shard_file).split(".")[0]
        light = con.execute(
            f"""SELECT r.image_id, r.image_url, r.page_url, r.alt, r.position, r.sha256, l.links
                FROM rep r JOIN image_links l ON l.sha256 = r.sha256
                WHERE r.image_url IN (SELECT url FROM read_parquet('{shard_file}') WHERE status = 'success') ORDER BY r.image_url"""
        ).to_arrow_table()
        data = pq.read_table(shard_file, columns=["url", image_col])
        rows = pc.index_in(light.column("image_url"), value_set=data.column("url"))
        table = pa.table({**{n: light.column(n) for n in ("image_id", "image_url", "page_url", "alt", "position")}, "image_bytes": data.column(image_col).take(rows), "sha256": light.column("sha256"), "links": light.column("links")})
        fetch_round = os.path.basename(os.path.dirname(shard_file))  # img2dataset, or a --retry-failed round's folder
        name = f"part-{shard}" if fetch_round == "img2dataset" else f"part-{fetch_round}-{shard}"
        write_downloads(table, os.path.join(out_dir, "downloads", f"{name}.parquet"))
        images += table.num_rows
    if not shards:
        write_downloads(DOWNLOAD_SCHEMA.empty_table(), os.path.join(out_dir, "downloads", "part-empty.parquet"))
    occurrences = write_query(
        con,
        """SELECT s.link_id, s.page_url, s.site, s.image_url, s.alt, s.position, s.declared_width, s.declared_height, r.image_id, s.reason
           FROM seen s JOIN res r USING (image_url) WHERE r.image_id IS NOT NULL ORDER BY s.link_id""",
        os.path.join(out_dir, "occurrences", "part"), DOWNLOAD_OCCURRENCE_SCHEMA, rows_per_file=1_000_000,
    )
    if not occurrences:
        pq.write_table(DOWNLOAD_OCCURRENCE_SCHEMA.empty_table(), os.path.join(out_dir, "occurrences", "part-empty.parquet"))
    write_query(
        con,
        f"""SELECT link_id AS record_id, '{STAGE}' AS stage, reason, detail, image_url AS url FROM plan WHERE reason IS NOT NULL
            UNION ALL
            SELECT s.link_id, '{STAGE}', r.reason, r.detail, s.image_url FROM sel s JOIN res r USING (image_url) WHERE r.image_id IS NULL""",
        os.path.join(out_dir, "rejected", "part.parquet"), REJECTED_SCHEMA,
    )
    reasons = dict(con.execute("SELECT reason, count(*) FROM (SELECT reason FROM plan WHERE reason IS NOT NULL UNION ALL SELECT r.reason FROM sel s JOIN res r USING (image_url) WHERE r.image_id IS NULL) GROUP BY reason").fetchall())
    missing = con.execute("SELECT count(*) FROM sel s ANTI JOIN res r USING (image_url)").fetchone()[0]
    downloaded = con.execute("SELECT count(*) FROM res WHERE image_id IS NOT NULL").fetchone()[0]
    kept = con.execute("SELECT count(*) FROM sel s JOIN res r USING (image_url) WHERE r.image_id IS NOT NULL").fetchone()[0]
    return {"kept": kept, "reasons": reasons, "missing": missing, "urls_downloaded": downloaded, "images": images}
