"""A prepared check for a CUDA machine (run by benchmarks/gpu_check.sh; under ten minutes on one GPU).

1. every registered model: training steps/s (loss, backward, Adam) in fp32 and under bf16 autocast,
   and the full-ranking evaluation time of the test split, on the demo (generated offline);
2. ATHWE on the demo end to end (`athwe train` in a child process, default settings);
3. text extraction with the packaged MiniLM: batched against one item per forward pass.

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check

`--device cpu --steps 2` runs the same code on a CPU (to check the script, not for figures).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athwe.config import resolve_config  # noqa: E402
from athwe.evaluation.metrics import evaluate  # noqa: E402
from athwe.models import create_model, list_models  # noqa: E402
from athwe.runs import load_data, load_model_features, read_metrics  # noqa: E402
from athwe.training.trainer import sample_negatives  # noqa: E402
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_row(name: str, data_dir: str, device: torch.device, steps: int) -> dict:
    cfg = resolve_config(name, "demo", flags={"data.data_dir": data_dir})
    data, split = load_data(cfg)
    feats = load_model_features(cfg, data, lambda s: None, False)
    row: dict = {"model": name}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = create_model(name, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss,
                             feats).to(device)
        model.prepare(split.train)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        bs = cfg.train.batch_size

        def step(i: int) -> None:
            batch = split.train.batch(torch.arange(i * bs, (i + 1) * bs) % len(split.train))
            if cfg.train.loss == "bce":
                batch.neg = sample_negatives(batch, data.n_items)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model.loss(batch.to(device))
            loss.backward()
            opt.step()

        for i in range(3):
            step(i)
        sync(device)
        t = time.perf_counter()
        for i in range(steps):
            step(i + 3)
        sync(device)
        dt = time.perf_counter() - t
        row[f"{precision}_steps_per_s"] = steps / dt
        row[f"{precision}_samples_per_s"] = steps * bs / dt
    model.eval()
    sync(device)
    t = time.perf_counter()
    evaluate(model.scores, split.test, "none", cfg.train.eval_batch_size, device, trim=model.supports_trimming)
    sync(device)
    row["eval_test_s"] = time.perf_counter() - t
    return row


def demo_end_to_end(data_dir: str, device: str, runs_dir: str) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "athwe.cli", "train", "--data-dir", data_dir, "--device", device,
                          "--runs-dir", runs_dir], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed", "seconds": seconds}
    run = max(Path(runs_dir).iterdir(), key=lambda p: p.stat().st_mtime)
    res = json.loads((run / "results.json").read_text())
    epochs = read_metrics(run / "metrics.jsonl")
    return {"seconds": seconds, "test_NDCG@10": res["test"]["NDCG@10"], "epochs": len(epochs),
            "samples_per_s": [r["samples_per_s"] for r in epochs]}


def extraction(data_dir: str, device: torch.device) -> dict:
    from athwe.feature_extraction.items import build_item_texts, read_item_table
    from athwe.feature_extraction.text import TextEncoder, packaged_minilm_dir
    from athwe.runs import load_data as load

    cfg = resolve_config("sasrec", "demo", flags={"data.data_dir": data_dir})
    data, _ = load(cfg)
    texts = build_item_texts(read_item_table(Path(data_dir) / "demo", "demo"), data.item_tokens).texts[1:]
    enc = TextEncoder(str(packaged_minilm_dir()), device=device, progress=False)
    enc.encode(texts[:8])
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(texts), 64):
        enc.encode(texts[i:i + 64])
    sync(device)
    batched = len(texts) / (time.perf_counter() - t)
    one = texts[:200]
    t = time.perf_counter()
    for text in one:
        enc.encode([text])
    sync(device)
    single = len(one) / (time.perf_counter() - t)
    return {"batched_items_per_s": batched, "one_per_pass_items_per_s": single, "ratio": batched / single}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per model and precision")
    ap.add_argument("--out", required=True, help="table path without .md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here")
    scratch = Path(tempfile.mkdtemp(prefix="athwe-gpu-"))
    data_dir = str(scratch / "dataset")
    rows = [model_row(name, data_dir, device, args.steps) for name in list_models()]
    for r in rows:
        print(json.dumps(r), flush=True)
    ext = extraction(data_dir, device)
    print(json.dumps(ext), flush=True)
    demo = demo_end_to_end(data_dir, args.device, str(scratch / "runs"))
    print(json.dumps(demo), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "torch": torch.__version__, "command": "python benchmarks/gpu_check.py "
            + " ".join(sys.argv[1:])}
    atomic_write_json(args.out + ".json", {"meta": meta, "models": rows, "extraction": ext, "demo": demo})
    lines = [f"# GPU check on {name}", "", f"Command: `{meta['command']}`", "",
             "| model | fp32 steps/s | bf16 steps/s | fp32 samples/s | bf16 samples/s | test evaluation (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['fp32_steps_per_s']:.1f} | {r['bf16_steps_per_s']:.1f} | "
              f"{r['fp32_samples_per_s']:.0f} | {r['bf16_samples_per_s']:.0f} | {r['eval_test_s']:.2f} |"
              for r in rows]
    lines += ["", f"Text extraction (packaged MiniLM, demo items): {ext['batched_items_per_s']:.0f} items/s in "
              f"batches of 64 against {ext['one_per_pass_items_per_s']:.0f} one per pass ({ext['ratio']:.1f}x).", "",
              "ATHWE on the demo end to end (`athwe train`): " + (
                  f"{demo['seconds']:.0f} s, {demo['epochs']} epochs, test NDCG@10 {demo['test_NDCG@10']:.4f}"
                  if "error" not in demo else f"failed: {demo['error']}") + "."]
    atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
