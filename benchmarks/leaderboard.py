"""Leaderboard: every model tuned on the same budget on MovieLens-100k, then retrained with three seeds.

Phase 1, studies: one Optuna study per model (athwe.tuning.run_study) in `<work>/studies/<model>`, all
with the same budget: --trials finished trials (complete or pruned), at most --epochs-cap epochs per
trial, the default MedianPruner, the model's shipped search space, TPE sampler seed --sampler-seed.
The objective is the config's validation metric (NDCG@10 on ml-100k); nothing reads the test split.
A folder that holds a study is resumed, else a study is created there.
Phase 2, retrain: each study's best settings (its best.yaml) retrained with each seed at the same
epoch cap, with the config's early stopping, under `<work>/retrain` (finished runs reused, interrupted
ones resumed: run_cache.py).
Phase 3, ablations: the tuned ATHWE with its time routing, wavelet alignment, mixture of experts or
text features switched off (a component the winner already has off is switched on instead), each seed.

The table (`--out` .md and .json, also printed): test HR/NDCG@5/10/20 per model, validation NDCG@10,
the studies' trial counts and CPU hours, the winning settings, paired bootstrap intervals on test
NDCG@10 (benchmarks/paired.py) of every model against ATHWE, ATHWE against the best ID-only model
(chosen on validation) and the ablations against the tuned ATHWE. It tabulates whatever exists, so
unfinished studies give an honest partial table (their rows are flagged). Every phase resumes after
kill -9: start the same command again. Run from the repository root:
    python benchmarks/leaderboard.py                    # all phases (days on a 2-core CPU)
    python benchmarks/leaderboard.py --phase studies    # the studies only
    python benchmarks/leaderboard.py --report-only      # train nothing: tabulate what exists
    python benchmarks/leaderboard.py --quick            # smoke run: 2 trials, 2 epochs, 1 seed
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from athwe_ml100k import ROOT, ensure_features, keep_ranks, mean_std, shared_seed_runs, writable_data_dir  # noqa: E402
from paired import Stored, compare_rows, load_stored  # noqa: E402
from run_cache import (run_main, command_line, epoch_printer, finished_run, record_of, result_key, train_or_reuse,  # noqa: E402
                       training_command)

from athwe.errors import AthweError  # noqa: E402
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

MODELS = ["sasrec", "bsarec", "wearec", "fearec", "asrec", "athwe"]
NAMES = {"sasrec": "SASRec", "bsarec": "BSARec", "wearec": "WEARec", "fearec": "FEARec", "asrec": "ASRec",
         "athwe": "ATHWE"}
METRICS = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
SEEDS = "2025,2026,2027"
#: (trials, epoch cap, seeds, models) of --quick
QUICK = (2, 2, "2025", "sasrec,athwe")


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (the platform's processor string where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def study_dir(args: argparse.Namespace, model: str) -> Path:
    return Path(args.work) / "studies" / model


def study_info(folder: Path) -> dict[str, Any] | None:
    """What a study folder holds, read without touching it: athwe.tuning.study.summary (counts, best trial,
    its value, settings and best.yaml) plus its epoch cap, threads, objective and CPU hours (wall seconds
    of its complete, pruned and failed-with-an-error trials x threads; trials cut off by a kill have no
    meaningful duration and are left out). None without a study; {"error": ...} when it cannot be read."""
    import optuna

    from athwe.tuning.study import DB, STUDY_NAME, StudySettings, summary

    if not (folder / DB).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(folder / DB).resolve()}")
        settings = StudySettings.from_dict(study.user_attrs.get("athwe"), str(folder / DB))
    except (AthweError, KeyError) as e:
        return {"study": str(folder), "error": str(e)}
    train = settings.base.get("train", {})
    threads = int(train.get("num_threads") or 0) or os.cpu_count() or 1
    seconds = sum(t.duration.total_seconds() for t in study.get_trials(deepcopy=False)
                  if t.duration is not None and (t.state.name in ("COMPLETE", "PRUNED") or "error" in t.user_attrs))
    return {**summary(folder, study), "epochs_cap": settings.epochs_cap, "sampler_seed": settings.seed,
            "threads": threads, "metric": train.get("valid_metric"), "trial_seconds": round(seconds, 1),
            "cpu_hours": round(seconds * threads / 3600, 3)}


def best_yaml(info: dict[str, Any] | None) -> Path | None:
    path = Path(info["best_yaml"]) if info and info.get("best_yaml") else None
    return path if path is not None and path.is_file() else None


def run_config(args: argparse.Namespace, model: str, config_file: Path, seed: int, cap: int | None,
               extra: list[str]) -> Any:
    """The resolved config of one retrain: the study's best.yaml (+ `extra` overrides), this seed, the
    retrain runs folder, and train.epochs capped at the study's cap (as each trial was)."""
    from athwe.config import resolve_config

    flags = {"data.data_dir": args.data_dir, "train.seed": seed, "train.runs_dir": str(Path(args.work) / "retrain"),
             "train.device": args.device, "train.num_threads": args.threads}
    cfg = resolve_config(model, args.dataset, config_file=str(config_file), overrides=extra, flags=flags)
    if cap is not None:
        cfg.train.epochs = min(cfg.train.epochs, cap)
    return cfg


