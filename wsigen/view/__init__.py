"""``wsigen view``: pan and zoom a slide in the browser, straight from the store, even mid-run.

``start`` returns a running server (tests, benchmarks); ``view`` serves in the foreground until
Ctrl-C. See docs/view.md for the routes and what the server refuses.
"""

from __future__ import annotations

import ipaddress
import os
import threading

from ..errors import UsageError, WsigenError

FORMATS = ("jpeg", "png")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(slide: str | os.PathLike, *, port: int = 8765, host: str = "127.0.0.1", tile_format: str = "jpeg",
          quality: int = 90, workers: int | None = None, cache_mb: int | None = None, access_log=None):
    """A ``ViewServer`` for ``slide`` answering on a background thread; ``.shutdown()`` stops it."""
    from .layers import Source
    from .server import BLOCK_CACHE_MB, TILE_CACHE_MB, WORKERS, ViewServer
    from .tiles import LRU

    if tile_format not in FORMATS:
        raise UsageError(f"--tile-format must be jpeg or png (got {tile_format!r})")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be 1 … 100 (got {quality})")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 … 65535 (got {port})")
    source = Source(slide, LRU((cache_mb if cache_mb is not None else BLOCK_CACHE_MB) << 20))
    try:
        srv = ViewServer(source, host, port, tile_format, quality, workers or WORKERS,
                         cache_mb if cache_mb is not None else TILE_CACHE_MB, access_log)
    except OSError as e:
        raise WsigenError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                          "pick another --port (0: any free one)") from None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                              name="wsigen-view", daemon=True)
    thread.start()
    srv.thread = thread
    return srv


def url_of(srv) -> str:
    host = srv.server_address[0]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{srv.port}/"


def view(slide: str | os.PathLike, *, port: int = 8765, host: str = "127.0.0.1", open_browser: bool = True,
         tile_format: str = "jpeg", quality: int = 90, log=print, access_log: bool = False) -> None:
    """Serve ``slide`` (a store, finished or not, or an image file) until Ctrl-C; open a browser."""
    if not _loopback(host):
        log(f"warning: serving on {host}, not only this machine: there is no authentication, "
            "anyone who can reach this address can view the slide")
    srv = start(slide, port=port, host=host, tile_format=tile_format, quality=quality,
                access_log=log if access_log else None)
    url = url_of(srv)
    log(f"serving {slide} at {url} (Ctrl-C to stop)")
    try:
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        stop = threading.Event()
        while not stop.wait(0.5):  # the main thread waits here, so Ctrl-C reaches it
            if not srv.thread.is_alive():
                break
    except KeyboardInterrupt:
        log("stopped")
    finally:
        srv.shutdown()
        srv.server_close()
