"""The benchmarks' run reuse (which run folder counts as the same run, and what is read back), their
output, and the paired comparison of runs on the same test users."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_cache import find_run, finished, save_record  # noqa: E402

from athwe.config import resolve_config  # noqa: E402
from athwe.models import resolved_model_args  # noqa: E402


def _run(root: Path, name: str, cfg: dict, done: bool, age: int) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if done:
        (run / "results.json").write_text(json.dumps({
            "best_epoch": 3, "epochs_run": 5, "train_samples_per_s": 100.0, "train_seconds": 50.0,
            "test": {"NDCG@10": 0.1}, "valid": {"NDCG@10": 0.2}, "header": {"model": cfg["model"]}}))
    else:
        (run / "last.pt").write_bytes(b"")
    t = 1_700_000_000 + age
    os.utime(run / "config.yaml", (t, t))
    return run


def test_find_run_matches_config_up_to_threads_device_and_paths(tmp_path):
    cfg = resolve_config("sasrec", "LastFM", overrides=["train.seed=1"]).to_dict()
    same = resolve_config("sasrec", "LastFM", overrides=["train.seed=1", "train.num_threads=1", "train.device=cpu",
                                                        "data.data_dir=/elsewhere", "train.runs_dir=/x"]).to_dict()
    other_seed = resolve_config("sasrec", "LastFM", overrides=["train.seed=2"]).to_dict()
    other_lr = resolve_config("sasrec", "LastFM", overrides=["train.seed=1", "train.lr=0.01"]).to_dict()
    assert find_run(cfg, tmp_path / "missing") is None
    _run(tmp_path, "seed2", other_seed, True, 0)
    _run(tmp_path, "lr", other_lr, True, 0)
    assert find_run(cfg, tmp_path) is None
    unfinished = _run(tmp_path, "a", same, False, 10)
    assert find_run(cfg, tmp_path) == unfinished
    assert finished(unfinished) is None
    done = _run(tmp_path, "b", same, True, 5)  # finished beats newer-but-unfinished
    assert find_run(cfg, tmp_path) == done


def test_saved_model_defaults_match_and_a_changed_default_does_not(tmp_path):
    """A run folder's config.yaml holds every model setting (defaults too); one written before it
    did (only the settings the YAML named) matches a request under today's defaults, and one whose
    recorded setting differs from today's default does not."""
    cfg = resolve_config("fearec", "LastFM", overrides=["train.seed=1", "model_args.variant=bsarec"]).to_dict()
    assert "topk_factor" not in cfg["model_args"] or cfg["model_args"]["topk_factor"] is None
    old = _run(tmp_path, "old", cfg, True, 0)
    assert find_run(cfg, tmp_path) == old
    full = copy.deepcopy(cfg)
    full["model_args"] = resolved_model_args("fearec", cfg["model_args"])
    assert full["model_args"]["topk_factor"] == 10 and full["model_args"]["padding"] == "left"
    new = _run(tmp_path, "new", full, True, 5)
    assert find_run(cfg, tmp_path) == new  # both match; the newer wins
    changed = copy.deepcopy(full)
    changed["model_args"]["topk_factor"] = 5  # what a run trained under another default recorded
    for run in (old, new):
        shutil.rmtree(run)
    _run(tmp_path, "changed", changed, True, 0)
    assert find_run(cfg, tmp_path) is None
    gone = copy.deepcopy(cfg)
    gone["model_args"]["retired_setting"] = 1  # a setting this version does not know
    _run(tmp_path, "gone", gone, True, 0)
    assert find_run(cfg, tmp_path) is None


def test_runs_recorded_before_train_precision_existed_match_as_fp32(tmp_path):
    cfg = resolve_config("sasrec", "LastFM", overrides=["train.seed=1"]).to_dict()
    old = copy.deepcopy(cfg)
    del old["train"]["precision"]
    bf16 = resolve_config("sasrec", "LastFM", overrides=["train.seed=1", "train.precision=bf16"]).to_dict()
    run = _run(tmp_path, "old", old, True, 0)
    assert find_run(cfg, tmp_path) == run
    assert find_run(bf16, tmp_path) is None


def test_athwe_runs_without_experts_match_whatever_their_expert_routing(tmp_path):
    def cfg(*sets: str) -> dict:
        return resolve_config("athwe", "ml-100k", overrides=["train.seed=1", *sets]).to_dict()

    run = _run(tmp_path, "no_moe", cfg("model_args.moe=false", "model_args.time_routing=true"), True, 0)
    # with the experts off their routing and sizes build nothing, so the run stands for either routing
    assert find_run(cfg("model_args.moe=false", "model_args.time_routing=false"), tmp_path) == run
    assert find_run(cfg("model_args.moe=false", "model_args.routed_experts=4", "model_args.moe_topk=2"),
                    tmp_path) == run
    assert find_run(cfg("model_args.moe=false", "model_args.wavelet=false"), tmp_path) is None
    routed = _run(tmp_path, "moe", cfg("model_args.time_routing=true"), True, 0)
    assert find_run(cfg("model_args.time_routing=true"), tmp_path) == routed
    assert find_run(cfg("model_args.time_routing=false"), tmp_path) is None


