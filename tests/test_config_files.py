"""The packaged YAML defaults (athwe/configs): found through importlib.resources, shipped as package
data, and free of values that repeat a dataclass default (the dataclass is the one place for those)."""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from athwe.config import DataConfig, RunConfig, TrainConfig, config_dir, load_yaml, merge_layer, resolve_config
from athwe.models import get_entry, list_models

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "athwe"


def packaged_yamls() -> dict[str, Any]:
    """Every YAML under athwe/configs as importlib.resources sees it, by path relative to the package."""
    root = resources.files("athwe") / "configs"
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            found[f"configs/{entry.name}"] = entry
    for entry in (root / "datasets").iterdir():
        if entry.name.endswith(".yaml"):
            found[f"configs/datasets/{entry.name}"] = entry
    return found


def field_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _same(value: Any, default: Any) -> bool:
    """A YAML value equal to a default as the config would hold it (an int given for a float is widened)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return type(value) is type(default) and value == default


def repeated_defaults(layer: dict[str, Any], model: str | None = None) -> list[str]:
    """The keys of a YAML layer (a model's or a dataset's file, its per-dataset sections left out) whose
    value equals the dataclass default: model_args against `model`'s config class, data and train
    against DataConfig and TrainConfig."""
    defaults = {"data": field_defaults(DataConfig), "train": field_defaults(TrainConfig)}
    if model is not None:
        defaults["model_args"] = field_defaults(get_entry(model).config_cls)
    return [f"{section}.{key}" for section, known in defaults.items()
            for key, value in (layer.get(section) or {}).items() if key in known and _same(value, known[key])]


def test_packaged_yamls_found_through_importlib_resources(monkeypatch):
    monkeypatch.delenv("ATHWE_CONFIG_DIR", raising=False)
    found = packaged_yamls()
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "configs").rglob("*.yaml")}
    spaces = {rel for rel in on_disk if rel.startswith("configs/spaces/")}  # search spaces: not config layers
    assert set(found) == on_disk - spaces
    assert spaces == {f"configs/spaces/{m}.yaml" for m in list_models()}  # athwe tune has a space per model
    assert {f"configs/{m}.yaml" for m in list_models()} <= set(found)  # every registered model has one
    assert f"configs/datasets/{DataConfig.dataset}.yaml" in found
    assert str(config_dir()) == str(resources.files("athwe") / "configs")
    for rel, entry in found.items():
        merge_layer(RunConfig(), load_yaml(entry), rel, allow_datasets=True)  # a mapping of known sections
    assert resolve_config("sasrec", "demo").train.epochs == 12  # read from the packaged datasets/demo.yaml


def test_pyproject_package_data_ships_every_config_yaml():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["athwe"]
    shipped = {p.relative_to(PACKAGE).as_posix() for pattern in patterns for p in PACKAGE.glob(pattern)}
    assert set(packaged_yamls()) <= shipped
    assert {"configs/*.yaml", "configs/datasets/*.yaml"} <= set(patterns)


def test_yamls_repeat_no_dataclass_default():
    # the check itself: a repeated default is reported, an int for a float default too, a changed value not
    sasrec = {"model_args": {"hidden_size": 64, "num_heads": 1}}
    assert repeated_defaults(sasrec, "sasrec") == ["model_args.hidden_size"]
    assert repeated_defaults({"model_args": {"num_heads": 1, "tau": 1}}, "fearec") == ["model_args.tau"]
    run = {"train": {"seed": 42, "lr": 0.002}, "data": {"kcore": 0}}
    assert repeated_defaults(run) == ["data.kcore", "train.seed"]
    for rel, entry in packaged_yamls().items():
        layer = load_yaml(entry)
        model = None if rel.startswith("configs/datasets/") else rel.removeprefix("configs/").removesuffix(".yaml")
        assert not repeated_defaults(layer, model), f"{rel} repeats dataclass defaults"
