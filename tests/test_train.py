"""Trainer: run folder contents, checkpoints, exact resume, config precedence, CLI errors."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from athwe.cli import app
from athwe.config import resolve_config
from athwe.errors import ConfigError
from athwe.models import check_run_config, get_entry
from athwe import runs
from athwe.training import trainer as tr
from athwe.utils import oversubscription_note
from conftest import SHARED_DATA, TINY_MODEL, train_dies_in_epoch


def tiny_cfg(data_dir: Path, runs: Path, **train):
    overrides = [f"model_args.{k}={v}" for k, v in TINY_MODEL.items()]
    flags = {"data.data_dir": str(data_dir), "train.runs_dir": str(runs), "data.max_seq_length": 8,
             "train.batch_size": 32, "train.epochs": 5, "train.patience": 10, "data.preset": "recbole"}
    flags.update({f"train.{k}": v for k, v in train.items()})
    return resolve_config("sasrec", "tiny", overrides=overrides, flags=flags)


def test_run_folder_contents_and_weights_only_checkpoints(tiny_data_dir, tmp_path):
    run, res = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3), printer=lambda s: None, progress=False)
    for name in ("config.yaml", "item_map.json", "metrics.jsonl", "results.json", "curves.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a direct write leaves under this umask (not mkstemp's 0o600)
    for name in ("config.yaml", "item_map.json", "results.json", "curves.png", "best.pt", "last.pt"):
        assert (run / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best = torch.load(run / "best.pt", weights_only=True)
    assert "embedding.item.weight" in best
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and set(last) >= {"model", "optimizer", "rng", "best_metric", "bad_epochs"}
    saved = json.loads((run / "results.json").read_text())
    assert saved["header"]["preset"] == "recbole" and saved["header"]["history"] == "none"
    assert saved["header"]["loss"] == "ce" and saved["header"]["split"].startswith("chronological leave-one-out")
    assert saved["test"] == res["test"] and 0.0 <= res["test"]["NDCG@10"] <= 1.0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model_args"]["hidden_size"] == 16 and cfg["train"]["epochs"] == 3
    # every model setting is written, the ones the config left at their defaults too
    assert set(cfg["model_args"]) == {f.name for f in dataclasses.fields(get_entry("sasrec").config_cls)}


def test_training_learns_the_tiny_pattern(tiny_data_dir, tmp_path):
    _, res = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=30, lr=0.01), printer=lambda s: None,
                      progress=False)
    # next item is id+0 or id+1 of 50: a model that learned it has HR@10 far above chance (0.2)
    assert res["test"]["HR@10"] > 0.6


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_interrupted_then_resumed_equals_uninterrupted(tiny_data_dir, tmp_path, monkeypatch, loss):
    quiet = dict(printer=lambda s: None, progress=False)
    run_a, full = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "a", loss=loss), **quiet)

    # kill the second run in the middle of epoch 3 (after epoch 2's checkpoint was written)
    undo = train_dies_in_epoch(monkeypatch, 2)
    cfg_b = tiny_cfg(tiny_data_dir, tmp_path / "b", loss=loss)
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg_b, run_dir=tmp_path / "b" / "run", **quiet)
    undo()
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["epoch"] == 2
    resumed = tr.resume(tmp_path / "b" / "run", **quiet)

    assert resumed["test"] == full["test"]
    assert resumed["valid"] == full["valid"]
    a = torch.load(run_a / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4, 5]


def test_early_stopping_and_best_checkpoint(tiny_data_dir, tmp_path):
    run, res = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=50, patience=2, lr=0.05),
                        printer=lambda s: None, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    metric = [r["valid_NDCG@20"] for r in rows]
    best = max(range(len(metric)), key=lambda i: (metric[i], -i))
    assert res["best_epoch"] == best + 1
    assert len(rows) - res["best_epoch"] == 2 or len(rows) == 50
    assert res["valid"]["NDCG@20"] == pytest.approx(metric[best], abs=1e-6)


def test_config_precedence(tmp_path, monkeypatch):
    cdir = tmp_path / "configs"
    (cdir / "datasets").mkdir(parents=True)
    (cdir / "datasets" / "X.yaml").write_text("train: {lr: 0.1, batch_size: 7}\ndata: {preset: recbole}\n")
    (cdir / "sasrec.yaml").write_text("train: {lr: 0.2}\ndatasets:\n  X: {train: {epochs: 3}}\n")
    user = tmp_path / "user.yaml"
    user.write_text("train: {epochs: 4, seed: 9}\n")
    monkeypatch.setenv("ATHWE_CONFIG_DIR", str(cdir))
    cfg = resolve_config("sasrec", "X", str(user), ["train.seed=10", "model_args.num_heads=1"], {"train.seed": 11})
    assert cfg.train.batch_size == 7 and cfg.data.preset == "recbole"  # dataset file
    assert cfg.train.lr == 0.2  # model file over dataset file
    assert cfg.train.epochs == 4  # --config over the model's per-dataset section
    assert cfg.train.seed == 11  # flag over --set over --config
    assert cfg.model_args["num_heads"] == 1
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        resolve_config("sasrec", "X", overrides=["train.nope=1"])
    with pytest.raises(ConfigError, match="unknown model key"):
        check_run_config(resolve_config("sasrec", "X", overrides=["model_args.nope=1"]))
    with pytest.raises(ConfigError, match="must be int"):
        resolve_config("sasrec", "X", overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match="data.kcore must be >= 0"):
        resolve_config("sasrec", "X", overrides=["data.kcore=-2"])
    built = tiny_cfg(tmp_path, tmp_path / "runs")
    built.train.lr = -1.0  # a config assembled in Python is checked by train() too, before any folder exists
    with pytest.raises(ConfigError, match="train.lr must be a positive number"):
        tr.train(built)
    assert not (tmp_path / "runs").exists()
    for bad, needle in (("train.epochs=0", "train.epochs must be at least 1"),
                        ("train.patience=0", "train.patience must be at least 1"),
                        ("train.eval_batch_size=0", "train.eval_batch_size must be at least 1"),
                        ("data.max_seq_length=0", "data.max_seq_length must be at least 1"),
                        ("train.lr=-0.001", "train.lr must be a positive number"), ("train.lr=0", "train.lr must be"),
                        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
                        ("train.num_threads=-1", "train.num_threads must be >= 0")):
        with pytest.raises(ConfigError, match=needle):
            resolve_config("sasrec", "X", overrides=[bad])


def _cli(args, tmp_path):
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.mark.parametrize("content,needle", [
    ("user_id\titem_id\n1\t2\n", "malformed header"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\tyesterday\n", "is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\n", "expected 3 tab-separated fields"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, content, needle):
    d = tmp_path / "data" / "bad"
    d.mkdir(parents=True)
    (d / "bad.inter").write_text(content)
    runs = tmp_path / "runs"
    res = _cli(["train", "--dataset", "bad", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(runs)], tmp_path)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err and "bad.inter" in err
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-written


def test_cli_unknown_model_and_missing_dataset(tmp_path):
    res = _cli(["train", "--model", "nope", "--runs-dir", str(tmp_path / "r")], tmp_path)
    assert res.exit_code == 2 and "unknown model 'nope'" in res.stderr
    res = _cli(["data", "info", "--dataset", "missing", "--data-dir", str(tmp_path)], tmp_path)
    assert res.exit_code == 2 and "dataset folder not found" in res.stderr
    res = _cli(["evaluate", "--run", str(tmp_path)], tmp_path)
    assert res.exit_code == 2 and "not a run folder" in res.stderr


def test_resolve_device_rejects_devices_the_machine_lacks(monkeypatch):
    from athwe.utils import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for bad, needle in (("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                        ("gpu", "not a torch device"), ("meta", "holds no data")):
        with pytest.raises(ConfigError, match=needle):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_cli_train_on_a_missing_gpu_exits_2_and_leaves_no_run_folder(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs = tmp_path / "runs"
    res = _cli(["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir),
                "--runs-dir", str(runs), "--device", "cuda", "--epochs", "1"], tmp_path)
    err = res.stderr.strip()
    assert res.exit_code == 2 and len(err.splitlines()) == 1 and "CUDA is not available" in err, res.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_cli_train_evaluate_roundtrip(tiny_data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    res = _cli(["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir),
                "--run-dir", str(run), "--epochs", "2", "--max-seq-length", "8",
                "--set", "model_args.hidden_size=16", "--set", "model_args.inner_size=32"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "NDCG" in res.stdout
    saved = json.loads((run / "results.json").read_text())["test"]
    for bs in ("1", "1000"):
        res = _cli(["evaluate", "--run", str(run), "--json", "--batch-size", bs], tmp_path)
        assert res.exit_code == 0
        assert json.loads(res.stdout)["test"] == saved
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    res = _cli(["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir),
                "--run-dir", str(run), "--epochs", "1"], tmp_path)  # another training into a finished run's folder
    assert res.exit_code == 2 and "already holds a run" in res.stderr and "--resume" in res.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    res = _cli(["evaluate", "--run", str(run), "--batch-size", "0"], tmp_path)
    assert res.exit_code == 2 and "--batch-size must be at least 1" in res.stderr
    # a run trained with --device cuda evaluates on a machine without a GPU (on the CPU)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["device"] = "cuda"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = _cli(["evaluate", "--run", str(run), "--json"], tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["test"] == saved


def test_damaged_or_foreign_checkpoints_are_one_line_errors(tiny_data_dir, tmp_path):
    run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1), printer=lambda s: None, progress=False)
    best, last = run / "best.pt", run / "last.pt"
    good_best, good_last = best.read_bytes(), last.read_bytes()

    def error(args):
        res = _cli(args, tmp_path)
        err = res.stderr.strip()
        assert res.exit_code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), res.stderr
        return err

    best.write_bytes(good_best[: len(good_best) // 2])  # truncated by a full disk or a copy
    assert "best.pt: not a readable checkpoint" in error(["evaluate", "--run", str(run)])
    assert "best.pt: not a readable checkpoint" in error(["retrieve", "--run", str(run), "--user", "u1"])
    state = torch.load(tmp_path / "runs" / run.name / "last.pt", weights_only=True)["model"]
    state["extra.weight"] = torch.zeros(2)
    state = {k: (torch.zeros(3, 3) if k.endswith("position.weight") else v) for k, v in state.items()}
    torch.save(state, best)
    err = error(["evaluate", "--run", str(run)])
    assert "weights do not fit" in err and "unexpected 1 (e.g. extra.weight)" in err and "wrong shape 1" in err
    best.write_bytes(good_best)
    last.write_bytes(good_last[:100])
    assert "last.pt: not a readable checkpoint" in error(["train", "--resume", str(run)])
    torch.save({"model": {}}, last)
    assert "last.pt: not a checkpoint of this run" in error(["train", "--resume", str(run)])
    last.write_bytes(good_last)
    assert _cli(["evaluate", "--run", str(run)], tmp_path).exit_code == 0
    for name, damaged, needle in (("item_map.json", "{bad", "item_map.json: not valid JSON"),
                                  ("item_map.json", "[1]", "item_map.json: has no item-map fingerprint"),
                                  ("config.yaml", "train: [", "config.yaml: invalid YAML"),
                                  ("config.yaml", "train: {}", "config.yaml: saved run config names no model"),
                                  ("index.json", '{"kind":', "index.json: not valid JSON"),
                                  ("index.json", "{}", "index.json: not an index description"),
                                  ("index.faiss", "garbage", "index.faiss: not a readable FAISS index")):
        good = (run / name).read_bytes()
        (run / name).write_text(damaged)
        cmd = (["retrieve", "--run", str(run), "--user", "u1"] if name.startswith("index")
               else ["evaluate", "--run", str(run)])
        assert needle in error(cmd), name
        (run / name).write_bytes(good)
    good = (run / "config.yaml").read_text()
    for edit, needle in ((lambda c: c.update(model_args=[1]), "section 'model_args' must be a mapping"),
                         (lambda c: c["model_args"].update(hidden_size="eight"), "hidden_size must be int"),
                         (lambda c: c.update(model="nosuch"), "unknown model 'nosuch'")):
        cfg = yaml.safe_load(good)
        edit(cfg)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        for cmd in (["evaluate", "--run", str(run)], ["retrieve", "--run", str(run), "--user", "u1"]):
            err = error(cmd)
            assert "config.yaml: " in err and needle in err, err
    (run / "config.yaml").write_text(good)
    assert "--history must be one of none, zero, exclude, not 'bogus'" in error(
        ["evaluate", "--run", str(run), "--history", "bogus"])
    (tmp_path / "afile").write_text("x")
    for out, needle in ((tmp_path, "--out is a directory"),
                        (tmp_path / "afile" / "x.jsonl", "a parent of --out is a file")):
        assert needle in error(["retrieve", "--run", str(run), "--all-users", "--out", str(out)])
    assert list(tmp_path.glob("*.tmp*")) == []


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3)
    run, _ = tr.train(cfg, printer=lambda s: None, progress=False, stop_after=2)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "loss": 1.2')  # killed during the append
    res = tr.resume(run, printer=lambda s: None, progress=False)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and res["test"]


@pytest.mark.skipif(not (SHARED_DATA / "LastFM").is_dir(), reason="shared data not present")
def test_data_info_on_lastfm():
    res = CliRunner().invoke(app, ["data", "info", "--dataset", "LastFM", "--data-dir", str(SHARED_DATA), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert (info["users"], info["items"], info["interactions"]) == (1090, 3646, 52551)
    assert info["gap_seconds"] == {}  # a BSARec .txt file has no timestamps
    res = CliRunner().invoke(app, ["data", "info", "--dataset", "ml-100k", "--data-dir", str(SHARED_DATA)])
    assert res.exit_code == 0
    assert "gaps          p25 0 s  p50 0 s  p75 37 s  p90 1.4 min  p99 3.7 d" in res.stdout


def test_cli_train_failure_leaves_no_run_folder(tiny_data_dir, tmp_path):
    """`athwe train` defaults to ATHWE, which needs item features: the error names the command to
    run, exits 2, and leaves no run folder behind."""
    runs = tmp_path / "runs"
    res = _cli(["train", "--dataset", "tiny", "--data-dir", str(tiny_data_dir), "--runs-dir", str(runs),
                "--epochs", "1"], tmp_path)
    assert res.exit_code == 2 and "athwe extract --dataset tiny" in res.stderr
    assert not runs.exists() or not any(runs.iterdir())
    res = _cli(["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir), "--runs-dir",
                str(runs), "--set", "model_args.num_heads=3"], tmp_path)
    assert res.exit_code == 2 and "error" in res.stderr
    assert not runs.exists() or not any(runs.iterdir())


_PAGE_FAULTS = """
import os, resource, sys
import torch
from athwe.utils import keep_freed_memory
tuned = keep_freed_memory()
def step():
    torch.empty(16 << 20).fill_(1.0)  # 64 MB: above glibc's largest dynamic mmap threshold
