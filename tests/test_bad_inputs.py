"""Bad input at the command line: one table of cases, each run through the CLI.

Every case must end with exit code 2 and exactly one `error: ...` line on stderr that names the file or
option at fault, and must leave no new file or folder behind (under tmp_path, nor in the working
directory, which is a fresh folder under tmp_path). To add a case, append a `Case` to CASES: its
`setup` writes what it needs under tmp_path and returns the argv (or argv and environment variables).
Classes: config-shape, numbers, parse-errors, divergence, run-folder, and (their rows and setups in
tests/test_bad_inputs_data.py) encoding and extraction.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Union

import pytest
from typer.testing import CliRunner

from athwe.cli import app
from conftest import TINY_MODEL, write_tiny_dataset
from test_bad_inputs_data import CASES as DATA_CASES
from test_bad_inputs_data import Case

Invocation = Union[list[str], tuple[list[str], dict[str, str]]]


# ---- helpers for setups -------------------------------------------------------------------------

def config_file(text: str, *extra: str) -> Callable[[Path], Invocation]:
    """`athwe train --config my.yaml` with `text` as the file."""
    def setup(tmp: Path) -> Invocation:
        (tmp / "my.yaml").write_text(text, encoding="utf-8")
        return ["train", "--config", str(tmp / "my.yaml"), "--runs-dir", str(tmp / "runs"), *extra]
    return setup


def train_args(*args: str) -> Callable[[Path], Invocation]:
    """`athwe train ARGS` on the tiny dataset (sasrec, tiny sizes), runs under tmp_path/runs."""
    def setup(tmp: Path) -> Invocation:
        write_tiny_dataset(tmp / "data")
        sizes = [a for k, v in TINY_MODEL.items() for a in ("--set", f"model_args.{k}={v}")]
        return ["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tmp / "data"),
                "--runs-dir", str(tmp / "runs"), "--epochs", "1", *sizes, *args]
    return setup


def edited_config_dir(name: str, text: str) -> Callable[[Path], Invocation]:
    """A copy of the packaged configs (ATHWE_CONFIG_DIR) with configs/`name` replaced by `text`, and
    `athwe train --model sasrec --dataset tiny` against it."""
    def setup(tmp: Path) -> Invocation:
        from athwe.config import config_dir

        cdir = tmp / "configs"
        shutil.copytree(str(config_dir()), cdir)
        (cdir / name).write_text(text, encoding="utf-8")
        argv = train_args()(tmp)
        return argv, {"ATHWE_CONFIG_DIR": str(cdir)}
    return setup


def saved_run_config(text: str) -> Callable[[Path], Invocation]:
    """`athwe evaluate --run RUN` on a run folder whose config.yaml is `text`."""
    def setup(tmp: Path) -> Invocation:
        run = tmp / "run"
        run.mkdir()
        (run / "config.yaml").write_text(text, encoding="utf-8")
        return ["evaluate", "--run", str(run)]
    return setup


_BUILT: dict[str, Path] = {}


def trained_run(tmp: Path) -> Path:
    """A copy under tmp of a tiny trained SASRec run with a flat index (trained once per session, in a
    folder of its own that no case's snapshot covers)."""
    if "run" not in _BUILT:
        import atexit
        import tempfile

        from athwe.config import resolve_config
        from athwe.retrieval import build_run_index
        from athwe.training import trainer as tr

        root = Path(tempfile.mkdtemp(prefix="athwe-bad-inputs-"))
        atexit.register(shutil.rmtree, root, True)
        write_tiny_dataset(root / "data")
        flags = {"data.data_dir": str(root / "data"), "train.runs_dir": str(root / "runs"), "train.epochs": 1,
                 "data.max_seq_length": 8, "train.batch_size": 32, "train.num_threads": 1}
        cfg = resolve_config("sasrec", "tiny", overrides=[f"model_args.{k}={v}" for k, v in TINY_MODEL.items()],
                             flags=flags)
        run, _ = tr.train(cfg, printer=lambda s: None, progress=False)
        build_run_index(run, "flat")
        _BUILT["run"], _BUILT["root"] = run, root
    shutil.copytree(_BUILT["run"], tmp / "run")
    return tmp / "run"


def with_run(*args: str) -> Callable[[Path], Invocation]:
    """`athwe ARGS --run RUN` on a copy of the tiny trained run."""
    def setup(tmp: Path) -> Invocation:
        return [*args, "--run", str(trained_run(tmp))]
    return setup


def damaged_run(damage: Callable[[Path], None], *args: str) -> Callable[[Path], Invocation]:
    """`athwe ARGS` on a copy of the tiny trained run after `damage(run)`; {run} in ARGS is the run."""
    def setup(tmp: Path) -> Invocation:
        run = trained_run(tmp)
        damage(run)
        return [a.replace("{run}", str(run)) for a in args]
    return setup


def nan_weights(run: Path) -> None:
    import torch

    state = torch.load(run / "best.pt", weights_only=True)
    state["embedding.item.weight"][2, 1] = float("nan")
    torch.save(state, run / "best.pt")


def unfinished_with_bad_metrics(run: Path) -> None:
    (run / "results.json").unlink()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n" + (run / "metrics.jsonl").read_bytes())


def plain(*args: str) -> Callable[[Path], Invocation]:
    """`athwe ARGS`, with {tmp} in an argument replaced by tmp_path."""
    def setup(tmp: Path) -> Invocation:
        return [a.replace("{tmp}", str(tmp)) for a in args]
    return setup


# ---- the table ----------------------------------------------------------------------------------

CASES = [
    # config-shape: a section or value of the wrong shape or type, in any config file or --set
    Case("data-is-a-list", "config-shape", config_file("data: [1]\n"),
         "my.yaml: section 'data' must be a mapping, got a list"),
    Case("model-is-a-list", "config-shape", config_file("model: [a, b]\n"),
         "my.yaml: key model must be str, got a list"),
    Case("dataset-is-a-number", "config-shape", config_file("data: {dataset: 5}\n"),
         "my.yaml: key data.dataset must be str, got an integer (5)"),
    Case("valid-metric-is-a-number", "config-shape", config_file("train: {valid_metric: 3}\n"),
         "my.yaml: key train.valid_metric must be str"),
    Case("model-args-is-a-number", "config-shape", config_file("model_args: 7\n"),
         "my.yaml: section 'model_args' must be a mapping, got an integer (7)"),
    Case("top-level-is-a-list", "config-shape", config_file("- model\n- data\n"),
         "my.yaml: the top level must be a mapping"),
    Case("lr-is-a-list", "config-shape", config_file("train: {lr: [1]}\n"), "my.yaml: key train.lr must be float"),
    Case("runs-dir-is-a-mapping", "config-shape", config_file("train: {runs_dir: {a: 1}}\n"),
         "my.yaml: key train.runs_dir must be str, got a mapping"),
    Case("model-yaml-datasets-is-a-list", "config-shape", edited_config_dir("sasrec.yaml", "datasets: [1]\n"),
         "sasrec.yaml: section 'datasets' must map dataset names to sections, got a list"),
    Case("model-yaml-per-dataset-is-a-list", "config-shape",
         edited_config_dir("sasrec.yaml", "datasets:\n  tiny: [1, 2]\n"),
         "sasrec.yaml: section 'datasets.tiny' must be a mapping, got a list"),
    Case("model-yaml-per-dataset-bad-value", "config-shape",
         edited_config_dir("sasrec.yaml", "datasets:\n  other: {train: {loss: 5}}\n"),
         "sasrec.yaml: key datasets.other.train.loss must be str"),
    Case("dataset-yaml-train-is-a-list", "config-shape", edited_config_dir("datasets/tiny.yaml", "train: [1]\n"),
         "tiny.yaml: section 'train' must be a mapping, got a list"),
    Case("run-config-data-is-a-list", "config-shape", saved_run_config("model: sasrec\ndata: [1]\n"),
         "config.yaml: section 'data' must be a mapping, got a list"),
    Case("run-config-model-args-is-a-string", "config-shape", saved_run_config("model: sasrec\nmodel_args: x\n"),
         "config.yaml: section 'model_args' must be a mapping, got a string ('x')"),
    Case("set-seed-is-a-word", "config-shape", train_args("--set", "train.seed=abc"),
         "--set: key train.seed must be int, got a string ('abc')"),
    Case("set-model-is-a-number", "config-shape", train_args("--set", "model=5"),
         "--set: key model must be str, got an integer (5)"),
    Case("set-dataset-is-a-list", "config-shape", train_args("--set", "data.dataset=[a]"),
         "--set: key data.dataset must be str, got a list"),
    # numbers: values out of their sane range, named by option (or file and setting)
    Case("seed-beyond-64-bits", "numbers", train_args("--seed", str(2**70)),
         "--seed: train.seed must be at most 2**63 - 1"),
    Case("seed-negative", "numbers", train_args("--seed", "-1"), "--seed: train.seed must be >= 0"),
    Case("epochs-zero", "numbers", train_args("--epochs", "0"), "--epochs: train.epochs must be at least 1, got 0"),
    Case("epochs-absurd", "numbers", train_args("--epochs", str(10**8)),
         "--epochs: train.epochs must be at most 10,000,000"),
    Case("batch-size-absurd", "numbers", train_args("--batch-size", str(10**9)),
         "--batch-size: train.batch_size must be at most 10,000,000"),
    Case("max-seq-length-absurd", "numbers", train_args("--max-seq-length", str(10**6)),
         "--max-seq-length: data.max_seq_length must be at most 100,000"),
    Case("threads-absurd", "numbers", train_args("--threads", "5000"),
         "--threads: train.num_threads must be at most 4,096"),
    Case("lr-nan", "numbers", train_args("--lr", "nan"), "--lr: train.lr must be a positive number"),
    Case("lr-zero", "numbers", train_args("--lr", "0"), "--lr: train.lr must be a positive number"),
    Case("config-seed-beyond-64-bits", "numbers", config_file(f"train: {{seed: {2**64}}}\n"),
         "my.yaml: train.seed must be at most 2**63 - 1"),
    Case("config-eval-batch-size-zero", "numbers", config_file("train: {eval_batch_size: 0}\n"),
         "my.yaml: train.eval_batch_size must be at least 1"),
    Case("set-patience-absurd", "numbers", train_args("--set", f"train.patience={10**12}"),
         "--set: train.patience must be at most 10,000,000"),
    Case("retrieve-k-beyond-catalogue", "numbers", with_run("retrieve", "--user", "u1", "-k", str(10**12)),
         "-k 1,000,000,000,000 is more than the 50 items of the catalogue"),
    Case("retrieve-all-users-k-beyond-catalogue", "numbers",
         with_run("retrieve", "--all-users", "--out", "recs.jsonl", "-k", "51"),
         "-k 51 is more than the 50 items of the catalogue"),
    Case("retrieve-k-zero", "numbers", plain("retrieve", "--user", "u1", "-k", "0"), "-k must be at least 1"),
    Case("retrieve-batch-size-absurd", "numbers",
         plain("retrieve", "--all-users", "--out", "{tmp}/r.jsonl", "--batch-size", str(10**9)),
         "--batch-size must be at most 10,000,000"),
    Case("evaluate-batch-size-absurd", "numbers", plain("evaluate", "--run", "{tmp}", "--batch-size", str(10**9)),
         "--batch-size must be at most 10,000,000"),
    Case("index-hnsw-m-absurd", "numbers", plain("index", "--hnsw-m", str(10**6)), "--hnsw-m must be at most 1,024"),
    Case("index-refine-negative", "numbers", plain("index", "--refine", "-1"), "--refine must be >= 0"),
    Case("index-nprobe-zero", "numbers", plain("index", "--nprobe", "0"), "--nprobe must be at least 1"),
    Case("images-timeout-nan", "numbers",
         plain("data", "images", "-d", "x", "--data-dir", "{tmp}", "--timeout", "nan"),
         "--timeout must be above 0"),
    Case("images-workers-absurd", "numbers",
         plain("data", "images", "-d", "x", "--data-dir", "{tmp}", "--workers", "100000"),
         "--workers must be at most 256"),
    Case("images-max-bytes-zero", "numbers",
         plain("data", "images", "-d", "x", "--data-dir", "{tmp}", "--max-bytes", "0"),
         "--max-bytes must be at least 1"),
    Case("data-info-kcore-negative", "numbers", plain("data", "info", "--kcore", "-1"), "--kcore must be >= 0"),
    Case("import-kcore-absurd", "numbers",
         plain("data", "import", "{tmp}/x.txt", "--name", "x", "--data-dir", "{tmp}/d", "--kcore", str(10**12)),
         "--kcore must be at most 1,000,000,000"),
    Case("extract-batch-size-zero", "numbers", plain("extract", "--batch-size", "0"),
         "--batch-size must be at least 1"),
    # parse-errors: Click's own errors, one line each
    Case("epochs-not-a-number", "parse-errors", plain("train", "--epochs", "abc"),
         "error: --epochs: 'abc' is not a valid integer"),
    Case("lr-not-a-number", "parse-errors", plain("train", "--lr", "fast"), "--lr: 'fast' is not a valid number"),
    Case("unknown-option", "parse-errors", plain("train", "--nope"), "--nope: no such option"),
    Case("option-without-value", "parse-errors", plain("train", "--epochs"), "--epochs: needs a value"),
    Case("missing-argument", "parse-errors", plain("data", "import"), "SOURCE: missing (a required argument)"),
    Case("missing-option", "parse-errors", plain("data", "import", "x.txt"), "--name/-n: missing (a required option)"),
    Case("k-not-a-number", "parse-errors", plain("retrieve", "-k", "ten"), "-k/--top-k: 'ten' is not a valid integer"),
    Case("unknown-command", "parse-errors", plain("trian"), "no such command 'trian'"),
    Case("missing-command", "parse-errors", plain("data"), "missing command (one of info, import, images)"),
    Case("extra-argument", "parse-errors", plain("runs", "extra"), "unexpected extra argument"),
    # divergence: a run whose loss or weights stop being finite, a checkpoint holding NaN
    Case("lr-1e9", "divergence", train_args("--lr", "1e9", "--batch-size", "16"),
         "training diverged in epoch 1, step"),
    Case("nan-checkpoint-evaluate", "divergence", damaged_run(nan_weights, "evaluate", "--run", "{run}"),
         "best.pt: embedding.item.weight holds NaN or infinite values (the run diverged)"),
    Case("nan-checkpoint-retrieve", "divergence",
         damaged_run(nan_weights, "retrieve", "--run", "{run}", "--user", "u1"), "holds NaN or infinite values"),
    Case("nan-checkpoint-index", "divergence", damaged_run(nan_weights, "index", "--run", "{run}"),
         "holds NaN or infinite values"),
    # run-folder: a damaged file in a run folder is named, with what to do
    Case("metrics-not-text", "run-folder", damaged_run(unfinished_with_bad_metrics, "train", "--resume", "{run}"),
         "metrics.jsonl: line 1 is not text, the file is damaged; delete that line"),
    Case("config-not-utf8", "run-folder",
         damaged_run(lambda r: (r / "config.yaml").write_bytes(b"model: \xff\xfe\n"), "evaluate", "--run", "{run}"),
         "config.yaml"),
    Case("best-truncated", "run-folder",
         damaged_run(lambda r: (r / "best.pt").write_bytes((r / "best.pt").read_bytes()[:100]),
                     "evaluate", "--run", "{run}"), "best.pt: not a readable checkpoint"),
    Case("last-truncated", "run-folder",
         damaged_run(lambda r: ((r / "last.pt").write_bytes(b"junk"), (r / "results.json").unlink()),
                     "train", "--resume", "{run}"), "last.pt: not a readable checkpoint"),
    Case("item-map-missing", "run-folder", damaged_run(lambda r: (r / "item_map.json").unlink(),
                                                      "evaluate", "--run", "{run}"), "item_map.json"),
    Case("index-json-damaged", "run-folder",
         damaged_run(lambda r: (r / "index.json").write_text("{"), "retrieve", "--run", "{run}", "--user", "u1"),
         "index.json"),
    Case("results-damaged-latest", "run-folder",
         damaged_run(lambda r: (r / "index.json").unlink(), "retrieve", "--run", "{run}", "--user", "u1"),
         "no index (build it with `athwe index --run"),
] + DATA_CASES


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}:{c.id}" for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(case: Case, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # defaults such as ./runs and ./dataset would land here
    got = case.setup(tmp_path)
    argv, env = got if isinstance(got, tuple) else (got, {})
    before = tree(tmp_path)
    res = CliRunner().invoke(app, argv, env=env, catch_exceptions=False)
    lines = res.stderr.splitlines()
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", res.stderr
    assert case.needle in lines[0], lines[0]
    assert tree(tmp_path) == before, sorted(tree(tmp_path) - before)


def test_table_covers_each_class():
    kinds = [c.kind for c in CASES]
    assert kinds.count("config-shape") >= 6 and kinds.count("numbers") >= 8 and kinds.count("parse-errors") >= 4
    assert kinds.count("divergence") >= 3 and kinds.count("run-folder") >= 5
    assert kinds.count("encoding") >= 3 and kinds.count("extraction") >= 6
    assert len({c.id for c in CASES}) == len(CASES)


def test_help_still_works():
    for argv in (["--help"], ["train", "--help"], ["data", "import", "--help"]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 0 and "Usage" in res.stdout and not res.stderr, argv
