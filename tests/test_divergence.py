"""A diverged model never looks good: training stops with one line, the evaluator counts a row with
a non-finite score as a miss, and a checkpoint holding NaN weights is refused."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from athwe import runs
from athwe.cli import app
from athwe.dataset.split import SampleSet
from athwe.errors import AthweError
from athwe.evaluation.metrics import MISS_RANK, evaluate
from athwe.training import trainer as tr
from conftest import poison_loss_from_epoch
from test_train import tiny_cfg


def _samples(n: int = 6, width: int = 4) -> SampleSet:
    ids = torch.arange(1, n * width + 1).view(n, width) % 9 + 1
    return SampleSet(ids, torch.zeros(n, width, dtype=torch.float64), torch.arange(1, n + 1), torch.arange(n),
                     torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_misses_and_counted(bad):
    samples = _samples()

    def scores(batch):
        s = torch.rand(len(batch), 10)
        s[:, 1:] = bad  # every item, the target too
        return s

    metrics, ranks = evaluate(scores, samples, "none", batch_size=4)
    assert metrics["HR@10"] == 0.0 and metrics["NDCG@50"] == 0.0 and metrics["MRR@5"] == 0.0
    assert metrics["nonfinite_rows"] == 6 and bool((ranks == MISS_RANK).all())

    def one_row_broken(batch):  # row 0's other items are NaN: it would rank its target first
        s = torch.zeros(len(batch), 10)
        s[torch.arange(len(batch)), batch.target] = 1.0
        s[batch.user == 0, 5:] = float("nan")
        return s

    metrics, ranks = evaluate(one_row_broken, samples, "none", batch_size=4)
    assert metrics["nonfinite_rows"] == 1 and ranks[0] == MISS_RANK and metrics["HR@5"] == pytest.approx(5 / 6)
    assert "nonfinite_rows" not in evaluate(lambda b: torch.rand(len(b), 10), samples)[0]


def test_diverging_training_stops_with_one_line(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3, lr=1e9)
    with pytest.raises(AthweError) as e:
        tr.train(cfg, run_dir=tmp_path / "run", printer=lambda s: None, progress=False)
    message = str(e.value)
    assert "training diverged in epoch 1, step" in message and "train.lr 1e+09" in message
    assert "\n" not in message and message.endswith("no epoch had finished, so nothing was kept")
    assert not (tmp_path / "run").exists()  # nothing usable: the folder it created is gone


def test_diverging_run_from_the_cli_keeps_its_best_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    """Two good epochs, then the loss turns NaN in epoch 3: exit 2 with one line naming epoch and step;
    best.pt and the two epoch records stay, and `athwe evaluate` still works on the run."""
    run = tmp_path / "run"
    tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=2), run_dir=run, printer=lambda s: None,
             progress=False)
    (run / "results.json").unlink()
    poison_loss_from_epoch(monkeypatch, 3)
    cfg = runs.load_run_config(run)
    cfg.train.epochs = 4
    (run / "config.yaml").write_text(json.dumps(runs.saved_config(cfg)))
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "training diverged in epoch 3, step 1: the training loss is nan" in lines[0]
    assert f"{run / 'best.pt'} keeps epoch" in lines[0]
    assert [r["epoch"] for r in runs.read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert 0.0 <= runs.evaluate_run(run)["test"]["NDCG@10"] <= 1.0


def test_nan_checkpoint_is_refused(tiny_data_dir, tmp_path):
    run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1), printer=lambda s: None, progress=False)
    state = torch.load(run / "best.pt", weights_only=True)
    state["embedding.item.weight"][3, 0] = float("nan")
    torch.save(state, run / "best.pt")
    for argv in (["evaluate", "--run", str(run)], ["index", "--run", str(run)],
                 ["retrieve", "--run", str(run), "--user", "u1"]):
        res = CliRunner().invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, res.stderr
        assert "best.pt: embedding.item.weight holds NaN or infinite values (the run diverged)" in lines[0]


def test_damaged_metrics_file(tiny_data_dir, tmp_path):
    run, _ = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=2), printer=lambda s: None, progress=False)
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n" + good)
    rows = runs.list_runs(tmp_path / "runs")
    assert [r["status"] for r in rows] == ["damaged"]
    res = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0 and "damaged" in res.stdout
    (run / "results.json").unlink()
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: {run / 'metrics.jsonl'}: line 1 is not text, the file is damaged; delete that line (the run's "
        f"checkpoints do not depend on it)"]
    (run / "metrics.jsonl").write_bytes(good + b'{"epoch": 3, "tr\xc3')  # a kill mid-character: skipped
    assert [r["epoch"] for r in runs.read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_largest_seed_trains(tiny_data_dir, tmp_path):
    """Every seed the config accepts (0 .. 2**63 - 1) trains: the epoch generators' seeds stay in range."""
    _, res = tr.train(tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=1, seed=2**63 - 1), printer=lambda s: None,
                      progress=False)
    assert 0.0 <= res["test"]["NDCG@10"] <= 1.0
