"""New items from their content on an ATHWE run whose dataset features were extracted with a tiny
real BERT and CLIP: `athwe items add` gives them the vectors computed by hand (text and image
through the model's projections, the learned missing vectors, the mean ID embedding), they are
recommendable and usable as history at once and after a restart, and bad input is refused in one
line with nothing written."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from athwe.cli import app  # noqa: E402
from athwe.config import resolve_config  # noqa: E402
from athwe.errors import AthweError  # noqa: E402
from athwe.feature_extraction import extract as ex  # noqa: E402
from athwe.feature_extraction.image import ImageEncoder  # noqa: E402
from athwe.feature_extraction.text import TextEncoder  # noqa: E402
from athwe.retrieval import Retriever, build_run_index, new_items  # noqa: E402
from athwe.training import trainer as tr  # noqa: E402
from conftest import write_tiny_dataset  # noqa: E402
from test_models_common import small_config  # noqa: E402
from test_serving_core import assert_top_k, model_scores  # noqa: E402
from tiny_models import TINY_CLIP, WORDS, write_png  # noqa: E402

torch.set_num_threads(1)
HISTORY = ["i3", "i4", "i6", "i9"]
TIMES = [1.6e9, 1.6e9 + 3_600, 1.6e9 + 90_000, 1.6e9 + 400_000]


def _train(root: Path, data: Path, model: str, *extra: str) -> Path:
    overrides = [f"model_args.{k}={v}" for k, v in small_config(model).items()] + list(extra)
    cfg = resolve_config(model, "tiny", overrides=overrides, flags={
        "data.data_dir": str(data), "data.max_seq_length": 8, "train.epochs": 1, "data.preset": "recbole",
        "train.runs_dir": str(root / "runs")})
    run, _ = tr.train(cfg, run_dir=root / f"run-{model}-{len(extra)}", printer=lambda s: None, progress=False)
    return run


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, tiny_clip) -> dict[str, Path]:
    """The tiny dataset with a .item file (every 7th item without a row, so without text) and images
    (every 5th item from 3 without), features extracted with the tiny BERT and CLIP; an ATHWE run
    (id, text, image; time-routed experts), a SASRec run and an ATHWE run with modalities [id]."""
    root = tmp_path_factory.mktemp("new-items")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATHWE_CACHE_DIR", str(root / "cache"))
        mp.setattr("athwe.training.trainer.busy_cpus_elsewhere", lambda window=0.1: None)
        data = write_tiny_dataset(root / "data")
        d = data / "tiny"
        (d / "images").mkdir()
        lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token"]
        for k in range(1, 51):
            if k % 7 == 0:
                continue
            cats = ["Home Lamps", "Apparel Shoes", "Outdoors Trail"][k % 3]
            brand = ["acme", "globex", "initech"][k % 3]
            lines.append(f"i{k}\t{WORDS[k % 10]} {WORDS[(3 * k) % 17]}\t{cats}\t{brand}")
            if k % 5 != 3:
                write_png(d / "images" / f"i{k}.png", k)
        (d / "tiny.item").write_text("\n".join(lines) + "\n")
        ex.extract_features("tiny", data, text_model=str(tiny_bert), image=True, image_model=TINY_CLIP,
                            pretrained=str(tiny_clip), batch_size=16, progress=False)
        return {"athwe": _train(root, data, "athwe"), "sasrec": _train(root, data, "sasrec"),
                "athwe-id": _train(root, data, "athwe", "model_args.modalities=[id]"), "dataset": d}


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the ATHWE run (additions change the run folder)."""
    return Path(shutil.copytree(trained["athwe"], tmp_path / "run"))


@pytest.fixture
def image_server(trained):
    """An HTTP server on 127.0.0.1 serving the dataset's images folder; yields its base URL."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(trained["dataset"] / "images")))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def query(r: Retriever, tokens: list[str], times: list[float]) -> torch.Tensor:
    """The model's query vector for a history, computed directly (not through the Retriever)."""
    from athwe.dataset.split import Batch

    n = r.cfg.data.max_seq_length
    ids = torch.zeros(1, n, dtype=torch.long)
    ts = torch.zeros(1, n, dtype=torch.float64)
    ids[0, n - len(tokens):] = torch.tensor([r.token_index[t] for t in tokens])
    ts[0, n - len(times):] = torch.tensor(times, dtype=torch.float64)
    with torch.inference_mode():
        q = r.model.query_vectors(Batch(ids, ts, torch.zeros(1, dtype=torch.long), torch.zeros(1), ts[:, -1]))[0]
    return q.clone()


