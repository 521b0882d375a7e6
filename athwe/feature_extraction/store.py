"""The feature store: where extracted item features live on disk and how they are loaded.

Two layouts are read:

* ours, `<dataset>/features/`: `txt_emb.pt`, `img_emb.pt`, `cat.pt` (plain float32 tensors, row i
  = internal item id i, row 0 zeros) and `manifest.json`, written last, which records the item-map
  fingerprint, the models, and which items had no text or image. A manifest whose fingerprint
  differs from the dataset's item map is an error (features would be shifted onto other items).
* upstream ATHWE / HM4SR, files at the dataset folder root: `txt_emb.pt`, `img_emb.pt`, `cat.pt`
  whose row k belongs to the item with id k in `item2id` (a pickled RecBole `field2token_id`
  dict `{token: id}` with `[PAD]` = 0; `item2id.json` with the same mapping is accepted too).
  Rows are realigned to our internal ids by token; all-zero upstream rows count as missing.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from athwe.errors import FeatureError, brief
from athwe.utils import fingerprint_tokens, hash_file

FEATURES_DIR = "features"
TEXT_FILE = "txt_emb.pt"
IMAGE_FILE = "img_emb.pt"
CAT_FILE = "cat.pt"
MANIFEST_FILE = "manifest.json"
CAT_VOCAB_FILE = "cat_vocab.json"
UPSTREAM_ITEM_MAPS = ("item2id", "item2id.pkl", "item2id.pickle", "item2id.json")
MANIFEST_VERSION = 1


@dataclass
class FeatureSet:
    """Frozen item features aligned to internal item ids (row i = item i, row 0 = padding).

    `text_mask` / `image_mask` are True where the item has that feature; rows where the mask is
    False are zeros. `fingerprint` identifies what produced the features (item map, models, settings,
    the items' inputs; see `producer_digest`), so a checkpoint can refuse features made differently
    and derived data (e.g. cluster labels) can be cached against it.
    """

    text: torch.Tensor | None = None
    image: torch.Tensor | None = None
    cat: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    cat_vocab: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    fingerprint: str = ""
    source: Path | None = None
    layout: str = "athwe"  # "athwe" (features/ with a manifest) or "upstream" (root files + item2id)

    @property
    def n_items(self) -> int:
        for t in (self.text, self.image, self.cat):
            if t is not None:
                return int(t.shape[0]) - 1
        return 0

    @property
    def text_dim(self) -> int:
        return 0 if self.text is None else int(self.text.shape[1])

    @property
    def image_dim(self) -> int:
        return 0 if self.image is None else int(self.image.shape[1])

    @property
    def n_categories(self) -> int:
        return 0 if self.cat is None else int(self.cat.shape[1])

    @property
    def modalities(self) -> list[str]:
        return [m for m, t in (("text", self.text), ("image", self.image), ("cat", self.cat)) if t is not None]


def features_dir(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / FEATURES_DIR


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    return hash_file(path).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape and float32 values (independent of how the file was written)."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(json.dumps(list(t.shape)).encode("utf-8"))
    h.update(t.numpy().tobytes())
    return h.hexdigest()


#: the settings of a feature model that decide what it computes (not where its files lie, the device or
#: the batch size, which move only the last bits of the embeddings)
PRODUCER_KEYS = {
    "text": ("name", "source", "revision", "package", "pooling", "normalize", "max_length", "model_type"),
    "image": ("architecture", "pretrained", "random_weights", "pooling", "quick_gelu", "image_size"),
}


def producer_digest(key: str, info: dict) -> str | None:
    """A digest of what produced a modality's features: the model, its weights (hub revision, package
    version, or the local path when there is neither), the extraction settings and the items' inputs
    (texts, image bytes), as the manifest records them. Features extracted again from the same inputs
    with the same settings get the same digest, whatever the CPU or thread count. None for a manifest
    entry without a record of its inputs (category features, older manifests): their values are hashed."""
    model = info.get("model")
    if key not in PRODUCER_KEYS or not isinstance(model, dict) or not isinstance(info.get("inputs"), str):
        return None
    record = {k: model.get(k) for k in PRODUCER_KEYS[key]}
    if not (model.get("revision") or model.get("package")) and key == "text":
        record["path"] = model.get("path")
    record.update({k: info.get(k) for k in ("inputs", "fields", "template", "max_field_chars")})
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _read_vocab(path: Path) -> list | None:
    """A category vocabulary JSON list beside cat.pt, or None when absent."""
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeatureError(f"{path}: unreadable category vocabulary ({e})") from None
    return vocab if isinstance(vocab, list) else None


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise FeatureError(f"{path}: cannot be read as a tensor file ({type(e).__name__}: {brief(e)}); "
                           f"it may be truncated or not a torch file") from None
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        kind = type(obj).__name__ if not isinstance(obj, torch.Tensor) else f"{obj.dim()}-d tensor"
        raise FeatureError(f"{path}: expected a 2-d tensor (items x features), found a {kind}")
    if not (obj.is_floating_point() or obj.dtype in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                     torch.uint8, torch.bool)):
        raise FeatureError(f"{path}: unsupported dtype {obj.dtype}")
    return obj.float().contiguous()


def _check_rows(path: Path, t: torch.Tensor, n_rows: int) -> None:
    if t.shape[0] != n_rows:
        raise FeatureError(f"{path}: {t.shape[0]} rows, expected {n_rows} (n_items + 1 with row 0 = padding); "
                           f"the features belong to another item map, re-run `athwe extract --overwrite`")
    if not torch.isfinite(t).all():
        raise FeatureError(f"{path}: contains NaN or infinite values")


def _kind(value: Any) -> str:
    """How a JSON value is named in manifest errors."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _bad_field(mpath: Path, name: str, want: str, value: Any) -> FeatureError:
    """A one-line error for a manifest field of the wrong type or value."""
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
    found = "null or nothing" if value is None else f"{_kind(value)} ({shown})"
    return FeatureError(f"{mpath}: field {name} must be {want}, found {found}; the manifest is "
                        f"damaged, re-run `athwe extract --overwrite`")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mask_from_missing(n_rows: int, missing: Any, item_tokens: list[str], where: Path, name: str) -> torch.Tensor:
    if not isinstance(missing, list):
        raise _bad_field(where, name, "a list of item ids", missing)
    mask = torch.ones(n_rows, dtype=torch.bool)
    mask[0] = False
    for entry in missing:
        i = entry.get("id") if isinstance(entry, dict) else entry
        if not _is_int(i) or not 1 <= i < n_rows:
            raise FeatureError(f"{where}: field {name}: entry {entry!r} is not an item id in 1..{n_rows - 1}")
        tok = entry.get("item") if isinstance(entry, dict) else None
        if tok is not None and tok != item_tokens[i]:
            raise FeatureError(f"{where}: field {name}: entry {entry!r} does not match item {i} = {item_tokens[i]!r}")
        mask[i] = False
    return mask