for _ in range(10):  # glibc settles into reusing the block within a few rounds
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_keep_freed_memory_stops_page_faults_on_large_tensors():
    """Without the tuning each 64 MB tensor is a fresh mmap whose 16,384 pages all fault on first
    touch; with it the freed block is reused. The opt-out variable leaves glibc's defaults."""
    def run(**env):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=env, capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned == "True", int(faults)

    tuned, faults = run()
    assert tuned and faults < 1000
    tuned, faults = run(ATHWE_KEEP_FREED_MEMORY="0")
    assert not tuned and faults > 10_000


def test_bf16_precision_trains_records_and_resumes_config(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=30, lr=0.01, precision="bf16")
    run, res = tr.train(cfg, printer=lambda s: None, progress=False)
    assert res["header"]["precision"] == "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "bf16"
    assert res["test"]["HR@10"] > 0.6  # learns the tiny pattern as fp32 does
    assert runs.load_run_config(run).train.precision == "bf16"


def test_bad_precision_is_a_one_line_cli_error(tmp_path):
    res = _cli(["train", "--precision", "fp16", "--runs-dir", str(tmp_path / "r")], tmp_path)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "train.precision 'fp16' is not one of fp32, bf16" in res.stderr
    assert not (tmp_path / "r").exists()
    res = _cli(["train", "--model", "sasrec", "--precision", "bf16", "--print-config"], tmp_path)
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["train"]["precision"] == "bf16"
    assert yaml.safe_load(res.stdout)["model_args"]["layer_norm_eps"] == 1e-12  # defaults shown too


