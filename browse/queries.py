"""DuckDB queries over a run's parquet, for people who would rather write SQL than click: the
questions `webpairs browse` answers, with this run's paths filled in. The HTML report prints them;
tests run every one of them.

    duckdb -c "<query>"      or      python -c "import duckdb; print(duckdb.sql('<query>'))"
"""

from __future__ import annotations

import os

# (question, SQL with {stage} placeholders for stage directories, stages it needs)
EXAMPLES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "Pairs, pages and images per site",
        "SELECT o.site, count(DISTINCT i.page_url) AS pages, count(*) AS pairs\n"
        "FROM read_parquet('{shards}/index/*.parquet') i\n"
        "JOIN (SELECT DISTINCT page_url, site FROM read_parquet('{filter}/occurrences/*.parquet')) o USING (page_url)\n"
        "GROUP BY o.site ORDER BY pairs DESC LIMIT 20",
        ("shards", "filter"),
    ),
    (
        "The pairs of a similarity band, most similar first, with their URLs and alt texts",
        "SELECT pair_id, similarity, page_url, cond_url, target_url, cond_alt, target_alt\n"
        "FROM read_parquet('{pair}/pairs/*.parquet')\n"
        "WHERE similarity BETWEEN 0.3 AND 0.6 ORDER BY similarity DESC LIMIT 20",
        ("pair",),
    ),
    (
        "A random sample of 10 pairs (the same 10 every time)",
        "SELECT pair_id, page_url, similarity FROM read_parquet('{pair}/pairs/*.parquet')\n"
        "USING SAMPLE reservoir(10 ROWS) REPEATABLE (42)",
        ("pair",),
    ),
    (
        "The similarity histogram",
        "SELECT round(similarity, 1) AS similarity, count(*) AS pairs\n"
        "FROM read_parquet('{pair}/pairs/*.parquet') GROUP BY ALL ORDER BY 1",
        ("pair",),
    ),
    (
        "What each stage rejected, by reason",
        "SELECT stage, reason, count(*) AS records\n"
        "FROM read_parquet([{rejected}], union_by_name = true)\n"
        "GROUP BY ALL ORDER BY records DESC",
        ("rejected",),
    ),
    (
        "Where a pair's sample lies in its shard (tar byte range: read it with `tail -c +OFFSET+1 | head -c SIZE | tar -t`)",
        "SELECT key, shard, \"offset\", size FROM read_parquet('{shards}/index/*.parquet') LIMIT 5",
        ("shards",),
    ),
]


def examples(dirs: dict[str, str]) -> list[tuple[str, str]]:
    """(question, runnable SQL) for the stages this run has (`dirs`: stage name -> directory)."""
    from browse.report import STAGE_ORDER

    paths = {k: os.path.abspath(v).replace("'", "''") for k, v in dirs.items()}
    rejected = ", ".join(f"'{paths[s]}/rejected/*.parquet'" for s in STAGE_ORDER if s in paths and os.path.isdir(os.path.join(dirs[s], "rejected")))
    out = []
    for question, sql, needs in EXAMPLES:
        if "rejected" in needs and not rejected:
            continue
        if any(n != "rejected" and n not in paths for n in needs):
            continue
        out.append((question, sql.format(rejected=rejected, **{k: paths.get(k, "") for k in STAGE_ORDER})))
    return out
