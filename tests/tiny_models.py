"""Tiny real models for feature-extraction tests: random weights saved to disk, then loaded
through the same code path a user's downloaded model takes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("red blue green running shoes jacket rain steel pan pot lamp desk kitchen home apparel outdoors "
         "acme globex initech umbrella soylent trail summit copper cotton wool and & the a of for with").split()
TINY_CLIP = "athwe-test-tiny-vit"  # a custom open_clip architecture registered by make_tiny_clip


def make_tiny_bert(d: Path) -> Path:
    """A 1-layer, 16-d BERT with a small WordPiece vocabulary, saved with save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "-", "(", ")"] + sorted(set(WORDS)) + chars
    vocab = list(dict.fromkeys(vocab)) + [f"##{c}" for c in chars]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(vocab=str(d / "vocab.txt")).save_pretrained(d)
    return d


def make_tiny_clip(d: Path) -> Path:
    """Register a tiny open_clip ViT config (32 px, 24-wide, 12-d embedding) and save random
    weights as a checkpoint file; returns the checkpoint path (pass it as `pretrained`)."""
    import open_clip

    d.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 12,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 24, "head_width": 12, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt


def write_png(path: Path, seed: int) -> None:
    """A small random RGB image (48 x 40) saved as PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