def test_resume_on_another_thread_count_records_it_per_epoch(tiny_data_dir, tmp_path, monkeypatch):
    """--threads on resume sets the CPU threads for the rest of the run without touching its
    config.yaml; every epoch record says how many threads it trained on."""
    before = torch.get_num_threads()
    heard: list[str] = []
    try:
        undo = train_dies_in_epoch(monkeypatch, 2)
        cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", num_threads=2)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg, run_dir=tmp_path / "run", printer=lambda s: None, progress=False)
        undo()
        tr.resume(tmp_path / "run", printer=heard.append, progress=False, num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rows = runs.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["epoch"], r["num_threads"]) for r in rows] == [(1, 2), (2, 2), (3, 1), (4, 1), (5, 1)]
    assert "note: resuming on 1 CPU thread(s) (the run started with 2)" in heard
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["num_threads"] == 2


def test_cli_resume_with_negative_threads_is_a_one_line_error(tmp_path):
    res = _cli(["train", "--resume", str(tmp_path / "nowhere"), "--threads", "-1"], tmp_path)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "num_threads must be >= 0" in res.stderr
    res = _cli(["train", "--model", "sasrec", "--threads", "3", "--print-config"], tmp_path)
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["train"]["num_threads"] == 3


def test_oversubscription_note_wording_and_thresholds():
    assert oversubscription_note(1, None, 2) is None  # nothing measured
    assert oversubscription_note(2, 0.3, 2) is None  # background noise
    assert oversubscription_note(1, 1.0, 2) is None  # fits beside the other run
    note = oversubscription_note(2, 1.0, 2)
    assert note.startswith("other processes keep about 1.0 of this machine's 2 CPUs busy")
    assert "--threads 1 (train.num_threads) fits beside them" in note
    assert "no CPU is free" in oversubscription_note(1, 2.0, 2)


