"""Consent: what each site says about being crawled and mined, asked before its images are fetched.

Per origin (scheme, host, port), once per run, in download's plan and before any image of it:

* **robots.txt** (RFC 9309, parsed by `protego`): the group for the product token `webpairs`,
  else `*`. A 2xx answer is parsed; a 4xx answer means everything is allowed; a 5xx answer or an
  unreachable host means everything is disallowed for this run (§2.3.1.4). `Crawl-delay` is
  honoured by the politeness layer (crawl/polite.py). Reason: `robots_disallowed`.
* **TDMRep** (W3C community group report): `/.well-known/tdmrep.json`, a list of rules
  `{"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url}`; the first rule whose location
  pattern (robots.txt syntax: `*` and a final `$`) matches the path applies. A location with
  `tdm-reservation: 1` is not fetched. Reason: `tdm_reserved`.

The answers are kept in the run (`consent/hosts.parquet` of the download output), so a rerun or a
resume asks no site again. On image responses, the rules of crawl/judge.py judge the headers
before the body is read: `tdm-reservation: 1` (`tdm_reserved`) and `X-Robots-Tag` opt-outs
(`opt_out`, img2dataset's check). At extract, a page opts out of giving images with
`X-Robots-Tag: noai`/`noimageai` in its stored HTTP headers, `<meta name="robots" content="noai">`
(or `noimageai`, or the `webpairs` meta name), or TDMRep's `tdm-reservation: 1` header or meta:
`page_opt_out`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Optional
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from core.config import DEFAULT_CONTACT  # --contact: where a site owner learns what we do

log = logging.getLogger(__name__)

TOKEN = "webpairs"  # the product token robots.txt groups and X-Robots-Tag prefixes are matched on
ROBOTS_DISALLOWED = "robots_disallowed"
TDM_RESERVED = "tdm_reserved"
PAGE_OPT_OUT = "page_opt_out"
OPT_OUT_DIRECTIVES = ("noai", "noimageai")  # page level (X-Robots-Tag header, <meta name=robots>)
CONSENT_DIR = "consent"
HOSTS_FILE = "hosts.parquet"
MAX_ROBOTS_BYTES = 512 * 1024  # RFC 9309 §2.5: parse at least 500 KiB
MAX_TDMREP_BYTES = 256 * 1024

HOSTS_SCHEMA = pa.schema(
    [
        ("origin", pa.string()), ("robots_status", pa.string()), ("robots_http", pa.int32()), ("robots_txt", pa.string()),
        ("tdmrep_status", pa.string()), ("tdmrep_http", pa.int32()), ("tdmrep_json", pa.string()), ("error", pa.string()), ("fetched", pa.string()),
    ]
)
# status of each file: ok (2xx, parsed) | missing (4xx: no rules) | unavailable (5xx, timeout, no
# connection: robots.txt then disallows all) | refused (the URL policy refuses the host: its images are
# refused by the policy too, with the policy's reason) | invalid (tdmrep.json that is not a rule list)
OK, MISSING, UNAVAILABLE, REFUSED, INVALID = "ok", "missing", "unavailable", "refused", "invalid"


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("webpairs")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "0"


def user_agent(contact: str = DEFAULT_CONTACT) -> str:
    """`webpairs/<version> (+<contact URL>)`: the token robots.txt is matched on, and who to ask."""
    return f"{TOKEN}/{version()} (+{contact or DEFAULT_CONTACT})"


def origin_of(url: str) -> Optional[str]:
    """`scheme://host[:port]` (robots.txt and TDMRep are per origin), None for a URL without a host."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if not host or parts.scheme not in ("http", "https"):
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


# ---- asking a site ------------------------------------------------------------------------------


