"""Hyper-parameter studies (athwe.tuning) and the trainer's TensorBoard logging and on_epoch hook:
tiny studies of 2-3 trials of 1-3 epochs on the tiny dataset."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from typer.testing import CliRunner

from athwe import runs
from athwe.cli import app as cli_app
from athwe.config import config_dir, resolve_config
from athwe.errors import AthweError, ConfigError
from athwe.feature_extraction.store import FeatureSet
from athwe.models import create_model, get_entry, list_models
from athwe.training import trainer as tr
from athwe.tuning import (DB, Param, apply_settings, check_space, load_space, run_study, sample, space_path,
                          study_lock, with_available_features)
from conftest import poison_loss_from_epoch, random_features
from test_train import tiny_cfg

torch.set_num_threads(1)

#: every trial: the tiny dataset, tiny sizes the spaces leave alone, one thread
TINY = ["model_args.inner_size=32", "data.max_seq_length=8", "data.preset=recbole", "train.batch_size=64",
        "train.num_threads=1"]
QUIET = dict(printer=lambda s: None, progress=False)


def tune(*args: str):
    return CliRunner().invoke(cli_app, ["tune", *args], catch_exceptions=False)


def study_kwargs(data_dir: Path, **kw):
    return dict(dataset="tiny", overrides=TINY, flags={"data.data_dir": str(data_dir)}, **QUIET, **kw)


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def best_valid(run: Path, metric: str = "NDCG@20") -> float:
    return max(r[f"valid_{metric}"] for r in runs.read_metrics(run / "metrics.jsonl"))


# -- a whole study from the command line ----------------------------------------------------------------
def test_tiny_study_writes_its_outputs_and_best_yaml_trains(tiny_data_dir, tmp_path):
    study = tmp_path / "study"
    args = ["--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir), "--study", str(study),
            "--trials", "3", "--epochs-cap", "2", *[a for s in TINY for a in ("--set", s)]]
    res = tune(*args)
    assert res.exit_code == 0, res.output
    assert "best: trial" in res.stdout and "best.yaml" in res.stdout
    for name in ("study.db", "best.yaml", "trials.md", "trials.csv", "progress.png"):
        assert (study / name).is_file(), name
    assert (study / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(study.glob(".*.tmp"))
    rows = csv_rows(study)
    assert [(r["number"], r["state"], r["epochs"]) for r in rows] == [(str(i), "complete", "2") for i in range(3)]
    for r in rows:  # each trial is an ordinary run folder; its value is its best validation epoch
        run = study / r["run"]
        assert (run / "results.json").is_file() and (run / "best.pt").is_file()
        assert float(r["value"]) == pytest.approx(best_valid(run), abs=1e-6)
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["train"]["epochs"] == 2 and saved["model_args"]["num_heads"] == int(r["model_args.num_heads"])
        assert 1e-4 <= float(r["train.lr"]) <= 1e-2 and int(r["model_args.hidden_size"]) in (32, 64, 128)
    best = max(rows, key=lambda r: float(r["value"]))
    md = (study / "trials.md").read_text()
    assert f"Best: trial {best['number']}, {float(best['value']):.4f}" in md and md.count("| complete |") == 3
    # best.yaml: the best trial's config, without the study's epoch cap, which `athwe train --config` takes
    cfg = resolve_config(config_file=str(study / "best.yaml"))
    trial_cfg = runs.load_run_config(study / best["run"])
    assert cfg.model == "sasrec" and cfg.data.dataset == "tiny" and cfg.data.data_dir == str(tiny_data_dir)
    assert cfg.model_args["hidden_size"] == trial_cfg.model_args["hidden_size"]
    assert cfg.train.lr == trial_cfg.train.lr and cfg.data.max_seq_length == 8
    assert runs.saved_config(cfg)["model_args"] == runs.saved_config(trial_cfg)["model_args"]
    assert cfg.train.epochs == 200 and trial_cfg.train.epochs == 2
    cfg.train.epochs, cfg.train.runs_dir = 1, str(tmp_path / "again")
    run, again = tr.train(cfg, **QUIET)
    assert 0.0 <= again["test"]["NDCG@10"] <= 1.0
    # TensorBoard: each trial's settings and objective under tensorboard/, its curves in its run folder
    for r in rows:
        acc = EventAccumulator(str(study / "tensorboard" / f"trial-{int(r['number']):04d}"))
        acc.Reload()
        assert acc.Scalars("hparams/valid_NDCG@20")[0].value == pytest.approx(float(r["value"]), abs=1e-6)
    # reaching the number again starts nothing; a new study in the same folder is refused
    assert run_study(None, study_dir=study, resume=True, trials=3, **QUIET)["complete"] == 3
    res = tune(*args)
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: {study}: already holds a study; continue a study with --resume, or pass a new or empty "
        f"--study folder"]


# -- kill -9 in the middle of a trial, then --resume ------------------------------------------------------
KILLED = """
import sys, time, torch
torch.set_num_threads(1)
from athwe.training import trainer as tr
original = tr.Trainer.train_epoch
def slow(self):  # long enough epochs for the test to kill the process inside the second trial
    time.sleep(0.5)
    return original(self)
