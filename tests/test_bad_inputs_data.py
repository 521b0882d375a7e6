"""Bad data and extraction input at the command line: the encoding and extraction rows of the bad-input
table (tests/test_bad_inputs.py runs them with the rest), and valid input that looks odd.

The table's contract (tests/test_bad_inputs.py): every case ends with
exit code 2 and exactly one `error: ...` line on stderr naming the file or option at fault, and leaves
no new file or folder behind (under tmp_path, the working directory included): a failed `athwe extract`
creates no `features/` folder, a failed `athwe data import` no dataset or --data-dir folder. A `Case`'s
`setup` writes what it needs under tmp_path and returns the argv.
Classes here: encoding (text files that are not UTF-8; a UTF-8 byte-order mark is valid input and is
tested separately, as positive cases) and extraction (models, fields, options of `athwe extract`).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from athwe.cli import app  # noqa: E402
from conftest import write_tiny_dataset  # noqa: E402
from tiny_models import TINY_CLIP, make_tiny_bert, make_tiny_clip  # noqa: E402

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Case:
    """One row of the bad-input table (tests/test_bad_inputs.py runs every row, these too)."""

    id: str
    kind: str  # config-shape | numbers | parse-errors | divergence | run-folder | encoding | extraction
    setup: Callable[[Path], list[str] | tuple[list[str], dict[str, str]]]  # returns argv or (argv, env)
    needle: str  # text the one error line must hold: it names the file or option in question


# ---- helpers for setups -------------------------------------------------------------------------

ITEM_HEADER = "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token"


def tiny_data(tmp: Path, name: str = "x", item: bool = True, images: bool = False) -> Path:
    """A tiny atomic dataset <tmp>/data/<name>/ (items i1..i12), with a .item file and PNG images
    when asked; returns the data dir."""
    root = write_tiny_dataset(tmp / "data", name, n_users=20, n_items=12, seed=1)
    d = root / name
    if item:
        rows = [f"i{k}\tcopper pan {k}\tHome Kitchen\tacme" for k in range(1, 13)]
        (d / f"{name}.item").write_text("\n".join([ITEM_HEADER, *rows]) + "\n", encoding="utf-8")
    if images:
        from PIL import Image

        (d / "images").mkdir()
        for k in range(1, 4):
            rng = np.random.default_rng(k)
            Image.fromarray(rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)).save(d / "images" / f"i{k}.png")
    return root


def extract_args(*args: str, item: bool = True, images: bool = False,
                 prepare: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    """`athwe extract --dataset x ARGS` on the tiny dataset; {tmp} in an argument becomes tmp_path;
    `prepare(tmp)` writes anything else the case needs."""
    def setup(tmp: Path) -> list[str]:
        root = tiny_data(tmp, item=item, images=images)
        if prepare is not None:
            prepare(tmp)
        return ["extract", "--dataset", "x", "--data-dir", str(root), *(a.replace("{tmp}", str(tmp)) for a in args)]
    return setup


def dataset_file(name: str, data: bytes, *command: str) -> Callable[[Path], list[str]]:
    """Dataset x whose file `name` (x.inter, x.txt, x.item, x.meta.jsonl, ...) holds `data`, and
    `athwe COMMAND --dataset x --data-dir DATA` (data info by default)."""
    def setup(tmp: Path) -> list[str]:
        d = tmp / "data" / "x"
        if name.endswith(".inter") or name.endswith(".txt"):
            d.mkdir(parents=True)
        else:
            tiny_data(tmp)
        (d / name).write_bytes(data)
        return [*(command or ("data", "info")), "--dataset", "x", "--data-dir", str(tmp / "data")]
    return setup


def import_file(name: str, data: bytes, *extra: str) -> Callable[[Path], list[str]]:
    """`athwe data import raw/NAME --name x` (into ./dataset, which does not exist yet)."""
    def setup(tmp: Path) -> list[str]:
        (tmp / "raw").mkdir()
        (tmp / "raw" / name).write_bytes(data)
        return ["data", "import", str(tmp / "raw" / name), "--name", "x", *extra]
    return setup


def import_atomic_folder(bad: str, data: bytes) -> Callable[[Path], list[str]]:
    """`athwe data import raw/src --name x --data-dir out/new` on an atomic folder whose file `bad`
    (src.item, src.user) holds `data`."""
    def setup(tmp: Path) -> list[str]:
        src = tmp / "raw" / "src"
        src.mkdir(parents=True)
        (src / "src.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\t2\n",
                                       encoding="utf-8")
        (src / bad).write_bytes(data)
        (tmp / "out").mkdir()
        return ["data", "import", str(src), "--name", "x", "--data-dir", str(tmp / "out" / "new" / "deeper")]
    return setup


def tiny_bert(tmp: Path) -> None:
    make_tiny_bert(tmp / "bert")


def unloadable_model(tmp: Path) -> None:
    """A folder that looks like a model (config.json) but holds no loadable one."""
    (tmp / "badmodel").mkdir()
    (tmp / "badmodel" / "config.json").write_text('{"model_type": "bert", "hidden_size": ', encoding="utf-8")


def damaged_checkpoint(tmp: Path) -> None:
    """The tiny BERT, the tiny open_clip architecture registered, and a checkpoint file of junk."""
    make_tiny_bert(tmp / "bert")
    make_tiny_clip(tmp / "clip")
    (tmp / "junk.pt").write_bytes(np.random.default_rng(0).bytes(300))


def earlier_work(tmp: Path) -> None:
    """Resumable shards of an interrupted earlier extraction: a failed run must keep them."""
    work = tmp / "data" / "x" / "features" / ".partial" / "text-0123456789abcdef"
    work.mkdir(parents=True)
    torch.save({"ids": [1, 2], "rows": torch.zeros(2, 4), "errors": [None, None]}, work / "000000.pt")


def extracted_before(tmp: Path) -> None:
    """Features from an earlier extraction: a failed --overwrite run must leave them as they were."""
    out = tmp / "data" / "x" / "features"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}", encoding="utf-8")
    torch.save(torch.zeros(13, 4), out / "txt_emb.pt")


LATIN1_INTER = "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\ncaf\u00e9\ti2\t2\n".encode("latin-1")
LATIN1_ITEM = f"{ITEM_HEADER}\ni1\tpan\tHome\tacme\ni2\tcaf\u00e9 cup\tHome\tacme\n".encode("latin-1")
REVIEW = '{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1, "overall": 5.0}\n'
MINILM = "packaged-minilm"  # a text model that passes the checks without loading anything

# ---- the table ----------------------------------------------------------------------------------

CASES = [
    # encoding: text that is not UTF-8 (Latin-1, UTF-16, a stray byte-order mark), named by file and line
    Case("inter-latin1", "encoding", dataset_file("x.inter", LATIN1_INTER),
         "x.inter:3: not UTF-8 text (invalid continuation byte at byte 4 of the line)"),
    Case("inter-utf16", "encoding", dataset_file("x.inter", "user_id:token\titem_id:token\nu1\ti1\n".encode("utf-16")),
         "x.inter: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    Case("inter-bom-inside", "encoding",
         dataset_file("x.inter", b"user_id:token\titem_id:token\nu1\ti1\n" + BOM + b"u2\ti2\n"),
         "x.inter:3: byte-order mark (U+FEFF) inside the file, not at its start"),
    Case("txt-latin1", "encoding", dataset_file("x.txt", b"u1 1 2\nu\xe9 2 3\n"), "x.txt:2: not UTF-8 text"),
    Case("item-latin1-extract", "encoding", dataset_file("x.item", LATIN1_ITEM, "extract", "--text-model", MINILM),
         "x.item:3: not UTF-8 text"),
    Case("meta-latin1-images", "encoding",
         dataset_file("x.meta.jsonl", b'{"item": "i1", "image_urls": []}\n{"item": "caf\xe9"}\n', "data", "images"),
         "x.meta.jsonl:2: not UTF-8 text"),
    Case("meta-latin1-all-category-paths", "encoding",
         dataset_file("x.meta.jsonl", b'{"item": "i1"}\n{"item": "caf\xe9"}\n', "extract", "--no-text", "--no-image",
                      "--all-category-paths"),
         "x.meta.jsonl:2: not UTF-8 text"),
    Case("import-jsonl-latin1", "encoding", import_file("r.json", REVIEW.encode() + b'{"reviewerID": "caf\xe9"}\n'),
         "r.json:2: not UTF-8 text (invalid continuation byte at byte 20 of the line)"),
    Case("import-csv-utf16", "encoding",
         import_file("r.csv", "user_id,parent_asin,rating,timestamp\nA1,B1,5,1000\n".encode("utf-16")),
         "r.csv: UTF-16 text"),
    Case("import-item-latin1", "encoding", import_atomic_folder("src.item", LATIN1_ITEM),
         "src.item:3: not UTF-8 text"),
    Case("import-user-bom-inside", "encoding",
         import_atomic_folder("src.user", b"user_id:token\tage:float\nu1\t3\n" + BOM + b"u2\t4\n"),
         "src.user:3: byte-order mark (U+FEFF) inside the file"),
    # extraction: what `athwe extract` can check before it loads a model or computes a feature
    Case("text-model-missing", "extraction", extract_args("--text-model", "{tmp}/no/such/model"),
         "no/such/model: text model folder not found; --text-model takes"),
    Case("text-model-no-config", "extraction", extract_args("--text-model", "{tmp}/data"),
         "data: not a transformers model folder (no config.json)"),
    Case("text-model-is-a-file", "extraction", extract_args("--text-model", "{tmp}/data/x/x.item"),
         "x.item: a file, not a model folder"),
    Case("text-model-unloadable", "extraction",
         extract_args("--text-model", "{tmp}/badmodel", prepare=unloadable_model),
         "badmodel': weights or tokenizer not found/loadable in the folder"),
    Case("image-model-unknown", "extraction", extract_args("--text-model", MINILM, "--image-model", "NOPE"),
         "unknown image model 'NOPE' (--image-model takes an open_clip architecture"),
    Case("image-model-typo", "extraction", extract_args("--no-text", "--image-model", "ViT-B-61"),
         "(--image-model takes an open_clip architecture such as ViT-B-16 or ViT-L-14; did you mean ViT-B-16"),
    Case("pretrained-file-missing", "extraction",
         extract_args("--text-model", MINILM, "--image-model", "ViT-B-16", "--pretrained", "{tmp}/no/such/file.pt"),
         "no/such/file.pt: pretrained checkpoint file not found (--pretrained takes"),
    Case("pretrained-tag-unknown", "extraction", extract_args("--text-model", MINILM, "--pretrained", "nosuchtag"),
         "pretrained 'nosuchtag' is neither a known tag"),
    Case("pretrained-is-a-folder", "extraction", extract_args("--text-model", MINILM, "--pretrained", "{tmp}/data"),
         "data: a folder, not a checkpoint file (--pretrained"),
    Case("pretrained-damaged", "extraction",
         extract_args("--text-model", "{tmp}/bert", "--image-model", TINY_CLIP, "--pretrained", "{tmp}/junk.pt",
                      images=True, prepare=damaged_checkpoint),
         f"image model '{TINY_CLIP}' (pretrained "),
    Case("no-item-file-with-text-model", "extraction", extract_args("--text-model", MINILM, item=False),
         "x.item: not found; item text comes from it (pass --no-text"),
    Case("no-item-file-with-text-fields", "extraction", extract_args("--text-fields", "title", item=False),
         "x.item: not found; item text comes from it"),
    Case("nothing-to-extract-without-item", "extraction", extract_args("--no-image", item=False),
         "no feature could be extracted (text: no x.item file"),
    Case("text-fields-unknown", "extraction", extract_args("--text-model", MINILM, "--text-fields", "title,nope"),
         "x.item: unknown text field(s) nope (--text-fields)"),
    Case("text-fields-empty", "extraction", extract_args("--text-model", MINILM, "--text-fields", ","),
         "text fields (--text-fields) must name .item columns"),
    Case("text-fields-and-template", "extraction",
         extract_args("--text-model", MINILM, "--text-fields", "title", "--text-template", "{title}"),
         "pass text fields (--text-fields) or a text template (--text-template), not both"),
    Case("text-template-unknown-field", "extraction",
         extract_args("--text-model", MINILM, "--text-template", "{nope}"),
         "x.item: text template '{nope}' uses unknown field(s) nope (--text-template)"),
    Case("all-category-paths-without-meta", "extraction", extract_args("--no-text", "--all-category-paths"),
         "x.meta.jsonl: not found; all category paths come from it"),
    Case("device-bogus", "extraction", extract_args("--text-model", MINILM, "--device", "bogus"),
         "device 'bogus' is not a torch device"),
    Case("device-meta", "extraction", extract_args("--text-model", MINILM, "--device", "meta"), "device 'meta'"),
    Case("batch-size-zero", "extraction", extract_args("--text-model", MINILM, "--batch-size", "0"), "--batch-size"),
    Case("batch-size-negative", "extraction", extract_args("--text-model", MINILM, "--batch-size", "-3"),
         "--batch-size"),
    Case("text-pooling-unknown", "extraction", extract_args("--text-model", MINILM, "--text-pooling", "max"),
         "--text-pooling"),
    Case("image-pooling-unknown", "extraction", extract_args("--text-model", MINILM, "--image-pooling", "mean"),
         "--image-pooling"),
    Case("dataset-missing", "extraction", extract_args("--dataset", "nope"), "nope: dataset folder not found"),
    Case("bad-option-keeps-earlier-work", "extraction",
         extract_args("--text-model", MINILM, "--image-model", "NOPE", prepare=earlier_work),
         "unknown image model 'NOPE'"),
    Case("bad-option-with-overwrite-keeps-features", "extraction",
         extract_args("--overwrite", "--text-model", "{tmp}/no/such/model", prepare=extracted_before),
         "no/such/model: text model folder not found"),
    Case("already-extracted", "extraction", extract_args("--text-model", MINILM, prepare=extracted_before),
         "features/manifest.json: features already extracted (pass --overwrite"),
]


# ---- valid input that looks odd: a UTF-8 byte-order mark (what spreadsheet tools write) ----------


def _with_bom(path: Path, crlf: bool = False) -> None:
    data = path.read_bytes()
    path.write_bytes(BOM + (data.replace(b"\n", b"\r\n") if crlf else data))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_bom_dataset_reads_and_extracts_like_plain_utf8(tmp_path, bert_dir, crlf):
    """.inter and .item saved with a byte-order mark (and CRLF line ends): `athwe data info` and
    `athwe extract` succeed and give what the same files without it give."""
    import json

    from athwe.feature_extraction import load_features
    from athwe.dataset.sequences import load_sequences

    runner = CliRunner()
    plain, bom = tiny_data(tmp_path / "plain"), tiny_data(tmp_path / "bom")
    for f in ("x.inter", "x.item"):
        _with_bom(bom / "x" / f, crlf)
    infos = []
    for root in (plain, bom):
        r = runner.invoke(app, ["data", "info", "--dataset", "x", "--data-dir", str(root), "--json"])
        assert r.exit_code == 0 and not r.stderr, r.output
        infos.append(json.loads(r.stdout))
        r = runner.invoke(app, ["extract", "--dataset", "x", "--data-dir", str(root), "--text-model", str(bert_dir),
                                "--no-image", "--device", "cpu", "--batch-size", "5"])
        assert r.exit_code == 0, r.output
    assert infos[0]["item_fingerprint"] == infos[1]["item_fingerprint"] and infos[0]["users"] == infos[1]["users"]
    toks = load_sequences(plain, "x").item_tokens
    a, b = load_features(plain / "x", toks), load_features(bom / "x", toks)
    assert a.text_mask.all() == b.text_mask.all() and bool(b.text_mask[1:].all())
    torch.testing.assert_close(a.text, b.text, atol=0, rtol=0)
    assert a.cat_vocab == b.cat_vocab == ["Home", "Kitchen"] and torch.equal(a.cat, b.cat)


def test_bom_sources_import_from_the_command_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "r.json").write_bytes(BOM + REVIEW.encode() + REVIEW.replace("A1", "A2").encode())
    r = runner.invoke(app, ["data", "import", str(tmp_path / "raw" / "r.json"), "--name", "j", "--data-dir",
                            str(tmp_path / "d"), "--no-find-meta"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "j" / "j.inter").read_text(encoding="utf-8").splitlines()[1:] == ["A1\tB1\t5\t1",
                                                                                               "A2\tB1\t5\t1"]
    root = tiny_data(tmp_path / "src")
    for f in ("x.inter", "x.item"):
        _with_bom(root / "x" / f, crlf=True)
    r = runner.invoke(app, ["data", "import", str(root / "x"), "--name", "a", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "a" / "a.item").read_bytes().startswith(ITEM_HEADER.encode())  # written without BOM


def test_failed_extraction_after_work_started_keeps_its_shards_and_no_empty_folders(tmp_path, bert_dir, monkeypatch):
    """A failure once batches were saved (here an interruption in the second text batch) keeps the
    finished shards for the next run; one before the first batch leaves no folder at all."""
    from athwe.feature_extraction.text import TextEncoder

    root = tiny_data(tmp_path)
    real = TextEncoder.encode
    calls = {"n": 0, "fail_at": 1}

    def flaky(self, texts):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(TextEncoder, "encode", flaky)
    argv = ["extract", "--dataset", "x", "--data-dir", str(root), "--text-model", str(bert_dir), "--no-image",
            "--batch-size", "4", "--device", "cpu"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 130, r.output
    assert not (root / "x" / "features").exists()  # interrupted before any batch was saved: nothing left
    calls.update(n=0, fail_at=2)
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 130, r.output
    shards = sorted(p.relative_to(root / "x").as_posix() for p in (root / "x" / "features").rglob("*.pt"))
    assert len(shards) == 1 and shards[0].startswith("features/.partial/text-"), shards
    calls.update(n=0, fail_at=0)
    r = CliRunner().invoke(app, argv + ["--json"])
    assert r.exit_code == 0, r.output
    assert '"batches_resumed": 1' in r.stdout and not (root / "x" / "features" / ".partial").exists()
