"""The hash blocklist: known-bad images refused as their bytes arrive (`crawl download --blocklist`).

A list file holds one entry a line: `sha256:<64 hex>`, `md5:<32 hex>` or `pdq:<64 hex>` (Meta's
perceptual hash, core/perceptual.py); `#` starts a comment, blank lines are skipped. An exact entry
matches bytes whose digest is equal; a PDQ entry matches an image whose PDQ hash is within
`pdq_distance` bits (31 by default, Meta's confident-match threshold).

Lists of 10^7 lines stay in bounded memory: the driver compiles them once (`compile_index`) into
numpy arrays on disk, parsing the text a block at a time, and each worker process memory-maps them
(`BlocklistIndex`), so the index costs page cache shared by all workers, not a copy per process:

* exact hashes: the digests sorted by their first 8 bytes; a lookup is a binary search
  (`np.searchsorted`) and a comparison of the few rows with that prefix;
* PDQ: multi-index hashing (Norouzi et al.; the scheme Meta's own PDQ index uses): the 256 bits in
  16 chunks of 16 bits, one table per chunk (entry ids sorted by chunk value plus 65,537 offsets).
  Two hashes within d bits agree within d // 16 bits on at least one chunk (pigeonhole), so a
  query probes, in each chunk, the values within d // 16 bits of its own (17 values for d = 31)
  and computes the full distance only for the entries found there: no scan of the list.

`BlocklistRule` is the `on_body` rule of crawl/judge.py: it is pickled into img2dataset's worker
processes holding only the list paths, the distance and the compiled index's folder, and maps the
index lazily, once per process. A match raises `FetchError("blocklisted", ...)` naming the entry,
its file and line: the bytes are still only in the worker's memory and are never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from core.config import ConfigError
from core.perceptual import PDQ_BYTES, pdq_of_bytes

log = logging.getLogger(__name__)
KINDS = {"sha256": 32, "md5": 16, "pdq": PDQ_BYTES}
CHUNKS = 16  # PDQ multi-index: 16 chunks of 16 bits
META = "blocklist.json"
BLOCK_BYTES = 32 << 20  # text parsed a block at a time
_LOCK = threading.Lock()  # img2dataset runs several threads per worker process


def fingerprint(paths: Sequence[str]) -> str:
    """A digest of the lists' contents (a resumed download must use the same lists)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.abspath(path).encode() + b"\0")
        try:
            fh = open(path, "rb")
        except OSError as err:
            raise ConfigError(f"cannot read blocklist {path}: {err.strerror}") from None
        with fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _bad(path: str, lineno: int, line: bytes, why: str) -> ConfigError:
    text = line.decode("utf-8", "replace").strip()
    return ConfigError(f"blocklist {path} line {lineno}: {text[:80]!r} {why} (expected sha256:<64 hex>, md5:<32 hex> or pdq:<64 hex>)")