tr.Trainer.train_epoch = slow
from athwe.tuning import run_study
run_study("sasrec", "tiny", trials=3, study_dir=sys.argv[1], epochs_cap=2, overrides=sys.argv[3:],
          flags={"data.data_dir": sys.argv[2]}, printer=lambda s: None)
"""


def test_kill_9_mid_trial_then_resume_reaches_the_trials_without_double_counting(tiny_data_dir, tmp_path):
    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(study), str(tiny_data_dir), *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = study / "trials" / "trial-0001"
    deadline = time.monotonic() + 240
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert second.exists(), proc.stderr.read().decode()[-2000:]
    assert not (second / "results.json").exists()  # killed before the second trial finished
    killed = optuna.load_study(study_name="athwe", storage=f"sqlite:///{study / DB}")
    assert [t.state.name for t in killed.trials] == ["COMPLETE", "RUNNING"]

    res = run_study(None, study_dir=study, resume=True, trials=3, **QUIET)
    assert (res["complete"], res["pruned"], res["fail"]) == (3, 0, 1)
    rows = csv_rows(study)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "complete"), ("1", "fail"), ("2", "complete"),
                                                         ("3", "complete")]
    assert "stopped before the trial finished" in rows[1]["note"]
    finished = [r for r in rows if r["state"] == "complete"]
    assert len({r["run"] for r in finished}) == 3
    assert all((study / r["run"] / "results.json").is_file() for r in finished)
    assert not (second / "results.json").exists()  # the cut-off trial is not run again under its number
    # the resumed sampler does not repeat the first session's draws
    assert len({r["train.lr"] for r in finished}) == 3
    again = run_study(None, study_dir=study, resume=True, trials=3, **QUIET)
    assert again["complete"] == 3 and len(csv_rows(study)) == 4


# -- pruning --------------------------------------------------------------------------------------------
def test_a_pruned_trial_stops_and_leaves_a_finished_so_far_run(tiny_data_dir, tmp_path):
    study = tmp_path / "study"
    # every validation value is below 2: the threshold pruner stops each trial after its first epoch
    res = run_study("sasrec", study_dir=study, trials=2, **study_kwargs(
        tiny_data_dir, pruner=optuna.pruners.ThresholdPruner(lower=2.0)), epochs_cap=3)
    assert (res["complete"], res["pruned"], res["best_trial"]) == (0, 2, None)
    rows = csv_rows(study)
    assert [(r["state"], r["epochs"]) for r in rows] == [("pruned", "1"), ("pruned", "1")]
    assert all(r["note"].startswith("pruned: valid NDCG@20") for r in rows)
    run = study / rows[0]["run"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["status"] == "pruned" and saved["epochs_run"] == 1 and saved["best_epoch"] == 1
    assert float(rows[0]["value"]) == pytest.approx(best_valid(run), abs=1e-6)
    assert 0.0 <= runs.evaluate_run(run)["test"]["NDCG@10"] <= 1.0  # an ordinary run folder
    assert not (study / "best.yaml").exists() and "Best: none yet." in (study / "trials.md").read_text()


def test_stop_training_from_on_epoch(tiny_data_dir, tmp_path, monkeypatch):
    seen = []

    def on_epoch(epoch, record):
        seen.append((epoch, record["valid_NDCG@20"]))
        if epoch == 2:
            raise tr.StopTraining("enough")

    closed = []
    close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self.log_dir), close(self)))
    run, res = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=5), on_epoch=on_epoch, **QUIET)
    rows = runs.read_metrics(run / "metrics.jsonl")
    assert [e for e, _ in seen] == [1, 2] and [v for _, v in seen] == [r["valid_NDCG@20"] for r in rows]
    saved = json.loads((run / "results.json").read_text())
    assert (saved["status"], saved["stopped"], saved["epochs_run"]) == ("pruned", "enough", 2)
    assert saved["test"] == res["test"] and (run / "best.pt").is_file() and (run / "index.faiss").is_file()
    assert closed == [str(run)]
    _, plain = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1), **QUIET)
    assert plain["status"] == "finished" and "stopped" not in plain


# -- TensorBoard in run folders -------------------------------------------------------------------------
def scalars(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_a_resumed_stream(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3, lr=0.005)
    run, _ = tr.train(cfg, stop_after=2, **QUIET)
    # a process killed after logging epoch 3 but before its last.pt: the resumed run drops that step
    with SummaryWriter(str(run)) as w:
        w.add_scalar("valid/NDCG@20", 99.0, 3)
    time.sleep(1.1)  # event files are ordered by the second they were opened in
    res = tr.resume(run, **QUIET)
    acc = scalars(run)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/epoch_seconds", "valid/HR@10",
            "valid/NDCG@10", "valid/MRR@50", "test/NDCG@10", "test/HR@20"} <= tags
    rows = runs.read_metrics(run / "metrics.jsonl")
    valid = acc.Scalars("valid/NDCG@20")
    assert [e.step for e in valid] == [1, 2, 3]
    assert [e.value for e in valid] == pytest.approx([r["valid_NDCG@20"] for r in rows], abs=1e-6)
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows], abs=1e-5)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([0.005] * 3)
    test = acc.Scalars("test/NDCG@10")
    assert len(test) == 1 and test[0].step == res["best_epoch"]
    assert test[0].value == pytest.approx(res["test"]["NDCG@10"], abs=1e-6)


def test_tensorboard_off_and_closed_on_divergence(tiny_data_dir, tmp_path, monkeypatch):
    run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "off", epochs=1, tensorboard=False), **QUIET)
    assert not list(run.glob("events.out.tfevents.*"))
    closed = []
    close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self.log_dir), close(self)))
    poison_loss_from_epoch(monkeypatch, 2)
    with pytest.raises(AthweError, match="training diverged in epoch 2"):
        tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3), run_dir=tmp_path / "run", **QUIET)
    assert closed == [str(tmp_path / "run")]
    assert [e.step for e in scalars(tmp_path / "run").Scalars("train/loss")] == [1]


# -- search spaces --------------------------------------------------------------------------------------
def test_every_shipped_space_samples_valid_models(tiny_data_dir):
    shipped = sorted(p.name.removesuffix(".yaml") for p in (config_dir() / "spaces").iterdir()
                     if p.name.endswith(".yaml"))
    assert shipped == list_models()
    features = random_features(30)
    for model in shipped:
        space = load_space(model)
        names = space.names()
        assert {"train.lr", "model_args.hidden_size", "model_args.num_layers", "model_args.num_heads",
                "model_args.hidden_dropout"} <= set(names), model
        lr = space.params[names.index("train.lr")]
        assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True)
        base = resolve_config(model, "tiny", flags={"data.max_seq_length": 8})
        check_space(space, base)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(6):
            trial = study.ask()
            cfg = apply_settings(base, sample(space, trial, base))
            args = cfg.model_args
            assert args["hidden_size"] % args["num_heads"] == 0
            net = create_model(model, 30, 8, args, cfg.train.loss, features if get_entry(model).needs_features
                               else None)
            assert sum(p.numel() for p in net.parameters()) > 0
            study.tell(trial, 0.0)


def test_space_constraints_and_missing_image_features():
    heads = Param("model_args.num_heads", "categorical", choices=(1, 2, 4, 8), divides="model_args.hidden_size")
    assert [heads.fit_divisor(8, t) for t in (64, 12, 6, 3)] == [8, 4, 2, 1]
    assert heads.fit_divisor(1, 64) == 1 and heads.fit_divisor(2, 9) == 1
    space = load_space("athwe")
    mods = space.params[space.names().index("model_args.modalities")]
    assert mods.choices == (["id", "text"], ["id", "text", "image"])
    no_image = with_available_features(space, FeatureSet(text=torch.zeros(3, 4)))
    assert no_image.params[space.names().index("model_args.modalities")].choices == (["id", "text"],)
    with pytest.raises(ConfigError, match="every choice needs item features"):
        with_available_features(space, FeatureSet())


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    (None, "config file not found"),
    ("params: [", "invalid YAML"),
    ("params: {model_args.nope: {type: float, low: 0.1, high: 0.2}}", "unknown parameter model_args.nope"),
    ("params: {train.lr: {type: float, low: 0.01, high: 0.001}}", "bad range, low 0.01 must be below high 0.001"),
    ("params: {train.lr: {type: float, low: 0.0, high: 0.1, log: true}}", "a log scale needs low > 0"),
    ("params: {model_args.hidden_dropout: {type: float, low: 0.1, high: 1.5}}", "1.5 is not a valid value"),
    ("params: {model_args.num_layers: {type: int, low: 1, high: 2.5}}", "high must be a whole number"),
    ("params: {model_args.hidden_size: {type: choice, choices: [8]}}", "type must be one of"),
    ("params: {train.seed: {type: int, low: 1, high: 5}}", "not searched"),
    ("params: {model_args.num_heads: {type: categorical, choices: [1, 2], divides: model_args.hidden_size},\n"
     "         model_args.hidden_size: {type: categorical, choices: [8, 16]}}", "which must come before it"),
    ("nothing: 1", "unknown section 'nothing'"),
])
def test_bad_space_file_is_one_line_naming_it(tiny_data_dir, tmp_path, text, needle):
    space = tmp_path / "space.yaml"
    if text is not None:
        space.write_text(text)
    res = tune("--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir), "--space", str(space),
               "--study", str(tmp_path / "study"))
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0] and str(space) in lines[0], lines[0]
    assert not (tmp_path / "study").exists()


def test_bad_options_are_one_line(tiny_data_dir, tmp_path):
    study = tmp_path / "study"
    common = ["--dataset", "tiny", "--data-dir", str(tiny_data_dir), "--study", str(study)]
    for args, needle in ((["--model", "nope"], "unknown model 'nope'"),
                         (["--model", "sasrec", "--trials", "0"], "--trials must be"),
                         (["--model", "sasrec", "--timeout", "-1"], "--timeout must be"),
                         (["--model", "sasrec", "--epochs-cap", "0"], "--epochs-cap must be"),
                         (["--model", "sasrec", "--set", "train.nope=1"], "unknown key train.nope"),
                         (["--model", "sasrec", "--trials", "x"], "--trials: 'x' is not a valid integer"),
                         (["--resume"], f"{study}: no study to resume"),
                         ([], "--model is required")):
        res = tune(*args, *common)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert not study.exists()
    study.mkdir()
    res = tune("--resume", *common)
    assert res.exit_code == 2 and f"{study}: no study to resume (no study.db)" in res.stderr
    (study / "notes.txt").write_text("x")
    res = tune("--model", "sasrec", *common)
    assert res.exit_code == 2 and "already holds files" in res.stderr


def test_one_process_per_study_and_resume_keeps_its_settings(tiny_data_dir, tmp_path):
    study = tmp_path / "study"
    run_study("sasrec", study_dir=study, trials=1, epochs_cap=1, **study_kwargs(tiny_data_dir))
    with study_lock(study):  # as if another process were running it
        with pytest.raises(AthweError, match=f"{study}: another process \\(pid {os.getpid()}\\) is running"):
            run_study(None, study_dir=study, resume=True, trials=2, **QUIET)
    with pytest.raises(ConfigError, match="--resume: model 'bsarec' differs from the study's 'sasrec'"):
        run_study("bsarec", study_dir=study, resume=True, trials=2, **QUIET)
    with pytest.raises(ConfigError, match="--resume: epochs_cap 3 differs"):
        run_study(None, study_dir=study, resume=True, trials=2, epochs_cap=3, **QUIET)
    shipped = str(space_path("sasrec"))
    assert run_study("sasrec", study_dir=study, resume=True, trials=1, space_file=shipped, **QUIET)["complete"] == 1
    other = tmp_path / "other.yaml"
    other.write_text("params: {train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}\n")
    with pytest.raises(ConfigError, match=f"--space {other} differs from the study's space"):
        run_study(None, study_dir=study, resume=True, trials=2, space_file=other, **QUIET)
    # --timeout: no trial starts after it (the one under way finishes): one more trial of the 5 asked for
    assert run_study(None, study_dir=study, resume=True, trials=5, timeout=0.01, **QUIET)["complete"] == 2