def ablations(args: argparse.Namespace, info: dict[str, Any]) -> list[tuple[str, list[str], bool]]:
    """(label, overrides, no effect) of each ablation of the tuned ATHWE: time routing, wavelet and MoE
    switched off (on where the winner has them off), text off (modalities [id]). `no effect`: the
    ablated config computes the same as the tuned one (time routing while the MoE is off)."""
    from athwe.models import resolved_model_args

    path = best_yaml(info)
    if path is None:
        return []
    tuned = run_config(args, "athwe", path, 0, info.get("epochs_cap"), [])
    values = resolved_model_args("athwe", tuned.model_args)
    specs = []
    for key, name in (("time_routing", "time routing"), ("wavelet", "wavelet"), ("moe", "MoE")):
        on = bool(values.get(key, True))
        label = f"ATHWE tuned, {'no ' + name if on else name + ' on'}"
        specs.append((label, [f"model_args.{key}={str(not on).lower()}"]))
    mods = list(values.get("modalities") or [])
    specs.append(("ATHWE tuned, no text (ID only)", ["model_args.modalities=[id]"]) if "text" in mods else
                 ("ATHWE tuned, text on", [f"model_args.modalities=[{','.join([*mods, 'text'])}]"]))
    want = result_key(tuned.to_dict())
    return [(label, extra, result_key(run_config(args, "athwe", path, 0, info.get("epochs_cap"), extra).to_dict())
             == want) for label, extra in specs]


def run_studies(args: argparse.Namespace, models: list[str]) -> None:
    """Phase 1: each model's study, created or resumed, one model at a time. A study that stops with an
    error (three failed trials in a row, another process holding it) is reported and the next one runs."""
    from athwe.tuning import DB, run_study

    for model in models:
        folder = study_dir(args, model)
        say = study_printer(model, args.quiet)
        try:
            if (folder / DB).is_file():  # its saved overrides (threads) and data dir stand; the budget must match
                res = run_study(model, args.dataset, trials=args.trials, study_dir=folder, resume=True,
                                epochs_cap=args.epochs_cap, seed=args.sampler_seed, printer=say)
            else:
                res = run_study(model, args.dataset, trials=args.trials, study_dir=folder,
                                overrides=[f"train.num_threads={args.threads}"],
                                flags={"data.data_dir": args.data_dir, "train.device": args.device},
                                epochs_cap=args.epochs_cap, seed=args.sampler_seed, printer=say)
        except AthweError as e:
            print(f"[{model} study] stopped: {e}", file=sys.stderr, flush=True)
            continue
        best = f"best valid {res['best_value']:.4f} (trial {res['best_trial']})" if res["best_trial"] is not None \
            else "no complete trial yet"
        print(f"[{model} study] {res['complete']} complete, {res['pruned']} pruned, {res['fail']} failed; {best}",
              flush=True)


