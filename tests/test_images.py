"""athwe.dataset.images against a real HTTP server on 127.0.0.1: statuses, retries, timeouts, size
limit, validation, atomic files, manifest and resumption without requests."""
from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures_amazon as fx
from athwe.dataset.images import (
    collect_image_urls,
    download_dataset_images,
    download_images,
    find_image,
    image_stem,
)
from athwe.dataset.importers import import_dataset
from athwe.errors import DataError

MAX_BYTES = 5000
TIMEOUT = 0.5


def encode(fmt: str, size: int = 48, seed: int = 0) -> bytes:
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 5 + seed, y * 5, (x + y) * 2], -1).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


PNG, JPEG, GIF, WEBP = encode("PNG"), encode("JPEG"), encode("GIF"), encode("WEBP")
assert max(len(PNG), len(JPEG), len(GIF), len(WEBP)) < MAX_BYTES


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog (5) overflows under load: refused connections


class Server:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.flaky_calls = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def send(self, code: int, body: bytes, ctype: str = "image/png", length: int | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path
                with srv.lock:
                    srv.counts[path] += 1
                try:
                    srv.route(self, path)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeouts, size limit): expected

        self.httpd = _Httpd(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, h: BaseHTTPRequestHandler, path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        if name in ("p.png", "p2.png", "p3.png", "p4.png"):
            h.send(200, PNG)
        elif name == "j.jpg":
            h.send(200, JPEG, "image/jpeg")
        elif name == "g.gif":
            h.send(200, GIF, "image/gif")
        elif name == "w.img":  # no extension in the URL: the format decides
            h.send(200, WEBP, "application/octet-stream")
        elif name.startswith("missing"):
            h.send(404, b"not here", "text/plain")
        elif name == "forbidden":
            h.send(403, b"no", "text/plain")
        elif name == "slow.png":
            time.sleep(3 * TIMEOUT)
            h.send(200, PNG)
        elif name == "trickle.png":  # every byte in time, the whole transfer too slow
            body = PNG * 3
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for k in range(0, len(body), 16):
                h.wfile.write(body[k:k + 16])
                h.wfile.flush()
                time.sleep(0.05)
        elif name == "truncated.jpg":
            h.send(200, JPEG[: len(JPEG) * 6 // 10], "image/jpeg")
        elif name == "short.png":  # promises more than it sends, then closes
            h.send(200, PNG[:50], length=len(PNG))
        elif name == "page.html":
            h.send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
        elif name == "big.png":
            h.send(200, b"\x89PNG" + b"\0" * (4 * MAX_BYTES))
        elif name == "big-stream.png":  # no Content-Length: the limit must stop the read
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.end_headers()
            for _ in range(8):
                h.wfile.write(b"\0" * MAX_BYTES)
        elif name == "flaky.png":
            with self.lock:
                self.flaky_calls += 1
                first = self.flaky_calls == 1
            if first:
                h.send(500, b"oops", "text/plain")
            else:
                h.send(200, PNG)
        else:
            h.send(404, b"?", "text/plain")

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s = Server()
    yield s
    s.close()


def run(folder: Path, urls: dict, **kw) -> dict:
    opts = dict(max_workers=8, timeout=TIMEOUT, retries=1, max_bytes=MAX_BYTES, progress=False, backoff=0.01)
    opts.update(kw)
    return download_images(folder, urls, **opts)


EXPECTED = {  # item -> (status, extension of the kept file or None)
    "P1": ("ok", "png"), "J1": ("ok", "jpg"), "G1": ("ok", "gif"), "W1": ("ok", "webp"),
    "N1": ("not_found", None), "Q1": ("http_error", None), "S1": ("timeout", None),
    "K1": ("timeout", None), "T1": ("truncated", None), "R1": ("truncated", None),
    "H1": ("not_image", None), "L1": ("too_large", None), "L2": ("too_large", None),
    "F1": ("ok", "png"), "M1": ("ok", "png"), "E1": ("no_url", None), "X1": ("bad_url", None),
    "C1": ("connection_error", None), "a/b": ("ok", "png"),
}


def item_urls(s: Server) -> dict[str, list[str]]:
    return {
        "P1": [s.url("p.png")], "J1": [s.url("j.jpg")], "G1": [s.url("g.gif")], "W1": [s.url("w.img")],
        "N1": [s.url("missing")], "Q1": [s.url("forbidden")], "S1": [s.url("slow.png")],
        "K1": [s.url("trickle.png")], "T1": [s.url("truncated.jpg")], "R1": [s.url("short.png")],
        "H1": [s.url("page.html")], "L1": [s.url("big.png")], "L2": [s.url("big-stream.png")],
        "F1": [s.url("flaky.png")], "M1": [s.url("missing2"), s.url("p2.png")], "E1": [],
        "X1": ["file:///etc/passwd", "ftp://127.0.0.1/x.png"], "C1": ["http://127.0.0.1:1/x.png"],
        "a/b": [s.url("p3.png")],
    }


def disk_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "images").iterdir())


def test_download_statuses_files_manifest_and_resume(tmp_path, server):
    folder = tmp_path / "ds"
    folder.mkdir()
    urls = item_urls(server)
    t0 = time.perf_counter()
    m = run(folder, urls, total_timeout=0.4)
    assert time.perf_counter() - t0 < 6
    got = {item: e["status"] for item, e in m["items"].items()}
    assert got == {item: st for item, (st, _) in EXPECTED.items()}

    # only valid images are kept, with the decoded format's extension; no temporary files
    kept = sorted(f"{image_stem(i)}.{ext}" for i, (_, ext) in EXPECTED.items() if ext)
    assert disk_files(folder) == sorted(kept + ["manifest.json"])
    assert "a%2Fb.png" in kept
    for item, (_, ext) in EXPECTED.items():
        e = m["items"][item]
        if ext:
            p = find_image(folder, item)
            assert p is not None and p.suffix == f".{ext}" and e["file"] == f"images/{p.name}"
            assert e["bytes"] == p.stat().st_size
            with Image.open(p) as im:
                im.load()
                assert {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}[im.format] == ext
        else:
            assert find_image(folder, item) is None and e["file"] is None and e["bytes"] == 0
    assert m["items"]["M1"]["url"] == server.url("p2.png")  # the first URL 404s, the second works
    assert m["items"]["M1"]["bytes"] == len(PNG)
    assert m["items"]["P1"]["url"] == server.url("p.png") and m["items"]["J1"]["bytes"] == len(JPEG)

    # retries: 5xx and timeouts and interrupted bodies are retried (retries=1), 404/403/too large not
    c = server.counts
    assert c["/flaky.png"] == 2 and c["/slow.png"] == 2 and c["/short.png"] == 2 and c["/trickle.png"] == 2
    assert c["/missing"] == 1 and c["/forbidden"] == 1 and c["/big.png"] == 1 and c["/big-stream.png"] == 1
    assert c["/truncated.jpg"] == 1 and c["/page.html"] == 1 and c["/p.png"] == 1
    assert "Content-Length" in " ".join(m["items"]["L1"]["errors"])

    # the manifest on disk is the returned one
    on_disk = json.loads((folder / "images" / "manifest.json").read_text())
    assert on_disk == m
    assert m["counts"]["ok"] == 7 and m["with_image"] == 7 and not m["interrupted"]

    # a second run: finished items are skipped without any request, failed ones are tried again
    server.counts.clear()
    m2 = run(folder, urls, retries=0, total_timeout=0.4)
    ok_items = [i for i, (st, _) in EXPECTED.items() if st == "ok"]
    for item in ok_items:
        assert m2["items"][item]["status"] == "skipped"
        assert m2["items"][item]["file"] == m["items"][item]["file"]
        assert m2["items"][item]["url"] == m["items"][item]["url"]
    ok_paths = ["/p.png", "/j.jpg", "/g.gif", "/w.img", "/flaky.png", "/p2.png", "/p3.png"]
    assert sum(server.counts[p] for p in ok_paths) == 0 and server.counts["/missing2"] == 0
    assert server.counts["/missing"] == 1 and server.counts["/page.html"] == 1
    assert m2["counts"]["skipped"] == 7 and m2["this_run"]["counts"]["skipped"] == 7
    assert disk_files(folder) == sorted(kept + ["manifest.json"])


def test_existing_files_without_manifest(tmp_path, server):
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "V1.jpg").write_bytes(JPEG)  # valid: kept, no request
    (folder / "images" / "D1.jpg").write_bytes(JPEG[:300])  # damaged: fetched again and replaced
    m = run(folder, {"V1": [server.url("p.png")], "D1": [server.url("p4.png")]})
    assert m["items"]["V1"]["status"] == "skipped" and m["items"]["V1"]["bytes"] == len(JPEG)
    assert m["items"]["D1"]["status"] == "ok" and m["items"]["D1"]["file"] == "images/D1.png"
    assert server.counts["/p.png"] == 0 and server.counts["/p4.png"] == 1
    assert disk_files(folder) == ["D1.png", "V1.jpg", "manifest.json"]


