"""``wsigen view``: tiles equal the store's pixels, the server refuses what it must, live stores
grow layers as stages are marked, and a headless Chromium shows the slide."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsigen.slides.store import SlideStore, downsample2
from wsigen.view import layers as layers_mod
from wsigen.view import start, tiles

PINK = (200, 80, 160)
# JPEG q90, 4:4:4 against the exact pixels of `picture` (σ = 6 per-pixel noise, JPEG's worst case:
# it measures 33.3 dB, mean 4.4): PSNR in dB and mean |error| in grey levels
JPEG_PSNR_DB, JPEG_MEAN_ERR = 32.0, 5.0


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(3, h, w) uint8: a colour gradient, a pink disc in the middle, and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([60 + 150 * x / w, 90 + 120 * y / h, 220 - 100 * x / w])
    disc = (x - w / 2) ** 2 + (y - h / 2) ** 2 < (0.3 * min(h, w)) ** 2
    a[:, disc] = np.array(PINK, float)[:, None]
    return np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)


def make_store(path: Path, final=(420, 600), n_stages: int = 3, complete: bool = True,
               min_side: int = 128, upto: int | None = None) -> SlideStore:
    """A store written through SlideStore with ``upto`` stages (default all) marked complete."""
    H, W = final
    sizes = [(-(-H // 2 ** (n_stages - 1 - l)), -(-W // 2 ** (n_stages - 1 - l))) for l in range(n_stages)]
    stages = [{"index": l, "height": h, "width": w, "mpp": 0.5 * 2 ** (n_stages - 1 - l)}
              for l, (h, w) in enumerate(sizes)]
    info = {"torch_version": "test", "config": {"steps": 4, "guided_steps": 3, "input": "/secret/path"},
            "key": {}, "model": {"name": "testmodel", "sha256": "ab" * 32}, "seed": 7,
            "mpp_per_stage": [s["mpp"] for s in stages]}
    store = SlideStore.create(path, stages=stages, final=final, info=info, chunk=128)
    for l in range(n_stages if upto is None else upto):
        write_stage(store, l)
    if complete and upto is None:
        store.finalize(0.5, path.name, min_side=min_side, workers=1)
    return store


def write_stage(store: SlideStore, l: int) -> None:
    st = store.stages[l]
    store.write_rows(l, 0, picture(st["height"], st["width"], seed=l))
    store.mark_stage_complete(l)


def expected_levels(level0: np.ndarray, stored: list[np.ndarray]) -> list[np.ndarray]:
    """Every Deep Zoom level (d = 0 … max): the stored ones, then the store's own 2×2 mean."""
    out = list(stored)
    while max(out[-1].shape[1:]) > 1:
        out.append(downsample2(out[-1]))
    return out


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("view") / "slide.zarr"
    make_store(p)
    return p


@pytest.fixture(scope="module")
def png_server(store_path):
    srv = start(store_path, port=0, tile_format="png")
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv, path: str, method: str = "GET", headers: dict | None = None):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r, body


def raw(srv, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side path normalisation); (status, whole response)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def info(srv) -> dict:
    r, body = get(srv, "/info.json")
    assert r.status == 200
    return json.loads(body)


def layer(srv, name: str) -> dict:
    return {l["name"]: l for l in info(srv)["layers"]}[name]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def fetch_level(srv, lay: dict, level: int, fmt: str) -> np.ndarray:
    """A whole Deep Zoom level put together from its tiles, overlaps cut off."""
    d = lay["max_level"] - level
    w, h = tiles.level_size(lay["width"], lay["height"], d)
    cols, rows = tiles.tile_grid(lay["width"], lay["height"], d)
    out = np.zeros((3, h, w), np.uint8)
    for row in range(rows):
        for col in range(cols):
            r, body = get(srv, f"/{lay['url']}/{level}/{col}_{row}.{fmt}")
            assert r.status == 200 and r.getheader("Content-Type") == f"image/{fmt}"
            x0, y0, x1, y1 = tiles.tile_box(lay["width"], lay["height"], level, col, row)
            t = decode(body)
            assert t.shape == (3, y1 - y0, x1 - x0)
            ox, oy = col * tiles.TILE - x0, row * tiles.TILE - y0
            out[:, row * tiles.TILE : (row + 1) * tiles.TILE, col * tiles.TILE : (col + 1) * tiles.TILE] = \
                t[:, oy : oy + tiles.TILE, ox : ox + tiles.TILE]
    return out


