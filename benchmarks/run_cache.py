"""Reuse and resume benchmark runs: a long benchmark that is stopped part way (a closed laptop, a
job time limit) continues where it left off when it is started again with the same arguments.

A run folder matches a requested run when its saved config.yaml equals the requested config in
everything that can change the result; the thread count, device, runs folder and data folder are
left out of the comparison (they change speed or paths, not what is trained), and so are model
settings that have no effect given the others (ATHWE's expert routing while its experts are off). The data must be
the same too: a run records a fingerprint of its dataset folder's files (and extracted feature
manifest) in benchmark.json and matches only while they are unchanged (a regenerated demo or
re-extracted features invalidate older runs); a run that has no fingerprint yet (one still
training) is taken to be on the current data.

A results table keeps its runs' records in its .json, so a table outlives the run folders it was made
from (another machine, a cleaned runs folder): `--report-only` carries a record over from the
earlier table when no run folder for it is here (`read_table`, `earlier_records`, `carried_record`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from athwe.errors import ConfigError
from athwe.models import resolved_model_args, unused_model_keys
from athwe.utils import atomic_write_json, hash_file

#: (section, key) pairs that do not change what a run computes
IGNORED = [("train", "num_threads"), ("train", "device"), ("train", "runs_dir"), ("data", "data_dir"),
           ("train", "tensorboard")]  # where and how a run is logged, not what it computes
#: (section, key, value) settings added after runs were recorded: a saved config without one was
#: trained with this value
ADDED = [("train", "precision", "fp32")]
BENCH_FILE = "benchmark.json"
#: how data fingerprints are taken (the manifest of extracted features): 1 byte for byte; 2 without
#: its timing fields; 3 also without the paths it names (where the text model was loaded from, the
#: interaction file), which differ between checkouts of the same data; 4 also without the checksums
#: of the float embedding files (text, image): the same model on the same items gives embeddings
#: that differ in their last bits between CPUs and thread counts (ml-100k's MiniLM text table on 1
#: and 2 threads: 0.35% of the values differ, by at most 1.1e-7), while the model, its package
#: version, the fields, pooling, dimensions and counts stay in. The category tensor's checksum stays.
FINGERPRINT_SCHEME = 4


def result_key(cfg: dict[str, Any]) -> dict[str, Any]:
    """What of a run's config can change its result: the config with every model setting resolved
    (`resolved_model_args`), less IGNORED and less the model settings that have no effect given the
    others (`unused_model_keys`: ATHWE's expert settings with its mixture of experts off), with
    ADDED's defaults filled in."""
    key = copy.deepcopy(cfg)
    for section, name in IGNORED:
        key.get(section, {}).pop(name, None)
    args = key.get("model_args")
    if isinstance(args, dict) and isinstance(key.get("model"), str):
        try:  # defaults filled in: configs saved before run folders recorded them compare equal
            args = key["model_args"] = resolved_model_args(key["model"], args)
        except ConfigError:  # a setting this version no longer knows: compared as written
            pass
        for name in unused_model_keys(key["model"], args):
            args.pop(name)
    for section, name, value in ADDED:
        if isinstance(key.get(section), dict):
            key[section].setdefault(name, value)
    return key


def data_files(cfg: dict[str, Any]) -> list[Path]:
    """The files a run's data comes from: the dataset folder's own files (links followed) and the
    extracted features' manifest; empty when the folder is not there."""
    data = cfg.get("data", {})
    folder = Path(str(data.get("data_dir", ""))) / str(data.get("dataset", ""))
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    manifest = folder / "features" / "manifest.json"
    return files + ([manifest] if manifest.is_file() else [])


#: manifest fields that record when and how fast features were extracted, not what they are
VOLATILE_MANIFEST_KEYS = ("written", "seconds", "items_per_s", "images_per_s")
#: manifest fields that name paths on the machine that extracted them
PATH_MANIFEST_KEYS = ("path", "source")
#: manifest sections whose file holds float embeddings (their checksum leaves scheme 4 and later)
FLOAT_MANIFEST_SECTIONS = ("text", "image")


def _stable_manifest(value: Any, drop: tuple[str, ...] = VOLATILE_MANIFEST_KEYS) -> Any:
    if isinstance(value, dict):
        return {k: _stable_manifest(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_stable_manifest(v, drop) for v in value]
    return value


def data_fingerprints(cfg: dict[str, Any]) -> dict[int, str | None]:
    """The data fingerprint under every scheme (FINGERPRINT_SCHEME's comment): a hash of the files a
    run's data comes from (data_files), the feature manifest last. From scheme 2 on the manifest
    enters as its JSON without timing fields, so features extracted again with the same models and
    settings keep the fingerprint; scheme 3 also leaves out its paths, scheme 4 the checksums of the
    float embedding files. None where there are no files."""
    files = data_files(cfg)
    if not files:
        return dict.fromkeys(range(1, FINGERPRINT_SCHEME + 1))
    manifest = files[-1] if files[-1].parent.name == "features" else None
    h = hashlib.sha256()
    for f in files if manifest is None else files[:-1]:
        h.update(f.name.encode() + b"\0")
        hash_file(f, h)
    parsed = None
    if manifest is not None:
        try:
            parsed = json.loads(manifest.read_text())
        except (OSError, ValueError):
            parsed = None
    out: dict[int, str | None] = {}
    for scheme in range(1, FINGERPRINT_SCHEME + 1):
        g = h.copy()
        if manifest is not None:
            g.update(manifest.name.encode() + b"\0")
            if scheme == 1 or parsed is None:  # byte for byte
                hash_file(manifest, g)
            else:
                drop = VOLATILE_MANIFEST_KEYS + (PATH_MANIFEST_KEYS if scheme >= 3 else ())
                kept = parsed
                if scheme >= 4 and isinstance(parsed, dict):
                    kept = {k: ({f: x for f, x in v.items() if f != "sha256"}
                                if k in FLOAT_MANIFEST_SECTIONS and isinstance(v, dict) else v)
                            for k, v in parsed.items()}
                g.update(json.dumps(_stable_manifest(kept, drop), sort_keys=True).encode())
        out[scheme] = g.hexdigest()[:16]
    return out


def data_fingerprint(cfg: dict[str, Any], legacy: bool = False) -> str | None:
    """The data fingerprint under the current scheme (`legacy`: scheme 1, byte for byte, as the
    oldest benchmark records hold it)."""
    return data_fingerprints(cfg)[1 if legacy else FINGERPRINT_SCHEME]


def _same_data(run: Path, fingerprints: tuple[str | None, ...]) -> bool:
    """Whether the run's recorded data fingerprint is one of `fingerprints` (those of every scheme);
    a run without one, or data that cannot be fingerprinted, counts as the same."""
    path = run / BENCH_FILE
    saved = json.loads(path.read_text()).get("data_fingerprint") if path.is_file() else None
    return saved is None or None in fingerprints or saved in fingerprints


def find_run(cfg: dict[str, Any], runs_dir: str | Path) -> Path | None:
    """The newest run folder under `runs_dir` trained with `cfg` on the same data (finished ones
    first), or None."""
    want = result_key(cfg)
    fingerprint = tuple(data_fingerprints(cfg).values())
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    found: list[tuple[bool, float, Path]] = []
    for path in root.iterdir():
        conf = path / "config.yaml"
        if not conf.is_file():
            continue
        try:
            saved = yaml.safe_load(conf.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(saved, dict) and result_key(saved) == want and _same_data(path, fingerprint):
            found.append(((path / "results.json").is_file(), conf.stat().st_mtime, path))
    if not found:
        return None
    return max(found)[2]


def finished_run(cfg: dict[str, Any], runs_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished run trained with `cfg` on the same data under `runs_dir`, or None."""
    found = find_run(cfg, runs_dir)
    return finished(found) if found is not None else None


def finished(run: Path) -> dict[str, Any] | None:
    """A finished run's record: what the benchmark saved beside it (wall time, peak memory) over
    what its results.json holds; None while the run is unfinished. Without a saved wall time the
    training seconds stand in for it (`wall_s_is_train_s`)."""
    res_path = run / "results.json"
    if not res_path.is_file():
        return None
    res = json.loads(res_path.read_text())
    record = {"run_dir": str(run), "best_epoch": res["best_epoch"], "epochs": res["epochs_run"],
              "samples_per_s": res["train_samples_per_s"], "train_seconds": res["train_seconds"],
              "test": res["test"], "valid": res["valid"], "header": res["header"],
              "config": yaml.safe_load((run / "config.yaml").read_text()),
              "wall_s": res["train_seconds"], "wall_s_is_train_s": True}
    record["threads"] = epoch_threads(run, record["config"])
    path = run / BENCH_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        record.update(saved)
        if "wall_s" in saved:  # a resumed run saves no wall time: its training seconds stand in
            record.pop("wall_s_is_train_s", None)
    return record


def read_table(out: str | Path) -> dict[str, Any]:
    """The table last written to `<out>.json`; {} when there is none or it cannot be read."""
    try:
        table = json.loads(Path(str(out) + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def earlier_records(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The run records of a table read by `read_table` (every row's runs)."""
    return [run for row in table.get("rows", []) if isinstance(row, dict) for run in row.get("runs", [])
            if isinstance(run, dict) and isinstance(run.get("config"), dict) and "test" in run]


def carried_record(cfg: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The earlier table's record of a run trained with `cfg` (newest last), marked `carried`, or
    None. A record whose data fingerprint was taken with the current scheme must match the current
    data. An older record's fingerprint named where the features were extracted (paths, and
    before that the extraction time), so it cannot be compared on another machine: it is taken
    on its config."""
    want = result_key(cfg)
    current = data_fingerprint(cfg)
    for rec in reversed(earlier):
        if result_key(rec["config"]) != want:
            continue
        saved = rec.get("data_fingerprint")
        if rec.get("fingerprint_scheme") == FINGERPRINT_SCHEME and None not in (saved, current) and saved != current:
            continue
        return {**rec, "carried": True}
    return None


CARRIED_NOTE = ("Seeds marked † are carried over from the earlier version of this table: their run folders are not "
                "on the machine that wrote it, so their records (metrics, config, data fingerprint) were taken from "
                "its .json, and their samples/s and peak memory are those of the machine that trained them. A row "
                "that mixes carried and new seeds lists samples/s per seed.")


def epoch_threads(run: Path, cfg: Any) -> list[list[int]]:
    """The CPU threads a run's epochs trained on, as [threads, epochs] stretches in epoch order
    (a run resumed with another thread count has two). Epoch records from before the count was
    recorded take the run config's train.num_threads (0: torch's default, count unknown)."""
    from athwe.runs import read_metrics

    train = cfg.get("train") if isinstance(cfg, dict) else None
    default = int((train or {}).get("num_threads") or 0)
    path = run / "metrics.jsonl"
    out: list[list[int]] = []
    for r in read_metrics(path) if path.is_file() else []:
        n = int(r.get("num_threads", default))
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def run_threads(x: dict[str, Any]) -> str:
    """A run record's CPU thread count, "a→b" for a run resumed on b threads after training on a,
    "default" for torch's own choice (0)."""
    stretches = x.get("threads") or [[int(((x.get("config") or {}).get("train") or {}).get("num_threads") or 0), 0]]
    return "→".join(str(n) if n else "default" for n, _ in stretches)


def threads_cell(runs: list[dict[str, Any]]) -> str:
    """A table's threads cell: each run's `run_threads`."""
    return ",".join(run_threads(x) for x in runs)


def seeds_cell(runs: list[dict[str, Any]]) -> str:
    """A table's seeds cell: the seeds of a row's runs, † after those carried over."""
    return ",".join(f"{x['seed']}{'†' if x.get('carried') else ''}" for x in runs)


def speed_cell(runs: list[dict[str, Any]]) -> str:
    """A table's samples/s cell: the mean over a row's runs, or each run's figure when the row mixes
    carried-over and new runs (measured on different machines) or runs on different thread counts,
    which are not averaged."""
    speeds = [x["samples_per_s"] for x in runs]
    if len({bool(x.get("carried")) for x in runs}) > 1 or len({run_threads(x) for x in runs}) > 1:
        return ",".join(f"{v:.0f}" for v in speeds)
    return f"{statistics.mean(speeds):.0f}"


def save_record(run: Path, record: dict[str, Any]) -> None:
    """Write `record` to the run's benchmark.json, with the fingerprint of the data it was trained on."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    record = {**record, "data_fingerprint": data_fingerprint(cfg if isinstance(cfg, dict) else {}),
              "fingerprint_scheme": FINGERPRINT_SCHEME}
    atomic_write_json(run / BENCH_FILE, record)


def train_or_reuse(cfg: Any, fresh: bool = False, log: Callable[[str], None] = print,
                   printer: Callable[[str], None] = lambda s: None) -> tuple[Path, str, float]:
    """Obtain the run of resolved config `cfg` (an athwe RunConfig) under its train.runs_dir:
    reuse a finished run trained with the same config on the same data, resume an interrupted one
    from its last epoch, or train anew (`fresh` skips the search). Returns (run folder, how, seconds
    spent here) with how one of "reused", "resumed", "trained". `log` hears which it was; the
    trainer's own lines go to `printer`."""
    from athwe.training.trainer import resume, train

    found = None if fresh else find_run(cfg.to_dict(), cfg.train.runs_dir)
    if found is not None and finished(found) is not None:
        log(f"reusing finished run {found}")
        return found, "reused", 0.0
    t0 = time.perf_counter()
    if found is not None and (found / "last.pt").is_file():
        log(f"resuming {found}")
        resume(found, printer=printer, progress=False, num_threads=cfg.train.num_threads or None)
        return found, "resumed", time.perf_counter() - t0
    run_dir, _ = train(cfg, printer=printer, progress=False)
    return run_dir, "trained", time.perf_counter() - t0


def record_of(run_dir: Path, how: str, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save what this process measured about a run it trained or resumed (its wall time, or that it
    was resumed, whose wall time is then unknown; plus `extra`) beside the run, and return the
    run's finished record. A reused run's saved record is left as it is."""
    if how != "reused":
        mark = {"wall_s": round(seconds, 1)} if how == "trained" else {"resumed": True}
        save_record(run_dir, {**mark, **(extra or {})})
    done = finished(run_dir)
    if done is None:
        raise RuntimeError(f"{run_dir}: the run ended without results.json")
    return done


def add_reuse_args(ap: argparse.ArgumentParser) -> None:
    """The flags both benchmark scripts share: where runs live, --fresh, --report-only and --quiet."""
    ap.add_argument("--runs-dir", default="benchmarks/runs")
    ap.add_argument("--fresh", action="store_true",
                    help="train every run anew (default: reuse finished runs with the same config under "
                         "--runs-dir and resume interrupted ones)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tabulate the finished runs found under --runs-dir, and the earlier "
                         "table's records (--out .json) of runs whose folders are not here (seeds without either "
                         "are left out)")
    ap.add_argument("--quiet", action="store_true",
                    help="do not print the trainer's line per epoch (loss, validation metric, seconds)")


def epoch_printer(label: str, quiet: bool) -> Callable[[str], None]:
    """Where a benchmark sends the trainer's lines: stdout, each prefixed with `label` and flushed
    (so a long run in the background shows its progress in its log), or nowhere with `quiet`."""
    if quiet:
        return lambda s: None
    return lambda s: print("\n".join(f"[{label}] {line}" for line in s.splitlines()), flush=True)


def load_avg() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages, rounded; [] where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def exit_with_parent(poll_s: float = 2.0) -> None:
    """Make this (child) process exit when the process that started it is gone.

    A benchmark trains each run in a spawned child; when only the parent is killed (`kill PID`,
    not Ctrl-C, which reaches the whole process group) the child would otherwise train on unseen.
    A daemon thread polls the parent PID and ends the process when it changes (the child was
    re-parented). Checkpoints are written to a temporary file and renamed, so the run folder keeps
    its last complete epoch and the same command resumes it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"benchmark process {parent} is gone: stopping this run (the same command resumes it)",
                      file=sys.stderr, flush=True)
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def training_command(argv: list[str] | None = None) -> str:
    """The command line that trains what a table shows (a --report-only table is read from its runs)."""
    return "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else argv) if a != "--report-only")


def command_line(command: str, report_only: bool) -> str:
    """A result table's "Command:" line."""
    return f"Command: `{command}`" + (" (this table: its finished runs, read back with --report-only)"
                                      if report_only else "")


def run_main(main: Callable[[], Any]) -> None:
    """A benchmark's entry point: athwe's errors (bad data or config) as one line on stderr and exit
    code 2, no traceback."""
    from athwe.errors import AthweError

    try:
        main()
    except AthweError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