def _get(url: str, allow, pins, agent: str, timeout: float, max_bytes: int) -> tuple[str, Optional[int], bytes, str]:
    """(status, HTTP status, body, error) of one GET of a site file (redirects followed, policy applied)."""
    from crawl.fetch import FetchError, fetch
    from crawl.urls import REASON_BAD_SCHEME, REASON_BAD_URL, REASON_PRIVATE, REASON_USERINFO

    try:
        data = fetch(url, allow, timeout, max(timeout, 2 * timeout), max_bytes, agent, pins, accept="text/plain,application/json,*/*;q=0.5", trim=False)
        return OK, 200, data, ""
    except FetchError as err:
        m = re.fullmatch(r"http_(\d{3})", err.reason)
        if m:
            code = int(m.group(1))
            return (MISSING if 400 <= code < 500 else UNAVAILABLE), code, b"", str(err)[:300]
        if err.reason in (REASON_PRIVATE, REASON_BAD_SCHEME, REASON_BAD_URL, REASON_USERINFO, "redirect_refused"):
            return REFUSED, None, b"", str(err)[:300]
        return UNAVAILABLE, None, b"", str(err)[:300]


def ask_origin(origin: str, allow, pins, agent: str, timeout: float) -> dict:
    """One HOSTS_SCHEMA row: the origin's robots.txt and tdmrep.json, as it answered."""
    r_status, r_http, r_body, r_err = _get(origin + "/robots.txt", allow, pins, agent, timeout, MAX_ROBOTS_BYTES)
    if r_status == REFUSED:  # the policy refuses the host: asking its TDMRep would be refused too
        t_status, t_http, t_body, t_err = REFUSED, None, b"", ""
    else:
        t_status, t_http, t_body, t_err = _get(origin + "/.well-known/tdmrep.json", allow, pins, agent, timeout, MAX_TDMREP_BYTES)
        if t_status == OK and parse_tdmrep(t_body) is None:
            t_status, t_err = INVALID, "tdmrep.json is not a JSON list of rules"
    return {
        "origin": origin, "robots_status": r_status, "robots_http": r_http, "robots_txt": r_body.decode("utf-8", "replace"),
        "tdmrep_status": t_status, "tdmrep_http": t_http, "tdmrep_json": t_body.decode("utf-8", "replace"),
        "error": "; ".join(e for e in (r_err and f"robots.txt: {r_err}", t_err and f"tdmrep.json: {t_err}") if e) or None,
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_tdmrep(data: bytes) -> Optional[list[tuple[str, int]]]:
    """tdmrep.json -> [(location pattern, reservation 0/1)], None when it is not a rule list."""
    try:
        doc = json.loads(data.decode("utf-8-sig", "replace") or "null")
    except ValueError:
        return None
    if not isinstance(doc, list):
        return None
    rules = []
    for rule in doc:
        if isinstance(rule, dict) and isinstance(rule.get("location"), str):
            try:
                reservation = int(rule.get("tdm-reservation", 0))
            except (TypeError, ValueError):
                reservation = 0
            rules.append((rule["location"], reservation))
    return rules


def _pattern(location: str) -> re.Pattern:
    """A robots.txt-style path pattern (`*` any characters, a final `$` the end) as a regex."""
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    if not body.startswith("/"):
        body = "/" + body
    return re.compile(".*".join(re.escape(part) for part in body.split("*")) + ("$" if anchored else ""))


class SitePolicy:
    """One origin's answers, parsed: `refusal(url)` and `crawl_delay()`."""

    def __init__(self, row: Mapping):
        self.row = dict(row)
        self._robots = None
        self._tdm = None

    def robots(self):
        if self._robots is None and self.row["robots_status"] == OK:
            from protego import Protego

            self._robots = Protego.parse(self.row["robots_txt"] or "")
        return self._robots

    def tdm_rules(self) -> list:
        if self._tdm is None:
            rules = parse_tdmrep((self.row["tdmrep_json"] or "").encode()) if self.row["tdmrep_status"] == OK else None
            self._tdm = [(_pattern(loc), loc, res) for loc, res in (rules or [])]
        return self._tdm

    def refusal(self, url: str) -> Optional[tuple[str, str]]:
        """(reason, detail) when the site refuses this URL; None when it may be fetched."""
        status = self.row["robots_status"]
        if status == UNAVAILABLE:
            http = self.row["robots_http"]
            return ROBOTS_DISALLOWED, f"robots.txt unavailable ({f'HTTP {http}' if http else (self.row['error'] or 'no answer')[:120]}): all disallowed for this run (RFC 9309 2.3.1.4)"
        robots = self.robots()
        if robots is not None and not robots.can_fetch(url, TOKEN):
            return ROBOTS_DISALLOWED, f"robots.txt of {self.row['origin']} disallows it for {TOKEN}"
        rules = self.tdm_rules()
        if rules:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            for pattern, location, reservation in rules:
                if pattern.match(path):
                    if reservation == 1:
                        return TDM_RESERVED, f"tdmrep.json of {self.row['origin']} reserves {location[:100]}"
                    break  # the first matching rule applies
        return None

    def crawl_delay(self) -> float:
        robots = self.robots()
        delay = robots.crawl_delay(TOKEN) if robots is not None else None
        return float(delay or 0.0)


_ROWS_LOCK = threading.Lock()  # a worker's threads read hosts.parquet once (`SiteRules.rows`)


class SiteRules:
    """Every origin's answers for one download: asked once (`ask`), kept in `folder/hosts.parquet`,
    read back on a rerun. Pickled into img2dataset's workers (once per shard) without its rows when
    they are saved: a worker reads them back from the file on its first redirect to another site."""

    def __init__(self, folder: str, allow_hosts=(), pins: Optional[dict] = None, agent: str = "", timeout: float = 10.0):
        self.folder, self.allow_hosts, self.pins, self.agent, self.timeout = folder, tuple(allow_hosts), dict(pins or {}), agent or user_agent(), timeout
        self._rows: Optional[dict[str, dict]] = None
        self._policies: dict[str, SitePolicy] = {}
        self._saved = False

    @property
    def rows(self) -> dict[str, dict]:
        if self._rows is None:
            with _ROWS_LOCK:  # one thread reads the file; the others wait for its dict
                if self._rows is None:
                    # filled before it is published: a worker's other threads saw the empty dict while
                    # the file was read, took a planned site for a new one and asked its robots.txt a
                    # second time. Read once: two threads that each read it and published their own
                    # dict lost the answer one had put in the first, and asked that site again.
                    rows: dict[str, dict] = {}
                    path = os.path.join(self.folder, HOSTS_FILE)
                    if os.path.exists(path):
                        for row in pq.read_table(path).to_pylist():
                            rows[row["origin"]] = row
                        self._saved = True
                    self._rows = rows
        return self._rows

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_policies"] = {}
        if self._saved:
            state["_rows"] = None  # read back from the file where needed
        return state

    def forget_unavailable(self) -> None:
        """Forget the origins whose robots.txt or tdmrep.json was unavailable: `ask` asks them again."""
        for origin in [o for o, r in self.rows.items() if UNAVAILABLE in (r["robots_status"], r["tdmrep_status"])]:
            del self.rows[origin]
            self._policies.pop(origin, None)
            self._saved = False

    def ask(self, origins: Iterable[str], threads: int = 32) -> int:
        """Ask every origin not asked yet (`threads` at a time); returns how many were asked."""
        from crawl.urls import AllowList

        todo = sorted(set(o for o in origins if o) - set(self.rows))
        if not todo:
            if not self._saved and self.rows:
                self.save()
            return 0
        allow = AllowList(self.allow_hosts)
        log.info("consent: asking %d sites for robots.txt and tdmrep.json", len(todo))
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            for row in pool.map(lambda o: ask_origin(o, allow, self.pins, self.agent, self.timeout), todo):
                self.rows[row["origin"]] = row
        self.save()
        return len(todo)

    def save(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        rows = [self.rows[o] for o in sorted(self.rows)]
        tmp = os.path.join(self.folder, f".{HOSTS_FILE}.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=HOSTS_SCHEMA), tmp)
        os.replace(tmp, os.path.join(self.folder, HOSTS_FILE))
        self._saved = True

    def keep_hop(self, row: dict) -> None:
        """A worker's answer from a site reached by a redirect, kept beside hosts.parquet (one small
        JSON file per origin, written atomically) until the driver folds it in (`absorb_hops`)."""
        try:
            os.makedirs(self.folder, exist_ok=True)
            path = self._hop_file(row["origin"])
            with open(path + f".{os.getpid()}.tmp", "w") as fh:
                json.dump(row, fh)
            os.replace(path + f".{os.getpid()}.tmp", path)
        except OSError as err:  # a worker on another machine: the answer stays in this process
            log.debug("consent: cannot keep the answer of %s: %s", row["origin"], err)

    def _hop_file(self, origin: str) -> str:
        import hashlib

        return os.path.join(self.folder, f"hop-{hashlib.sha1(origin.encode()).hexdigest()[:20]}.json")

    @contextlib.contextmanager
    def asking(self, origin: str):
        """Held while a worker process asks a site the plan did not: the other processes of this
        machine wait for its answer (an flock beside the hop file) instead of asking too."""
        try:
            os.makedirs(self.folder, exist_ok=True)
            fh = open(os.path.join(self.folder, f".{os.path.basename(self._hop_file(origin))[:-5]}.lock"), "a")
        except OSError:  # a worker on another machine: no lock to share
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        finally:
            fh.close()

    def read_hop(self, origin: str) -> Optional[dict]:
        """The answer another worker got from `origin` (`keep_hop`), or None."""
        try:
            with open(self._hop_file(origin)) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def absorb_hops(self) -> int:
        """Fold the workers' answers (`keep_hop`) into hosts.parquet; returns how many."""
        import glob

        files = sorted(glob.glob(os.path.join(self.folder, "hop-*.json")))
        for path in files:
            with open(path) as fh:
                row = json.load(fh)
            self.rows.setdefault(row["origin"], row)
        if files:
            self.save()
            for path in files:
                os.remove(path)
        for path in glob.glob(os.path.join(self.folder, ".hop-*.lock")):  # the workers' `asking` locks
            os.remove(path)
        return len(files)

    def policy(self, origin: str) -> Optional[SitePolicy]:
        if origin not in self._policies and origin in self.rows:
            self._policies[origin] = SitePolicy(self.rows[origin])
        return self._policies.get(origin)

    def refusal(self, url: str) -> Optional[tuple[str, str]]:
        origin = origin_of(url)
        policy = self.policy(origin) if origin else None
        return policy.refusal(url) if policy is not None else None

    def crawl_delays(self) -> dict[str, float]:
        """{host name: seconds} for the hosts whose robots.txt asks for a Crawl-delay (the largest of its origins)."""
        delays: dict[str, float] = {}
        for origin, row in self.rows.items():
            delay = crawl_delay_of(row)
            if delay > 0:
                host = urlsplit(origin).hostname or ""
                delays[host] = max(delays.get(host, 0.0), delay)
        return delays


def crawl_delay_of(row: dict) -> float:
    """The Crawl-delay (seconds, 0: none) that one HOSTS_SCHEMA row's robots.txt asks of us."""
    if "crawl-delay" not in (row["robots_txt"] or "").lower():
        return 0.0  # parse only the robots.txt files that ask for one
    return SitePolicy(row).crawl_delay()


# ---- rules of crawl/judge.py ----------------------------------------------------------------------


_ASK_LOCK = threading.Lock()  # one worker thread asks a site the plan did not; the others wait for its answer


class SiteConsent:
    """`before_request`: a redirect hop to another origin than the planned one is judged on that
    origin's robots.txt and TDMRep, asked on first need (once per machine: `SiteRules.asking`) when the plan did
    not ask it. The planned origin itself was judged by the plan.

    `gate` (crawl/polite.py's HostGate, built with the planned sites' Crawl-delays) is told the
    Crawl-delay of each site asked here, before any request to it is let through."""

    def __init__(self, rules: SiteRules, gate=None):
        self.rules, self.gate = rules, gate

    def __getstate__(self):
        return {"rules": self.rules, "gate": self.gate}

    def __setstate__(self, state):
        self.rules, self.gate = state["rules"], state.get("gate")

    def before_request(self, url: str, planned_origin: Optional[str] = None) -> None:
        from crawl.fetch import FetchError

        origin = origin_of(url)
        if origin is None or origin == planned_origin:
            return
        if origin not in self.rules.rows:
            with _ASK_LOCK, self.rules.asking(origin):
                if origin not in self.rules.rows:
                    row = self.rules.read_hop(origin)  # another worker may have asked it already
                    if row is None:
                        from crawl.urls import AllowList

                        row = ask_origin(origin, AllowList(self.rules.allow_hosts), self.rules.pins, self.rules.agent, self.rules.timeout)
                        self.rules.keep_hop(row)
                    if self.gate is not None:  # before the answer is seen: no thread gets past the gate without its delay
                        self.gate.learn_delay(urlsplit(origin).hostname or "", crawl_delay_of(row))
                    self.rules.rows[origin] = row
        refusal = self.rules.refusal(url)
        if refusal is not None:
            raise FetchError(refusal[0], f"redirect to {url[:200]}: {refusal[1]}")


class PlannedOrigin:
    """SiteConsent bound to one planned URL's origin (what the judge calls for every hop)."""

    def __init__(self, consent: SiteConsent, url: str):
        self.consent, self.origin = consent, origin_of(url)

    def before_request(self, url: str) -> None:
        self.consent.before_request(url, self.origin)


class TdmHeader:
    """`on_headers`: an image response saying `tdm-reservation: 1` is refused on its headers alone."""

    def on_headers(self, url: str, headers) -> None:
        from crawl.fetch import FetchError

        values = headers.get_all("tdm-reservation", []) if hasattr(headers, "get_all") else [headers.get("tdm-reservation", "")]
        if any((v or "").strip() == "1" for v in values):
            raise FetchError(TDM_RESERVED, "tdm-reservation: 1 in the image response headers")


# ---- page level (extract) --------------------------------------------------------------------------


_VALUED = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")


def _directives(value: str, token: str = TOKEN) -> list[str]:
    """The directives of one X-Robots-Tag value that apply to us: unprefixed, or `webpairs: ...`."""
    head, sep, rest = (value or "").partition(":")
    if sep and re.fullmatch(r"\s*[A-Za-z][\w.-]*\s*", head) and head.strip().lower() not in _VALUED:
        if head.strip().lower() != token:
            return []  # another crawler's directives
        value = rest
    return [d.strip().lower() for d in (value or "").split(",") if d.strip()]


def page_opt_out(headers: Iterable[tuple[str, str]] = (), metas: Iterable[tuple[str, str]] = ()) -> Optional[str]:
    """Why a page opts out of giving its images (None when it does not): `headers` are its HTTP
    response headers (name, value), `metas` its <meta name content> pairs."""
    for name, value in headers:
        name = name.strip().lower()
        if name == "x-robots-tag":
            hit = [d for d in _directives(value) if d in OPT_OUT_DIRECTIVES]
            if hit:
                return f"X-Robots-Tag: {hit[0]}"
        elif name == "tdm-reservation" and (value or "").strip() == "1":
            return "tdm-reservation: 1 (page header)"
    for name, content in metas:
        name = (name or "").strip().lower()
        if name in ("robots", TOKEN):
            hit = [d.strip().lower() for d in (content or "").split(",") if d.strip().lower() in OPT_OUT_DIRECTIVES]
            if hit:
                return f'<meta name="{name}" content="{hit[0]}">'
        elif name == "tdm-reservation" and (content or "").strip() == "1":
            return '<meta name="tdm-reservation" content="1">'
    return None
