"""`webpairs browse RUN`: a read-only local web app over a run's pairs, rejects and sites.

Routes (GET only; anything else is 404, so nothing outside the run is ever served):
    /                                 the app (browse/app.html)
    /api/summary                      pairs, pages, sites, rejects, similarity range
    /api/pairs?site&page&smin&smax&fmin&fmax&nmin&nmax&order&offset&limit  (fmin/fmax: faces on the pair;
                nmin/nmax: its nsfw score, the higher of its two images')
    /api/reasons                      rejects per stage and reason
    /api/rejects?stage&reason&offset&limit
    /api/sites?offset&limit
    /api/copies?site&offset&limit      copy groups (kept dress first) and groups per site
    /image/pair/KEY/cond|target       a JPEG read from the shard tar by offset
    /image/reject/STAGE/RECORD_ID     the image a stage had for a rejected link
Images are looked up by key in the run's own tables, never by a path from the request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

from browse.data import BrowseError, RunData

log = logging.getLogger(__name__)
APP_HTML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.html")


def _float(value: Optional[str]) -> Optional[float]:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise BrowseError(f"not a number: {value!r}") from None


def _int(value: Optional[str], default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise BrowseError(f"not an integer: {value!r}") from None


def make_handler(data: RunData):
    with open(APP_HTML, "rb") as fh:
        page = fh.read()

    class Handler(BaseHTTPRequestHandler):
        server_version = "webpairs-browse"

        def log_message(self, fmt, *args):  # requests go to the debug log, not the console
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if ctype.startswith("application/json") else "max-age=3600")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj, default=str).encode(), "application/json; charset=utf-8")

        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            try:
                if url.path == "/":
                    return self._send(200, page, "text/html; charset=utf-8")
                if parts[:1] == ["api"] and len(parts) == 2:
                    return self._api(parts[1], q)
                if parts[:2] == ["image", "pair"] and len(parts) == 4:
                    return self._image(data.pair_image(parts[2], parts[3]))
                if parts[:2] == ["image", "copy"] and len(parts) == 3:
                    return self._image(data.copy_image(parts[2]))
                if parts[:2] == ["image", "reject"] and len(parts) == 4:
                    return self._image(data.reject_image(parts[2], parts[3]))
            except BrowseError as err:
                return self._json({"error": str(err)}, 400)
            return self._json({"error": "not found"}, 404)

        def _api(self, name: str, q: dict) -> None:
            if name == "summary":
                return self._json(data.summary())
            if name == "pairs":
                return self._json(data.pairs(q.get("site", ""), q.get("page", ""), _float(q.get("smin")), _float(q.get("smax")), q.get("order", "random"), _int(q.get("offset"), 0), _int(q.get("limit"), 24), _int(q.get("fmin"), None), _int(q.get("fmax"), None), _float(q.get("nmin")), _float(q.get("nmax"))))
            if name == "reasons":
                return self._json(data.reasons())
            if name == "rejects":
                return self._json(data.rejects(q.get("stage", ""), q.get("reason", ""), _int(q.get("offset"), 0), _int(q.get("limit"), 24)))
            if name == "sites":
                return self._json(data.sites(_int(q.get("offset"), 0), _int(q.get("limit"), 100)))
            if name == "copies":
                return self._json(data.copy_groups(q.get("site", ""), _int(q.get("offset"), 0), _int(q.get("limit"), 24)))
            return self._json({"error": "not found"}, 404)

        def _image(self, body: Optional[bytes]) -> None:
            if body is None:
                return self._json({"error": "no such image"}, 404)
            ctype = "image/jpeg"
            if body[:8] == b"\x89PNG\r\n\x1a\n":
                ctype = "image/png"
            elif body[:4] == b"GIF8":
                ctype = "image/gif"
            elif body[:4] == b"RIFF" and body[8:12] == b"WEBP":
                ctype = "image/webp"
            elif not body.startswith(b"\xff\xd8"):
                ctype = "application/octet-stream"  # never rendered as HTML (nosniff)
            self._send(200, body, ctype)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a browser that closed its connection is not an error
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, (BrokenPipeError, ConnectionResetError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class BrowseServer:
    """The app on host:port (port 0: a free one) over an opened run; `serve_forever` or use as a
    context manager (serves in a thread, for tests and benchmarks)."""

    def __init__(self, run_dir: str, host: str = "127.0.0.1", port: int = 8765):
        self.data = RunData(run_dir)
        self.httpd = _Server((host, port), make_handler(self.data))
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        self._thread: Optional[threading.Thread] = None

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def __enter__(self) -> "BrowseServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