def _load_ours(folder: Path, item_tokens: list[str]) -> FeatureSet:
    mpath = folder / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise FeatureError(f"{mpath}: unreadable feature manifest ({e}); re-run `athwe extract --overwrite`") from None
    want = fingerprint_tokens(item_tokens)
    item_map = manifest.get("item_map")
    if not isinstance(item_map, dict):
        raise _bad_field(mpath, "item_map", "an object with the item-map fingerprint", item_map)
    have = item_map.get("fingerprint")
    if not isinstance(have, str):
        raise _bad_field(mpath, "item_map.fingerprint", "a string", have)
    if have != want:
        raise FeatureError(
            f"{mpath}: features were extracted for item map {have} ({item_map.get('n_items')} "
            f"items) but the dataset's item map is {want} ({len(item_tokens) - 1} items); re-run "
            f"`athwe extract --dataset {folder.parent.name} --overwrite` (with the same --kcore as training)")
    n_rows = len(item_tokens)
    fs = FeatureSet(manifest=manifest, source=folder, layout="athwe")
    parts = [want]
    for key, fname in (("text", TEXT_FILE), ("image", IMAGE_FILE), ("cat", CAT_FILE)):
        info = manifest.get(key)
        if info is None:
            continue  # not recorded: not extracted
        if not isinstance(info, dict):
            raise _bad_field(mpath, key, "an object", info)
        status = info.get("status")
        if not isinstance(status, str):
            raise _bad_field(mpath, f"{key}.status", "a string (ok, skipped or disabled)", status)
        if status != "ok":
            continue
        file = info.get("file", fname)
        if not isinstance(file, str) or not file or file in (".", "..") or Path(file).name != file:
            raise _bad_field(mpath, f"{key}.file", f"a file name in {folder} (e.g. {fname!r})", file)
        dim = info.get("dim")
        if dim is not None and not (_is_int(dim) and dim >= 1):
            raise _bad_field(mpath, f"{key}.dim", "a positive integer", dim)
        sha = info.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise _bad_field(mpath, f"{key}.sha256", "a hex digest string", sha)
        path = folder / file
        if not path.is_file():
            raise FeatureError(f"{path}: listed in {mpath} but missing; re-run `athwe extract --overwrite`")
        t = _load_tensor(path)
        _check_rows(path, t, n_rows)
        if dim is not None and t.shape[1] != dim:
            raise FeatureError(f"{path}: {t.shape[1]} columns but {mpath} records dim {dim}")
        digest = tensor_digest(t)
        if sha and sha != digest:
            raise FeatureError(f"{path}: contents differ from what {mpath} records (file replaced or damaged); "
                               f"re-run `athwe extract --overwrite`")
        parts.append(f"{key}:{producer_digest(key, info) or digest}")
        if key == "text":
            fs.text = t
            fs.text_mask = _mask_from_missing(n_rows, info.get("missing", []), item_tokens, mpath, "text.missing")
        elif key == "image":
            fs.image = t
            fs.image_mask = _mask_from_missing(n_rows, info.get("missing", []), item_tokens, mpath, "image.missing")
        else:
            fs.cat = t
            vocab = info.get("vocab")
            if vocab is not None and not (isinstance(vocab, list) and all(isinstance(v, str) for v in vocab)):
                raise _bad_field(mpath, "cat.vocab", "a list of category names", vocab)
            if vocab is None:
                vocab = _read_vocab(folder / CAT_VOCAB_FILE)
            if not isinstance(vocab, list) or len(vocab) != t.shape[1]:
                raise FeatureError(f"{mpath}: category vocabulary missing or of the wrong length for {path}")
            fs.cat_vocab = [str(v) for v in vocab]
    if not fs.modalities:
        raise FeatureError(f"{mpath}: no modality was extracted (text, image and cat all skipped)")
    fs.fingerprint = fingerprint_tokens(parts)
    return fs


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: a RecBole item2id dict needs no classes, so none are allowed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
            import collections

            return collections.OrderedDict if name == "OrderedDict" else dict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only a plain dict is expected)")


