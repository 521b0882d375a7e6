"""Shared fixtures: an isolated cache, a tiny timestamped dataset, tiny-model configs."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # the trainer's CPU-contention note depends on what else the machine runs: off unless a test asks
    monkeypatch.setattr("athwe.training.trainer.busy_cpus_elsewhere", lambda window=0.1: None)


def write_tiny_dataset(root: Path, name: str = "tiny", n_users: int = 80, n_items: int = 50, seed: int = 0) -> Path:
    """A small atomic dataset with learnable structure: users walk item ids upward in steps of 1-2."""
    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        length = int(rng.integers(4, 16))
        item = int(rng.integers(1, n_items + 1))
        t = 1_600_000_000 + int(rng.integers(0, 10_000))
        for _ in range(length):
            lines.append(f"u{u}\ti{item}\t{t}")
            item = (item + int(rng.integers(1, 3)) - 1) % n_items + 1
            t += int(rng.integers(60, 86_400))
    (d / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return root


TINY_MODEL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "inner_size": 32}


def random_features(n_items: int, text_dim: int = 24, image_dim: int = 20, n_cat: int = 5, seed: int = 0):
    """A small FeatureSet for models that need item features (tests only): random text/image rows,
    every 7th item without text and items 3, 8, 13, ... without an image (zero rows, mask False),
    multi-hot categories with at least one category per item; row 0 is padding."""
    import torch

    from athwe.feature_extraction.store import FeatureSet

    g = torch.Generator().manual_seed(seed)
    rows = n_items + 1
    ids = torch.arange(rows)
    text_mask, image_mask = (ids % 7 != 0) & (ids > 0), (ids % 5 != 3) & (ids > 0)
    text = torch.randn(rows, text_dim, generator=g) * text_mask.unsqueeze(1)
    image = torch.randn(rows, image_dim, generator=g) * image_mask.unsqueeze(1)
    cat = (torch.rand(rows, n_cat, generator=g) < 0.3).float()
    cat[ids, ids % n_cat] = 1.0
    cat[0] = 0.0
    return FeatureSet(text=text, image=image, cat=cat, text_mask=text_mask, image_mask=image_mask,
                      cat_vocab=[f"c{j}" for j in range(n_cat)], fingerprint=f"test-{seed}-{n_items}")


def write_random_features(dataset_dir: Path, item_tokens: list[str], seed: int = 0) -> Path:
    """Write `random_features` for a dataset in the feature store's on-disk layout."""
    import json

    import torch

    from athwe.feature_extraction.store import CAT_FILE, IMAGE_FILE, MANIFEST_FILE, TEXT_FILE, features_dir
    from athwe.utils import fingerprint_tokens

    fs = random_features(len(item_tokens) - 1, seed=seed)
    folder = features_dir(dataset_dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"version": 1,
                "item_map": {"fingerprint": fingerprint_tokens(item_tokens), "n_items": len(item_tokens) - 1}}
    for key, fname, t, mask in (("text", TEXT_FILE, fs.text, fs.text_mask),
                                ("image", IMAGE_FILE, fs.image, fs.image_mask),
                                ("cat", CAT_FILE, fs.cat, None)):
        torch.save(t, folder / fname)
        entry = {"status": "ok", "file": fname, "dim": int(t.shape[1])}
        if mask is not None:
            entry["missing"] = [int(i) for i in torch.nonzero(~mask[1:]).squeeze(1) + 1]
        else:
            entry["vocab"] = fs.cat_vocab
        manifest[key] = entry
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data")


def train_dies_in_epoch(monkeypatch, epoch: int) -> Callable[[], None]:
    """Make training raise KeyboardInterrupt during epoch `epoch` + 1 (after epoch `epoch`'s
    checkpoint was written), as a killed process would; returns a function that undoes it."""
    from athwe.training import trainer as tr

    original = tr.Trainer.train_epoch

    def dying(self):
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(tr.Trainer, "train_epoch", dying)
    return lambda: monkeypatch.setattr(tr.Trainer, "train_epoch", original)


def poison_loss_from_epoch(monkeypatch, epoch: int) -> None:
    """Make every training loss NaN from `epoch` on (counted from 1 as the trainer counts)."""
    import torch

    from athwe.training import trainer as tr

    original = tr.Trainer.train_epoch

    def poisoned(self):
        if self.epoch == epoch - 1:
            monkeypatch.setattr(self.model, "loss", lambda batch: torch.tensor(float("nan"), requires_grad=True))
        return original(self)

    monkeypatch.setattr(tr.Trainer, "train_epoch", poisoned)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny real BERT saved to disk (tiny_models.make_tiny_bert), one per test module."""
    from tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny real open_clip ViT checkpoint (tiny_models.make_tiny_clip), one per test module."""
    from tiny_models import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
