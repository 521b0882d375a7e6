"""Training throughput of this checkout against an older commit, measured side by side.

For each model and dataset, a child process of each tree (the older commit checked out in a git
worktree) times training steps (loss, backward, Adam) on the dataset's configured settings; the
two trees take turns over --windows windows, so both see the same machine state, and each side's
median samples/s gives the ratio new / old. Quality is not measured here (see docs/benchmarks.md).

    python benchmarks/train_speed.py --baseline 398f106 --threads 1 --out benchmarks/results/train_speed

--busy adds one row per model: the new tree's samples/s with one single-threaded busy loop
beside it and train.num_threads 0 (the trainer's default: the CPUs free at the start), against
its one-thread idle speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs inside a child process with PYTHONPATH set to one tree; works with that tree's API.
CHILD = r"""
import json, sys, time, torch
model, dataset, data_dir, steps, threads, precision = sys.argv[1:7]
steps, threads = int(steps), int(threads)
from athwe.config import resolve_config
try:
    from athwe.runs import load_data, load_model_features
except ImportError:
    from athwe.training.trainer import load_data, load_model_features
from athwe.models import create_model
from athwe.training import trainer as tr
if threads:
    torch.set_num_threads(threads)
else:
    busy = tr.busy_cpus_elsewhere()
    free = getattr(tr, "free_threads", None)
    if free is not None:
        torch.set_num_threads(free(busy, torch.get_num_threads()))
cfg = resolve_config(model, dataset, flags={"data.data_dir": data_dir})
data, split = load_data(cfg)
feats = load_model_features(cfg, data, lambda s: None, False)
torch.manual_seed(0)
m = create_model(model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss, feats)
m.prepare(split.train)
m.train()
make = getattr(tr, "adam", None)  # the tree's own optimizer where it names one
opt = (make(m, cfg.train.lr, cfg.train.weight_decay, torch.device("cpu")) if make
       else torch.optim.Adam(m.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
bs = cfg.train.batch_size
perm = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0))
def step(i):
    rows = perm[(i * bs) % (len(perm) - bs):][:bs]
    b = split.train.batch(rows)
    if cfg.train.loss == "bce":
        b.neg = tr.sample_negatives(b, data.n_items)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = m.loss(b)
    loss.backward()
    opt.step()
for i in range(2):
    step(i)
t = time.perf_counter()
for i in range(steps):
    step(i + 2)
print(json.dumps({"samples_per_s": steps * bs / (time.perf_counter() - t), "threads": torch.get_num_threads()}))
"""


def worktree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"athwe-baseline-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                       capture_output=True)
    return path


def measure(tree: Path, model: str, dataset: str, data_dir: str, steps: int, threads: int,
            precision: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    out = subprocess.run([sys.executable, "-c", CHILD, model, dataset, data_dir, str(steps), str(threads), precision],
                         env=env, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: {model} on {dataset} in {tree}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the older commit (any git revision)")
    ap.add_argument("--models", default="athwe,sasrec,bsarec,wearec,fearec,asrec")
    ap.add_argument("--datasets", default="demo", help="comma-separated; the demo is generated in --data-dir")
    ap.add_argument("--data-dir", default=None, help="root of the dataset folders (default: a scratch folder "
                                                     "holding the demo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per window")
    ap.add_argument("--windows", type=int, default=3, help="alternating windows per tree")
    ap.add_argument("--busy", action="store_true", help="also time the new tree beside a busy loop (see above)")
    ap.add_argument("--out", required=True, help="table path without .md")
    args = ap.parse_args()
    old = worktree(args.baseline)
    scratch = Path(tempfile.mkdtemp(prefix="athwe-speed-"))
    data_dir = args.data_dir or str(scratch / "dataset")
    command = "python benchmarks/train_speed.py " + " ".join(sys.argv[1:])
    rows = []
    for dataset in args.datasets.split(","):
        for model in args.models.split(","):
            runs: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.windows):
                for side, tree in (("old", old), ("new", ROOT)):
                    r = measure(tree, model, dataset, data_dir, args.steps, args.threads, args.precision, scratch)
                    runs[side].append(r["samples_per_s"])
            row = {"model": model, "dataset": dataset, "precision": args.precision, "threads": args.threads,
                   "old": statistics.median(runs["old"]), "new": statistics.median(runs["new"]), "windows": runs}
            row["ratio"] = row["new"] / row["old"]
            if args.busy:
                loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(1.0)
                    busy = measure(ROOT, model, dataset, data_dir, args.steps, 0, args.precision, scratch)
                finally:
                    loop.kill()
                    loop.wait()
                idle1 = measure(ROOT, model, dataset, data_dir, args.steps, 1, args.precision, scratch)
                row["busy"] = {"samples_per_s": busy["samples_per_s"], "threads": busy["threads"],
                               "idle_one_thread": idle1["samples_per_s"],
                               "share": busy["samples_per_s"] / idle1["samples_per_s"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": command, "baseline": args.baseline,
            "head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
            "cpu": subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                                  text=True).stdout.strip(),
            "torch_cpu_capability": __import__("torch").backends.cpu.get_cpu_capability()}
    atomic_write_json(args.out + ".json", {"meta": meta, "rows": rows})
    lines = [f"# Training throughput: {meta['head']} against {args.baseline}", "",
             f"Command: `{command}`", "",
             f"CPU {meta['cpu']} ({meta['torch_cpu_capability']}), {args.threads} thread(s), {args.precision}; "
             f"median samples/s of {args.windows} alternating windows of {args.steps} steps per tree.", "",
             "| model | dataset | old samples/s | new samples/s | ratio |"
             + (" busy: samples/s (threads) | of idle 1-thread |" if args.busy else ""),
             "|---|---|---|---|---|" + ("---|---|" if args.busy else "")]
    for r in rows:
        line = f"| {r['model']} | {r['dataset']} | {r['old']:.0f} | {r['new']:.0f} | {r['ratio']:.2f}x |"
        if args.busy:
            b = r["busy"]
            line += f" {b['samples_per_s']:.0f} ({b['threads']}) | {b['share']:.0%} |"
        lines.append(line)
    atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