def test_images_from_an_imported_dataset(tmp_path, server):
    exp = fx.write_amazon2018(tmp_path / "raw", gz=False)
    text = exp["meta"].read_text(encoding="utf-8").replace(fx.IMG, server.base)
    exp["meta"].write_text(text, encoding="utf-8")
    import_dataset(exp["reviews"], tmp_path / "data", "kt", meta=exp["meta"])
    folder = tmp_path / "data" / "kt"
    urls = collect_image_urls(folder)
    assert sorted(urls) == ["B001", "B002", "B003", "B004", "B005", "B006"]
    assert urls["B003"] == [] and urls["B001"][0] == f"{server.base}/B001-0.jpg"
    m = download_dataset_images(folder, max_workers=4, timeout=TIMEOUT, retries=0, progress=False)
    # the fixture server 404s these paths: every candidate URL of every item is tried once
    assert m["items"]["B001"]["status"] == "not_found" and len(m["items"]["B001"]["errors"]) == 4
    assert m["items"]["B003"]["status"] == "no_url"
    assert sum(server.counts.values()) == sum(len(v) for v in urls.values())


def test_collect_urls_needs_metadata(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no x.meta.jsonl"):
        collect_image_urls(tmp_path / "x")
    (tmp_path / "x" / "x.item").write_text("item_id:token\timage_url:token\nI1\thttp://h/a.jpg\nI2\t\n")
    assert collect_image_urls(tmp_path / "x") == {"I1": ["http://h/a.jpg"], "I2": []}
    (tmp_path / "x" / "x.item").write_text("item_id:float\timage_url:token\n1\thttp://h/a.jpg\n")
    with pytest.raises(DataError, match=r"x\.item: id column item_id must be typed token, not float"):
        collect_image_urls(tmp_path / "x")
    (tmp_path / "x" / "x.meta.jsonl").write_text('{"item": "I1", "image_urls": ["u"]}\nnot json\n')
    with pytest.raises(DataError, match=r"x\.meta\.jsonl:2: bad metadata record"):
        collect_image_urls(tmp_path / "x")


def test_metadata_records_checked_by_both_readers(tmp_path):
    from athwe.feature_extraction.items import read_meta_category_paths

    d = tmp_path / "x"
    d.mkdir()
    (d / "x.meta.jsonl").write_text('{"item": "I1", "categories": [["A", "B"]], "image_urls": null}\n'
                                    '\n{"item": "I2", "categories": null, "image_urls": ["u", ""]}\n')
    assert read_meta_category_paths(d, "x") == {"I1": [["A", "B"]], "I2": []}
    assert collect_image_urls(d) == {"I1": [], "I2": ["u"]}
    (d / "x.meta.jsonl").write_text('{"item": "I1", "categories": "A > B"}\n')
    with pytest.raises(DataError, match=r"x\.meta\.jsonl:1: bad metadata record \(categories must be a list"):
        read_meta_category_paths(d, "x")
    (d / "x.meta.jsonl").write_text('{"item": 7, "image_urls": []}\n')
    with pytest.raises(DataError, match=r"x\.meta\.jsonl:1: bad metadata record \(item must be a string"):
        collect_image_urls(d)