def study_printer(model: str, quiet: bool) -> Callable[[str], None]:
    """The study's lines prefixed with the model; with `quiet`, only the study's own (one per trial),
    not the trainer's (which run_study indents)."""
    def say(text: str) -> None:
        if not (quiet and text.startswith("  ")):
            print("\n".join(f"[{model} study] {line}" for line in text.splitlines()), flush=True)
    return say


def train_seeds(args: argparse.Namespace, label: str, model: str, info: dict[str, Any], seeds: list[int],
                extra: list[str]) -> None:
    """Phases 2 and 3: train (or reuse, or resume) one row's run per seed."""
    path = best_yaml(info)
    if path is None:
        print(f"[{label}] no best.yaml in {info.get('study') if info else study_dir(args, model)}: not retrained",
              flush=True)
        return
    for seed in seeds:
        tag = f"{label} seed {seed}"
        cfg = run_config(args, model, path, seed, info.get("epochs_cap"), extra)
        run_dir, how, seconds = train_or_reuse(cfg, log=lambda s, t=tag: print(f"[{t}] {s}", flush=True),
                                               printer=epoch_printer(tag, args.quiet))
        rec = record_of(run_dir, how, seconds)
        print(f"[{tag}] {how}: valid NDCG@10 {rec['valid']['NDCG@10']:.4f}, best epoch {rec['best_epoch']} of "
              f"{rec['epochs']} ({run_dir})", flush=True)


def finished_seeds(args: argparse.Namespace, model: str, info: dict[str, Any] | None, seeds: list[int],
                   extra: list[str]) -> list[dict[str, Any]]:
    """The records of a row's finished runs (run_cache.finished_run), seed added; none without best.yaml."""
    path = best_yaml(info)
    if path is None or info is None:
        return []
    runs = []
    for seed in seeds:
        cfg = run_config(args, model, path, seed, info.get("epochs_cap"), extra)
        rec = finished_run(cfg.to_dict(), cfg.train.runs_dir)
        if rec is not None:
            runs.append({**rec, "seed": seed})
    return runs


def paired(a: dict[str, Any], b: dict[str, Any], stored: Stored) -> dict[str, Any] | None:
    """paired.compare_rows on test NDCG@10 of row `a` against row `b` on their shared seeds; None (and a
    line on stderr) when a row has no runs or a run's ranks are missing."""
    if not a["runs"] or not b["runs"]:
        return None
    runs_a, runs_b, seeds = shared_seed_runs(a, b)
    try:
        stats = compare_rows(runs_a, runs_b, k=10, stored=stored)
    except (OSError, ValueError, AthweError) as e:
        print(f"paired comparison {a['variant']} vs {b['variant']} left out: {e}", file=sys.stderr, flush=True)
        return None
    return {"variant": a["variant"], "against": b["variant"], "seeds": seeds, **stats}


def valid_mean(row: dict[str, Any]) -> float:
    return statistics.mean(x["valid"]["NDCG@10"] for x in row["runs"])