def test_cli_adds_items_with_the_vectors_computed_by_hand(run, trained, tiny_bert, tiny_clip, image_server, tmp_path):
    png = trained["dataset"] / "images" / "i1.png"
    shutil.copy(png, tmp_path / "lamp.png")
    file = jsonl(tmp_path / "new.jsonl",
                 {"item": "new-lamp", "title": "red lamp", "categories": ["Home", "Lamps"], "brand": "acme",
                  "image": "lamp.png"},  # relative to the file's folder
                 {"item": "new-shoe", "title": "running  shoes", "categories": "Apparel > Shoes", "brand": "globex"},
                 "",
                 {"item": "new-pic", "image": f"{image_server}/i1.png"})
    res = invoke("items", "add", "--run", str(run), str(file), "--id-part", "mean")
    assert res.exit_code == 0, res.output
    assert "added 3 item(s), ids 51..53 (catalogue: 50 trained + 3 added)" in res.stdout
    files = sorted(p.name for p in (run / "added_items").iterdir())
    assert len(files) == 2 and files[0].startswith("0001-") and files[1] == "index.json"
    assert json.loads((run / "added_items" / "index.json").read_text())["additions"][0]["tokens"] == [
        "new-lamp", "new-shoe", "new-pic"]

    r = Retriever(run)  # a restarted retriever sees them (ID part: the mean trained ID embedding)
    assert (r.info()["added_items"], r.info()["index_items"]) == (3, 53)
    assert r.item("new-lamp") == {"token": "new-lamp", "id": 51, "title": "red lamp", "added": True,
                                  "categories": ["Home", "Lamps"]}
    assert r.item("new-shoe")["categories"] == ["Apparel", "Shoes"] and r.item("new-pic")["title"] is None
    # by hand: text as items.py builds it, the same encoders, the model's projections and missing vectors
    m = r.model
    text = TextEncoder(str(tiny_bert), device="cpu").encode(["red lamp. Home Lamps. acme.",
                                                             "running shoes. Apparel Shoes. globex."])
    enc = ImageEncoder(TINY_CLIP, str(tiny_clip), pooling="embed", device="cpu")
    image = enc.encode(torch.stack([enc.load(png)]))
    with torch.no_grad():
        h_id = m.item_embedding.weight[1:51].mean(0)
        t, v = m.projections["text"](text), m.projections["image"](image)
        by_hand = torch.stack([torch.cat([h_id, t[0], v[0]]), torch.cat([h_id, t[1], m.missing["image"]]),
                               torch.cat([h_id, m.missing["text"], v[0]])])
    assert m.modalities == ["id", "text", "image"]
    with torch.inference_mode():
        np.testing.assert_allclose(m.item_vectors()[51:].numpy(), by_hand.numpy(), rtol=1e-5, atol=1e-6)
    q = query(r, HISTORY, TIMES)
    scores = {x.item: x.score for x in r.recommend(items=HISTORY, timestamps=TIMES, k=53, exclude_history=False)}
    np.testing.assert_allclose([scores[tok] for tok in ("new-lamp", "new-shoe", "new-pic")],
                               (by_hand @ q).numpy(), rtol=1e-5, atol=1e-6)
    # an added item as history: the model's own scores and ranking, at once
    history = [(HISTORY[:2] + ["new-lamp"], TIMES[:3])]
    recs = r.recommend(items=history[0][0], timestamps=history[0][1], k=5, exclude_history=False)
    ids = [[r.token_index[tok] for tok in history[0][0]]]
    assert_top_k(recs, model_scores(r, [(ids[0], history[0][1])])[0], set(), 5, "added item in the history")

    res = invoke("items", "list", "--run", str(run), "--json")
    assert res.exit_code == 0 and [x["token"] for x in json.loads(res.stdout)] == ["new-lamp", "new-shoe", "new-pic"]
    res = invoke("retrieve", "--run", str(run), "--items", "i3,new-lamp", "--timestamps", "1600000000,1600000100",
                 "--exclude", "new-shoe", "-k", "52", "--json")
    assert res.exit_code == 0, res.output
    got = [x["item"] for x in json.loads(res.stdout)]
    assert len(got) == 50 and not {"i3", "new-lamp", "new-shoe"} & set(got) and "new-pic" in got
    res = invoke("retrieve", "--run", str(run), "--items", "i3,new-lamp", "-k", "3")
    assert res.exit_code == 2 and "timestamps are required" in res.stderr and len(res.stderr.splitlines()) == 1


