"""ATHWE against SASRec, BSARec and WEARec on MovieLens-100k, with ATHWE ablations.

Every variant trains with the dataset's protocol (athwe/configs/datasets/ml-100k.yaml: RecBole preset,
5-core, early stopping on NDCG@10) for each seed, in a fresh child process so that its peak memory
can be reported (CUDA: max allocated; CPU: the child's peak RSS). The table gives test HR/NDCG at
5/10/20 as mean ± sample standard deviation over the seeds, training samples/s and peak memory.

ATHWE needs item features: when `<data-dir>/<dataset>/features/` is missing they are extracted
first (text from the item titles with --text-model, categories from the `class` column; ml-100k
has no images, so ATHWE runs on ID + text there, athwe/configs/athwe.yaml).

Full run (hours on a CPU):
    python benchmarks/athwe_ml100k.py --out benchmarks/results/athwe_ml100k_content_routing
Smoke test on a small dataset, one epoch:
    python benchmarks/athwe_ml100k.py --dataset ml-tiny --data-dir /tmp/ml-tiny --epochs 1 \
        --seeds 1,2 --set data.preset=recbole --set data.kcore=5 \
        --athwe-set 'model_args.modalities=[id,text]' --out /tmp/athwe_tiny
(a dataset without a section in athwe/configs/athwe.yaml gets the reference modalities id, text and
image; a dataset without images needs the --athwe-set). Each run prints its trainer's line per
epoch, prefixed with its variant and seed (--quiet: none).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import Stored, compare_rows, load_stored, save_stored, test_ranks  # noqa: E402
from run_cache import (run_main, CARRIED_NOTE, add_reuse_args, carried_record, command_line, earlier_records,  # noqa: E402
                       epoch_printer, exit_with_parent, finished_run, load_avg, read_table, record_of, seeds_cell,
                       speed_cell, threads_cell, train_or_reuse, training_command)
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

METRICS = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
#: (label, model, extra overrides); ablations switch one ATHWE component off
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("ATHWE", "athwe", []),
    ("SASRec", "sasrec", []),
    ("BSARec", "bsarec", []),
    ("WEARec", "wearec", []),
    ("ATHWE no time routing", "athwe", ["model_args.time_routing=false"]),
    ("ATHWE no wavelet", "athwe", ["model_args.wavelet=false"]),
    ("ATHWE no MoE", "athwe", ["model_args.moe=false"]),
    ("ATHWE ID only", "athwe", ["model_args.modalities=[id]"]),
    # not an ablation: the same model trained with mixed precision (train.precision bf16)
    ("ATHWE bf16", "athwe", ["train.precision=bf16"]),
]
#: variants that are not ablations and not trained unless named in --variants
EXTRA_VARIANTS = {"ATHWE bf16"}
#: the time-routing ablation of a dataset whose athwe/configs/athwe.yaml section routes on content
#: (time_routing false) switches time routing on instead
TIME_ROUTING_ON = ("ATHWE time routing", "athwe", ["model_args.time_routing=true"])


def variants(time_routing: bool = True) -> list[tuple[str, str, list[str]]]:
    """The variants for an ATHWE configuration that routes its experts on time (`time_routing`) or
    on content: each ablation switches one component of the configured model, so the time-routing
    row is "no time routing" for the first and "time routing" for the second."""
    if time_routing:
        return list(VARIANTS)
    return [TIME_ROUTING_ON if v[0] == "ATHWE no time routing" else v for v in VARIANTS]


ROOT = Path(__file__).resolve().parents[1]


def ensure_features(dataset: str, data_dir: str, kcore: int, text_model: str, device: str) -> None:
    """Extract the dataset's item features once (ATHWE's inputs), aligned to the training item map."""
    from athwe.feature_extraction import extract_features
    from athwe.feature_extraction.store import MANIFEST_FILE, features_dir

    if (features_dir(Path(data_dir) / dataset) / MANIFEST_FILE).is_file():
        return
    print(f"extracting {dataset} item features (text model {text_model}, kcore {kcore})", flush=True)
    extract_features(dataset, data_dir, kcore=kcore, text_model=text_model, device=device, progress=False,
                     log=lambda s: print(s, flush=True))


def writable_data_dir(dataset: str, data_dir: str, work_dir: Path) -> str:
    """The data dir to train from. A data dir outside this repository (the shared datasets) is
    mirrored under `work_dir`: its dataset folder links to the source files, and extracted features
    are written beside the links, so the source folder is never modified."""
    src = Path(data_dir) / dataset
    if Path(data_dir).resolve().is_relative_to(ROOT):
        return data_dir
    if not src.is_dir():
        raise SystemExit(f"error: {src}: no such dataset folder")
    dst = work_dir / dataset
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = dst / f.name
        if not link.exists():
            link.symlink_to(f.resolve(), target_is_directory=f.is_dir())
    print(f"training from {dst} (links to the files of {src}; features are written there)", flush=True)
    return str(work_dir)


def run_one(model: str, dataset: str, overrides: list[str], flags: dict[str, Any], fresh: bool,
            label: str = "", quiet: bool = True) -> dict[str, Any]:
    """Train one (variant, seed) in this (child) process, or resume its interrupted run folder;
    returns its record with peak memory (of this process: for a resumed run, of the last part).
    Unless `quiet`, the trainer's lines are printed prefixed with `label`."""
    import torch

    from athwe.config import resolve_config

    exit_with_parent()
    cfg = resolve_config(model, dataset, overrides=overrides, flags=flags)
    load_before = load_avg()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    say = epoch_printer(label, quiet)
    run_dir, how, seconds = train_or_reuse(cfg, fresh, log=say, printer=say)
    extra = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "load_avg_before": load_before}
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        extra["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record_of(run_dir, how, seconds, extra)


def mean_std(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")


def pair_seeds_cell(pair: dict[str, Any]) -> str:
    seeds = pair.get("seeds")
    return ",".join(str(x) for x in seeds) if seeds else "all"  # tables before the seeds column used all


def earlier_pair(a: dict[str, Any], b: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier table's comparison of rows `a` and `b` when both rows still hold the same runs."""
    runs = {r.get("variant"): [x.get("run_dir") for x in r.get("runs", [])] for r in earlier.get("rows", [])}
    if any(runs.get(r["variant"]) != [x["run_dir"] for x in r["runs"]] for r in (a, b)):
        return None
    return next(({**p, "carried": True} for p in earlier.get("paired", [])
                 if p.get("variant") == a["variant"] and p.get("against") == b["variant"]), None)


def paired_rows(rows: list[dict[str, Any]], stored: Stored | None = None,
                earlier: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Paired bootstrap comparisons (benchmarks/paired.py) of every ATHWE row against the best ID-only
    row by mean NDCG@10, and of every other ATHWE row (the ablations) against the first ATHWE row.
    Runs whose folders are gone are compared through their `stored` ranks; a pair that still lacks
    ranks keeps the `earlier` table's figures when both rows are unchanged, else it is left out.
    Returns (comparisons, why each left-out pair is missing)."""
    done = [r for r in rows if r["runs"]]
    athwe = [r for r in done if r["model"] == "athwe"]
    id_only = [r for r in done if r["model"] != "athwe"]
    todo = []
    if id_only:
        best = max(id_only, key=lambda r: statistics.mean(x["test"]["NDCG@10"] for x in r["runs"]))
        todo += [(r, best) for r in athwe]
    if athwe:
        todo += [(r, athwe[0]) for r in athwe[1:]]
    out, missing = [], []
    for a, b in todo:
        runs_a, runs_b, seeds = shared_seed_runs(a, b)
        try:
            stats = compare_rows(runs_a, runs_b, k=10, stored=stored)
        except (OSError, ValueError) as e:  # a run folder gone or changed: leave the pair out, say why
            kept = earlier_pair(a, b, earlier or {})
            if kept is not None:
                out.append(kept)
                continue
            print(f"paired comparison {a['variant']} vs {b['variant']} left out: {e}", file=sys.stderr, flush=True)
            missing.append(f"{a['variant']} vs {b['variant']} ({e})")
            continue
        out.append({"variant": a["variant"], "against": b["variant"], "seeds": seeds, **stats})
    return out, missing


def shared_seed_runs(a: dict[str, Any], b: dict[str, Any]) -> tuple[list, list, list[int] | None]:
    """The two rows' runs on the seeds both rows have, so that a row trained on fewer seeds (an
    ablation) is set against the same seeds of the other, not against its mean over more; with no
    seed in common, every run of each row (seeds None)."""
    shared = {x["seed"] for x in a["runs"]} & {x["seed"] for x in b["runs"]}
    if not shared:
        return a["runs"], b["runs"], None
    return ([x for x in a["runs"] if x["seed"] in shared], [x for x in b["runs"] if x["seed"] in shared],
            sorted(shared))


def keep_ranks(out: str, rows: list[dict[str, Any]], stored: Stored) -> None:
    """Store the test ranks of every run in `rows` that has them (from its folder or `stored`)
    beside the table, so its comparisons can be made again without the run folders."""
    keep: Stored = {}
    for r in rows:
        for x in r["runs"]:
            try:
                keep[Path(x["run_dir"]).name] = test_ranks(x["run_dir"], stored)
            except (OSError, ValueError):
                continue
    if keep:
        save_stored(out, keep)


def load_line(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table's load-average clause: the machine's load before this invocation trained, or, for a
    table read back with --report-only, the range of the loads its runs recorded when they started."""
    if not meta.get("report_only"):
        return f"load average before {meta['load_avg']}"
    loads = [x["load_avg_before"][0] for r in rows for x in r["runs"] if x.get("load_avg_before")]
    if not loads:
        return "the load average before each run was not recorded"
    counted = sum(len(r["runs"]) for r in rows)
    share = "" if len(loads) == counted else f" (recorded for {len(loads)} of its {counted} runs)"
    return f"1-minute load average before each run {min(loads):g}-{max(loads):g}{share}"


def other_tables_line(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The note naming the tables (--carry-from) that carried seeds were taken from, other than this
    table's own earlier version; none when there are no such seeds."""
    by_table: dict[str, list[str]] = {}
    for r in rows:
        for x in r["runs"]:
            src = x.get("carried_from")
            if x.get("carried") and src and src != meta.get("out"):
                by_table.setdefault(src, []).append(f"{r['variant']} {x['seed']}")
    if not by_table:
        return []
    return ["", "Carried from other tables (their .json records; key carried_from in this table's .json): " +
            "; ".join(f"{', '.join(seeds)} from {src}" for src, seeds in by_table.items()) + "."]


def write(out: str, meta: dict[str, Any], rows: list[dict[str, Any]], final: bool = True,
          stored: Stored | None = None, earlier: dict[str, Any] | None = None) -> None:
    """The table and its .json; the paired comparisons (which evaluate every run's checkpoint, and
    may extract the demo's features on the way) only in the `final` write, after all runs are in,
    which also stores the runs' test ranks beside the table (`<out>.ranks.json`)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    h = next((r["runs"][0]["header"] for r in rows if r["runs"]), {})
    lines = [f"# {', '.join(r['variant'] for r in rows if r['runs'])} on {meta['dataset']}", "",
             command_line(meta["command"], bool(meta.get("report_only"))), "",
             f"Protocol: {h.get('preset', '?')} preset, history {h.get('history', '?')}, full ranking over all items, "
             "chronological leave-one-out, one target per user, ties count items scored strictly higher, padding "
             f"excluded. Test metrics as mean ± sample std over the seeds of each row (of {meta['seeds']}). "
             f"Device {meta['device']}, "
             f"CPU threads per run in column threads; {load_line(meta, rows)}.", "",
             "| variant | seeds | " + " | ".join(METRICS)
             + " | valid NDCG@10 | best epochs | threads | samples/s | peak memory (MB) |",
             "|---" * (7 + len(METRICS)) + "|"]
    for r in rows:
        runs = r["runs"]
        if not runs:
            continue
        cells = [mean_std([x["test"][m] for x in runs]) for m in METRICS]
        mem = [x.get("peak_cuda_mb", x.get("peak_rss_mb", 0.0)) for x in runs]
        kind = "CUDA" if "peak_cuda_mb" in runs[0] else "RSS"
        lines.append(
            f"| {r['variant']} | {seeds_cell(runs)} | " + " | ".join(cells) +
            " | "
            f"{mean_std([x['valid']['NDCG@10'] for x in runs]) if all('valid' in x for x in runs) else 'n/a'}"
            f" | {','.join(str(x['best_epoch']) for x in runs)} | {threads_cell(runs)} | "
            f"{speed_cell(runs)} | {max(mem):.0f} ({kind})"
            f"{'*' if any(x.get('resumed') for x in runs) else ''} |")
    lines += ["", "Valid NDCG@10: the validation split's NDCG@10 at the best epoch (the early-stopping metric), "
              "the figure a choice between variants can be made on without looking at the test split."]
    mixed = [f"{r['variant']} seed {x['seed']}" for r in rows for x in r["runs"]
             if (x.get("config") or {}).get("train", {}).get("precision", "fp32") != "fp32"]
    if mixed:
        lines += ["", "Trained with train.precision bf16 (bfloat16 autocast in the training steps; evaluation in "
                  "float32), the rest in fp32: " + "; ".join(mixed) + "."]
    pairs, missing = paired_rows(rows, stored, earlier) if final else ([], [])
    if final:
        keep_ranks(out, rows, stored or {})
    if pairs:
        users = pairs[0]["users"]
        lines += ["", f"Paired on the same {users:,} test users: each user's NDCG@10 averaged over a row's seeds, the "
                  f"relative difference of the means, and its 95% interval and share of draws ahead over "
                  f"{pairs[0]['resamples']:,} bootstrap resamples of the users (the spread that comes from which "
                  "users are tested; training noise enters only through the seeds averaged).", "",
                  "Two rows are compared on the seeds both have (column seeds); without a seed in common, "
                  "on all of each row's seeds (column: all).", "",
                  "| variant | against | seeds | NDCG@10 difference | 95% interval | ahead in |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['variant']}{' †' if p.get('carried') else ''} | {p['against']} | {pair_seeds_cell(p)} | "
                  f"{p['rel']:+.1%} | "
                  f"[{p['lo']:+.1%}, {p['hi']:+.1%}] | {p['ahead']:.0%} |" for p in pairs]
        if any(p.get("carried") for p in pairs):
            lines += ["", "Comparisons marked † are the earlier table's: their rows are unchanged, and the per-user "
                      "ranks of their runs were not kept then." + (
                          " Those without a seeds list there were made on all of each row's seeds, before rows were "
                          "matched on their shared seeds." if any(p.get("carried") and "seeds" not in p for p in pairs)
                          else "")]
    if missing:
        lines += ["", "Not compared (no per-user test ranks for a run): " + "; ".join(missing) + "."]
    if any(x.get("carried") for r in rows for x in r["runs"]):
        lines += ["", CARRIED_NOTE]
        lines += other_tables_line(meta, rows)
    ablations = {label for label, model, extra in VARIANTS + [TIME_ROUTING_ON]
                 if model == "athwe" and extra and label not in EXTRA_VARIANTS}
    if any(r["variant"] in ablations and r["runs"] for r in rows):
        routing = ("time routing (the experts are routed on the fused content instead)"
                   if not any(r["variant"] == TIME_ROUTING_ON[0] for r in rows) else
                   "content routing (row ATHWE time routing: the configured ATHWE routes its experts on the fused "
                   "content; this row routes them on the time buckets)")
        lines += ["", f"Ablations switch one component of the configured ATHWE: {routing}, the wavelet alignment, "
                  "the mixture of experts, or every feature modality (ID only; category prediction stays on)."]
    switched = [f"{r['variant']} seed {x['seed']} (" + ", then ".join(f"{n or 'default'} for {e} epoch{'s' * (e != 1)}"
                                                           for n, e in x["threads"]) + ")"
                for r in rows for x in r["runs"] if len(x.get("threads") or []) > 1]
    if switched:
        lines += ["", "Resumed on another thread count (a→b in column threads; samples/s is over all its epochs): "
                  + "; ".join(switched) + "."]
    refeatured = [f"{r['variant']} seed {x['seed']} (after epoch " + ", ".join(str(c["after_epoch"]) for c in
                                                                      x["feature_changes"]) + ")"
                  for r in rows for x in r["runs"] if x.get("feature_changes")]
    if refeatured:
        lines += ["", "Resumed on item features extracted again on another machine (the same text model, items and "
                  "categories; the float embeddings differ in their last bits between CPUs and thread counts, so "
                  "their fingerprint changed; key feature_changes in the .json): " + "; ".join(refeatured) + "."]
    if any(x.get("resumed") for r in rows for x in r["runs"]):
        lines += ["", "Peak memory marked * includes a run that was interrupted and resumed: its figure is the peak "
                  "of the resumed part (the process that finished the run)."]
    atomic_write_json(out + ".json", {**meta, "rows": rows, "paired": pairs})
    atomic_write_text(out + ".md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="2025,2026,2027")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated labels (default: all but {', '.join(sorted(EXTRA_VARIANTS))}); where the "
                         f"dataset's ATHWE routes on content, the time-routing ablation is '{TIME_ROUTING_ON[0]}'")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (smoke tests)")
    ap.add_argument("--set", action="append", default=[], help="override for every variant, e.g. data.kcore=5")
    ap.add_argument("--athwe-set", action="append", default=[], help="override for the ATHWE variants only")
    ap.add_argument("--text-model", default="packaged-minilm", help="feature extraction text model (offline default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="train.num_threads (0 = torch default)")
    ap.add_argument("--out", required=True,
                    help="table path without .md, e.g. benchmarks/results/athwe_ml100k_content_routing")
    ap.add_argument("--carry-from", action="append", default=[], metavar="TABLE",
                    help="another table (path without .md) whose run records and kept test ranks are carried over "
                         "like --out's own, for runs with no folder here (repeatable; where tables share a run, "
                         "the later one named wins, and --out over all)")
    add_reuse_args(ap)
    args = ap.parse_args()
    command = training_command()
    seeds = [int(s) for s in args.seeds.split(",")]

    from athwe.config import resolve_config
    from athwe.dataset.demo import DEMO_NAME, DEMO_VERSION, demo_is_current
    from athwe.utils import resolve_device

    athwe_cfg = resolve_config("athwe", args.dataset, overrides=args.set + args.athwe_set)
    chosen = variants(bool(athwe_cfg.model_args.get("time_routing", True)))
    known = [v[0] for v in chosen]
    wanted = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants is not None
              else [x for x in known if x not in EXTRA_VARIANTS])
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        other = {"ATHWE no time routing": "its ATHWE already routes on content",
                 TIME_ROUTING_ON[0]: "its ATHWE already routes on time"}
        why = "".join(f"; {u}: {other[u]} on {args.dataset}" for u in unknown if u in other)
        ap.error(f"unknown variant(s) {unknown}{why}; known: {known}")
    args.data_dir = writable_data_dir(args.dataset, args.data_dir, Path(args.runs_dir) / "data")
    if not args.report_only and any(chosen[known.index(w)][1] == "athwe" for w in wanted):
        ensure_features(args.dataset, args.data_dir, athwe_cfg.data.kcore, args.text_model, args.device)
    if args.report_only and args.dataset == DEMO_NAME and not demo_is_current(args.data_dir):
        print(f"warning: {Path(args.data_dir) / DEMO_NAME} was made by another version of the demo generator "
              f"(this one is v{DEMO_VERSION}); only runs trained on that older data are tabulated "
              "(run without --report-only, or `athwe extract`, to bring it up to date)", file=sys.stderr, flush=True)
    import torch

    meta = {"command": command, "dataset": args.dataset, "seeds": seeds, "device": str(resolve_device(args.device)),
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "report_only": args.report_only, "load_avg": load_avg()}
    stored: Stored = {}
    earlier: list[dict[str, Any]] = []
    for other in args.carry_from:
        source = read_table(other)
        if not source:
            raise SystemExit(f"error: {other}.json: no table to carry runs from")
        earlier += [{"carried_from": other, **rec} for rec in earlier_records(source)]  # keeps an older origin
        stored.update(load_stored(other))
    stored.update(load_stored(args.out))
    earlier_table = read_table(args.out) if args.report_only else {}
    earlier += earlier_records(earlier_table)
    meta["out"] = args.out
    rows = []
    for label, model, extra in chosen:
        if label not in wanted:
            continue
        overrides = args.set + (args.athwe_set if model == "athwe" else []) + extra
        row = {"variant": label, "model": model, "overrides": overrides, "runs": []}
        rows.append(row)
        for seed in seeds:
            flags = {"data.data_dir": args.data_dir, "train.seed": seed, "train.runs_dir": args.runs_dir,
                     "train.device": args.device, "train.epochs": args.epochs,
                     "train.num_threads": args.threads or None}
            cfg = resolve_config(model, args.dataset, overrides=overrides, flags=flags).to_dict()
            res = None if args.fresh else finished_run(cfg, args.runs_dir)
            if res is None and earlier:
                res = carried_record(cfg, earlier)
                if res is not None:
                    print(f"{label} seed {seed}: carried over from {res.get('carried_from', args.out)}.json "
                          f"(run folder {res['run_dir']} not here)",
                          flush=True)
            if res is not None:
                if not res.get("carried"):
                    print(f"{label} seed {seed}: reusing finished run {res['run_dir']}", flush=True)
            elif args.report_only:
                print(f"{label} seed {seed}: no finished run, left out", flush=True)
                continue
            else:
                # one fresh process per run: its peak RSS is this run's alone
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    res = pool.submit(run_one, model, args.dataset, overrides, flags, args.fresh,
                                      f"{label} seed {seed}", args.quiet).result()
            res["seed"] = seed
            row["runs"].append(res)
            print(json.dumps({"variant": label, "seed": seed, "NDCG@10": round(res["test"]["NDCG@10"], 4),
                              **{k: res.get(k)
                                 for k in ("best_epoch", "epochs", "samples_per_s", "peak_rss_mb", "wall_s")}}),
                  flush=True)
            write(args.out, meta, rows, final=False)
    if not any(r["runs"] for r in rows):
        raise SystemExit(f"error: no finished runs under {args.runs_dir}; nothing written to {args.out}.md")
    write(args.out, meta, rows, stored=stored, earlier=earlier_table)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    run_main(main)