def settings_cell(settings: dict[str, Any] | None) -> str:
    """The winning settings, short: names without their section, floats to 3 digits, lists joined by +."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else "+".join(map(str, v)) if isinstance(v, list) else str(v)
    return ", ".join(f"{k.split('.', 1)[-1]}={fmt(v)}" for k, v in (settings or {}).items())


def metric_cells(runs: list[dict[str, Any]]) -> str:
    return " | ".join(mean_std([x["test"][m] for x in runs]) if runs else "" for m in METRICS)


def epochs_cell(runs: list[dict[str, Any]]) -> str:
    return ",".join(f"{x['best_epoch']}/{x['epochs']}" for x in runs)


def pair_lines(pairs: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | against | seeds | NDCG@10 difference | 95% interval | ahead in |", "|---|---|---|---|---|---|"]
    return lines + [f"| {p['variant']} | {p['against']} | {','.join(map(str, p['seeds'] or [])) or 'all'} | "
                    f"{p['rel']:+.1%} | [{p['lo']:+.1%}, {p['hi']:+.1%}] | {p['ahead']:.0%} |" for p in pairs]


def write(out: str, meta: dict[str, Any], rows: list[dict[str, Any]], abl: list[dict[str, Any]],
          stored: Stored) -> str:
    """The table (.md) and its record (.json), both written atomically; returns the .md text."""
    from athwe.tuning.study import PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS

    budget, cap, seeds = meta["trials"], meta["epochs_cap"], meta["seeds"]
    metric = next((r["study"]["metric"] for r in rows if r["study"] and r["study"].get("metric")), "NDCG@10")
    lines = [f"# Leaderboard on {meta['dataset']}: every model tuned on the same budget, then retrained", "",
             command_line(meta["command"], meta["report_only"]), "",
             f"Machine: {meta['cpu']}, {meta['cpus']} CPUs, device {meta['device']}, torch {meta['torch']}; "
             f"{meta['threads']} CPU thread(s) per study trial and per retrain run (--threads).", "",
             f"Budget per model: {budget} finished trials (complete or pruned) of an Optuna TPE study (sampler seed "
             f"{meta['sampler_seed']}) over the model's shipped search space (athwe/configs/spaces/<model>.yaml), "
             f"the default MedianPruner ({PRUNER_STARTUP_TRIALS} startup trials, {PRUNER_WARMUP_EPOCHS} warm-up "
             f"epochs), at most {cap} epochs per trial. Each study's best complete trial (its best.yaml) was "
             f"retrained with seeds {','.join(map(str, seeds))} at the same cap of {cap} epochs, with the config's "
             "early stopping; test metrics are mean ± sample std over those seeds.", "",
             f"Selection used validation only: each study maximised validation {metric}, each model's settings are "
             "its study's best trial on it, and the best ID-only model is chosen by validation NDCG@10 (mean over "
             "its seeds); the test split was read only to fill this table.", "",
             "| model | seeds | " + " | ".join(METRICS) + " | valid NDCG@10 (seeds) | valid NDCG@10 (study best) | "
             "trials complete/pruned | CPU h | best/run epochs | winning settings |",
             "|---" * (8 + len(METRICS)) + "|"]
    for r in rows:
        s = r["study"] or {}
        runs = r["runs"]
        if "complete" in s:
            flag = " ‡" if s["complete"] + s["pruned"] < budget or s.get("epochs_cap") != cap else ""
            trials = f"{s['complete']}/{s['pruned']}{flag}"
            best = (f"{s['best_value']:.4f} (trial {s['best_trial']})" if s.get("best_trial") is not None
                    else "none yet")
            cpu = f"{s['cpu_hours']:.2f}"
        else:
            trials, best, cpu = (s.get("error", "no study yet") if s else "no study yet"), "", ""
        valid = mean_std([x["valid"]["NDCG@10"] for x in runs]) if runs else ""
        lines.append(f"| {r['variant']} | {','.join(str(x['seed']) for x in runs)} | {metric_cells(runs)} | {valid} | "
                     f"{best} | {trials} | {cpu} | {epochs_cell(runs)} | {settings_cell(s.get('best_settings'))} |")
    short = [f"{r['variant']} ({r['study']['complete'] + r['study']['pruned']} of {budget}"
             + (f", cap {r['study'].get('epochs_cap')}" if r["study"].get("epochs_cap") != cap else "") + ")"
             for r in rows if r["study"] and "complete" in r["study"]
             and (r["study"]["complete"] + r["study"]["pruned"] < budget or r["study"].get("epochs_cap") != cap)]
    if short:
        lines += ["", "‡ Study unfinished or on another budget, so its row is provisional: " + "; ".join(short) + "."]
    lines += ["", "Valid NDCG@10 (seeds): the validation NDCG@10 at each retrained run's best epoch; (study best): "
              "the study's best complete trial, trained once at the config's seed. CPU h: the study's trial wall "
              "seconds (complete, pruned and failed trials; a trial cut off by a kill is not counted) x its threads "
              "/ 3600. Best/run epochs: per seed, the best epoch and the epochs trained (the cap, or early stopping)."]
    athwe = next((r for r in rows if r["model"] == "athwe" and r["runs"]), None)
    pairs = [p for r in rows if athwe is not None and r is not athwe for p in [paired(r, athwe, stored)] if p]
    ids = [r for r in rows if r["model"] != "athwe" and r["runs"]]
    best_id = max(ids, key=valid_mean) if ids else None
    headline = paired(athwe, best_id, stored) if athwe is not None and best_id is not None else None
    if pairs or headline:
        p0 = (pairs or [headline])[0]
        lines += ["", f"Paired on the same {p0['users']:,} test users: each user's test NDCG@10 averaged over a row's "
                  f"seeds (those both rows have), the relative difference of the means, its 95% interval and share of "
                  f"draws ahead over {p0['resamples']:,} bootstrap resamples of the users.", ""]
    if pairs:
        lines += pair_lines(pairs)
    if headline:
        lines += ["", f"**ATHWE against the best ID-only model by validation NDCG@10 ({best_id['variant']}, "
                  f"{valid_mean(best_id):.4f} against ATHWE's {valid_mean(athwe):.4f}): test NDCG@10 "
                  f"{headline['rel']:+.1%} [{headline['lo']:+.1%}, {headline['hi']:+.1%}], ahead in "
                  f"{headline['ahead']:.0%} of the resamples.**"]
    abl_pairs = [p for r in abl if athwe is not None for p in [paired(r, athwe, stored)] if p]
    if abl:
        lines += ["", "## Ablations of the tuned ATHWE", "",
                  "Each row switches one component of the tuned ATHWE (its best.yaml) and keeps the rest; a component "
                  "the winner has off is switched on instead. Same seeds and epoch cap as the tuned row.", "",
                  "| variant | seeds | " + " | ".join(METRICS) + " | valid NDCG@10 | best/run epochs |",
                  "|---" * (4 + len(METRICS)) + "|"]
        for r in abl:
            if r["no_effect"]:
                lines.append(f"| {r['variant']} | no effect on the tuned settings (MoE off), not trained |"
                             + " |" * (len(METRICS) + 2))
                continue
            runs = r["runs"]
            valid = mean_std([x["valid"]["NDCG@10"] for x in runs]) if runs else ""
            lines.append(f"| {r['variant']} | {','.join(str(x['seed']) for x in runs)} | {metric_cells(runs)} | "
                         f"{valid} | {epochs_cell(runs)} |")
        if abl_pairs:
            lines += ["", "Against the tuned ATHWE (paired on the same test users, as above):", ""]
            lines += pair_lines(abl_pairs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    keep_ranks(out, rows + abl, stored)  # <out>.ranks.json: the comparisons can be made again without the runs
    text = "\n".join(lines) + "\n"
    atomic_write_json(out + ".json", {**meta, "rows": rows, "ablations": abl, "paired": pairs,
                                      "athwe_vs_best_id": headline and {**headline, "best_id": best_id["variant"]},
                                      "ablations_paired": abl_pairs})
    atomic_write_text(out + ".md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--model-order", default=None,
                    help="comma-separated: the order the studies and retrains run in (models not named follow in "
                         "--models order)")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--phase", choices=["studies", "retrain", "all"], default="all",
                    help="studies: phase 1; retrain: phases 2 and 3 (retrain the winners, ablate ATHWE); all: 1-3")
    ap.add_argument("--trials", type=int, default=None, help="finished trials per study (default 12)")
    ap.add_argument("--epochs-cap", type=int, default=None, help="epochs per trial and per retrain (default 50)")
    ap.add_argument("--sampler-seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help=f"retrain seeds (default {SEEDS})")
    ap.add_argument("--threads", type=int, default=1, help="train.num_threads of every trial and run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text-model", default="packaged-minilm", help="ATHWE's text features (offline default)")
    ap.add_argument("--work", default=None, help="studies, retrain runs, data mirror "
                                                 "(default benchmarks/runs/leaderboard, git-ignored)")
    ap.add_argument("--out", default=None, help="table path without .md (default benchmarks/results/leaderboard)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tabulate what exists")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 trials, 2 epochs, seed 2025, models sasrec,athwe, under "
                         "benchmarks/runs/leaderboard-quick (table there too)")
    ap.add_argument("--quiet", action="store_true", help="no trainer line per epoch")
    args = ap.parse_args()
    trials, cap, seeds_q, models_q = QUICK if args.quick else (12, 50, SEEDS, ",".join(MODELS))
    args.trials = args.trials if args.trials is not None else trials
    args.epochs_cap = args.epochs_cap if args.epochs_cap is not None else cap
    args.work = args.work or ("benchmarks/runs/leaderboard-quick" if args.quick else "benchmarks/runs/leaderboard")
    args.out = args.out or (f"{args.work}/leaderboard" if args.quick else "benchmarks/results/leaderboard")
    seeds = [int(s) for s in (args.seeds or seeds_q).split(",") if s.strip()]
    models = [m.strip() for m in (args.models or models_q).split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {MODELS}")
    order = [m.strip() for m in (args.model_order or "").split(",") if m.strip() in models]
    models = list(dict.fromkeys(order + models))
    command = training_command()

    import torch

    from athwe.config import resolve_config
    from athwe.utils import resolve_device

    args.data_dir = writable_data_dir(args.dataset, args.data_dir, Path(args.work) / "data")
    if not args.report_only:  # before any run: the features' manifest enters every run's data fingerprint
        kcore = resolve_config("athwe", args.dataset).data.kcore
        ensure_features(args.dataset, args.data_dir, kcore, args.text_model, args.device)
        if args.phase in ("studies", "all"):
            run_studies(args, models)
        if args.phase in ("retrain", "all"):
            for model in models:
                train_seeds(args, NAMES[model], model, study_info(study_dir(args, model)) or {}, seeds, [])
            if "athwe" in models:
                info = study_info(study_dir(args, "athwe")) or {}
                for label, extra, no_effect in ablations(args, info):
                    if no_effect:
                        print(f"[{label}] no effect on the tuned settings: not trained", flush=True)
                    else:
                        train_seeds(args, label, "athwe", info, seeds, extra)
    rows = []
    for model in models:
        info = study_info(study_dir(args, model))
        rows.append({"model": model, "variant": NAMES[model], "study": info,
                     "runs": finished_seeds(args, model, info, seeds, [])})
    info = next((r["study"] for r in rows if r["model"] == "athwe"), None)
    abl = [{"variant": label, "model": "athwe", "overrides": extra, "no_effect": no_effect,
            "runs": [] if no_effect else finished_seeds(args, "athwe", info, seeds, extra)}
           for label, extra, no_effect in (ablations(args, info) if info and "complete" in info else [])]
    meta = {"command": command, "dataset": args.dataset, "models": models, "seeds": seeds, "trials": args.trials,
            "epochs_cap": args.epochs_cap, "sampler_seed": args.sampler_seed, "threads": args.threads,
            "cpu": cpu_name(), "cpus": os.cpu_count(), "device": str(resolve_device(args.device)),
            "torch": torch.__version__, "python": platform.python_version(), "report_only": args.report_only,
            "work": args.work, "out": args.out}
    print(write(args.out, meta, rows, abl, load_stored(args.out)))


if __name__ == "__main__":
    run_main(main)