def test_added_items_win_when_their_vectors_do(run, monkeypatch):
    """In-process additions are recommendable at once: an item whose ID row points along the
    query's ID part comes first, with the score its vector gives."""
    r = Retriever(run)
    q = query(r, HISTORY, TIMES)
    h = r.model.config.hidden_size
    boost = 100.0 * q[:h] / q[:h].dot(q[:h])
    monkeypatch.setattr(new_items, "content_id_rows", lambda model, n_trained, raw, has: boost.expand(1, -1).clone())
    assert r.add_items([{"item": "winner", "title": "copper pan", "brand": "acme"}]) == ["winner"]
    recs = r.recommend(items=HISTORY, timestamps=TIMES, k=3)
    with torch.inference_mode():
        own = float(r.model.item_vectors()[51] @ q)
    assert recs[0].item == "winner" and recs[0].item_id == 51 and recs[0].title == "copper pan"
    assert own > 99.0 and recs[0].score == pytest.approx(own, rel=1e-5)
    assert Retriever(run).recommend(items=HISTORY, timestamps=TIMES, k=3)[0].item == "winner"
    build_run_index(run, "hnsw")  # the rebuilt index file holds the trained items; additions join it on loading
    again = Retriever(run)
    assert again.meta["kind"] == "hnsw" and again.index.ntotal == 51
    assert again.recommend(items=HISTORY, timestamps=TIMES, k=3)[0].item == "winner"



def test_a_trained_items_content_gives_its_extracted_features(run, trained):
    """Given item i1's .item fields and image, a new item gets exactly i1's extracted text and image
    features, so the same vector but for the ID part."""
    r = Retriever(run)
    record = {"item": "i1-again", "title": f"{WORDS[1]} {WORDS[3]}", "categories": ["Apparel", "Shoes"],
              "brand": "globex", "image": str(trained["dataset"] / "images" / "i1.png")}
    r.add_items([record])
    m, old, new = r.model, r.token_index["i1"], r.token_index["i1-again"]
    assert new == 51 and bool(m.text_has[new]) and bool(m.image_has[new])
    np.testing.assert_allclose(m.text_raw[new].numpy(), m.text_raw[old].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.image_raw[new].numpy(), m.image_raw[old].numpy(), rtol=1e-5, atol=1e-6)
    h = m.config.hidden_size
    with torch.inference_mode():
        vectors = m.item_vectors()
    np.testing.assert_allclose(vectors[new, h:].numpy(), vectors[old, h:].numpy(), rtol=1e-5, atol=1e-6)

BAD_FILES = [
    ("existing", ['{"item": "i1", "title": "x"}'], "new.jsonl:1: item 'i1' already exists in the run (a trained item"),
    ("twice", ['{"item": "n1", "title": "a"}', '{"item": "n1", "title": "b"}'],
     "new.jsonl:2: item 'n1' is given twice (also at "),
    ("malformed", ['{"item": "n1", "title": "a"}', '{"item": "n2", "title": '], "new.jsonl:2: not valid JSON"),
    ("no-image-file", ['{"item": "n1", "title": "a", "image": "missing.png"}'],
     "new.jsonl:1: image {tmp}/missing.png cannot be read (No such file or directory)"),
    ("not-an-image", ['{"item": "n1", "title": "a"}', '{"item": "n2", "image": "broken.png"}'],
     "new.jsonl:2: image {tmp}/broken.png cannot be read (not_image"),
    ("no-token", ['{"title": "a"}'], "new.jsonl:1: field item (the new item's token) is missing or empty"),
    ("bad-categories", ['{"item": "n1", "categories": 3}'], "new.jsonl:1: field categories must be a list"),
    ("bad-title", ['{"item": "n1", "title": ["a"]}'], "new.jsonl:1: field title must be a string"),
    ("unknown-field", ['{"item": "n1", "title": "a"}', '{"item": "n2", "colour": "red"}'],
     "new.jsonl:2: unknown field 'colour' (fields: item, title, categories, brand, description, image, or a column "
     "of tiny.item: title, categories, brand)"),
    ("not-an-object", ['["n1"]'], "new.jsonl:1: expected a JSON object"),
    ("empty", ["", "  "], "new.jsonl: no items"),
    ("ftp-image", ['{"item": "n1", "image": "ftp://x/y.png"}'], "only http and https URLs are fetched"),
]


