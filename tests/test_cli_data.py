"""`athwe data import`, `athwe data images` and `athwe extract` from the command line: the
whole front half of the pipeline on a raw Amazon 2014 fixture, plus bad-input exits."""
from __future__ import annotations

import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fixtures_amazon as fx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from athwe.cli import app  # noqa: E402
from athwe.dataset.sequences import load_sequences  # noqa: E402
from athwe.feature_extraction import load_features  # noqa: E402
from tiny_models import make_tiny_bert  # noqa: E402

torch.set_num_threads(1)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_server():
    body = _png()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path.endswith(".png"):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _one_error_line(output: str) -> bool:
    lines = output.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


def test_import_images_extract_pipeline(tmp_path, image_server):
    runner = CliRunner()
    raw = tmp_path / "raw"
    raw.mkdir()
    exp = fx.write_amazon2014(raw)
    data = tmp_path / "data"
    r = runner.invoke(app, ["data", "import", str(exp["reviews"]), "--name", "kit", "--format", "2014",
                            "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert f"{data / 'kit'}:" in r.output and "users" in r.output and "metadata:" in r.output
    # point the image URLs at the local server: one good, one 404 per listed item
    meta = data / "kit" / "kit.meta.jsonl"
    recs = [json.loads(line) for line in meta.read_text().splitlines()]
    for k, rec in enumerate(recs):
        rec["image_urls"] = [f"{image_server}/{rec['item']}.png" if k % 2 == 0
                             else f"{image_server}/{rec['item']}.gone"]
    meta.write_text("\n".join(json.dumps(rec) for rec in recs) + "\n")
    r = runner.invoke(app, ["data", "images", "--dataset", "kit", "--data-dir", str(data), "--workers", "2",
                            "--timeout", "5", "--retries", "0"])
    assert r.exit_code == 0, r.output
    n_ok = (len(recs) + 1) // 2
    assert f"{n_ok:,} of {len(recs):,} items have an image" in r.output
    r = runner.invoke(app, ["data", "import", str(exp["reviews"]), "--name", "kit", "--data-dir", str(data)])
    assert r.exit_code == 2 and "--overwrite" in r.output and _one_error_line(r.output)


def test_import_then_extract(tmp_path, tiny_bert_dir):
    runner = CliRunner()
    raw = tmp_path / "raw"
    raw.mkdir()
    exp = fx.write_amazon2014(raw)
    data = tmp_path / "data"
    assert runner.invoke(app, ["data", "import", str(exp["reviews"]), "--name", "kit",
                               "--data-dir", str(data)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--dataset", "kit", "--data-dir", str(data), "--text-model", str(tiny_bert_dir),
                            "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["image"]["status"] == "skipped" and "athwe data images" in m["image"]["reason"]
    toks = load_sequences(data, "kit").item_tokens
    fs = load_features(data / "kit", toks)
    no_meta = toks.index("B009NOMETA")
    assert not fs.text_mask[no_meta] and fs.text_mask.sum() == len(toks) - 2
    assert fs.cat[no_meta].sum() == 0 and fs.cat.shape[1] == len(fs.cat_vocab) > 0


@pytest.mark.parametrize("content, problem", [
    (b"1 2 3\n\xff\xfe 4\n", "not UTF-8 text"),
    ("1 2 3\n2 \u00b2 4\n".encode(), ":2: user '2' has item '\u00b2'; items must be integers >= 1"),
    (b"1 2 3\n2 99999999999999999999999 4\n", ":2: user '2' has item '99999999999999999999999'; ids above"),
])
def test_data_cli_bad_txt_sequences(tmp_path, content, problem):
    runner = CliRunner()
    path = tmp_path / "data" / "txtbin" / "txtbin.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    r = runner.invoke(app, ["data", "info", "--dataset", "txtbin", "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 2 and _one_error_line(r.output), r.output
    assert f"{path}" in r.output and problem in r.output, r.output
    r = runner.invoke(app, ["data", "import", str(path), "--name", "e", "--data-dir", str(tmp_path / "out")])
    if problem == "not UTF-8 text":  # the importer reads .txt items as tokens, so only bad text fails there
        assert r.exit_code == 2 and _one_error_line(r.output) and f"{path}:2: not UTF-8" in r.output, r.output
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    else:
        assert r.exit_code == 0, r.output


def test_data_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    src = fx.write_atomic_folder(tmp_path)["folder"]
    cases = [
        ["data", "import", str(src), "--name", "x", "--format", "2099", "--data-dir", str(tmp_path / "d")],
        ["data", "import", str(tmp_path / "nothing.json"), "--name", "x", "--data-dir", str(tmp_path / "d")],
        ["data", "import", str(src), "--name", "../evil", "--data-dir", str(tmp_path / "d")],
        ["data", "images", "--dataset", "none", "--data-dir", str(tmp_path / "d")],
        ["data", "images", "--dataset", "x", "--data-dir", str(tmp_path / "d"), "--workers", "0"],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert _one_error_line(r.output), (args, r.output)
    r = runner.invoke(app, ["data", "import", str(src), "--name", "ok", "--data-dir", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "atomic"
    assert Path(tmp_path / "d" / "ok" / "ok.inter").is_file()
