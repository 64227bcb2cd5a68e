"""A loopback model hub for the download-on-first-use tests: HF_ENDPOINT on 127.0.0.1 answering the
hub's protocol for one repository (`/api/models/{repo}` lists its files, `/{repo}/resolve/{rev}/{file}`
serves them with the headers huggingface_hub checks). Every request path is recorded."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading


def serve(repo: str, files: dict) -> tuple:
    """Start the hub for `repo` with `files` ({name: bytes}); returns (server, url, served paths).
    The caller shuts the server down."""
    served: list = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, data: bytes, body: bool, headers: dict) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _answer(self, body: bool):
            served.append(self.path)
            path = self.path.split("?")[0]
            if path == f"/api/models/{repo}":  # diffusers asks which files the repo has
                info = json.dumps({"id": repo, "modelId": repo, "sha": "0" * 40, "siblings": [{"rfilename": n} for n in files]}).encode()
                return self._send(200, info, body, {"Content-Type": "application/json"})
            parts = path.split("/resolve/", 1)  # /{repo}/resolve/{revision}/{file}
            name = parts[1].split("/", 1)[-1] if len(parts) == 2 and parts[0] == f"/{repo}" else None
            if name not in files:
                return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
            data = files[name]
            self._send(200, data, body, {"X-Repo-Commit": "0" * 40, "ETag": '"' + hashlib.sha256(data).hexdigest() + '"'})

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", served
