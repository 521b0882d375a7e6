"""Shared fixtures: an isolated cache, a tiny timestamped dataset, tiny-model configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATHWE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


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


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data")