# -- index arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", [(1, 1), (600, 420), (700, 500), (254, 254), (255, 1), (65536, 40000)])
def test_tiles_cover_each_level_once(w, h):
    top = tiles.max_level(w, h)
    assert 2**top >= max(w, h) and (top == 0 or 2 ** (top - 1) < max(w, h))
    assert tiles.level_size(w, h, 0) == (w, h) and tiles.level_size(w, h, top) == (1, 1)
    for level in (0, top // 2, top):
        d = top - level
        lw, lh = tiles.level_size(w, h, d)
        cols, rows = tiles.tile_grid(w, h, d)
        # without overlap the tiles partition the level; with it each grows by one pixel per side
        assert tiles.tile_box(w, h, level, cols - 1, rows - 1, overlap=0)[2:] == (lw, lh)
        assert tiles.tile_box(w, h, level, 0, 0)[:2] == (0, 0)
        assert tiles.tile_box(w, h, level, cols, 0) is None and tiles.tile_box(w, h, level, 0, rows) is None
    assert tiles.tile_box(w, h, top + 1, 0, 0) is None and tiles.tile_box(w, h, -1, 0, 0) is None


def test_level_sizes_are_the_stores():
    from wsigen.slides.store import level_shapes

    for h, w in level_shapes(4097, 3001, 16):
        d = round(np.log2(4097 / h))
        assert tiles.level_size(3001, 4097, d) == (w, h)


def test_lru_is_bounded():
    c = tiles.LRU(100)
    for i in range(10):
        c.put(("a", i), i, 30)
    assert c.bytes <= 100 and c.lookup(("a", 9)) == 9 and c.lookup(("a", 0)) is None
    c.drop(("a",))
    assert c.bytes == 0


def test_pyramid_makes_each_block_once_under_concurrency():
    import threading

    base = picture(1024, 1024)
    reads = []

    def read(x0, y0, x1, y1):
        reads.append((x0, y0, x1, y1))
        time.sleep(0.01)  # let the other threads collide
        return base[:, y0:y1, x0:x1]

    pyr = tiles.Pyramid(1024, 1024, {0: read}, ("t",), tiles.LRU(64 << 20))
    level = pyr.max_level - 3  # 128² from the full 1024² through three rounds of 2×2 means
    got = []
    threads = [threading.Thread(target=lambda: got.append(pyr.tile(level, 0, 0))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 4  # the four 512² boxes of level 0 behind the four blocks of level 1 (512²)
    want = downsample2(downsample2(downsample2(base)))
    for g in got:
        np.testing.assert_array_equal(g, want)


# -- pixels -------------------------------------------------------------------------------------


def test_png_tiles_are_the_stores_pixels_at_every_level(png_server, store_path):
    store = SlideStore.open(store_path)
    stored = [np.asarray(store.level_array(i)[:]) for i in range(len(store.level_names()))]
    assert len(stored) == 4  # 600×420 … 75×53: the rest is computed
    lay = layer(png_server, "final")
    want = expected_levels(stored[0], stored)
    assert len(want) == lay["max_level"] + 1
    for level in range(lay["max_level"] + 1):
        got = fetch_level(png_server, lay, level, "png")
        np.testing.assert_array_equal(got, want[lay["max_level"] - level], err_msg=f"level {level}")


def test_jpeg_tiles_are_within_the_stated_bound(png_server, store_path):
    store = SlideStore.open(store_path)
    lay = layer(png_server, "final")
    level0 = np.asarray(store.level_array(0)[:])
    got = fetch_level(png_server, lay, lay["max_level"], "jpeg")  # the URL's suffix picks the codec
    err = np.abs(got.astype(int) - level0)
    psnr = 10 * np.log10(255**2 / (err**2).mean())
    assert psnr >= JPEG_PSNR_DB and err.mean() <= JPEG_MEAN_ERR, (psnr, err.mean())


@pytest.mark.parametrize("fmt,name", [("ome-tiff", "slide.ome.tif"), ("tiff", "slide.tif"), ("svs", "slide.svs")])
def test_exported_files_serve_the_same_pixels(tmp_path, store_path, fmt, name):
    from wsigen.slides.exporting import export

    out = tmp_path / name
    export(store_path, out, format=fmt, compression="deflate", tile=128)
    srv = start(out, port=0, tile_format="png")
    try:
        store = SlideStore.open(store_path)
        stored = [np.asarray(store.level_array(i)[:]) for i in range(len(store.level_names()))]
        lay = layer(srv, "image")
        want = expected_levels(stored[0], stored)
        for level in (lay["max_level"], lay["max_level"] - 1, lay["max_level"] - 4, 0):
            got = fetch_level(srv, lay, level, "png")
            np.testing.assert_array_equal(got, want[lay["max_level"] - level], err_msg=f"level {level}")
    finally:
        srv.shutdown()
        srv.server_close()


# -- the page and its facts ----------------------------------------------------------------------


def test_page_and_vendored_files(png_server):
    r, body = get(png_server, "/")
    assert r.status == 200 and b"osd/openseadragon.min.js" in body
    assert "script-src 'self'" in r.getheader("Content-Security-Policy")
    r, js = get(png_server, "/osd/openseadragon.min.js")
    assert r.status == 200 and js.startswith(b"//! openseadragon 6.1.1")
    r, png = get(png_server, "/osd/images/zoomin_rest.png")
    assert r.status == 200 and png.startswith(b"\x89PNG")
    r, view_js = get(png_server, "/view.js")
    assert b'prefixUrl: "osd/images/"' in view_js and b"innerHTML" not in view_js


def test_facts_are_whitelisted(png_server):
    d = info(png_server)
    assert (d["width"], d["height"], d["model"], d["seed"], d["synthetic"]) == (600, 420, "testmodel", 7, True)
    assert d["world_um"] == 300.0 and d["steps"] == 4
    assert "/secret/path" not in json.dumps(d) and "config" not in d  # the configuration stays home


# -- what the server refuses ---------------------------------------------------------------------

BAD_PATHS = [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/%2E%2E/etc/passwd", "//etc/passwd",
    "/osd/..\\..\\..\\pyproject.toml", "/osd\\openseadragon.min.js", "/osd/images/../openseadragon.min.js",
    "/osd/./openseadragon.min.js", "/osd//openseadragon.min.js", "/osd/openseadragon.min.js.map",
    "/osd/openseadragon%2emin.js", "/static/index.html", "/view/server.py", "/wsigen/view/__init__.py",
    "/zarr.json", "/0/zarr.json", "/index.htm", "http://127.0.0.1/", "/tiles/../../zarr.json",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_traversal_and_unknown_paths_are_404(png_server, path):
    status, _ = raw(png_server, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{png_server.port}\r\n"
                                f"Connection: close\r\n\r\n".encode())
    assert status == 404


def test_out_of_range_tiles_are_404(png_server):
    lay = layer(png_server, "final")
    url, top = lay["url"], lay["max_level"]
    cols, rows = tiles.tile_grid(600, 420, 0)
    for p in [f"{url}/{top + 1}/0_0.png", f"{url}/{top}/{cols}_0.png", f"{url}/{top}/0_{rows}.png",
              f"{url}/{top}/-1_0.png", f"{url}/0/1_0.png", f"{url}/{top}/0_0.gif", f"{url}/{top}/0_0",
              f"tiles/final/00000000/{top}/0_0.png", f"tiles/stage9/{lay['url'].split('/')[2]}/0/0_0.png",
              "tiles/nope/0/0/0_0.png", f"{url}/{top}/0_0.png/x", f"{url}/99999/0_0.png"]:
        r, _ = get(png_server, "/" + p)
        assert r.status == 404, p
    assert get(png_server, f"/{url}/{top}/{cols - 1}_{rows - 1}.png")[0].status == 200
    r, with_gen = get(png_server, f"/{url}/{top}/1_1.jpeg")
    assert "immutable" in r.getheader("Cache-Control")
    r, without = get(png_server, f"/tiles/final/{top}/1_1.jpeg")  # the layer as it is now (curl)
    assert r.status == 200 and without == with_gen and r.getheader("Cache-Control") == "no-cache"
    for p in (f"tiles/final/abc/{top}/0_0.png", f"tiles/final/{url.split('/')[2]}0/{top}/0_0.png"):
        assert get(png_server, "/" + p)[0].status == 404, p


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_curl_path_as_is(png_server):
    for args in (["--path-as-is", "/../../etc/passwd"], ["--path-as-is", "/%2e%2e/%2e%2e/etc/passwd"],
                 ["--path-as-is", "//etc//passwd"]):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", args[0],
                              f"http://127.0.0.1:{png_server.port}{args[1]}"], capture_output=True, text=True)
        assert out.stdout == "404", args


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1", "127.0.0.1:1",
                                  "localhost.evil.example:{port}", "127.0.0.2:{port}", ""])
