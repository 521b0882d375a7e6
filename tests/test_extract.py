"""Feature extraction on tiny real models: a BERT built from a config and a custom open_clip
architecture (both with random weights saved to disk and loaded through the user path), plus the
packaged all-MiniLM-L6-v2 on a handful of texts."""
from __future__ import annotations

import json
import os
import pickle
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from athwe.cli import app  # noqa: E402
from athwe.dataset.sequences import load_sequences  # noqa: E402
from athwe.errors import DataError, FeatureError  # noqa: E402
from athwe.feature_extraction import extract as ex  # noqa: E402
from athwe.feature_extraction import load_features  # noqa: E402
from athwe.feature_extraction.image import ImageEncoder  # noqa: E402
from athwe.feature_extraction.items import build_item_texts, clean_field, read_item_table  # noqa: E402
from athwe.feature_extraction.text import TextEncoder, packaged_minilm_dir  # noqa: E402
from conftest import write_tiny_dataset  # noqa: E402
from tiny_models import TINY_CLIP, WORDS, write_png  # noqa: E402

torch.set_num_threads(1)

NO_ROW, EMPTY, NO_IMAGE, CORRUPT = "i3", "i5", "i2", "i4"


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)




def make_dataset(root: Path, name: str = "tiny", n_items: int = 12) -> Path:
    """Tiny atomic dataset; .item rows for all items but i3, i5 without any text, images for all
    but i2 and a corrupt file for i4; i7's title carries HTML entities."""
    write_tiny_dataset(root, name, n_users=30, n_items=n_items, seed=1)
    d = root / name
    lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token"]
    for k in range(1, n_items + 1):
        tok = f"i{k}"
        if tok == NO_ROW:
            continue
        if tok == EMPTY:
            lines.append(f"{tok}\t\t\t")
            continue
        title = "copper pan &amp; lid" if tok == "i7" else f"{WORDS[k % 10]} {WORDS[(3 * k) % 17]} {k}"
        cats = ["Home Kitchen Cookware", "Apparel Outerwear Rain_Jackets", "Outdoors Trail"][k % 3]
        lines.append(f"{tok}\t{title}\t{cats}\t{['acme', 'globex', 'initech'][k % 3]}")
    (d / f"{name}.item").write_text("\n".join(lines) + "\n")
    (d / "images").mkdir()
    for k in range(1, n_items + 1):
        tok = f"i{k}"
        if tok == NO_IMAGE:
            continue
        if tok == CORRUPT:
            (d / "images" / f"{tok}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
            continue
        write_png(d / "images" / f"{tok}.png", k)
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def _tokens(root: Path, name: str = "tiny") -> list[str]:
    return load_sequences(root, name).item_tokens


def _extract(root: Path, bert: Path, **kw) -> dict:
    args = dict(text_model=str(bert), image=False, batch_size=4, progress=False)
    args.update(kw)
    return ex.extract_features("tiny", root, **args)


# ------------------------------------------------------------------------------------------ text


def test_text_rows_align_with_items_and_masks(data_root, tiny_bert):
    m = _extract(data_root, tiny_bert)
    toks = _tokens(data_root)
    fs = load_features(data_root / "tiny", toks)
    n = len(toks)
    assert fs.text.shape == (n, 16) and fs.text.dtype == torch.float32
    assert fs.text_mask.dtype == torch.bool and not fs.text_mask[0] and torch.all(fs.text[0] == 0)
    assert m["text"]["model"]["pooling"] == "cls" and m["text"]["dim"] == 16
    missing = {e["item"]: e["reason"] for e in m["text"]["missing"]}
    assert missing == {NO_ROW: "no_metadata_row", EMPTY: "empty_text"}
    texts = build_item_texts(read_item_table(data_root / "tiny", "tiny"), toks).texts
    enc = TextEncoder(str(tiny_bert), device="cpu")
    for i, tok in enumerate(toks[1:], start=1):
        if tok in missing:
            assert not fs.text_mask[i] and torch.all(fs.text[i] == 0)
        else:
            assert fs.text_mask[i]
            # row i is item i's own text, embedded alone (alignment survives length-sorted batching)
            torch.testing.assert_close(fs.text[i], enc.encode([texts[i]])[0], atol=1e-5, rtol=1e-4)
    assert "copper pan & lid." in texts[toks.index("i7")]
    assert fs.cat.shape[0] == n and fs.cat_vocab[:3] and fs.cat.sum(1)[toks.index(NO_ROW)] == 0
    assert fs.image is None and fs.image_mask is None


def test_deterministic_and_atomic(data_root, tiny_bert):
    _extract(data_root, tiny_bert)
    out = data_root / "tiny" / "features"
    first = torch.load(out / "txt_emb.pt", weights_only=True)
    fp1 = load_features(data_root / "tiny", _tokens(data_root)).fingerprint
    with pytest.raises(FeatureError, match="already extracted"):
        _extract(data_root, tiny_bert)
    _extract(data_root, tiny_bert, overwrite=True)
    assert torch.equal(first, torch.load(out / "txt_emb.pt", weights_only=True))
    assert load_features(data_root / "tiny", _tokens(data_root)).fingerprint == fp1
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ex.PARTIAL_DIR]
    assert leftovers == []
    assert sorted(p.name for p in out.iterdir()) == ["cat.pt", "cat_vocab.json", "manifest.json", "txt_emb.pt"]


