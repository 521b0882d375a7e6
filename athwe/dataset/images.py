"""Download item images into a dataset folder: `<dataset>/images/<item>.<ext>` plus a manifest.

`download_images(dataset_dir, {item_token: [url, ...]})` fetches, for every item, the first URL
that yields a valid image, with

* bounded concurrency (a thread pool; each worker uses urllib.request),
* a timeout per socket operation (`timeout`) and per attempt (`total_timeout`, default
  4 x timeout, so a server trickling bytes cannot hold a worker forever),
* retries with exponential backoff (`backoff * 2**attempt` seconds) on timeouts, connection
  errors, interrupted bodies and HTTP 5xx/408/429, never on 404/410 or other 4xx,
* a size limit: a Content-Length above `max_bytes`, or a body that grows past it, stops the
  transfer (status too_large) and the next URL of the item is tried,
* validation with Pillow (open, verify, then a full decode, which catches truncated JPEGs):
  only JPEG/PNG/WebP/GIF are kept; the extension comes from the decoded format, not the URL,
* atomic writes (temporary file in images/, then rename): a crash never leaves a partial image,
* resumability: an item whose valid image is already on disk is skipped without any request
  (when the previous manifest lists the file with the same size, it is not even re-decoded).

Only http and https URLs are fetched. Per item the manifest (`images/manifest.json`) records
status, url, bytes, file and, for failures, what each URL gave. Statuses:
ok, skipped (valid file already present), no_url, bad_url, not_found (404/410), http_error
(other HTTP errors, 5xx after retries), timeout, connection_error, too_large, not_image
(not decodable as an image, or a format other than JPEG/PNG/WebP/GIF), truncated (an image
that does not decode completely, or a body shorter than its Content-Length).
An item's status is `ok` when any URL worked; otherwise the status of its LAST URL.
Failed items are retried on the next run; their entries are replaced.

File names: the item token percent-encoded (`urllib.parse.quote`, so `/` and other unsafe
characters cannot escape the folder; Amazon ids are unchanged); use `image_path()` /
`find_image()` to locate an item's image.

Note: truncation detection relies on Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from athwe.dataset.meta import read_meta
from athwe.errors import DataError
from athwe.utils import atomic_path, atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
IMAGES_DIR = "images"
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
IMAGE_EXTS = ("jpg", "png", "webp", "gif", "jpeg")  # looked for on disk, in this order
STATUSES = ("ok", "skipped", "no_url", "bad_url", "not_found", "http_error", "timeout", "connection_error",
            "too_large", "not_image", "truncated")
RETRY_HTTP = {408, 429, 500, 502, 503, 504}
USER_AGENT = "Mozilla/5.0 (compatible; athwe-image-fetch/0.1)"
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# file names and validation


def image_stem(item_token: str) -> str:
    """File name stem of an item's image: the token percent-encoded (never a path, never hidden)."""
    stem = urllib.parse.quote(str(item_token), safe="-_.~@+=,")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    return stem


def image_path(dataset_dir: str | Path, item_token: str, ext: str) -> Path:
    return Path(dataset_dir) / IMAGES_DIR / f"{image_stem(item_token)}.{ext}"


def find_image(dataset_dir: str | Path, item_token: str) -> Path | None:
    """The item's image file under `<dataset>/images/`, if any (not validated)."""
    for ext in IMAGE_EXTS:
        p = image_path(dataset_dir, item_token, ext)
        if p.is_file():
            return p
    return None