def _parse_block(path: str, first_line: int, lines: list[bytes], file_index: int, out: dict) -> None:
    """Parse one block of lines into out[kind] = [(digests uint8 (n, size), origins int64 (n,))]."""
    groups: dict[str, tuple[list, list]] = {k: ([], []) for k in KINDS}
    for offset, raw in enumerate(lines):
        line = raw.split(b"#", 1)[0].strip()
        if not line:
            continue
        kind, sep, value = line.partition(b":")
        kind = kind.strip().lower().decode("ascii", "replace")
        if not sep or kind not in KINDS:
            raise _bad(path, first_line + offset, raw, "is not an entry")
        if len(value.strip()) != 2 * KINDS[kind]:
            raise _bad(path, first_line + offset, raw, f"does not hold {2 * KINDS[kind]} hex digits")
        groups[kind][0].append(value.strip())
        groups[kind][1].append(first_line + offset)
    for kind, (values, linenos) in groups.items():
        if not values:
            continue
        try:
            digests = bytes.fromhex(b"".join(values).decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            for value, lineno in zip(values, linenos):  # find the line (the slow path, only on error)
                try:
                    bytes.fromhex(value.decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    raise _bad(path, lineno, kind.encode() + b":" + value, "holds a character that is not hex") from None
            raise
        arr = np.frombuffer(digests, np.uint8).reshape(-1, KINDS[kind])
        origins = (np.int64(file_index) << np.int64(40)) | np.asarray(linenos, dtype=np.int64)
        out[kind].append((arr, origins))


def _read_lists(paths: Sequence[str]) -> dict:
    out: dict[str, list] = {k: [] for k in KINDS}
    for file_index, path in enumerate(paths):
        try:
            fh = open(path, "rb")
        except OSError as err:
            raise ConfigError(f"cannot read blocklist {path}: {err.strerror}") from None
        with fh:
            lineno = 1
            while True:
                lines = fh.readlines(BLOCK_BYTES)
                if not lines:
                    break
                _parse_block(path, lineno, lines, file_index, out)
                lineno += len(lines)
    return out


def compile_index(paths: Sequence[str], out_dir: str) -> dict:
    """Parse the list files and write the index arrays into `out_dir`; returns counts per kind."""
    os.makedirs(out_dir, exist_ok=True)
    parsed = _read_lists(paths)
    counts = {}
    for kind, parts in parsed.items():
        size = KINDS[kind]
        digests = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size), np.uint8)
        origins = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        parts.clear()
        counts[kind] = len(digests)
        if kind == "pdq":
            np.save(os.path.join(out_dir, "pdq.npy"), digests)
            np.save(os.path.join(out_dir, "pdq_origin.npy"), origins)
            if len(digests):
                _write_multi_index(digests, out_dir)
        else:
            keys = np.ascontiguousarray(digests[:, :8]).view(">u8").reshape(-1).astype(np.uint64)
            order = np.argsort(keys, kind="stable")
            np.save(os.path.join(out_dir, f"{kind}_key.npy"), keys[order])
            del keys
            np.save(os.path.join(out_dir, f"{kind}.npy"), digests[order])
            np.save(os.path.join(out_dir, f"{kind}_origin.npy"), origins[order])
        del digests, origins
    with open(os.path.join(out_dir, META), "w") as fh:
        json.dump({"sources": [os.path.abspath(p) for p in paths], "counts": counts}, fh)
    return counts


def _write_multi_index(digests: np.ndarray, out_dir: str) -> None:
    n = len(digests)
    chunks = digests.view(">u2").reshape(n, CHUNKS)
    ids = np.lib.format.open_memmap(os.path.join(out_dir, "pdq_ids.npy"), mode="w+", dtype=np.uint32, shape=(CHUNKS, n))
    offsets = np.zeros((CHUNKS, 65537), np.int64)
    for c in range(CHUNKS):
        col = chunks[:, c].astype(np.uint16)
        ids[c] = np.argsort(col, kind="stable").astype(np.uint32)  # uint16 keys: a radix sort
        offsets[c, 1:] = np.cumsum(np.bincount(col, minlength=65536))
    ids.flush()
    del ids
    np.save(os.path.join(out_dir, "pdq_offsets.npy"), offsets)