def test_fingerprint_follows_what_produced_the_features_not_their_last_bits(data_root, tiny_bert, tiny_clip):
    """Rows that differ in their last bits (another CPU, thread count or batch size) keep the
    fingerprint; another text field, another item text, another image or another image model
    changes it. A manifest without a record of its inputs falls back to hashing the values."""
    def fingerprint(**kw) -> str:
        _extract(data_root, tiny_bert, overwrite=True, image=True, image_model=TINY_CLIP, pretrained=str(tiny_clip),
                 **kw)
        return load_features(data_root / "tiny", _tokens(data_root)).fingerprint

    out = data_root / "tiny" / "features"
    base = fingerprint()
    for name in ("txt_emb.pt", "img_emb.pt"):  # the same features with moved last bits, recorded as such
        t = torch.load(out / name, weights_only=True)
        torch.save(t + 1e-7 * torch.randn_like(t) * (t != 0), out / name)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["text"]["sha256"] = ex.tensor_digest(torch.load(out / "txt_emb.pt", weights_only=True))
    manifest["image"]["sha256"] = ex.tensor_digest(torch.load(out / "img_emb.pt", weights_only=True))
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_features(data_root / "tiny", _tokens(data_root)).fingerprint == base
    del manifest["text"]["inputs"]  # an older manifest: the text values are hashed
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_features(data_root / "tiny", _tokens(data_root)).fingerprint != base
    assert fingerprint(batch_size=3) == base
    assert fingerprint(text_fields=["title"]) != base
    assert fingerprint(image_pooling="cls") != base
    item = data_root / "tiny" / "tiny.item"
    item.write_text(item.read_text().replace("copper pan", "steel pan"))
    assert fingerprint() != base
    png = next((data_root / "tiny" / "images").glob("*.png"))
    write_png(png, seed=99)
    changed = fingerprint()
    item.write_text(item.read_text().replace("steel pan", "copper pan"))
    assert fingerprint() not in (base, changed)


