"""Image embeddings through open_clip.

Pooling `embed`: the CLIP image embedding (`encode_image`, after the projection; 768-d for
ViT-L-14). Pooling `cls`: the image tower's [CLS] token after the final LayerNorm and before the
projection, what HM4SR used (768-d for ViT-B-16). Outputs are not L2-normalised.

Pretrained weights are required (`require_pretrained=True`), so a failed download can never fall
back to random weights; `random_weights=True` builds an untrained model on purpose (tests and
pure-throughput benchmarks only) and is recorded in the manifest.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from athwe.errors import FeatureError
from athwe.feature_extraction.text import _one_line, hub_cache_dir, hub_offline
from athwe.utils import resolve_device

POOLINGS = ("embed", "cls")
DEFAULT_IMAGE_MODEL = {"embed": "ViT-L-14", "cls": "ViT-B-16"}
DEFAULT_PRETRAINED = "openai"
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class ImageModelInfo:
    """What the manifest records about the image model."""

    architecture: str
    pretrained: str | None
    random_weights: bool
    pooling: str
    quick_gelu: bool
    image_size: list[int]
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)


def pretrained_available(model: str, pretrained: str | None, cache_dir: str | None = None) -> bool:
    """Whether `pretrained` weights for `model` can be loaded without the network: a local file,
    or a known tag whose checkpoint is already in the Hugging Face or CLIP download cache."""
    if not pretrained:
        return False
    if Path(pretrained).expanduser().is_file():
        return True
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        return False
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, fname = os.path.split(hub)
        for f in ([fname] if fname else list(HF_WEIGHT_FILES)):
            if isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str):
                return True
    url = cfg.get("url", "")
    if url:
        clip_cache = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        if (clip_cache / os.path.basename(url)).is_file():
            return True
    return False


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def check_image_model(model: str, pretrained: str | None, random_weights: bool = False) -> None:
    """The checks on an image model that load nothing (run before any work): the architecture is
    one open_clip knows, and `pretrained` is an existing checkpoint file or a weights tag known for
    that architecture (whether a tag's weights are cached or downloadable shows only when loading)."""
    import open_clip

    if random_weights and pretrained:
        raise FeatureError("random_weights=True builds an untrained image model; do not pass a pretrained tag too")
    hub = model.startswith(("hf-hub:", "local-dir:"))
    if not random_weights and not pretrained and not hub:
        raise FeatureError(f"image model {model!r}: no pretrained weights given (pass --pretrained TAG or a "
                           f"checkpoint file, e.g. --pretrained openai)")
    if model.startswith("local-dir:") and not Path(model[len("local-dir:"):]).expanduser().is_dir():
        raise FeatureError(f"{model[len('local-dir:'):]}: image model folder not found (--image-model local-dir:PATH)")
    if not hub and model.replace("/", "-") not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FeatureError(f"unknown image model {model!r} (--image-model takes an open_clip architecture such as "
                           f"ViT-B-16 or ViT-L-14; {hint}see open_clip.list_models())")
    if random_weights or not pretrained or hub:
        return
    path = Path(pretrained).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        raise FeatureError(f"{pretrained}: a folder, not a checkpoint file (--pretrained takes an open_clip weights "
                           f"tag or a checkpoint file)")
    if open_clip.get_pretrained_cfg(model, pretrained):
        return
    if any(c in pretrained for c in "/\\") or pretrained.lower().endswith(CHECKPOINT_SUFFIXES):
        raise FeatureError(f"{pretrained}: pretrained checkpoint file not found (--pretrained takes an open_clip "
                           f"weights tag or an existing checkpoint file)")
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise FeatureError(f"image model {model!r}: pretrained {pretrained!r} is neither a known tag "
                       f"({', '.join(tags) or 'none'}) nor an existing checkpoint file (--pretrained)")


class ImageEncoder:
    """An open_clip image tower with a fixed pooling; `encode(batch)` returns float32 CPU rows."""

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = DEFAULT_PRETRAINED, pooling: str = "embed",
                 device: str | torch.device | None = None, random_weights: bool = False,
                 cache_dir: str | None = None) -> None:
        import open_clip

        if pooling not in POOLINGS:
            raise FeatureError(f"image pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        check_image_model(model, pretrained, random_weights)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        where = (f"the file {pretrained}" if pretrained and Path(pretrained).expanduser().is_file() else
                 f"the Hugging Face cache {hub_cache_dir()}"
                 + (" (offline mode)" if hub_offline() else " and the hub"))
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model,
                pretrained=None if random_weights else (str(Path(pretrained).expanduser())
                                                        if pretrained and Path(pretrained).expanduser().is_file()
                                                        else pretrained),
                force_quick_gelu=quick_gelu, require_pretrained=not random_weights, cache_dir=cache_dir,
                device="cpu")
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/OSError/hub errors for missing weights
            raise FeatureError(f"image model {model!r} (pretrained {pretrained!r}): weights not found/loadable in "
                               f"{where} ({type(e).__name__}: {_one_line(e, 160)}); pass a downloaded open_clip "
                               f"checkpoint with --pretrained /path/to/open_clip_model.safetensors") from None
        self.visual = net.visual.float().eval().to(self.device)
        del net  # only the image tower is used
        self.preprocess: Callable = preprocess
        self.pooling = pooling
        if pooling == "cls":
            from open_clip.transformer import VisionTransformer

            if not isinstance(self.visual, VisionTransformer) or getattr(self.visual, "pool_type", "") != "tok" \
                    or self.visual.attn_pool is not None:
                raise FeatureError(f"image model {model!r}: cls pooling needs a ViT image tower with a class token "
                                   f"({type(self.visual).__name__}, pool {getattr(self.visual, 'pool_type', '?')!r})")
            dim = int(self.visual.ln_post.normalized_shape[0])
        else:
            dim = int(getattr(self.visual, "output_dim", 0))
        size = getattr(self.visual, "image_size", None)
        self.info = ImageModelInfo(architecture=model, pretrained=None if random_weights else pretrained,
                                   random_weights=random_weights, pooling=pooling, quick_gelu=quick_gelu,
                                   image_size=list(size) if isinstance(size, (tuple, list)) else [int(size or 0)] * 2,
                                   dim=dim)

    def load(self, path: Path) -> torch.Tensor:
        """Decode one image file into the model's input tensor (raises on unreadable files)."""
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
        return self.preprocess(rgb)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images: (B, dim) float32 on the CPU."""
        x = pixels.to(self.device)
        v = self.visual
        if self.pooling == "cls":
            tokens = v.transformer(v._embeds(x))
            pooled, _ = v._pool(tokens)
        else:
            pooled = v(x)
            if isinstance(pooled, tuple):
                pooled = pooled[0]
        return pooled.float().cpu()
