"""How a stage worker allocates memory: the allocator of Arrow buffers and glibc's thresholds
(issue 34: filter's per-image overhead).

Measured on filter (benchmarks/filter.py, 2,400 photos, `perf record` of the stage run): pyarrow's
default pool, mimalloc, reserves a 1 GiB arena advised MADV_HUGEPAGE and purges freed 4 MiB
spans with MADV_DONTNEED, so every image's bytes that Arrow holds (the downloads read, the images/
write as it was then: ~75 KB an image, built by appends that grow) fault in freshly zeroed huge pages again:
the kernel's page clearing was 15 % of the stage's CPU and its system time 1.3-1.7 ms an image.
Arrow's system pool (glibc malloc) with glibc's thresholds fixed (large buffers stay in the heap,
which is not trimmed after each free) keeps those pages mapped and reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own dynamic ceiling (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 128 << 20  # free memory kept at the heap's top before it is given back

_tuned = False


def tune_allocators() -> bool:
    """Once per process: Arrow's buffers from the system pool (glibc malloc) instead of mimalloc,
    and glibc's mmap and trim thresholds fixed at MMAP_THRESHOLD / TRIM_THRESHOLD (glibc raises
    its mmap threshold by itself, but only up to the size of the last freed mapped chunk, and
    trims the heap's top at twice it). Outputs do not change; only where buffers live. Returns
    whether glibc's thresholds were set (False on a libc without mallopt)."""
    global _tuned
    if _tuned:
        return True
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except (NotImplementedError, pa.ArrowException):  # a build without it: its default stays
        pass
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        ok = False
    _tuned = True
    return ok



_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT = None  # threadpoolctl's limiter while any user holds one BLAS thread


def one_blas_thread() -> None:
    """NumPy's and SciPy's OpenBLAS on one thread in this process until every caller has called
    `release_blas_thread` (a count: the first call limits, the last release restores what was
    set before; threadpoolctl). Filter's per-image hashes make small matrix products (pHash's
    Lanczos resize, PDQ's DCT): OpenBLAS splits them over every core and its threads then spin
    waiting for the next one, CPU time charged to the process (the stage's CPU an image doubled,
    4.8 -> 9.6 ms, with the resize's 187 x 250 x 32 product; issue 34). Values do not change: the
    products are exact or computed alike on one thread. Torch's own threads are not OpenBLAS's and
    stay as they are."""
    global _BLAS_USERS, _BLAS_LIMIT
    with _BLAS_LOCK:
        _BLAS_USERS += 1
        if _BLAS_USERS == 1:
            from threadpoolctl import ThreadpoolController

            _BLAS_LIMIT = ThreadpoolController().select(internal_api="openblas").limit(limits=1)


def release_blas_thread() -> None:
    """One caller of `one_blas_thread` is done; the last one restores OpenBLAS's threads."""
    global _BLAS_USERS, _BLAS_LIMIT
    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            return
        _BLAS_USERS -= 1
        if _BLAS_USERS == 0 and _BLAS_LIMIT is not None:
            _BLAS_LIMIT.restore_original_limits()
            _BLAS_LIMIT = None


def system_arrow_pool() -> None:
    """Arrow's buffers from its system pool (glibc malloc) instead of mimalloc, glibc's own
    thresholds left as they are (pair and shards, issue 34): mimalloc kept ~40-50 MB more resident
    at the peak of shards after pair at 20,000 images (benchmarks/pairing.py: 10x 417 -> 379 MB, 1x
    351 -> 330 MB) and cost a little CPU; `tune_allocators`' fixed trim threshold (filter's) keeps
    up to 128 MB of freed heap, which raised pair's 10x peak instead (352 -> 407 MB). Outputs do not
    change; only where buffers live. It is a setting of the process: in `webpairs run`, filter
    runs first in the same process and its `tune_allocators` (this pool and glibc's fixed
    thresholds) stays for pair and shards, so the figures above are those of `webpairs pair` and
    `webpairs shards` run alone, on the in-process runner (on Dask it sets the driver's pool only)."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except (NotImplementedError, pa.ArrowException):  # a build without it: its default stays
        pass


_LIBC = None


def release_free_memory() -> bool:
    """Give the pages of freed heap memory back to the system (glibc's `malloc_trim(0)`: the free
    top of each arena and the whole free pages inside it): a step that held a large working set
    (pair's candidate search: ~180 MB of freed NumPy arrays and Python objects at 77,327 images)
    leaves its freed pages resident otherwise, and the steps after it add their own on top (issue
    34). Cheap (~1 ms over a few hundred MB): call it where one step ends and the next begins, or
    once per large unit of work (pair's featurising calls it per row group), never per record. Returns False on a libc without it (musl, macOS): nothing done."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            _LIBC = trim
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC(0)
    return True


@contextlib.contextmanager
def no_side_input_cache():
    """The in-process runner (Beam's FnApiRunner, its embedded worker) without its worker's state
    cache while the block runs (Beam's `worker_handlers.STATE_CACHE_SIZE_MB`, 100 MB, set to 0 and
    restored after; a worker made in the block keeps it). That cache keeps every side input a step
    reads, decoded, under the bundle's own cache token: no later bundle asks for it again, yet it
    stays until 100 MB of them are held. Pair's side inputs (the copy step's (member, kept member)
    map, read by two steps, its keep signals, the boilerplate flags) stayed resident to the end of
    the stage that way (issue 34: ~40 MB of pair's peak at the 16x scale input). Without the cache
    each step decodes its side input once a bundle (Beam's side input map keeps the view for the
    bundle) and drops it when the bundle ends; outputs do not change. Nothing in the project uses
    Beam's user state, which the cache also serves. Other runners (Dask) ignore it."""
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers
    except ImportError:  # a Beam without it: nothing to change
        yield
        return
    before = getattr(worker_handlers, "STATE_CACHE_SIZE_MB", None)
    worker_handlers.STATE_CACHE_SIZE_MB = 0
    try:
        yield
    finally:
        if before is not None:
            worker_handlers.STATE_CACHE_SIZE_MB = before