def test_resume_after_interruption(data_root, tiny_bert, monkeypatch):
    real = TextEncoder.encode
    calls = {"n": 0}

    def flaky(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(TextEncoder, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        _extract(data_root, tiny_bert, batch_size=2)
    out = data_root / "tiny" / "features"
    assert not (out / "manifest.json").exists() and not (out / "txt_emb.pt").exists()
    shards = list((out / ex.PARTIAL_DIR).rglob("*.pt"))
    assert len(shards) == 2
    with pytest.raises(FeatureError, match="interrupted extraction"):
        load_features(data_root / "tiny", _tokens(data_root))

    calls["n"] = 100  # no more failures; count the batches the resumed run computes
    m = _extract(data_root, tiny_bert, batch_size=2)
    n_batches = m["text"]["batches"]
    assert m["text"]["batches_resumed"] == 2 and calls["n"] - 100 == n_batches - 2
    resumed = load_features(data_root / "tiny", _tokens(data_root)).text

    monkeypatch.setattr(TextEncoder, "encode", real)
    _extract(data_root, tiny_bert, batch_size=2, overwrite=True)
    torch.testing.assert_close(resumed, load_features(data_root / "tiny", _tokens(data_root)).text, atol=0, rtol=0)
    assert not (out / ex.PARTIAL_DIR).exists()


def test_text_cleaning_and_template(data_root):
    assert clean_field('A "quoted"\ntitle &amp; more...', "title") == ("A quoted title & more.", False)
    assert clean_field("x" * 2500, "title") == ("", True)
    assert clean_field("Home_&_Kitchen Cookware", "categories") == ("Home & Kitchen Cookware.", False)
    table = read_item_table(data_root / "tiny", "tiny")
    toks = _tokens(data_root)
    t = build_item_texts(table, toks, template="{title} by {brand}")
    i = toks.index("i7")
    assert t.texts[i].startswith("copper pan & lid by ")
    with pytest.raises(FeatureError, match="unknown field"):
        build_item_texts(table, toks, template="{nope}")
    bad = data_root / "badid"
    bad.mkdir()
    (bad / "badid.item").write_text("item_id:float\ttitle:token_seq\n1.5\tpan\n")
    with pytest.raises(DataError, match=r"badid.item: id column item_id must be typed token, not float"):
        read_item_table(bad, "badid")


@pytest.mark.parametrize("template,problem", [("{", "Single '{'"), ("{title:d}", "Unknown format code 'd'"),
                                              ("{title!x}", "Unknown conversion specifier x"),
                                              ("{title:{brand}}", "nested field"), ("{}", "positional field")])
def test_bad_text_template_is_one_line_error_before_any_work(data_root, tiny_bert, monkeypatch, template, problem):
    table = read_item_table(data_root / "tiny", "tiny")
    with pytest.raises(FeatureError) as e:
        build_item_texts(table, _tokens(data_root), template=template)
    msg = str(e.value)
    assert f"text template {template!r}" in msg and problem in msg and "\n" not in msg

    def no_model(*a, **kw):
        raise AssertionError("a text model was loaded for a bad template")

    monkeypatch.setattr(ex, "TextEncoder", no_model)
    with pytest.raises(FeatureError, match="text template"):
        _extract(data_root, tiny_bert, text_template=template)
    assert not (data_root / "tiny" / "features").exists()  # nothing written, not even the folder
    r = CliRunner().invoke(app, ["extract", "--dataset", "tiny", "--data-dir", str(data_root), "--text-model",
                                 str(tiny_bert), "--no-image", "--text-template", template], catch_exceptions=False)
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert problem in r.output and not (data_root / "tiny" / "features").exists()


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("pooling,dim", [("embed", 12), ("cls", 24)])
def test_image_rows_align_and_record_missing(data_root, tiny_bert, tiny_clip, pooling, dim):
    m = _extract(data_root, tiny_bert, text=False, image=True, image_model=TINY_CLIP, pretrained=str(tiny_clip),
                 image_pooling=pooling)
    toks = _tokens(data_root)
    fs = load_features(data_root / "tiny", toks)
    assert fs.text is None and fs.image.shape == (len(toks), dim)
    assert m["image"]["model"]["random_weights"] is False and m["image"]["pretrained"] == str(tiny_clip)
    reasons = {e["item"]: e["reason"] for e in m["image"]["missing"]}
    assert set(reasons) == {NO_IMAGE, CORRUPT}
    assert reasons[NO_IMAGE] == "no_file" and reasons[CORRUPT].startswith("unreadable")
    enc = ImageEncoder(TINY_CLIP, str(tiny_clip), pooling=pooling, device="cpu")
    for i, tok in enumerate(toks[1:], start=1):
        if tok in reasons:
            assert not fs.image_mask[i] and torch.all(fs.image[i] == 0)
        else:
            one = enc.encode(enc.load(data_root / "tiny" / "images" / f"{tok}.png").unsqueeze(0))[0]
            torch.testing.assert_close(fs.image[i], one, atol=1e-5, rtol=1e-4)


def test_random_image_weights_only_when_asked(data_root, tiny_bert):
    with pytest.raises(FeatureError, match="no pretrained weights"):
        ImageEncoder(TINY_CLIP, None)
    m = _extract(data_root, tiny_bert, text=False, image=True, image_model=TINY_CLIP, random_image_weights=True)
    assert m["image"]["model"]["random_weights"] is True and m["image"]["pretrained"] is None


# ------------------------------------------------------------------------------------------ errors


def test_missing_weights_messages(tmp_path, tiny_bert):
    with pytest.raises(FeatureError) as e:
        TextEncoder("bert-base-uncased")
    msg = str(e.value)
    assert "'bert-base-uncased'" in msg and "cache" in msg and "--text-model /path/to/dir" in msg and "\n" not in msg
    with pytest.raises(FeatureError, match="not found"):
        TextEncoder(str(tmp_path / "nowhere" / "model"))
    # a folder with a config and tokenizer but no weights
    cfg_only = tmp_path / "cfg-only"
    cfg_only.mkdir()
    for f in ("config.json", "vocab.txt", "tokenizer_config.json"):
        if (tiny_bert / f).exists():
            (cfg_only / f).write_bytes((tiny_bert / f).read_bytes())
    with pytest.raises(FeatureError, match="--text-model"):
        TextEncoder(str(cfg_only))
    # weights that cover only part of the model are refused, never topped up with random layers
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_bert.iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((partial / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (partial / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FeatureError, match="refusing randomly initialised"):
        TextEncoder(str(partial))
    with pytest.raises(FeatureError) as e:
        ImageEncoder("ViT-B-16", "openai")
    msg = str(e.value)
    assert "'ViT-B-16'" in msg and "'openai'" in msg and "--pretrained /path/" in msg and "\n" not in msg


def test_bad_inputs_fail_before_any_model_loads_or_folder_appears(data_root, tiny_bert, tiny_clip, monkeypatch):
    """Names of models and files, fields, options and the dataset are checked before a model is loaded,
    and a model that cannot be loaded stops the run before any item is embedded: no features/ folder."""
    out = data_root / "tiny" / "features"
    loaded = []
    real_text = ex.TextEncoder

    def counting(*a, **kw):
        loaded.append(a[0])
        return real_text(*a, **kw)

    monkeypatch.setattr(ex, "TextEncoder", counting)
    bad = [
        (dict(image=True, image_model="NOPE"), "unknown image model 'NOPE'"),
        (dict(image=True, image_model=TINY_CLIP, pretrained=str(data_root / "none.pt")), "none.pt: pretrained"),
        (dict(image=True, image_model=TINY_CLIP, pretrained="nosuchtag"), "neither a known tag"),
        (dict(text_fields=["nope"]), "unknown text field(s) nope"),
        (dict(text_fields=["title"], text_template="{title}"), "not both"),
        (dict(text_pooling="max"), "text pooling"),
        (dict(image=True, image_pooling="max"), "image pooling"),
        (dict(max_length=0), "max_length"),
        (dict(batch_size=0), "batch size"),
        (dict(all_category_paths=True), "tiny.meta.jsonl: not found"),
    ]
    for kw, message in bad:
        with pytest.raises(FeatureError, match=re.escape(message)):
            _extract(data_root, tiny_bert, **kw)
        assert not loaded and not out.exists(), kw
    with pytest.raises(FeatureError, match="text model folder not found"):
        _extract(data_root, data_root / "no-model")
    # a checkpoint that passes the checks but does not load: no text batch is embedded before it fails
    junk = data_root / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(TextEncoder, "encode", lambda *a: pytest.fail("text embedded before the image model loaded"))
    with pytest.raises(FeatureError, match="junk.pt"):
        _extract(data_root, tiny_bert, image=True, image_model=TINY_CLIP, pretrained=str(junk))
    assert not out.exists()


def test_missing_item_file_skips_default_text_but_refuses_explicit_text(data_root, tiny_bert, tiny_clip):
    (data_root / "tiny" / "tiny.item").unlink()
    kw = dict(text_model=None, image=True, image_model=TINY_CLIP, pretrained=str(tiny_clip))
    m = _extract(data_root, tiny_bert, **kw)  # the default text model is not even needed: there is no text
    assert m["text"]["status"] == "skipped" and "no tiny.item file" in m["text"]["reason"]
    assert m["image"]["status"] == "ok" and m["cat"]["status"] == "skipped"
    for explicit in (dict(text_model=str(tiny_bert)), dict(text_fields=["title"]), dict(text_template="{title}")):
        with pytest.raises(FeatureError, match=r"tiny\.item: not found; item text comes from it"):
            _extract(data_root, tiny_bert, **{**kw, **explicit, "overwrite": True})
    with pytest.raises(FeatureError, match="no feature could be extracted"):
        _extract(data_root, tiny_bert, text_model=None, overwrite=True)
    assert (data_root / "tiny" / "features" / "manifest.json").is_file()  # the earlier features are kept


def test_no_features_and_fingerprint_mismatch(data_root, tiny_bert):
    toks = _tokens(data_root)
    with pytest.raises(FeatureError, match=r"athwe extract --dataset tiny"):
        load_features(data_root / "tiny", toks)
    _extract(data_root, tiny_bert)
    swapped = list(toks)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(FeatureError, match=r"features[/\\]manifest\.json: features were extracted for item map"):
        load_features(data_root / "tiny", swapped)
    torch.save(torch.zeros(3, 16), data_root / "tiny" / "features" / "txt_emb.pt")
    with pytest.raises(FeatureError, match="txt_emb.pt"):
        load_features(data_root / "tiny", toks)


def test_damaged_manifest_fields_are_one_line_errors(data_root, tiny_bert, tmp_path):
    toks = _tokens(data_root)
    _extract(data_root, tiny_bert)
    mpath = data_root / "tiny" / "features" / "manifest.json"
    good = json.loads(mpath.read_text())
    damaged = [
        ("item_map", {**good, "item_map": "abc"}),
        ("item_map", {k: v for k, v in good.items() if k != "item_map"}),
        ("item_map.fingerprint", {**good, "item_map": {"n_items": 3}}),
        ("text", {**good, "text": "abc"}),
        ("text.status", {**good, "text": {**good["text"], "status": 5}}),
        ("text.file", {**good, "text": {**good["text"], "file": 123}}),
        ("text.file", {**good, "text": {**good["text"], "file": None}}),
        ("text.file", {**good, "text": {**good["text"], "file": ""}}),
        ("text.file", {**good, "text": {**good["text"], "file": "../tiny.inter"}}),
        ("text.missing", {**good, "text": {**good["text"], "missing": 5}}),
        ("text.missing", {**good, "text": {**good["text"], "missing": None}}),
        ("text.missing", {**good, "text": {**good["text"], "missing": [True]}}),
        ("text.dim", {**good, "text": {**good["text"], "dim": "16"}}),
        ("text.sha256", {**good, "text": {**good["text"], "sha256": 5}}),
        ("cat.vocab", {**good, "cat": {**good["cat"], "vocab": "abc"}}),
    ]
    for name, manifest in damaged:
        mpath.write_text(json.dumps(manifest))
        with pytest.raises(FeatureError) as e:
            load_features(data_root / "tiny", toks)
        msg = str(e.value)
        assert msg.startswith(f"{mpath}: field {name}") and "\n" not in msg, (name, msg)
    mpath.write_text(json.dumps({**good, "item_map": "abc"}))
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["train", "--model", "athwe", "--dataset", "tiny", "--data-dir", str(data_root),
                                 "--runs-dir", str(runs), "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output  # stdout: the data summary
    assert r.stderr.startswith("error: ") and "manifest.json: field item_map" in r.stderr
    assert not runs.exists() or not any(runs.iterdir())
    mpath.write_text(json.dumps(good))
    load_features(data_root / "tiny", toks)


def test_unreadable_feature_file_is_one_line_error(data_root, tiny_bert):
    toks = _tokens(data_root)
    _extract(data_root, tiny_bert)
    path = data_root / "tiny" / "features" / "txt_emb.pt"
    for junk in (np.random.default_rng(0).bytes(400), path.read_bytes()[:200]):
        path.write_bytes(junk)
        with pytest.raises(FeatureError) as e:
            load_features(data_root / "tiny", toks)
        msg = str(e.value)
        assert msg.startswith(f"{path}: cannot be read as a tensor file") and "\n" not in msg, msg
        assert "weights_only" not in msg


def test_upstream_layout_realigned_by_item2id(data_root, tmp_path):
    d = data_root / "tiny"
    toks = _tokens(data_root)
    rng = np.random.default_rng(0)
    order = [toks[i] for i in rng.permutation(np.arange(1, len(toks)))]
    dropped = order.pop()  # an item upstream never saw
    item2id = {"[PAD]": 0, **{t: k for k, t in enumerate(order, start=1)}}
    txt = torch.zeros(len(item2id), 4)
    for t, k in item2id.items():
        if k:
            txt[k] = float(k)
    zero_item = order[0]
    txt[item2id[zero_item]] = 0.0  # upstream wrote zeros for items without text
    cat = torch.zeros(len(item2id), 3, dtype=torch.long)
    cat[1:, 1] = 1
    torch.save(txt, d / "txt_emb.pt")
    torch.save(cat, d / "cat.pt")
    with pytest.raises(FeatureError, match="no item2id mapping"):
        load_features(d, toks)
    (d / "item2id").write_bytes(pickle.dumps(item2id))
    fs = load_features(d, toks)
    assert fs.layout == "upstream" and fs.text.shape == (len(toks), 4) and fs.cat.dtype == torch.float32
    for i, t in enumerate(toks[1:], start=1):
        if t in (dropped, zero_item):
            assert not fs.text_mask[i] and torch.all(fs.text[i] == 0)
        else:
            assert fs.text_mask[i] and fs.text[i, 0] == float(item2id[t])
    assert fs.cat[toks.index(dropped)].sum() == 0 and fs.cat[toks.index(order[1])].tolist() == [0.0, 1.0, 0.0]
    (d / "item2id").unlink()
    (d / "item2id.json").write_text(json.dumps(item2id))
    assert torch.equal(load_features(d, toks).text, fs.text)
    (d / "item2id.json").write_text(json.dumps({"x": 1, "y": 2}))
    with pytest.raises(FeatureError, match="none of the dataset's"):
        load_features(d, toks)


def test_item2id_pickle_with_classes_is_refused(data_root):
    d = data_root / "tiny"
    torch.save(torch.zeros(2, 2), d / "txt_emb.pt")
    (d / "item2id").write_bytes(pickle.dumps({"i1": 1, "path": Path("x")}))
    with pytest.raises(FeatureError, match="item2id"):
        load_features(d, _tokens(data_root))


def test_categories_first_and_all_paths(data_root, tiny_bert):
    d = data_root / "tiny"
    toks = _tokens(data_root)
    meta = [{"item": t, "categories": [["Home", "Kitchen"], ["Gifts", "For Cooks"]]} for t in toks[1:]]
    (d / "tiny.meta.jsonl").write_text("\n".join(json.dumps(r) for r in meta) + "\n")
    m = _extract(data_root, tiny_bert, text=False, all_category_paths=True)
    fs = load_features(d, toks)
    assert fs.cat_vocab == ["Home", "Kitchen", "Gifts", "For_Cooks"] and m["cat"]["paths"] == "all"
    assert torch.all(fs.cat[1:] == 1) and torch.all(fs.cat[0] == 0)
    _extract(data_root, tiny_bert, text=False, overwrite=True)
    fs = load_features(d, toks)
    i = toks.index("i6")  # 6 % 3 == 0: Home Kitchen Cookware
    assert {fs.cat_vocab[j] for j in torch.nonzero(fs.cat[i]).flatten().tolist()} == {"Home", "Kitchen", "Cookware"}
    assert fs.cat[toks.index(NO_ROW)].sum() == 0


# ------------------------------------------------------------------------------------------ real model


def test_packaged_minilm_matches_sentence_transformers():
    texts = ["red running shoes", "crimson sneakers for jogging", "stainless steel saucepan", "a cast iron skillet"]
    enc = TextEncoder(str(packaged_minilm_dir()), device="cpu")
    assert enc.pooling == "mean" and enc.normalize and enc.max_length == 256 and enc.info.dim == 384
    emb = enc.encode(texts)
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 0] + 0.2
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(packaged_minilm_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref.float().cpu(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_extract(data_root, tiny_bert):
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--dataset", "tiny", "--data-dir", str(data_root),
                            "--text-model", str(tiny_bert),
                            "--no-image", "--batch-size", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "txt_emb.pt" in r.output and "cat.pt" in r.output and "image      not requested" in r.output
    r = runner.invoke(app, ["extract", "--dataset", "tiny", "--data-dir", str(data_root),
                            "--text-model", str(tiny_bert)])
    assert r.exit_code == 2 and "--overwrite" in r.output and len(r.output.strip().splitlines()) == 1
    for bad in (["--image-pooling", "mean"], ["--device", "bogus"], ["--dataset", "nope"], ["--batch-size", "0"]):
        args = ["extract", "--data-dir", str(data_root), "--text-model", str(tiny_bert), "--overwrite"]
        if "--dataset" not in bad:
            args += ["--dataset", "tiny"]
        r = runner.invoke(app, args + bad)
        assert r.exit_code == 2, (bad, r.output)
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