def test_busy_cpus_elsewhere_sees_a_busy_process():
    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat here")
    from athwe.utils import busy_cpus_elsewhere
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cpus_elsewhere(window=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and 0.7 <= busy <= (os.cpu_count() or 1) + 0.1


def test_trainer_notes_a_busy_cpu(tiny_data_dir, tmp_path, monkeypatch):
    heard: list[str] = []
    before = torch.get_num_threads()
    monkeypatch.setattr(tr, "busy_cpus_elsewhere", lambda window=0.1: 1.0)
    monkeypatch.setattr(tr.os, "cpu_count", lambda: 2)
    try:
        tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1, num_threads=2), printer=heard.append,
                 progress=False)
    finally:
        torch.set_num_threads(before)
    assert [s for s in heard if s.startswith("note: other processes keep about 1.0")], heard


def test_default_threads_are_the_free_cpus(tiny_data_dir, tmp_path, monkeypatch):
    """train.num_threads 0: the CPUs other processes leave free when the run starts (at least one);
    an explicit count wins."""
    assert tr.free_threads(None, 4) == 4 and tr.free_threads(0.2, 4) == 4 and tr.free_threads(1.0, 2) == 1
    assert tr.free_threads(1.6, 4) == 2 and tr.free_threads(7.0, 4) == 1
    before = torch.get_num_threads()
    monkeypatch.setattr(tr, "default_threads", lambda: 2)
    monkeypatch.setattr(tr, "busy_cpus_elsewhere", lambda window=0.1: 1.0)
    heard: list[str] = []
    try:
        run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1), printer=heard.append,
                          progress=False)
        assert runs.read_metrics(run / "metrics.jsonl")[0]["num_threads"] == 1
        assert ("note: other processes keep about 1.0 CPUs busy: training on 1 thread(s) (--threads N sets them)"
                in heard)
        run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1, num_threads=2), printer=heard.append,
                          progress=False)
        assert runs.read_metrics(run / "metrics.jsonl")[0]["num_threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_runs_lists_finished_and_unfinished_runs(tiny_data_dir, tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    tr.train(tiny_cfg(tiny_data_dir, runs_dir, epochs=2), run_dir=runs_dir / "done", printer=lambda s: None,
             progress=False)
    undo = train_dies_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        tr.train(tiny_cfg(tiny_data_dir, runs_dir, epochs=3), run_dir=runs_dir / "cut", printer=lambda s: None,
                 progress=False)
    undo()
    (runs_dir / "not-a-run").mkdir()
    rows = runs.list_runs(runs_dir)
    assert [Path(r["run"]).name for r in rows] == ["done", "cut"]
    done, cut = rows
    res = json.loads((runs_dir / "done" / "results.json").read_text())
    assert (done["status"], done["epochs"], done["max_epochs"], done["test_NDCG@10"]) == (
        "finished", 2, 2, res["test"]["NDCG@10"])
    assert (cut["status"], cut["epochs"], cut["max_epochs"], cut["best_epoch"], cut["test_NDCG@10"]) == (
        "unfinished", 1, 3, 1, None)
    assert cut["best_valid"] == runs.read_metrics(runs_dir / "cut" / "metrics.jsonl")[0]["valid_NDCG@20"]
    out = _cli(["runs", "--runs-dir", str(runs_dir)], tmp_path)
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert lines[1].split()[:5] == ["done", "sasrec", "tiny", "finished", "2/2"]
    assert lines[2].split()[:5] == ["cut", "sasrec", "tiny", "unfinished", "1/3"]
    assert "1 unfinished run(s)" in lines[3]
    assert json.loads(_cli(["runs", "--runs-dir", str(runs_dir), "--json"], tmp_path).stdout) == rows
    bad = _cli(["runs", "--runs-dir", str(tmp_path / "none")], tmp_path)
    assert bad.exit_code == 2 and bad.stderr.strip() == f"error: {tmp_path / 'none'}: no runs folder"


def test_progress_lines_inside_an_epoch_when_stderr_is_not_a_terminal(tiny_data_dir, tmp_path, monkeypatch):
    """A log file sees how far an epoch got: a line per PROGRESS_SECONDS with samples, loss and speed."""
    monkeypatch.setattr(tr, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(tr.sys.stderr, "isatty", lambda: False, raising=False)
    heard: list[str] = []
    tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1, batch_size=64), printer=heard.append)
    lines = [h for h in heard if h.startswith("epoch 1: ")]
    assert lines and all(" samples, loss " in h and h.endswith(" samples/s") for h in lines)
    done, total = lines[-1].split()[2].split("/")
    assert done == total