def _masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most `radius` bits set (the probes around a chunk value)."""
    values = np.arange(65536, dtype=np.uint32)
    return values[np.bitwise_count(values) <= radius].astype(np.uint16)


class BlocklistIndex:
    """A compiled index, memory-mapped (read-only)."""

    def __init__(self, index_dir: str, pdq_distance: int = 31):
        with open(os.path.join(index_dir, META)) as fh:
            meta = json.load(fh)
        self.sources, self.counts, self.pdq_distance = meta["sources"], meta["counts"], pdq_distance
        load = lambda name: np.load(os.path.join(index_dir, f"{name}.npy"), mmap_mode="r")  # noqa: E731
        self.exact = {k: (load(f"{k}_key"), load(k), load(f"{k}_origin")) for k in ("sha256", "md5") if self.counts[k]}
        if self.counts["pdq"]:
            self.pdq, self.pdq_origin = load("pdq"), load("pdq_origin")
            self.pdq_words = self.pdq.view(np.uint64).reshape(-1, 4) if len(self.pdq) else None
            self.pdq_ids, self.pdq_offsets = load("pdq_ids").reshape(-1), np.load(os.path.join(index_dir, "pdq_offsets.npy"))
            self.probes = _masks(pdq_distance // CHUNKS)

    @property
    def has_pdq(self) -> bool:
        return bool(self.counts["pdq"])

    def __len__(self) -> int:
        return sum(self.counts.values())

    def where(self, origin: int) -> str:
        return f"{self.sources[int(origin) >> 40]} line {int(origin) & ((1 << 40) - 1)}"

    def lookup_exact(self, kind: str, digest: bytes) -> Optional[str]:
        """'kind:hex (FILE line N)' when the digest is listed, else None."""
        if kind not in self.exact:
            return None
        keys, rows, origins = self.exact[kind]
        key = np.uint64(int.from_bytes(digest[:8], "big"))
        lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        for i in range(lo, hi):
            if rows[i].tobytes() == digest:
                return f"{kind}:{digest.hex()} ({self.where(origins[i])})"
        return None

    def lookup_pdq(self, pdq: bytes) -> Optional[tuple[str, int]]:
        """('pdq:hex (FILE line N)', distance) of the nearest listed hash within the distance."""
        if not self.has_pdq:
            return None
        n = len(self.pdq)
        query = np.frombuffer(pdq, ">u2")
        values = (query[:, None] ^ self.probes[None, :]).astype(np.int64)  # (16, probes)
        rows = np.arange(CHUNKS)[:, None]
        starts, ends = self.pdq_offsets[rows, values].ravel(), self.pdq_offsets[rows, values + 1].ravel()
        lengths = ends - starts
        total = int(lengths.sum())
        if not total:
            return None
        base = (starts + (np.arange(CHUNKS)[:, None] * n).repeat(len(self.probes), 1).ravel())
        keep = lengths > 0
        base, lengths = base[keep], lengths[keep]
        flat = np.repeat(base - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(total)
        candidates = np.unique(self.pdq_ids[flat])
        dist = np.bitwise_count(self.pdq_words[candidates] ^ np.frombuffer(pdq, np.uint64)[None, :]).sum(1)
        best = int(dist.argmin())
        if dist[best] > self.pdq_distance:
            return None
        i = candidates[best]
        return f"pdq:{self.pdq[i].tobytes().hex()} ({self.where(self.pdq_origin[i])})", int(dist[best])

    def match(self, data: bytes) -> Optional[str]:
        """What the bytes match ('sha256:... (FILE line N)', 'pdq:... (FILE line N), distance D'), or None."""
        for kind in ("sha256", "md5"):
            if kind in self.exact:
                hit = self.lookup_exact(kind, hashlib.new(kind, data).digest())
                if hit:
                    return hit
        if self.has_pdq:
            pdq = pdq_of_bytes(data)
            if pdq is not None:
                hit = self.lookup_pdq(pdq[0])
                if hit:
                    return f"{hit[0]}, distance {hit[1]}"
        return None


def load_lists(paths: Sequence[str], pdq_distance: int = 31, index_dir: Optional[str] = None) -> BlocklistIndex:
    """Compile `paths` (into `index_dir`, or a temporary folder) and map the index."""
    index_dir = index_dir or tempfile.mkdtemp(prefix="webpairs-blocklist-")
    compile_index(paths, index_dir)
    return BlocklistIndex(index_dir, pdq_distance)


class BlocklistRule:
    """crawl/judge.py's `on_body` rule. Pickled into the download workers with plain data only;
    each process maps the compiled index on its first image (and compiles its own copy from the
    list files when the driver's folder is not there: a Ray or Spark worker on another machine)."""

    def __init__(self, paths: Iterable[str], pdq_distance: int, index_dir: str):
        self.paths, self.pdq_distance, self.index_dir = tuple(paths), pdq_distance, index_dir
        self._index: Optional[BlocklistIndex] = None

    def __getstate__(self):
        return {"paths": self.paths, "pdq_distance": self.pdq_distance, "index_dir": self.index_dir, "_index": None}

    def index(self) -> BlocklistIndex:
        if self._index is None:
            with _LOCK:
                if self._index is None:
                    if os.path.exists(os.path.join(self.index_dir, META)):
                        self._index = BlocklistIndex(self.index_dir, self.pdq_distance)
                    else:
                        self._index = load_lists(self.paths, self.pdq_distance)
        return self._index

    def on_body(self, url: str, data: bytes) -> None:
        from crawl.fetch import FetchError

        hit = self.index().match(data)
        if hit:
            raise FetchError("blocklisted", f"{url[:200]} matches {hit}")


@contextlib.contextmanager
def compiled(cfg) -> Iterator[tuple]:
    """The download's body rules for `cfg.blocklist` (none without lists): the lists compiled once
    in the driver into a temporary folder outside the run, removed afterwards."""
    if not cfg.blocklist:
        yield ()
        return
    with tempfile.TemporaryDirectory(prefix="webpairs-blocklist-") as tmp:
        counts = compile_index(cfg.blocklist, tmp)
        log.info("download: blocklist of %s entries (%s)", f"{sum(counts.values()):,}", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        yield (BlocklistRule(cfg.blocklist, cfg.blocklist_pdq_distance, tmp),)