def test_wrong_host_is_refused(png_server, host):
    h = host.format(port=png_server.port)
    status, _ = raw(png_server, f"GET / HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n".encode())
    assert status == 403


def test_missing_host_is_refused_and_right_hosts_accepted(png_server):
    assert raw(png_server, b"GET / HTTP/1.0\r\n\r\n")[0] == 403
    for h in (f"127.0.0.1:{png_server.port}", f"localhost:{png_server.port}", f"LOCALHOST:{png_server.port}"):
        assert raw(png_server, f"GET / HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n".encode())[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW"])
def test_only_get_and_head(png_server, method):
    status, _ = raw(png_server, f"{method} / HTTP/1.1\r\nHost: 127.0.0.1:{png_server.port}\r\n"
                                f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert status in (405, 501)


def test_malformed_requests_get_our_headers(png_server):
    for req in (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"BREW / HTTP/1.1\r\n\r\n"):
        status, data = raw(png_server, req)
        assert status in (431, 414, 501) and b"nosniff" in data and b"text/html" not in data


def test_head_and_headers(png_server):
    r, body = get(png_server, "/info.json", "HEAD", {"Origin": "http://evil.example"})
    assert r.status == 200 and body == b"" and int(r.getheader("Content-Length")) > 0
    for path in ("/", "/info.json", "/nope", f"/{layer(png_server, 'final')['url']}/0/0_0.png"):
        r, _ = get(png_server, path, headers={"Origin": "http://evil.example"})
        names = {k.lower() for k, _ in r.getheaders()}
        assert r.getheader("X-Content-Type-Options") == "nosniff", path
        assert not any(n.startswith("access-control-") for n in names), path
        assert "python" not in (r.getheader("Server") or "").lower()


def test_worker_threads_are_bounded(store_path, monkeypatch):
    import threading

    from wsigen.view import server

    monkeypatch.setattr(server.Handler, "timeout", 0.4)  # idle connections close sooner
    srv = start(store_path, port=0, workers=2)
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(6)]  # idle clients
    try:
        time.sleep(0.2)
        busy = [t for t in threading.enumerate() if "process_request_thread" in t.name and t.is_alive()]
        assert len(busy) == 2
        r, _ = get(srv, "/info.json")  # served once the idle ones have timed out
        assert r.status == 200
    finally:
        for s in socks:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_the_store_is_never_written(tmp_path):
    p = tmp_path / "ro.zarr"
    make_store(p)
    before = {f: f.stat().st_mtime_ns for f in p.rglob("*")}
    srv = start(p, port=0, tile_format="png")
    try:
        lay = layer(srv, "final")
        for level in range(lay["max_level"] + 1):
            assert get(srv, f"/{lay['url']}/{level}/0_0.png")[0].status == 200
    finally:
        srv.shutdown()
        srv.server_close()
    assert {f: f.stat().st_mtime_ns for f in p.rglob("*")} == before  # no lock, no file, no touch


def test_a_port_in_use_is_one_line_error(png_server, store_path):
    from wsigen.errors import WsigenError

    with pytest.raises(WsigenError, match=f"cannot listen on 127.0.0.1:{png_server.port}"):
        start(store_path, port=png_server.port)


def test_bad_slides_are_one_line_errors(tmp_path):
    from wsigen.errors import WsigenError

    with pytest.raises(WsigenError, match="not found"):
        start(tmp_path / "missing.zarr", port=0)
    (tmp_path / "folder").mkdir()
    with pytest.raises(WsigenError, match="not a zarr store"):
        start(tmp_path / "folder", port=0)


# -- a store being written ------------------------------------------------------------------------


def test_live_store_grows_a_layer_per_marked_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(layers_mod, "REFRESH_S", 0.0)
    p = tmp_path / "live.zarr"
    store = make_store(p, n_stages=3, upto=0)
    srv = start(p, port=0, tile_format="png")
    try:
        d = info(srv)
        assert d["live"] and d["layers"] == [] and not d["complete"]
        gen0 = layers_mod._generation(p / "stages" / "0")
        assert get(srv, f"/tiles/stage0/{gen0}/0/0_0.png")[0].status == 404  # not marked: not served

        store.write_rows(0, 0, picture(105, 150, seed=0))  # written but not yet marked
        assert [l["name"] for l in info(srv)["layers"]] == []
        store.mark_stage_complete(0)
        lay = layer(srv, "stage0")
        assert lay["url"] == f"tiles/stage0/{gen0}" and lay["world_width"] == pytest.approx(1.0)
        np.testing.assert_array_equal(fetch_level(srv, lay, lay["max_level"], "png"), picture(105, 150, seed=0))

        write_stage(store, 1)
        write_stage(store, 2)  # the last stage is level 0; the pyramid does not exist yet
        assert [l["name"] for l in info(srv)["layers"]] == ["stage0", "stage1", "stage2"]
        store.finalize(0.5, "live", min_side=128, workers=1)
        d = info(srv)
        assert [l["name"] for l in d["layers"]] == ["stage0", "stage1", "final"] and not d["live"]
        assert get(srv, f"/{layer(srv, 'final')['url']}/0/0_0.png")[0].status == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_store_written_again_drops_its_old_tiles(tmp_path, monkeypatch):
    monkeypatch.setattr(layers_mod, "REFRESH_S", 0.0)
    p = tmp_path / "again.zarr"
    store = make_store(p, n_stages=2, upto=1)
    srv = start(p, port=0, tile_format="png")
    try:
        old = layer(srv, "stage0")
        assert get(srv, f"/{old['url']}/{old['max_level']}/0_0.png")[0].status == 200
        time.sleep(0.01)  # a new mtime for the recreated arrays
        store = SlideStore.create(p, stages=store.stages, final=(420, 600), info=store.info, chunk=128,
                                  overwrite=True)
        assert info(srv)["layers"] == []
        assert get(srv, f"/{old['url']}/{old['max_level']}/0_0.png")[0].status == 404
        store.write_rows(0, 0, np.full((3, 210, 300), 9, np.uint8))
        store.mark_stage_complete(0)
        new = layer(srv, "stage0")
        assert new["url"] != old["url"]
        assert decode(get(srv, f"/{new['url']}/{new['max_level']}/0_0.png")[1]).max() == 9
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_sampling_run_killed_after_stage_2_then_resumed(tmp_path, monkeypatch):
    """The real sampler: stages appear as the run marks them, the final pyramid when it completes."""
    from wsigen.api import sample

    monkeypatch.setattr(layers_mod, "REFRESH_S", 0.0)
    p = tmp_path / "run.zarr"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WSIGEN_FAULT": "stage:3"}
    r = subprocess.run([*CLI, "sample", "--model", "gaussian", "--patch", "64", "--size", "700x500", "--steps", "4",
                        "--threads", "1", "-o", str(p)], env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    srv = start(p, port=0, tile_format="png")
    try:
        d = info(srv)
        assert [l["name"] for l in d["layers"]] == ["stage0", "stage1", "stage2"] and d["live"]
        assert d["stages_complete"] == [0, 1, 2] and len(d["stages"]) == 5
        s2 = layer(srv, "stage2")
        want = np.asarray(SlideStore.open(p).stage_array(2)[:])
        np.testing.assert_array_equal(fetch_level(srv, s2, s2["max_level"], "png"), want)
        sample(p, resume=True, threads=1)
        d = info(srv)
        assert [l["name"] for l in d["layers"]] == ["stage0", "stage1", "stage2", "stage3", "final"]
        assert d["complete"] and not d["live"]
        fin = layer(srv, "final")
        np.testing.assert_array_equal(fetch_level(srv, fin, fin["max_level"], "png"),
                                      np.asarray(SlideStore.open(p).level_array(0)[:]))
    finally:
        srv.shutdown()
        srv.server_close()


# -- the command ---------------------------------------------------------------------------------

CLI = [sys.executable, "-c", "from wsigen.cli import main; main()"]


def test_cli_serves_and_stops_cleanly_on_ctrl_c(store_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([*CLI, "view", str(store_path), "--no-browser", "--port", "0"], env=env,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/info.json")
        assert c.getresponse().status == 200
        c.close()
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
        assert "stopped" in p.stderr.read()
    finally:
        p.kill()


def test_cli_bad_slide_and_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([*CLI, "view", str(tmp_path / "nope.zarr"), "--no-browser"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("wsigen: ") and len(r.stderr.splitlines()) == 1
    r = subprocess.run([*CLI, "view", str(tmp_path / "nope.zarr"), "--host", "0.0.0.0", "--no-browser"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no authentication" in r.stderr


# -- a real browser ------------------------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None,
                    reason="Debian's chromium is not installed (make install adds it where apt works)")
def test_headless_chromium_zooms_and_shows_the_slide(tmp_path):
    p = tmp_path / "big.zarr"
    make_store(p, final=(1536, 2048), n_stages=2, min_side=256)
    srv = start(p, port=0)
    try:
        top = layer(srv, "final")["max_level"]
        shot = tmp_path / "shot.png"
        cmd = [_chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=600,400",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
               f"--screenshot={shot}", f"http://127.0.0.1:{srv.port}/?zoom=8&x=0.5&y=0.5"]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        subprocess.run(cmd, capture_output=True, timeout=90, check=True)
        levels = {int(path.split("/")[4]) for m, path, status in srv.requests
                  if path.startswith("/tiles/final/") and status == 200}
        # the page opened at the overview, then the URL's zoom ×8 fetched full-resolution tiles
        assert min(levels) < top - 2 and max(levels) == top, sorted(levels)
        rgb = np.asarray(Image.open(shot).convert("RGB"))
        h, w = rgb.shape[:2]
        centre = np.median(rgb[int(0.5 * h) : int(0.65 * h), int(0.4 * w) : int(0.6 * w)].reshape(-1, 3), axis=0)
        assert np.abs(centre - PINK).max() <= 12, centre
    finally:
        srv.shutdown()
        srv.server_close()


def test_facts_name_the_live_writer_from_a_probe(tmp_path):
    """Beside a live writer the page says who writes the store (a probe: the lock stays theirs)."""
    from wsigen.slides import storelock

    p = tmp_path / "live.zarr"
    make_store(p, complete=False)
    assert layers_mod.store_facts(SlideStore.open(p))["writer"] is None
    lock = storelock.acquire(p, command="wsigen sample")
    try:
        writer = layers_mod.store_facts(SlideStore.open(p))["writer"]
        assert writer is not None and f"PID {os.getpid()}@" in writer
        assert storelock.probe(p) is not None  # still held by the writer after the viewer looked
    finally:
        lock.release()
    assert layers_mod.store_facts(SlideStore.open(p))["writer"] is None