@pytest.mark.parametrize("name,lines,needle", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_new_items_are_one_line_errors_and_write_nothing(run, tmp_path, name, lines, needle):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    file = tmp_path / "new.jsonl"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = tree(run)
    res = invoke("items", "add", "--run", str(run), str(file))
    assert res.exit_code == 2, res.output
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: ")
    assert needle.format(tmp=tmp_path) in res.stderr
    assert tree(run) == before and not (run / "added_items").exists()


@pytest.mark.parametrize("which,what", [("sasrec", "sasrec"), ("athwe-id", "ATHWE with modalities [id]")])
def test_id_only_runs_refuse_new_items(trained, tmp_path, which, what):
    run = trained[which]
    file = jsonl(tmp_path / "new.jsonl", {"item": "n1", "title": "red lamp"})
    before = tree(run)
    res = invoke("items", "add", "--run", str(run), str(file))
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert (f"{what} cannot take new items: its item vectors are learned ID embeddings, so an item without "
            f"interactions has none") in res.stderr
    r = Retriever(run)
    assert not r.info()["accepts_new_items"]
    with pytest.raises(AthweError, match="learned ID embeddings"):
        r.add_items([{"item": "n1", "title": "red lamp"}])
    assert tree(run) == before


def test_recorded_additions_are_checked_when_loaded(run, trained):
    r = Retriever(run)
    r.add_items([{"item": "n1", "title": "red lamp"}])
    with pytest.raises(AthweError, match="^record 1: item 'n1' already exists in the run \\(added earlier, id 51\\)"):
        r.add_items([{"item": "n1", "title": "red lamp"}])
    other = Retriever(run)
    r.add_items([{"item": "n2", "title": "blue lamp"}])
    with pytest.raises(AthweError, match="added by another process since this run was loaded"):
        other.add_items([{"item": "n3", "title": "green lamp"}])
    assert [p.name[:4] for p in new_items.addition_files(run)] == ["0001", "0002"]
    first = new_items.addition_files(run)[0]
    good = first.read_bytes()
    # damaged: content changed, or the file cut short
    rec = torch.load(first, weights_only=True)
    rec["titles"] = ["a lamp"]
    torch.save(rec, first)
    with pytest.raises(AthweError, match="its content does not match its fingerprint; the addition file is damaged"):
        Retriever(run)
    first.write_bytes(good[:200])
    with pytest.raises(AthweError, match="not readable .*the addition file is damaged"):
        Retriever(run)
    first.write_bytes(good)
    assert Retriever(run).info()["added_items"] == 2
    # recorded for another checkpoint: refused, even with a rebuilt index
    state = torch.load(run / "best.pt", weights_only=True)
    state["projections.text.weight"] += 0.01
    torch.save(state, run / "best.pt")
    build_run_index(run)
    with pytest.raises(AthweError, match="recorded for checkpoint [0-9a-f]+, but the run's checkpoint is now") as e:
        Retriever(run)
    assert "\n" not in str(e.value)
    res = invoke("retrieve", "--run", str(run), "--items", "i3", "--timestamps", "1")
    assert res.exit_code == 2 and "recorded for checkpoint" in res.stderr


def test_items_need_the_recorded_models_and_missing_vectors(run, tiny_bert):
    r = Retriever(run)
    moved = tiny_bert.with_name(tiny_bert.name + "-moved")
    tiny_bert.rename(moved)
    try:
        with pytest.raises(AthweError, match=f"text model '{re.escape(str(tiny_bert))}': the folder .* recorded in "
                                             f".* is not there") as e:
            r.add_items([{"item": "n1", "title": "red lamp"}])
    finally:
        moved.rename(tiny_bert)
    assert "\n" not in str(e.value) and not (run / "added_items").exists() and r.info()["added_items"] == 0
    # an item without text where the model learned no missing-text vector (every trained item had text)
    content = r._content_encoder()
    item = new_items.parse_record({"item": "n1", "brand": ""}, "record 1")
    with pytest.raises(AthweError, match="record 1: item 'n1' has no text .* no learned missing-text vector"):
        content.plan([item], has_missing={"image"})
    assert r.add_items([{"item": "n1", "title": "red lamp"}]) == ["n1"]


def test_content_id_rows_recover_a_linear_map_and_are_the_default(run):
    """The ID part predicted from content: when the trained items' ID embeddings are an exact linear
    function of their content, the ridge map (shrinkage by cross-validation) gives a new item nearly
    that function of its content; it is the ID part `add_items` uses by default."""
    r = Retriever(run)
    m = r.model
    x = new_items.content_matrix(m, slice(1, 51))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(x.shape[1], m.config.hidden_size, generator=g, dtype=torch.float64) * 0.1
    with torch.no_grad():
        m.item_embedding.weight[1:51] = (x @ w).float()
    raw = {k: getattr(m, f"{k}_raw")[3:5].clone() for k in new_items.content_modalities(m)}
    has = {k: getattr(m, f"{k}_has")[3:5].clone() for k in raw}
    rows = new_items.content_id_rows(m, 50, raw, has)
    target = (new_items.content_matrix(m, slice(None), raw, has) @ w).float()
    assert float((rows - target).norm() / target.norm()) < 0.05
    assert r.id_part == "content"
    r.add_items([{"item": "like-i3", "title": "x"}])
    with torch.no_grad():
        added = m.item_embedding.weight[51]
        expect = new_items.content_id_rows(m, 50, {k: getattr(m, f"{k}_raw")[51:52] for k in raw},
                                           {k: getattr(m, f"{k}_has")[51:52] for k in raw})[0]
    torch.testing.assert_close(added, expect)
    with pytest.raises(AthweError, match="--id-part must be one of content, mean"):
        Retriever(run, id_part="zero")
