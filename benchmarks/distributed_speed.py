"""Training throughput on a CPU with one process and T threads against P data-parallel processes
under torchrun (one thread each), on LastFM with the models' published settings.

    python benchmarks/distributed_speed.py [--models sasrec,wearec] [--epochs 3] \
        [--out benchmarks/results/distributed_speed]

Every setting trains real epochs through `athwe train` (full model, full data, the bsarec preset)
into a scratch runs folder; the figure is the samples/s of the epochs after the first (the first
warms allocators and caches), as each run's metrics.jsonl records them. The last epoch's
validation NDCG@20 is listed as a check that the settings trained the same model, not as a
quality figure (a few epochs only). Run it on an otherwise idle machine: other work on the cores
distorts exactly what it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from athwe.utils import atomic_write_json, atomic_write_text
from model_speed import cpu_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(model: str, procs: int, threads: int, epochs: int, scratch: Path) -> dict:
    run_dir = scratch / f"{model}-p{procs}-t{threads}"
    args = ["-m", "athwe.cli", "train", "--model", model, "--dataset", "LastFM", "--data-dir", str(DATA),
            "--epochs", str(epochs), "--threads", str(threads), "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs > 1:
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(shlex.quote(c) for c in cmd)} failed:\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    return {"model": model, "processes": procs, "threads_per_process": threads, "epochs": len(rows),
            "samples_per_s": round(statistics.median(rates), 1),
            "samples_per_s_all": [r["samples_per_s"] for r in rows],
            "last_valid_NDCG@20": rows[-1]["valid_NDCG@20"], "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sasrec,wearec")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="threads / processes to compare (default: all CPUs)")
    ap.add_argument("--out", default="benchmarks/results/distributed_speed")
    args = ap.parse_args()
    n = args.cores
    settings = [(1, 1), (1, n), (n, 1)] if n > 1 else [(1, 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="athwe-dist-") as scratch:
        for model in args.models.split(","):
            for procs, threads in settings:
                row = run_setting(model, procs, threads, args.epochs, Path(scratch))
                rows.append(row)
                print(f"{model:8s} {procs} process(es) x {threads} thread(s): {row['samples_per_s']:8.1f} samples/s "
                      f"(epochs {row['samples_per_s_all']}), valid NDCG@20 after {row['epochs']} epochs "
                      f"{row['last_valid_NDCG@20']:.4f}", flush=True)
    base = {r["model"]: r["samples_per_s"] for r in rows if r["processes"] == 1 and r["threads_per_process"] == 1}
    for r in rows:
        r["speedup_vs_one_thread"] = round(r["samples_per_s"] / base[r["model"]], 2)
    cmd = "python benchmarks/distributed_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}"
    lines = ["# Training throughput: threads against data-parallel processes (CPU, LastFM)", "",
             f"Command: `{cmd.strip()}`", "", f"Machine: {machine}.", "",
             "Samples/s: median over the epochs after the first of `athwe train` runs with the published LastFM "
             "settings (bsarec preset, batch 256, N=50); P processes run under torchrun (gloo), each batch split "
             "between them. Validation NDCG@20 after the last epoch shows that the settings train alike.", "",
             "| model | processes x threads | samples/s | vs 1 x 1 | valid NDCG@20 (last epoch) | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['processes']} x {r['threads_per_process']} | {r['samples_per_s']:.0f} | "
                     f"{r['speedup_vs_one_thread']:.2f}x | {r['last_valid_NDCG@20']:.4f} | {r['wall_s']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_json(out.with_suffix(".json"), {"command": cmd.strip(), "machine": machine, "rows": rows})
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
