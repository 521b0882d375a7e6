"""Train models on the shared datasets and tabulate test metrics beside the published numbers.

Example (what benchmarks/results/sasrec_lastfm.md was made with):
    python benchmarks/reproduce.py --models sasrec --datasets LastFM --losses bce,ce --seeds 42 \
        --out benchmarks/results/sasrec_lastfm
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published import ROW_NOTES, comparisons  # noqa: E402

from run_cache import (run_main, CARRIED_NOTE, add_reuse_args, carried_record, command_line, earlier_records,  # noqa: E402
                       epoch_printer, finished_run, read_table, record_of, seeds_cell, speed_cell, train_or_reuse,
                       training_command)

from athwe.config import resolve_config  # noqa: E402
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

METRICS = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sasrec")
    ap.add_argument("--datasets", default="LastFM")
    ap.add_argument("--losses", default="ce")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--set", action="append", default=[], help="extra config override, e.g. data.max_seq_length=200")
    ap.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    add_reuse_args(ap)
    args = ap.parse_args()
    command = training_command()
    earlier = earlier_records(read_table(args.out)) if args.report_only else []
    rows = []
    for dataset in args.datasets.split(","):
        for model in args.models.split(","):
            for loss in args.losses.split(","):
                runs = []
                for seed in [int(s) for s in args.seeds.split(",")]:
                    cfg = resolve_config(model, dataset, overrides=args.set, flags={
                        "data.data_dir": args.data_dir, "train.loss": loss, "train.seed": seed,
                        "train.runs_dir": args.runs_dir})
                    if args.report_only:
                        done = finished_run(cfg.to_dict(), args.runs_dir)
                        if done is None and earlier:
                            done = carried_record(cfg.to_dict(), earlier)
                            if done is not None:
                                print(f"{model} {dataset} {loss} seed {seed}: carried over from {args.out}.json "
                                      f"(run folder {done['run_dir']} not here)", flush=True)
                        if done is None:
                            print(f"{model} {dataset} {loss} seed {seed}: no finished run, left out", flush=True)
                            continue
                    else:
                        done = run_or_reuse(cfg, args.fresh,
                                            epoch_printer(f"{model} {dataset} {loss} seed {seed}", args.quiet))
                    runs.append({**done, "seed": seed})
                    print(json.dumps({k: runs[-1][k]
                                      for k in ("seed", "wall_s", "best_epoch", "epochs", "samples_per_s")}),
                          flush=True)
                    # rewrite the tables after every run, so an interrupted benchmark keeps what finished
                    write(args.out, command, rows + [{"dataset": dataset, "model": model, "loss": loss, "runs": runs}],
                          args.report_only)
                if runs:
                    rows.append({"dataset": dataset, "model": model, "loss": loss, "runs": runs})
    if not rows:
        raise SystemExit(f"error: no finished runs under {args.runs_dir}; nothing written to {args.out}.md")


def run_or_reuse(cfg, fresh: bool, printer=lambda s: None) -> dict:
    """Train `cfg`, or reuse a finished run with the same config and data, or resume an interrupted
    one (its wall time is then unknown: the table shows its training seconds, marked *). The
    trainer's lines go to `printer`."""
    run_dir, how, seconds = train_or_reuse(cfg, fresh, log=lambda s: print(s, flush=True), printer=printer)
    return record_of(run_dir, how, seconds)


def write(out: str, command: str, rows: list[dict], report_only: bool = False) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out + ".json", {"command": command, "report_only": report_only, "rows": rows})
    lines = [f"# Reproduction: {', '.join(sorted({r['model'] for r in rows}))} on "
             f"{', '.join(sorted({r['dataset'] for r in rows}))}", "",
             command_line(command, report_only), "",
             "Full ranking over all items, chronological leave-one-out, one target per user; "
             "ties count items scored strictly higher; padding excluded.", "",
             "| dataset | model | loss | preset / history / N | seeds | " + " | ".join(METRICS)
             + " | best epoch | epochs | samples/s | wall s |",
             "|---" * (9 + len(METRICS)) + "|"]
    notes: set[str] = set()
    for r in rows:
        runs = r["runs"]
        h = runs[0]["header"]
        cells = []
        for m in METRICS:
            vals = [x["test"][m] for x in runs]
            cells.append(f"{statistics.mean(vals):.4f}"
                         + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""))
        n = runs[0]["config"]["data"]["max_seq_length"]
        model_args = runs[0]["config"].get("model_args") or {}
        variant = model_args.get("variant")
        name = f"{r['model']} ({variant} variant)" if variant else r["model"]
        lines.append(f"| {r['dataset']} | {name} | {r['loss']} | {h['preset']} / {h['history']} / {n} | "
                     f"{seeds_cell(runs)} | " + " | ".join(cells) +
                     f" | {','.join(str(x['best_epoch']) for x in runs)} | "
                     f"{','.join(str(x['epochs']) for x in runs)} | "
                     f"{speed_cell(runs)} | {sum(x['wall_s'] for x in runs):.0f}"
                     f"{'*' if any(x.get('wall_s_is_train_s') for x in runs) else ''} |")
        means = {m: statistics.mean(x["test"][m] for x in runs) for m in METRICS}
        for label, pub, comparable in comparisons(r["dataset"], r["model"], n, r["loss"], model_args):
            notes.update(k for k in ROW_NOTES if label.startswith(k))
            lines.append(f"| {r['dataset']} | {r['model']} ({label}) | | | | " +
                         " | ".join(f"{pub[m]:.4f}" if m in pub else "" for m in METRICS) + " | | | | |")
            if not comparable:
                continue
            lines.append(f"| {r['dataset']} | {r['model']} (ours / {label}) | | | | " +
                         " | ".join(f"{100 * means[m] / pub[m]:.1f}%" if m in pub else "" for m in METRICS) +
                         " | | | | |")
    for k in ROW_NOTES:
        if k in notes:
            lines += ["", ROW_NOTES[k]]
    if any(x.get("carried") for r in rows for x in r["runs"]):
        lines += ["", CARRIED_NOTE]
    lines += ["", "Per-seed values, run folders and resolved configs are in the .json beside this file. "
              "Runs are reused when a finished run with the same config is found under the runs folder, "
              "and interrupted ones resumed (wall s marked * is training seconds: the run was resumed or "
              "made before wall times were recorded).", ""]
    atomic_write_text(out + ".md", "\n".join(lines))


if __name__ == "__main__":
    run_main(main)
