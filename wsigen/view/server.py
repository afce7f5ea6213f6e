"""The viewer's HTTP server: a fixed set of routes on a bounded ``ThreadingHTTPServer``.

What it lets out is only: the page and its two scripts, the vendored OpenSeadragon files, the
whitelisted facts (``info.json``) and tiles ``tiles/{layer}[/{gen}]/{level}/{col}_{row}.{jpeg|png}``
within bounds. Everything else is 404, including any path with ``..``, ``%``, ``\\`` or ``//``
(nothing is ever looked up on disk by a name from the request). GET and HEAD only; the Host
header must name the bound address (a DNS-rebinding page cannot read the slide); no CORS headers.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from .layers import Source
from .tiles import LRU, OVERLAP, TILE, encode

# the generation may be left out (curl, scripts): then the layer as it is now, not cached by the browser
TILE_ROUTE = re.compile(r"/tiles/(final|image|stage\d{1,3})/(?:([0-9a-f]{8})/)?"
                        r"(\d{1,2})/(\d{1,7})_(\d{1,7})\.(jpeg|png)")
TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
         "css": "text/css; charset=utf-8", "png": "image/png", "jpeg": "image/jpeg",
         "json": "application/json", "txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
       "style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
WORKERS = 8  # requests handled at once; more connections wait for a free worker
CONNECTION_S = 60.0  # a keep-alive connection is closed after this long, idle or not
IDLE_S = 10.0  # a connection that sends nothing for this long is closed
WAIT_S = 10.0  # a connection no worker takes up within this long is dropped
TILE_CACHE_MB = 128
BLOCK_CACHE_MB = 256


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file the server may send that is not computed: URL path → (bytes, kind in TYPES)."""
    root = resources.files(__package__)
    files = {}
    for name in ("index.html", "view.js", "view.css"):
        files["/" + name] = ((root / "static" / name).read_bytes(), name.rpartition(".")[2])
    osd = root / "vendor" / "openseadragon"
    files["/osd/openseadragon.min.js"] = ((osd / "openseadragon.min.js").read_bytes(), "js")
    files["/osd/LICENSE.txt"] = ((osd / "LICENSE.txt").read_bytes(), "txt")
    for f in (osd / "images").iterdir():
        if f.name.endswith(".png"):
            files[f"/osd/images/{f.name}"] = (f.read_bytes(), "png")
    files["/"] = files["/index.html"]
    return files


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host headers accepted; None for a wildcard bind (then any IP literal with the port)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name was bound: only that name
        return {f"{host.lower()}:{port}"}
    if ip.is_unspecified:
        return None
    names = {f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"}
    if ip.is_loopback:
        names.add(f"localhost:{port}")
    return names


class ViewServer(ThreadingHTTPServer):
    """Serves one ``Source``; at most ``workers`` requests at once, each connection time-bounded."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, source: Source, host: str = "127.0.0.1", port: int = 0, tile_format: str = "jpeg",
                 quality: int = 90, workers: int = WORKERS, tile_cache_mb: int = TILE_CACHE_MB,
                 access_log=None):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.source, self.tile_format, self.quality = source, tile_format, quality
        self.files = static_files()
        self.tiles = LRU(tile_cache_mb << 20)
        self.slots = threading.BoundedSemaphore(workers)
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=100_000)  # (method, path, status)
        self.access_log = access_log
        super().__init__((host, port), Handler)
        self.port = self.server_address[1]
        self.hosts = allowed_hosts(host, self.port)

    def process_request(self, request, client_address):
        # bounded threads: wait for a free worker, drop the connection if none frees up
        if not self.slots.acquire(timeout=WAIT_S):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        h = header.strip().lower()
        if self.hosts is not None:
            return h in self.hosts
        name, _, port = h.rpartition(":")
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return port == str(self.port)

    def log(self, method: str, path: str, status: int) -> None:
        self.requests.append((method, path, status))
        if self.access_log:
            self.access_log(f"{method} {path} {status}")


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    server_version = "wsigen-view"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive: a page fetches hundreds of tiles
    timeout = IDLE_S
    # headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold each keep-alive response back by up to 40 ms
    disable_nagle_algorithm = True

    def handle(self):
        deadline = time.monotonic() + CONNECTION_S
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and time.monotonic() < deadline:
            self.handle_one_request()

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _refuse_method(self):
        self.close_connection = True  # a body may follow that we do not read
        self._send(405, b"method not allowed\n", "txt", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (unknown method, malformed request, …) get our headers too
        self.close_connection = True
        self._send(code, f"{code} {message or self.responses.get(code, ('',))[0]}\n".encode(), "txt")

    def log_message(self, format, *args):  # the server's own log replaces http.server's stderr lines
        pass

    def log_request(self, code="-", size="-"):
        pass

    def _send(self, status: int, data: bytes, kind: str, body: bool = True, cache: str = "no-store",
              extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", TYPES[kind])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", cache)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        if kind == "html":
            self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)
        self.server.log(getattr(self, "command", None) or "-", getattr(self, "path", None) or "-", status)

    def _serve(self, body: bool) -> None:
        if not self.server.host_ok(self.headers.get("Host")):
            self._send(403, b"wrong Host header\n", "txt", body)
            return
        path, _, _query = self.path.partition("?")
        # nothing the routes need is ever encoded, dotted, doubled or back-slashed: refuse it all
        if (not path.startswith("/") or "%" in path or "\\" in path or "//" in path or "/." in path
                or not path.isascii()):
            self._send(404, b"not found\n", "txt", body)
            return
        if path in self.server.files:
            data, kind = self.server.files[path]
            self._send(200, data, kind, body, cache="no-cache")
            return
        if path == "/info.json":
            facts = {**self.server.source.public(), "tile_format": self.server.tile_format,
                     "tile_size": TILE, "overlap": OVERLAP}
            data = json.dumps(facts).encode()
            self._send(200, data, "json", body)
            return
        m = TILE_ROUTE.fullmatch(path)
        data = self._tile(*m.groups()) if m else None
        if data is None:
            self._send(404, b"not found\n", "txt", body)
            return
        self._send(200, data, m.group(6), body,
                   cache="private, max-age=86400, immutable" if m.group(2) else "no-cache")

    def _tile(self, name, gen, level, col, row, fmt) -> bytes | None:
        srv = self.server
        layer = srv.source.snapshot().layers.get(name)
        if layer is None or gen not in (None, layer.gen):  # perhaps it has just appeared: look again
            layer = srv.source.snapshot(fresh=True).layers.get(name)
        if layer is None or gen not in (None, layer.gen):
            return None
        key = (*layer.pyramid.key, int(level), int(col), int(row), fmt)
        cacheable = layer.pyramid.cache is not None
        if cacheable and (hit := srv.tiles.lookup(key)) is not None:
            return hit
        pixels = layer.pyramid.tile(int(level), int(col), int(row), TILE, OVERLAP)
        if pixels is None:
            return None
        data = encode(pixels, fmt, srv.quality)
        if cacheable:
            srv.tiles.put(key, data, len(data))
        return data