def read_item2id(path: Path) -> dict[str, int]:
    """The upstream item-token -> id mapping (pickled dict or JSON)."""
    try:
        if path.suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        else:
            obj = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - corrupt pickle / JSON / unreadable file
        raise FeatureError(f"{path}: cannot read the item2id mapping ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(_is_int(v) for v in obj.values()):
        raise FeatureError(f"{path}: item2id must map item tokens to integer ids")
    return {str(k): int(v) for k, v in obj.items()}


def _realign(path: Path, t: torch.Tensor, item2id: dict[str, int],
             item_tokens: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder upstream rows (upstream id order) to internal ids; rows absent or all-zero are masked."""
    src = torch.tensor([item2id.get(tok, -1) for tok in item_tokens[1:]], dtype=torch.long)
    bad = src >= t.shape[0]
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise FeatureError(f"{path}: item {item_tokens[k + 1]!r} has upstream id {int(src[k])} but the file has only "
                           f"{t.shape[0]} rows (item2id and the tensor do not match)")
    found = src >= 1
    out = torch.zeros(len(item_tokens), t.shape[1], dtype=torch.float32)
    rows = t[src.clamp(min=0)]
    out[1:][found] = rows[found]
    mask = torch.zeros(len(item_tokens), dtype=torch.bool)
    mask[1:] = found & (rows.abs().sum(dim=1) > 0)
    return out, mask


def _load_upstream(folder: Path, item_tokens: list[str], present: list[Path]) -> FeatureSet:
    maps = [folder / n for n in UPSTREAM_ITEM_MAPS if (folder / n).is_file()]
    if not maps:
        raise FeatureError(f"{folder}: found {', '.join(p.name for p in present)} but no item2id mapping "
                           f"({' / '.join(UPSTREAM_ITEM_MAPS)}), so rows cannot be matched to items; "
                           f"run `athwe extract --dataset {folder.name}` instead")
    map_path = maps[0]
    item2id = read_item2id(map_path)
    if not any(tok in item2id for tok in item_tokens[1:]):
        raise FeatureError(f"{map_path}: none of the dataset's {len(item_tokens) - 1} item tokens appear in item2id "
                           f"(is it from another dataset?)")
    fs = FeatureSet(source=folder, layout="upstream")
    parts = [fingerprint_tokens(item_tokens), f"item2id:{file_digest(map_path)}"]
    missing_map = [tok for tok in item_tokens[1:] if tok not in item2id]
    entries: dict[str, dict] = {}
    for key, fname in (("text", TEXT_FILE), ("image", IMAGE_FILE), ("cat", CAT_FILE)):
        path = folder / fname
        if not path.is_file():
            continue
        t = _load_tensor(path)
        if not torch.isfinite(t).all():
            raise FeatureError(f"{path}: contains NaN or infinite values")
        out, mask = _realign(path, t, item2id, item_tokens)
        parts.append(f"{key}:{tensor_digest(t)}")
        entries[key] = {"status": "ok", "file": fname, "dim": int(out.shape[1])}
        if key == "text":
            fs.text, fs.text_mask = out, mask
        elif key == "image":
            fs.image, fs.image_mask = out, mask
        else:
            fs.cat = out
            vocab = _read_vocab(folder / CAT_VOCAB_FILE)
            if not isinstance(vocab, list) or len(vocab) != out.shape[1]:
                vocab = [f"cat{j}" for j in range(out.shape[1])]  # upstream cat.pt carries no names
            fs.cat_vocab = [str(v) for v in vocab]
        if key != "cat":
            entries[key]["missing_count"] = int((~mask[1:]).sum())
    fs.manifest = {
        "version": MANIFEST_VERSION,
        "layout": "upstream",
        "item_map": {"fingerprint": fingerprint_tokens(item_tokens), "n_items": len(item_tokens) - 1,
                     "source": str(map_path), "items_not_in_item2id": len(missing_map)},
        **entries,
    }
    fs.fingerprint = fingerprint_tokens(parts)
    return fs


def load_features(dataset_dir: str | Path, item_tokens: list[str]) -> FeatureSet:
    """Load the item features of a dataset folder, aligned to `item_tokens` (internal id -> token,
    index 0 = padding, as `SequenceData.item_tokens`).

    Looks in `<dataset_dir>/features/` (written by `athwe extract`) first, then for upstream ATHWE
    files at the folder root. Raises FeatureError naming the file on any mismatch.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FeatureError(f"{dataset_dir}: dataset folder not found")
    if not item_tokens or len(item_tokens) < 2:
        raise FeatureError(f"{dataset_dir}: the item map is empty (no items to align features to)")
    ours = features_dir(dataset_dir)
    if (ours / MANIFEST_FILE).is_file():
        return _load_ours(ours, item_tokens)
    present = [dataset_dir / f for f in (TEXT_FILE, IMAGE_FILE, CAT_FILE) if (dataset_dir / f).is_file()]
    if present:
        return _load_upstream(dataset_dir, item_tokens, present)
    hint = " (an interrupted extraction left partial work there; re-run to finish it)" if ours.is_dir() else ""
    data_dir = "" if dataset_dir.parent.name == "dataset" else f" --data-dir {dataset_dir.parent}"
    raise FeatureError(f"{dataset_dir}: no item features (no {FEATURES_DIR}/{MANIFEST_FILE}{hint}, and no "
                       f"{TEXT_FILE}/{IMAGE_FILE}/{CAT_FILE} with item2id at the folder root); "
                       f"run `athwe extract --dataset {dataset_dir.name}{data_dir}` first")


__all__ = ["CAT_FILE", "FEATURES_DIR", "IMAGE_FILE", "MANIFEST_FILE", "TEXT_FILE", "FeatureSet", "features_dir",
           "file_digest", "load_features", "read_item2id", "tensor_digest"]