def test_finished_record_prefers_saved_wall_time(tmp_path):
    cfg = resolve_config("sasrec", "LastFM").to_dict()
    run = _run(tmp_path, "r", cfg, True, 0)
    rec = finished(run)
    assert rec["wall_s"] == 50.0 and rec["wall_s_is_train_s"] and rec["epochs"] == 5 and rec["test"]["NDCG@10"] == 0.1
    save_record(run, {"wall_s": 61.5, "peak_rss_mb": 900.0})
    rec = finished(run)
    assert rec["wall_s"] == 61.5 and rec["peak_rss_mb"] == 900.0 and "wall_s_is_train_s" not in rec
    assert not list(run.glob("*.tmp"))


def test_resumed_run_keeps_training_seconds_flag(tmp_path):
    """A resumed run records peak memory but no wall time: its training seconds stand in, flagged."""
    cfg = resolve_config("sasrec", "LastFM").to_dict()
    run = _run(tmp_path, "r", cfg, True, 0)
    save_record(run, {"resumed": True, "peak_rss_mb": 700.0})
    rec = finished(run)
    assert rec["wall_s"] == 50.0 and rec["wall_s_is_train_s"] and rec["resumed"] and rec["peak_rss_mb"] == 700.0


def test_athwe_ml100k_report_only_tabulates_finished_runs(tmp_path, monkeypatch, capsys):
    """--report-only trains nothing: finished runs are tabulated, seeds without one are left out."""
    import athwe_ml100k

    data = tmp_path / "data"
    (data / "ml-100k").mkdir(parents=True)
    runs = tmp_path / "runs"
    for seed in (1, 2):
        cfg = resolve_config("sasrec", "ml-100k", flags={"train.seed": seed}).to_dict()
        _run(runs, f"sasrec-{seed}", cfg, True, seed)
        rec = json.loads((runs / f"sasrec-{seed}" / "results.json").read_text())
        rec["test"] = {m: 0.1 * seed for m in athwe_ml100k.METRICS}
        rec["header"] = {"preset": "recbole", "history": "none"}
        (runs / f"sasrec-{seed}" / "results.json").write_text(json.dumps(rec))
    _run(runs, "sasrec-3", resolve_config("sasrec", "ml-100k", flags={"train.seed": 3}).to_dict(), False, 3)
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["athwe_ml100k.py", "--data-dir", str(data), "--runs-dir", str(runs),
                                      "--seeds", "1,2,3", "--variants", "SASRec,BSARec", "--report-only",
                                      "--out", str(out)])
    athwe_ml100k.main()
    md = (tmp_path / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| SASRec |"))
    assert row.startswith("| SASRec | 1,2 | 0.1500 ± 0.0707 |")
    assert "| BSARec |" not in md
    assert "Ablations switch" not in md and "Peak memory marked" not in md  # no ablation row, nothing resumed
    assert "seed 3: no finished run, left out" in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["data", "sasrec-1", "sasrec-2", "sasrec-3"]


def test_runs_on_other_data_are_not_reused(tmp_path):
    """save_record stores the data fingerprint; changed data (a regenerated dataset, re-extracted
    features) no longer matches; a run without a fingerprint yet (still training) still does."""
    data = tmp_path / "data" / "LastFM"
    data.mkdir(parents=True)
    (data / "LastFM.txt").write_text("1 1 2 3\n")
    cfg = resolve_config("sasrec", "LastFM", flags={"data.data_dir": str(tmp_path / "data")}).to_dict()
    runs = tmp_path / "runs"
    run = _run(runs, "a", cfg, True, 0)
    save_record(run, {"wall_s": 1.0})
    assert json.loads((run / "benchmark.json").read_text())["data_fingerprint"]
    assert find_run(cfg, runs) == run
    (data / "features").mkdir()
    (data / "features" / "manifest.json").write_text("{}")
    assert find_run(cfg, runs) is None  # features extracted since
    (data / "features" / "manifest.json").unlink()
    assert find_run(cfg, runs) == run
    (data / "LastFM.txt").write_text("1 1 2 4\n")
    assert find_run(cfg, runs) is None
    training = _run(runs, "b", cfg, False, 5)
    assert find_run(cfg, runs) == training


def test_features_extracted_again_alike_keep_the_data_fingerprint(tmp_path):
    """Only the manifest's timing fields may change; other manifest fields, or a record made with
    the older byte-for-byte manifest hash, behave as before."""
    from run_cache import data_fingerprint

    data = tmp_path / "data" / "ml"
    (data / "features").mkdir(parents=True)
    (data / "ml.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    manifest = {"version": 1, "written": "2026-01-01T00:00:00+00:00", "seconds": 3.0,
                "text": {"model": "minilm", "dim": 384, "seconds": 2.0, "items_per_s": 90.0}}
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    cfg = resolve_config("sasrec", "ml", flags={"data.data_dir": str(tmp_path / "data")}).to_dict()
    runs = tmp_path / "runs"
    run = _run(runs, "a", cfg, True, 0)
    save_record(run, {"wall_s": 1.0})
    again = {**manifest, "written": "2026-02-02T00:00:00+00:00", "seconds": 4.5,
             "text": {**manifest["text"], "seconds": 2.5, "items_per_s": 70.0}}
    (data / "features" / "manifest.json").write_text(json.dumps(again, indent=1))
    assert find_run(cfg, runs) == run
    (data / "features" / "manifest.json").write_text(json.dumps({**again, "text": {**again["text"], "model": "bert"}}))
    assert find_run(cfg, runs) is None
    # an older record holds the hash of the manifest's bytes: it matches while those bytes are unchanged
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    bench = json.loads((run / "benchmark.json").read_text())
    (run / "benchmark.json").write_text(json.dumps({**bench, "data_fingerprint": data_fingerprint(cfg, legacy=True)}))
    assert find_run(cfg, runs) == run
    (data / "features" / "manifest.json").write_text(json.dumps(again))
    assert find_run(cfg, runs) is None


def test_train_or_reuse_trains_reuses_and_resumes(tiny_data_dir, tmp_path, monkeypatch):
    from conftest import TINY_MODEL, train_dies_in_epoch
    from run_cache import record_of, train_or_reuse

    def cfg(seed):
        return resolve_config("sasrec", "tiny", overrides=[f"model_args.{k}={v}" for k, v in TINY_MODEL.items()],
                              flags={"data.data_dir": str(tiny_data_dir), "train.runs_dir": str(tmp_path / "runs"),
                                     "data.max_seq_length": 8, "train.batch_size": 32, "train.epochs": 3,
                                     "train.seed": seed})

    heard: list[str] = []
    lines: list[str] = []
    run, how, secs = train_or_reuse(cfg(1), log=heard.append, printer=lines.append)
    assert how == "trained" and secs > 0 and not heard
    assert sum(line.startswith("epoch ") for line in lines) == 3  # the trainer's line per epoch
    rec = record_of(run, how, secs, {"peak_rss_mb": 1.0})
    assert rec["wall_s"] == round(secs, 1) and rec["peak_rss_mb"] == 1.0 and rec["data_fingerprint"]
    assert (train_or_reuse(cfg(1), log=heard.append) == (run, "reused", 0.0)
            and heard == [f"reusing finished run {run}"])
    assert record_of(run, "reused", 0.0)["peak_rss_mb"] == 1.0  # a reused run's record is left as it was
    assert train_or_reuse(cfg(1), fresh=True, log=heard.append)[0] != run

    undo = train_dies_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_or_reuse(cfg(2))
    undo()
    run2, how, secs = train_or_reuse(cfg(2), log=heard.append)
    assert how == "resumed" and run2 != run and heard[-1] == f"resuming {run2}"
    rec = record_of(run2, how, secs)
    assert rec["resumed"] and rec["wall_s_is_train_s"] and rec["epochs"] == 3 and rec["data_fingerprint"]


def test_epoch_printer_prefixes_every_line_and_quiet_prints_nothing(capsys):
    from run_cache import epoch_printer

    epoch_printer("wearec LastFM ce seed 42", quiet=False)("epoch   1  loss 8.1\nHR@10 0.05")
    epoch_printer("wearec LastFM ce seed 42", quiet=True)("epoch   2  loss 7.9")
    assert capsys.readouterr().out.splitlines() == ["[wearec LastFM ce seed 42] epoch   1  loss 8.1",
                                                    "[wearec LastFM ce seed 42] HR@10 0.05"]


def _gone(pid: int) -> bool:
    """True when process `pid` has exited (or is a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_spawned_run_stops_when_the_benchmark_process_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "bench.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "benchmarks")!r})

        def child(path):
            from run_cache import exit_with_parent
            exit_with_parent(poll_s=0.1)
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)  # a run that would train on

        if __name__ == "__main__":
            p = multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1],))
            p.start()
            p.join()
    """))
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert not _gone(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = _gone(child)
    if not stopped:
        os.kill(child, 9)
    assert stopped, "the spawned run kept going after its benchmark process was killed"


def test_reproduction_tables_compare_at_the_same_sequence_length():
    from published import comparisons

    assert [label for label, _, _ in comparisons("LastFM", "wearec", 50)] == ["published", "reference code here"]
    # N=200: each row records the settings it was obtained with; only the row whose settings the run
    # shares is comparable (a ratio is taken)
    at_01 = comparisons("LastFM", "wearec", 200, "ce", {"alpha": 0.1, "num_heads": 2, "hidden_size": 64})
    assert [(label, ok) for label, _, ok in at_01] == [("published, N=200; alpha 0.1, num_heads 2", True),
                                                       ("reference log, N=200; alpha 0.3, num_heads 2", False)]
    assert at_01[0][1]["HR@10"] == .0972 and at_01[0][1]["NDCG@10"] == .0556
    at_03 = comparisons("LastFM", "wearec", 200, "ce", {"alpha": 0.3, "num_heads": 2})
    assert [ok for _, _, ok in at_03] == [False, True] and at_03[1][1]["HR@10"] == .0954
    assert [ok for _, _, ok in comparisons("LastFM", "wearec", 200, "ce",
                                           {"alpha": 0.3, "num_heads": 4})] == [False, False]
    assert comparisons("LastFM", "wearec", 100) == [] and comparisons("LastFM", "asrec", 50) == []
    # the published FEARec rows are the BSARec code's port: the official variant is shown beside them, not compared
    assert [(label, ok) for label, _, ok in comparisons("Beauty", "fearec", 50, "ce", {"variant": "official"})] == [
        ("published; variant bsarec", False)]
    assert [ok for _, _, ok in comparisons("Beauty", "fearec", 50, "ce", {"variant": "bsarec"})] == [True]
    # the published SASRec rows were trained with BCE: shown beside a CE run, but not as a ratio
    assert ([(label, ok) for label, _, ok in comparisons("Beauty", "sasrec", 50, "ce")]
            == [("published, trained with BCE", False)])
    assert [(label, ok) for label, _, ok in comparisons("Beauty", "sasrec", 50, "bce")] == [("published", True)]


def _wearec_n200_runs(runs: Path, metrics: list[str]) -> Path:
    """Two finished WEARec LastFM N=200 runs (seeds 1 and 2, every test metric 0.1 x seed)."""
    for seed in (1, 2):
        cfg = resolve_config("wearec", "LastFM", flags={"train.seed": seed, "data.max_seq_length": 200}).to_dict()
        _run(runs, f"wearec-{seed}", cfg, True, seed)
        rec = json.loads((runs / f"wearec-{seed}" / "results.json").read_text())
        rec["test"] = {m: 0.1 * seed for m in metrics}
        rec["header"] = {"preset": "bsarec", "history": "zero"}
        (runs / f"wearec-{seed}" / "results.json").write_text(json.dumps(rec))
    return runs


def test_reproduce_report_only_tabulates_finished_runs(tmp_path, monkeypatch, capsys):
    """reproduce.py --report-only trains nothing; the published row is the one for the run's N."""
    import reproduce

    runs = _wearec_n200_runs(tmp_path / "runs", reproduce.METRICS)
    out = tmp_path / "table"
    argv = ["reproduce.py", "--models", "wearec", "--datasets", "LastFM", "--seeds", "1,2,3", "--runs-dir", str(runs),
            "--set", "data.max_seq_length=200", "--report-only", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    reproduce.main()
    md = (tmp_path / "table.md").read_text()
    assert "| LastFM | wearec | ce | bsarec / zero / 200 | 1,2 | 0.1500 ± 0.0707 |" in md
    assert "| LastFM | wearec (published, N=200; alpha 0.1, num_heads 2) | | | | 0.0661 | 0.0972 |" in md
    assert "(reference code here)" not in md
    # the runs use the LastFM setting alpha 0.3: the ratio is taken against the log row at that setting only
    assert "| LastFM | wearec (ours / reference log, N=200; alpha 0.3, num_heads 2) | | | | 220.9% |" in md
    assert "(ours / published, N=200" not in md
    assert "--report-only" not in md.splitlines()[2].split("`")[1]
    assert "seed 3: no finished run, left out" in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["wearec-1", "wearec-2"]
    monkeypatch.setattr(sys, "argv", [a if a != "1,2,3" else "3" for a in argv])
    with pytest.raises(SystemExit, match="no finished runs"):
        reproduce.main()


def test_reproduce_table_names_the_variant_and_compares_only_the_published_one(tmp_path, monkeypatch):
    """A FEARec row says which variant it trained; the published (BSARec-port) row gets a ratio only
    against a run of that variant."""
    import reproduce

    runs = tmp_path / "runs"
    for variant in ("official", "bsarec"):
        cfg = resolve_config("fearec", "LastFM", overrides=[f"model_args.variant={variant}"],
                             flags={"train.seed": 1}).to_dict()
        _run(runs, f"fearec-{variant}", cfg, True, 0)
        rec = json.loads((runs / f"fearec-{variant}" / "results.json").read_text())
        rec["test"] = {m: 0.0354 for m in reproduce.METRICS}
        rec["header"] = {"preset": "bsarec", "history": "zero"}
        (runs / f"fearec-{variant}" / "results.json").write_text(json.dumps(rec))
    tables = {}
    for variant in ("official", "bsarec"):
        out = tmp_path / variant
        monkeypatch.setattr(sys, "argv", ["reproduce.py", "--models", "fearec", "--datasets", "LastFM", "--seeds", "1",
                                          "--runs-dir", str(runs), "--set", f"model_args.variant={variant}",
                                          "--report-only", "--out", str(out)])
        reproduce.main()
        tables[variant] = (tmp_path / f"{variant}.md").read_text()
    assert "| LastFM | fearec (official variant) | ce |" in tables["official"]
    assert "| LastFM | fearec (bsarec variant) | ce |" in tables["bsarec"]
    for md in tables.values():
        assert "| LastFM | fearec (published; variant bsarec) | | | |  | 0.0587 |" in md
    assert "(ours / published" not in tables["official"]
    assert "| LastFM | fearec (ours / published; variant bsarec) | | | |  | 60.3% |" in tables["bsarec"]


def test_paired_bootstrap_relative_difference_and_interval():
    import torch
    from paired import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    b = torch.rand(500, generator=g, dtype=torch.float64)
    same = paired_bootstrap(b * 1.1, b, resamples=2000)
    assert same["rel"] == pytest.approx(0.1) and same["lo"] == pytest.approx(0.1) and same["hi"] == pytest.approx(0.1)
    assert same["ahead"] == 1.0 and same["users"] == 500
    noisy = paired_bootstrap(torch.rand(500, generator=g, dtype=torch.float64), b, resamples=2000)
    assert noisy["lo"] < noisy["rel"] < noisy["hi"] and 0.0 < noisy["ahead"] < 1.0
    with pytest.raises(ValueError):
        paired_bootstrap(b, b[:-1])


def test_test_ranks_reproduce_the_runs_metric_and_are_cached(tiny_data_dir, tmp_path):
    import torch

    from conftest import TINY_MODEL
    from paired import RANKS_FILE, compare_rows, ndcg_per_user, row_ndcg, test_ranks
    from run_cache import train_or_reuse

    runs = []
    for seed in (1, 2):
        cfg = resolve_config("sasrec", "tiny", overrides=[f"model_args.{k}={v}" for k, v in TINY_MODEL.items()],
                             flags={"data.data_dir": str(tiny_data_dir), "train.runs_dir": str(tmp_path / "runs"),
                                    "data.max_seq_length": 8, "train.batch_size": 32, "train.epochs": 2,
                                    "train.seed": seed})
        runs.append(train_or_reuse(cfg)[0])
    users, ranks = test_ranks(runs[0])
    saved = json.loads((runs[0] / "results.json").read_text())["test"]
    assert float(ndcg_per_user(ranks, 10).mean()) == pytest.approx(saved["NDCG@10"], abs=1e-9)
    assert (runs[0] / RANKS_FILE).is_file()
    again = test_ranks(runs[0])  # read back from the cache
    assert torch.equal(again[0], users) and torch.equal(again[1], ranks)
    u, mean = row_ndcg(runs, 10)
    assert torch.equal(u, users.sort().values) and len(mean) == len(users)
    assert compare_rows([{"run_dir": runs[0]}], [{"run_dir": runs[0]}])["rel"] == 0.0


def test_report_only_carries_over_the_earlier_tables_runs(tmp_path, monkeypatch, capsys):
    """A table outlives its run folders: --report-only keeps the earlier .json's records of runs not
    found here (marked †), adds runs that are here, and does not carry a record trained on other data."""
    import reproduce
    from run_cache import FINGERPRINT_SCHEME, carried_record, data_fingerprint, earlier_records, read_table

    runs = _wearec_n200_runs(tmp_path / "runs", reproduce.METRICS)
    flags = {"train.runs_dir": str(runs), "data.max_seq_length": 200}
    out = tmp_path / "table"
    argv = ["reproduce.py", "--models", "wearec", "--datasets", "LastFM", "--seeds", "1,2", "--runs-dir", str(runs),
            "--set", "data.max_seq_length=200", "--report-only", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    reproduce.main()
    assert "| 1,2 | 0.1500 ± 0.0707 |" in (tmp_path / "table.md").read_text()
    import shutil

    shutil.rmtree(runs / "wearec-1")  # another machine: seed 1's folder is gone, seed 2's is here
    capsys.readouterr()
    reproduce.main()
    md = (tmp_path / "table.md").read_text()
    assert "| 1†,2 | 0.1500 ± 0.0707 |" in md and "Seeds marked † are carried over" in md
    assert "| 3,3 | 5,5 | 100,100 | " in md  # samples/s per seed when carried and new runs mix
    assert "seed 1: carried over from" in capsys.readouterr().out
    kept = json.loads((tmp_path / "table.json").read_text())["rows"][0]["runs"]
    assert [(x["seed"], bool(x.get("carried"))) for x in kept] == [(1, True), (2, False)]
    reproduce.main()  # carried again from the table it wrote itself
    assert "| 1†,2 | 0.1500 ± 0.0707 |" in (tmp_path / "table.md").read_text()
    # without --report-only nothing is carried (a training run would train seed 1 again)
    assert read_table(tmp_path / "missing") == {} and earlier_records(read_table(tmp_path / "missing")) == []
    # a record fingerprinted with the current scheme is carried only while the data is the same
    data = tmp_path / "data" / "LastFM"
    data.mkdir(parents=True)
    (data / "LastFM.txt").write_text("1 1 2 3\n")
    cfg = resolve_config("wearec", "LastFM",
                         flags={**flags, "train.seed": 1, "data.data_dir": str(tmp_path / "data")}).to_dict()
    rec = {"run_dir": "gone", "config": cfg, "test": {}, "data_fingerprint": data_fingerprint(cfg),
           "fingerprint_scheme": FINGERPRINT_SCHEME}
    assert carried_record(cfg, [rec])["carried"]
    (data / "LastFM.txt").write_text("1 1 2 4\n")
    assert carried_record(cfg, [rec]) is None
    assert carried_record(cfg, [{**rec, "fingerprint_scheme": None}]) is not None  # older scheme: taken on config
    # features extracted in another checkout: only the paths in their manifest differ, the record still matches
    (data / "features").mkdir()
    manifest = {"version": 1, "text": {"model": {"name": "minilm", "path": "/a/.venv/minilm"}, "sha256": "ab"},
                "item_map": {"source": "/a/data/LastFM/LastFM.txt", "n_items": 3}}
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    rec = {**rec, "data_fingerprint": data_fingerprint(cfg)}
    manifest["text"]["model"]["path"], manifest["item_map"]["source"] = "/b/.venv/minilm", "/b/data/LastFM/LastFM.txt"
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    assert carried_record(cfg, [rec]) is not None
    manifest["text"]["sha256"] = "cd"  # the same model's embeddings computed on another CPU: other last bits
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    assert carried_record(cfg, [rec]) is not None
    manifest["text"]["model"]["name"] = "bert"  # another text model
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    assert carried_record(cfg, [rec]) is None
    manifest["text"]["model"]["name"] = "minilm"
    manifest["cat"] = {"sha256": "ef"}  # other categories
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    rec = {**rec, "data_fingerprint": data_fingerprint(cfg)}
    manifest["cat"]["sha256"] = "01"
    (data / "features" / "manifest.json").write_text(json.dumps(manifest))
    assert carried_record(cfg, [rec]) is None
    other = resolve_config("wearec", "LastFM", flags={**flags, "train.seed": 3}).to_dict()
    assert carried_record(other, [rec]) is None


def test_paired_comparisons_survive_the_run_folders(tiny_data_dir, tmp_path):
    """The final write keeps each run's test ranks beside the table; without the folders the same
    comparison is computed from them. A pair with no ranks keeps the earlier figures only while both
    rows hold the same runs, else it is left out and the table says so."""
    import shutil

    import athwe_ml100k
    from conftest import TINY_MODEL
    from paired import compare_rows, load_stored, stored_path
    from run_cache import finished, train_or_reuse

    rows = []
    for variant, model in (("ATHWE", "sasrec"), ("WEARec", "wearec")):
        runs = []
        for seed in (1, 2):
            cfg = resolve_config(model, "tiny", overrides=[f"model_args.{k}={v}" for k, v in TINY_MODEL.items()],
                                 flags={"data.data_dir": str(tiny_data_dir), "train.runs_dir": str(tmp_path / "runs"),
                                        "data.max_seq_length": 8, "train.batch_size": 32, "train.epochs": 1,
                                        "train.seed": seed})
            runs.append({**finished(train_or_reuse(cfg)[0]), "seed": seed})
        rows.append({"variant": variant, "model": "athwe" if variant == "ATHWE" else model, "runs": runs})
    before = compare_rows(rows[0]["runs"], rows[1]["runs"])
    out = str(tmp_path / "table")
    meta = {"command": "x", "dataset": "tiny", "seeds": [1, 2], "device": "cpu", "threads": 1, "load_avg": [0, 0, 0]}
    athwe_ml100k.write(out, meta, rows)
    stored = load_stored(out)
    assert sorted(stored) == sorted(Path(x["run_dir"]).name for r in rows for x in r["runs"])
    earlier = json.loads(Path(out + ".json").read_text())
    shutil.rmtree(tmp_path / "runs")
    pairs, missing = athwe_ml100k.paired_rows(rows, stored)
    assert not missing and pairs[0]["rel"] == before["rel"] and pairs[0]["lo"] == before["lo"]
    assert pairs[0]["seeds"] == [1, 2]
    # a row trained on fewer seeds is set against the same seeds of the other row, not its mean over more
    one_seed = [rows[0], {**rows[1], "runs": rows[1]["runs"][1:]}]
    pairs, missing = athwe_ml100k.paired_rows(one_seed, stored)
    same = compare_rows(rows[0]["runs"][1:], rows[1]["runs"][1:], stored=stored)
    assert not missing and pairs[0]["seeds"] == [2] and pairs[0]["rel"] == same["rel"] != before["rel"]
    # no stored ranks: the earlier figures while the rows are unchanged, marked carried
    pairs, missing = athwe_ml100k.paired_rows(rows, {}, earlier)
    assert pairs[0]["carried"] and pairs[0]["rel"] == before["rel"] and not missing
    fewer = [rows[0], {**rows[1], "runs": rows[1]["runs"][:1]}]
    pairs, missing = athwe_ml100k.paired_rows(fewer, {}, earlier)
    assert pairs == [] and missing and "no stored test ranks" in missing[0]
    stored_path(out).unlink()
    athwe_ml100k.write(out, meta, fewer, earlier=earlier)
    assert "Not compared (no per-user test ranks for a run): ATHWE vs WEARec" in Path(out + ".md").read_text()


def test_ml100k_table_load_line():
    """A table written while training states the load before it; one read back with --report-only
    states the range its runs recorded when they started (not the load at read-back time)."""
    import athwe_ml100k

    meta = {"load_avg": [1.5, 1.0, 0.5], "report_only": False}
    rows = [{"runs": [{"load_avg_before": [0.2, 0, 0]}, {"load_avg_before": [2.25, 0, 0]}, {}]}]
    assert athwe_ml100k.load_line(meta, rows) == "load average before [1.5, 1.0, 0.5]"
    meta["report_only"] = True
    assert athwe_ml100k.load_line(meta, rows) == \
        "1-minute load average before each run 0.2-2.25 (recorded for 2 of its 3 runs)"
    assert athwe_ml100k.load_line(meta, [{"runs": [{}]}]) == "the load average before each run was not recorded"


def test_ml100k_table_notes_only_what_it_holds(tmp_path):
    """The ablation note appears with an ablation row, the resumed-memory note with a resumed run."""
    import athwe_ml100k

    run = {"test": {m: 0.1 for m in athwe_ml100k.METRICS}, "seed": 1, "best_epoch": 3, "samples_per_s": 100.0,
           "peak_rss_mb": 10.0, "header": {}}
    meta = {"dataset": "ml-100k", "command": "python x", "seeds": [1], "device": "cpu", "threads": 1,
            "load_avg": [], "report_only": False}

    def notes(rows):
        athwe_ml100k.write(str(tmp_path / "t"), meta, rows, final=False)
        md = (tmp_path / "t.md").read_text()
        return "Ablations switch" in md, "Peak memory marked" in md, "Trained with train.precision bf16" in md

    assert notes([{"variant": "ATHWE", "model": "athwe", "runs": [run]}]) == (False, False, False)
    assert notes([{"variant": "ATHWE", "model": "athwe", "runs": [run]},
                  {"variant": "ATHWE no MoE", "model": "athwe", "runs": [{**run, "resumed": True}]}]) == (
        True, True, False)
    bf16 = {**run, "seed": 2, "valid": {"NDCG@10": 0.25}, "config": {"train": {"precision": "bf16"}}}
    assert notes([{"variant": "ATHWE", "model": "athwe", "runs": [{**run, "valid": {"NDCG@10": 0.2}}, bf16]}]) == (
        False, False, True)
    md = (tmp_path / "t.md").read_text()
    assert "| 0.2250 ± 0.0354 | 3,3 |" in md and "bf16 (bfloat16 autocast" in md and ": ATHWE seed 2." in md


def test_thread_counts_per_run_in_records_and_tables(tmp_path):
    """A run's record lists the threads its epochs trained on (the config's count for epochs from
    before it was recorded); the ml-100k table shows them per run and names runs that switched."""
    import athwe_ml100k
    from run_cache import speed_cell, threads_cell

    cfg = resolve_config("sasrec", "ml-100k", flags={"train.num_threads": 1}).to_dict()
    run = _run(tmp_path, "r", cfg, True, 0)
    epochs = [{"epoch": 1}, {"epoch": 2, "num_threads": 2}, {"epoch": 3, "num_threads": 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    rec = finished(run)
    assert rec["threads"] == [[1, 1], [2, 2]]
    default = {"config": {"train": {"num_threads": 0}}}  # an older record: no per-epoch counts
    assert threads_cell([rec, {"threads": [[2, 4]]}, default]) == "1→2,2,default"
    # runs on different thread counts are not averaged
    one, two = {"samples_per_s": 100.0, "threads": [[1, 5]]}, {"samples_per_s": 300.0, "threads": [[2, 5]]}
    assert speed_cell([one, dict(one, samples_per_s=200.0)]) == "150"
    assert speed_cell([one, two]) == "100,300"

    meta = {"dataset": "ml-100k", "command": "python x", "seeds": [1], "device": "cpu", "threads": 1,
            "load_avg": [], "report_only": False}
    row = {**rec, "seed": 7, "test": {m: 0.1 for m in athwe_ml100k.METRICS}}
    athwe_ml100k.write(str(tmp_path / "t"), meta, [{"variant": "ATHWE", "model": "athwe", "runs": [row]}], final=False)
    md = (tmp_path / "t.md").read_text()
    assert "| valid NDCG@10 | best epochs | threads | samples/s |" in md
    assert "| 3 | 1→2 | 100 |" in md
    assert "ATHWE seed 7 (1 for 1 epoch, then 2 for 2 epochs)" in md


def test_ml100k_time_routing_ablation_follows_the_configured_routing(tmp_path, monkeypatch, capsys):
    """Where the dataset's ATHWE routes on content, the time-routing row switches time routing on
    (the configured model is row ATHWE), and asking for 'no time routing' says why it is not there."""
    import athwe_ml100k

    data, runs = tmp_path / "data", tmp_path / "runs"
    (data / "ml-100k").mkdir(parents=True)
    for name, routing in (("content", "false"), ("time", "true")):
        cfg = resolve_config("athwe", "ml-100k", overrides=[f"model_args.time_routing={routing}"],
                             flags={"train.seed": 1}).to_dict()
        run = _run(runs, name, cfg, True, 0)
        rec = json.loads((run / "results.json").read_text())
        rec["test"] = {m: 0.2 if routing == "false" else 0.1 for m in athwe_ml100k.METRICS}
        (run / "results.json").write_text(json.dumps(rec))
    argv = ["athwe_ml100k.py", "--data-dir", str(data), "--runs-dir", str(runs), "--seeds", "1", "--report-only",
            "--athwe-set", "model_args.time_routing=false", "--out", str(tmp_path / "t")]
    monkeypatch.setattr(sys, "argv", argv + ["--variants", "ATHWE,ATHWE time routing"])
    athwe_ml100k.main()
    md = (tmp_path / "t.md").read_text()
    assert "| ATHWE | 1 | 0.2000 |" in md and "| ATHWE time routing | 1 | 0.1000 |" in md
    assert "switch one component of the configured ATHWE: content routing (row ATHWE time routing" in md
    monkeypatch.setattr(sys, "argv", argv + ["--variants", "ATHWE no time routing"])
    with pytest.raises(SystemExit):
        athwe_ml100k.main()
    assert "ATHWE no time routing: its ATHWE already routes on content on ml-100k" in capsys.readouterr().err
    assert [v[0] for v in athwe_ml100k.variants(True)] == [v[0] for v in athwe_ml100k.VARIANTS]


def test_ml100k_carry_from_takes_runs_recorded_by_other_tables(tmp_path, monkeypatch, capsys):
    """--carry-from: runs whose folders are gone are taken from another table's .json (named in the
    log, the table's note and its .json), and carried again from the new table when rebuilt."""
    import shutil

    import athwe_ml100k

    data, runs = tmp_path / "data", tmp_path / "runs"
    (data / "ml-100k").mkdir(parents=True)
    for seed in (1, 2):
        run = _run(runs, f"sasrec-{seed}", resolve_config("sasrec", "ml-100k", flags={"train.seed": seed}).to_dict(),
                   True, seed)
        rec = json.loads((run / "results.json").read_text())
        rec["test"] = {m: 0.1 * seed for m in athwe_ml100k.METRICS}
        (run / "results.json").write_text(json.dumps(rec))
    base = ["athwe_ml100k.py", "--data-dir", str(data), "--runs-dir", str(runs), "--seeds", "1,2",
            "--variants", "SASRec", "--report-only"]
    monkeypatch.setattr(sys, "argv", base + ["--out", str(tmp_path / "old")])
    athwe_ml100k.main()
    shutil.rmtree(runs / "sasrec-1")  # seed 1 now lives only in table "old"
    capsys.readouterr()
    new = base + ["--out", str(tmp_path / "new"), "--carry-from", str(tmp_path / "old")]
    monkeypatch.setattr(sys, "argv", new)
    athwe_ml100k.main()
    assert f"SASRec seed 1: carried over from {tmp_path / 'old'}.json" in capsys.readouterr().out
    md = (tmp_path / "new.md").read_text()
    assert "| SASRec | 1†,2 | 0.1500 ± 0.0707 |" in md
    assert f"Carried from other tables (their .json records; key carried_from in this table's .json): SASRec 1 from " \
           f"{tmp_path / 'old'}." in md
    monkeypatch.setattr(sys, "argv", base + ["--out", str(tmp_path / "new")])  # rebuilt from itself: origin kept
    athwe_ml100k.main()
    assert "| SASRec | 1†,2 | 0.1500 ± 0.0707 |" in (tmp_path / "new.md").read_text()
    assert f"SASRec 1 from {tmp_path / 'old'}." in (tmp_path / "new.md").read_text()
    monkeypatch.setattr(sys, "argv", new + ["--carry-from", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="missing.json: no table to carry runs from"):
        athwe_ml100k.main()