def validate_image_bytes(data: bytes) -> tuple[str, str | None, str]:
    """(status, extension, detail): ('ok', 'jpg', 'JPEG 64x64') or a failure status."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            size = im.size
            im.verify()
    except UnidentifiedImageError:
        return "not_image", None, "not a recognised image format"
    except Image.DecompressionBombError as e:
        return "too_large", None, f"decompression bomb ({e})"
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
        return "truncated", None, f"{type(e).__name__}: {e}"
    if fmt not in FORMAT_EXT:
        return "not_image", None, f"unsupported image format {fmt}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        return "too_large", None, f"decompression bomb ({e})"
    except Exception as e:  # noqa: BLE001
        return "truncated", None, f"{type(e).__name__}: {e}"
    return "ok", FORMAT_EXT[fmt], f"{fmt} {size[0]}x{size[1]}"


def _valid_existing(path: Path, known_bytes: int | None) -> bool:
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if known_bytes is not None and known_bytes == size:
        return True  # the previous run validated exactly this file
    try:
        status, ext, _ = validate_image_bytes(path.read_bytes())
    except OSError:
        return False
    return status == "ok" and path.suffix.lower().lstrip(".") in (ext, "jpeg" if ext == "jpg" else ext)


# ---------------------------------------------------------------------------------------------
# URLs from a dataset folder


def collect_image_urls(dataset_dir: str | Path, name: str | None = None) -> dict[str, list[str]]:
    """item token -> candidate URLs, from `<name>.meta.jsonl` (written by the importer) or, when
    that is missing, from an image URL column of `<name>.item` (image_url, imUrl, image)."""
    d = Path(dataset_dir)
    name = name or d.name
    meta = d / f"{name}.meta.jsonl"
    out: dict[str, list[str]] = {}
    if meta.is_file():
        for item, urls in read_meta(meta, "image_urls", lambda v: isinstance(v, list), "image_urls must be a list"):
            out.setdefault(item, [str(u) for u in urls if u])
        return out
    item_file = d / f"{name}.item"
    if item_file.is_file():
        from athwe.dataset.atomic import read_atomic

        table = read_atomic(item_file)
        icol = table.find_token("item_id", "item", "iid", "asin", "parent_asin")
        ucol = table.find("image_url", "imUrl", "image", "image_urls")
        if icol is not None and ucol is not None:
            vals = table.columns[ucol]
            for item, v in zip(table.columns[icol], vals):
                urls = v if isinstance(v, list) else [v]
                out.setdefault(item, [u for u in urls if u.lower().startswith(("http://", "https://"))])
            return out
    raise DataError(f"{d}: no {name}.meta.jsonl and no image URL column (image_url) in {name}.item; "
                    f"import the dataset with `athwe data import` first")


# ---------------------------------------------------------------------------------------------
# fetching


@dataclass
class _Attempt:
    status: str
    detail: str = ""
    data: bytes | None = None
    retry: bool = False


def _timeout_error(e: BaseException) -> bool:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return True
    reason = getattr(e, "reason", None)
    return isinstance(reason, (socket.timeout, TimeoutError))


def _fetch_once(url: str, timeout: float, total_timeout: float, max_bytes: int, user_agent: str) -> _Attempt:
    start = time.monotonic()
    req = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.5"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked by caller
            length = resp.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                return _Attempt("too_large", f"Content-Length {int(length)} > max_bytes {max_bytes}")
            buf = bytearray()
            read = getattr(resp, "read1", resp.read)  # read1: whatever has arrived, so the deadline is checked
            while True:
                chunk = read(CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > max_bytes:
                    return _Attempt("too_large", f"body exceeds max_bytes {max_bytes}")
                if time.monotonic() - start > total_timeout:
                    return _Attempt("timeout", f"transfer took over {total_timeout:g} s", retry=True)
            if length is not None and length.strip().isdigit() and len(buf) < int(length):
                return _Attempt("truncated", f"body ended early ({len(buf)} of {int(length)} bytes)", retry=True)
            return _Attempt("ok", data=bytes(buf))
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            return _Attempt("not_found", f"HTTP {e.code}")
        return _Attempt("http_error", f"HTTP {e.code}", retry=e.code in RETRY_HTTP)
    except http.client.IncompleteRead as e:
        return _Attempt("truncated", f"body ended early ({len(e.partial)} bytes read)", retry=True)
    except ValueError as e:  # malformed URL (http.client.InvalidURL is a ValueError too)
        return _Attempt("bad_url", str(e))
    except Exception as e:  # noqa: BLE001 - URLError, OSError, HTTPException, ValueError
        if _timeout_error(e):
            return _Attempt("timeout", f"no response within {timeout:g} s", retry=True)
        reason = getattr(e, "reason", e)
        return _Attempt("connection_error", f"{type(reason).__name__}: {reason}", retry=True)


def _fetch(url: str, opts: "_Options") -> _Attempt:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return _Attempt("bad_url", f"unsupported URL scheme {scheme!r}")
    attempt = _Attempt("interrupted")
    for k in range(opts.retries + 1):
        if opts.stop.is_set():
            break
        attempt = _fetch_once(url, opts.timeout, opts.total_timeout, opts.max_bytes, opts.user_agent)
        if attempt.status == "ok" or not attempt.retry or k == opts.retries:
            break
        time.sleep(opts.backoff * (2 ** k))
    return attempt


@dataclass
class _Options:
    timeout: float
    total_timeout: float
    retries: int
    backoff: float
    max_bytes: int
    user_agent: str
    stop: threading.Event = field(default_factory=threading.Event)


def _process_item(dataset_dir: Path, item: str, urls: list[str], previous: dict | None,
                  opts: _Options) -> dict | None:
    existing = [image_path(dataset_dir, item, e) for e in IMAGE_EXTS]
    existing = [p for p in existing if p.is_file()]
    known = previous.get("bytes") if previous and previous.get("status") in ("ok", "skipped") \
        and previous.get("file") else None
    invalid = []
    for p in existing:
        same = known if previous and previous.get("file") == f"{IMAGES_DIR}/{p.name}" else None
        if _valid_existing(p, same):
            entry = {"status": "skipped", "url": (previous or {}).get("url"), "bytes": p.stat().st_size,
                     "file": f"{IMAGES_DIR}/{p.name}"}
            return entry
        invalid.append(p)
    if not urls:
        return {"status": "no_url", "url": None, "bytes": 0, "file": None}
    errors = []
    last, last_url = _Attempt("no_url"), urls[0]
    for url in urls:
        att = _fetch(url, opts)
        if att.status == "interrupted":
            if last.status == "no_url":
                return None  # nothing was tried: leave no record, the next run starts over
            break
        if att.status == "ok":
            status, ext, detail = validate_image_bytes(att.data or b"")
            if status == "ok":
                final = image_path(dataset_dir, item, ext)
                with atomic_path(final) as tmp:
                    tmp.write_bytes(att.data)
                for p in invalid:
                    if p != final:
                        p.unlink(missing_ok=True)  # a damaged earlier copy under another extension
                return {"status": "ok", "url": url, "bytes": len(att.data), "file": f"{IMAGES_DIR}/{final.name}",
                        "format": detail}
            att = _Attempt(status, detail)
        errors.append(f"{url}: {att.status} ({att.detail})" if att.detail else f"{url}: {att.status}")
        last = att
        last_url = url
        if opts.stop.is_set():
            break
    entry = {"status": last.status, "url": last_url, "bytes": 0, "file": None, "errors": errors}
    if invalid:
        entry["invalid_existing"] = [f"{IMAGES_DIR}/{p.name}" for p in invalid]
    return entry


def _read_manifest(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        items = blob.get("items")
        return items if isinstance(items, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def download_images(
    dataset_dir: str | Path,
    urls: dict[str, list[str]],
    max_workers: int = 8,
    timeout: float = 10.0,
    retries: int = 2,
    max_bytes: int = 5_000_000,
    progress: bool = True,
    *,
    total_timeout: float | None = None,
    backoff: float = 0.5,
    user_agent: str = USER_AGENT,
) -> dict:
    """Download every item's first working image URL into `<dataset_dir>/images/` and return the
    manifest (also written to `images/manifest.json`); see the module docstring for the rules."""
    from tqdm import tqdm

    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if timeout <= 0 or retries < 0 or max_bytes < 1:
        raise ValueError("timeout and max_bytes must be positive and retries >= 0")
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DataError(f"{dataset_dir}: dataset folder not found")
    img_dir = dataset_dir / IMAGES_DIR
    img_dir.mkdir(exist_ok=True)
    manifest_path = img_dir / MANIFEST
    previous = _read_manifest(manifest_path)
    opts = _Options(timeout=float(timeout), total_timeout=float(total_timeout or 4 * timeout), retries=int(retries),
                    backoff=float(backoff), max_bytes=int(max_bytes), user_agent=user_agent)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    interrupted = False
    items = list(urls.items())
    bar = tqdm(total=len(items), unit="img", desc="images", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="athwe-img")
    pending: dict[Future, str] = {}
    try:
        it = iter(items)
        # keep at most 4 x max_workers items in flight (a million items need not be queued at once)
        while True:
            while len(pending) < 4 * max_workers:
                nxt = next(it, None)
                if nxt is None:
                    break
                item, cand = nxt
                pending[pool.submit(_process_item, dataset_dir, item, list(cand or []), previous.get(item),
                                    opts)] = item
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                entry = fut.result()
                if entry is not None:
                    results[item] = entry
                bar.update(1)
    except BaseException:
        interrupted = True
        opts.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fut, item in pending.items():  # after an interruption: keep what the workers finished
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result() is not None:
                results[item] = fut.result()
        bar.close()
        manifest = _build_manifest(dataset_dir, previous, results, urls, opts, max_workers,
                                   time.perf_counter() - t0, interrupted)
        atomic_write_json(manifest_path, manifest)
    return manifest


def _build_manifest(dataset_dir: Path, previous: dict, results: dict[str, dict], urls: dict, opts: _Options,
                    max_workers: int, elapsed: float, interrupted: bool) -> dict:
    items: dict[str, Any] = {k: v for k, v in previous.items() if k not in results}
    for item in urls:  # this run's items, in the caller's order
        if item in results:
            items[item] = results[item]
    counts = {s: 0 for s in STATUSES}
    run_counts = {s: 0 for s in STATUSES}
    for entry in items.values():
        counts[entry.get("status", "")] = counts.get(entry.get("status", ""), 0) + 1
    for entry in results.values():
        run_counts[entry["status"]] += 1
    return {
        "version": MANIFEST_VERSION,
        "dataset": dataset_dir.name,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"max_workers": max_workers, "timeout": opts.timeout, "total_timeout": opts.total_timeout,
                     "retries": opts.retries, "backoff": opts.backoff, "max_bytes": opts.max_bytes},
        "interrupted": interrupted,
        "elapsed_s": round(elapsed, 3),
        "this_run": {"items": len(results), "counts": {k: v for k, v in run_counts.items() if v}},
        "counts": {k: v for k, v in counts.items() if v},
        "with_image": sum(1 for e in items.values() if e.get("status") in ("ok", "skipped")),
        "items": items,
    }


def download_dataset_images(dataset_dir: str | Path, name: str | None = None, **kwargs: Any) -> dict:
    """`collect_image_urls` then `download_images` (what `athwe data images` runs)."""
    return download_images(dataset_dir, collect_image_urls(dataset_dir, name), **kwargs)


__all__ = ["FORMAT_EXT", "STATUSES", "collect_image_urls", "download_dataset_images", "download_images",
           "find_image", "image_path", "image_stem", "validate_image_bytes"]
