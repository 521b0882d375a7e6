"""Training throughput of every registered model on LastFM-shaped batches.

    python benchmarks/model_speed.py [--models wearec,bsarec] [--max-seq-length 200] [--steps 60]
    python benchmarks/model_speed.py --models fearec --dataset Beauty --set model_args.variant=bsarec

Each model is built with its published LastFM settings (athwe/configs/<model>.yaml, datasets: LastFM),
N = --max-seq-length (default 50), batch 256, hidden 64, its configured loss (CE unless the config
says otherwise), Adam with the configured learning rate, and trained on real LastFM training
batches (3,646 items; /work/shared/data relative to this checkout). --dataset takes another
dataset's batches and settings (Beauty: 12,101 items); --set overrides a config key for every
model. The peak RSS column is the process's peak after the model: time one model per run to
read it as that model's. A step is what the trainer does
per batch: build the batch, loss, zero_grad, backward, Adam step. After warm-up steps the timed
steps run in --repeats windows; the figure is total steps / total time (the best window is also
kept). The reference code bases train LastFM at 5.0 (WEARec) and 4.9 (BSARec) steps/s on this
machine, idle (specs/published-results.md); the ratio to that anchor is printed for those models.

The machine is shared: the load average before and after each model and the ratio of process CPU
time to wall time are recorded, so a contended measurement can be recognised as such. With
--with-reference the script also times a plain re-implementation in the reference code's style
(nn.Dropout, TF-style LayerNorm, head permutes, complex rfft/irfft with torch's own backward, every
position through every layer, full Q/K/V attention) on the same batches, in windows alternating
with ours (ABBA order), so the ratio can be read under the same load ("ref-style" rows).
--precisions fp32,bf16 times each model with train.precision fp32 and bf16 (the step under
bfloat16 autocast) the same way, in alternating windows, and gives the bf16 rows their speed
ratio to fp32 under the same load.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cache import load_avg  # noqa: E402
from athwe.utils import atomic_write_json, atomic_write_text, keep_freed_memory  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OPTIONAL_MODELS = ("bsarec", "wearec", "fearec", "asrec")
REFERENCE_STEPS_PER_S = {"wearec": 5.0, "bsarec": 4.9}  # reference code, LastFM, N=50, batch 256, idle


# ---- reference-style implementations (the reference code's structure, for a same-load ratio) ----

class _TFLayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-12):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + self.eps)) + self.bias


class _RefFF(nn.Module):
    def __init__(self, d: int, p: float):
        super().__init__()
        self.dense_1, self.dense_2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm, self.drop = _TFLayerNorm(d), nn.Dropout(p)

    def forward(self, x):
        h = self.dense_1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / 2 ** 0.5))
        return self.norm(self.drop(self.dense_2(h)) + x)


class _RefWEARecLayer(nn.Module):
    def __init__(self, d: int, k: int, n: int, alpha: float, p: float):
        super().__init__()
        self.k, self.dh, self.n, self.nb, self.alpha = k, d // k, n, n // 2 + 1, alpha
        self.detail = nn.Parameter(torch.randn(1, k, n // 2, d // k) * 0.02)
        self.w_base = nn.Parameter(torch.ones(k, self.nb, 1))
        self.b_base = nn.Parameter(torch.full((k, self.nb, 1), -0.1))
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, k * self.nb * 2))
        self.drop, self.norm = nn.Dropout(p), _TFLayerNorm(d)

    def forward(self, x):
        b, n, d = x.shape
        xh = x.view(b, n, self.k, self.dh).permute(0, 2, 1, 3)
        z = torch.fft.rfft(xh, dim=2, norm="ortho")
        a = self.mlp(x.mean(dim=1)).view(b, self.k, self.nb, 2)
        z = z * (self.w_base * (1 + a[..., 0:1])) + (self.b_base + a[..., 1:2])
        x_fft = torch.fft.irfft(z, dim=2, n=self.n, norm="ortho")
        even, odd = xh[:, :, 0::2], xh[:, :, 1::2]
        approx, detail = 0.5 * (even + odd), 0.5 * (even - odd) * self.detail
        y = torch.zeros_like(xh)
        y[:, :, 0::2], y[:, :, 1::2] = approx + detail, approx - detail
        m = ((1.0 - self.alpha) * y + self.alpha * x_fft).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.norm(self.drop(m) + x)


class _RefAttention(nn.Module):
    def __init__(self, d: int, h: int, p: float):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.attn_drop, self.drop, self.norm = nn.Dropout(p), nn.Dropout(p), nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mask):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).permute(0, 2, 1, 3)
        k = self.k(x).view(b, n, self.h, self.dh).permute(0, 2, 3, 1)
        v = self.v(x).view(b, n, self.h, self.dh).permute(0, 2, 1, 3)
        att = self.attn_drop(torch.softmax(q @ k / self.dh ** 0.5 + mask, dim=-1))
        ctx = (att @ v).permute(0, 2, 1, 3).contiguous().view(b, n, d)
        return self.norm(self.drop(self.o(ctx)) + x)


class _RefBSARecLayer(nn.Module):
    def __init__(self, d: int, h: int, c: int, alpha: float, p: float):
        super().__init__()
        self.c, self.alpha = c // 2 + 1, alpha
        self.sqrt_beta = nn.Parameter(torch.randn(1, 1, d))
        self.drop, self.norm = nn.Dropout(p), _TFLayerNorm(d)
        self.att = _RefAttention(d, h, p)

    def forward(self, x, mask):
        z = torch.fft.rfft(x, dim=1, norm="ortho")
        z[:, self.c:, :] = 0
        low = torch.fft.irfft(z, n=x.shape[1], dim=1, norm="ortho")
        dsp = self.norm(self.drop(low + self.sqrt_beta ** 2 * (x - low)) + x)
        return self.alpha * dsp + (1 - self.alpha) * self.att(x, mask)


class RefStyleModel(nn.Module):
    """The reference code's computation for wearec / bsarec (CE over all items at the last position)."""

    def __init__(self, kind: str, n_items: int, n: int, args: dict):
        super().__init__()
        d, p, layers = args.get("hidden_size", 64), args.get("hidden_dropout", 0.5), args.get("num_layers", 2)
        self.kind = kind
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(n, d)
        self.norm, self.drop = _TFLayerNorm(d), nn.Dropout(p)
        if kind == "wearec":
            mixers = [_RefWEARecLayer(d, args["num_heads"], n, args["alpha"], p) for _ in range(layers)]
        else:
            mixers = [_RefBSARecLayer(d, args["num_heads"], args["c"], args["alpha"], p) for _ in range(layers)]
        self.mixers = nn.ModuleList(mixers)
        self.ffs = nn.ModuleList(_RefFF(d, p) for _ in range(layers))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.data.normal_(0.0, 0.02)
            if isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def loss(self, batch) -> torch.Tensor:
        ids = batch.input_ids
        n = ids.shape[1]
        x = self.drop(self.norm(self.item(ids) + self.pos(torch.arange(n).unsqueeze(0).expand_as(ids))))
        mask = None
        if self.kind == "bsarec":
            keep = ((ids > 0).long().unsqueeze(1).unsqueeze(2)
                    * torch.tril(torch.ones(n, n, dtype=torch.long)).view(1, 1, n, n))
            mask = (1.0 - keep.float()) * -10000.0
        for mixer, ff in zip(self.mixers, self.ffs):
            x = ff(mixer(x) if mask is None else mixer(x, mask))
        logits = x[:, -1, :] @ self.item.weight.t()
        return nn.functional.cross_entropy(logits, batch.target)


def import_models() -> dict[str, str]:
    """Import athwe.models and the optional model modules; returns {module: error} for failures other
    than the module not existing yet."""
    importlib.import_module("athwe.models")
    errors = {}
    for name in OPTIONAL_MODELS:
        mod = f"athwe.models.{name}"
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                errors[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # a model being written by someone else must not stop the others
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def synthetic_features(n_items: int):
    """Random 768-d text and image tables and 20 multi-hot categories for the catalogue's item count:
    the BSARec-format datasets have no item text or images, and a multimodal model's step costs the same on any values
    of the same shapes. Throughput only; these runs say nothing about quality."""
    from athwe.feature_extraction.store import FeatureSet

    g = torch.Generator().manual_seed(0)
    rows = n_items + 1
    text, image = torch.randn(rows, 768, generator=g), torch.randn(rows, 768, generator=g)
    cat = (torch.rand(rows, 20, generator=g) < 0.1).float()
    text[0] = image[0] = cat[0] = 0
    has = torch.ones(rows, dtype=torch.bool)
    has[0] = False
    return FeatureSet(text=text, image=image, cat=cat, text_mask=has, image_mask=has.clone(),
                      cat_vocab=[f"c{i}" for i in range(20)], fingerprint=f"model-speed-synthetic-{n_items}")


def _stepper(name: str, max_len: int, batch_size: int, ref_style: bool, dataset: str,
             overrides: list[str] | None, precision: str = "fp32") -> dict:
    """A model built with its published settings and a function doing one training step on batch i."""
    from athwe.config import resolve_config
    from athwe.models import create_model
    from athwe.models.base import get_entry
    from athwe.runs import load_data
    from athwe.training.trainer import autocast_context, sample_negatives

    cfg = resolve_config(name, dataset, overrides=overrides, flags={
        "data.data_dir": str(DATA), "data.max_seq_length": max_len, "train.batch_size": batch_size,
        "train.precision": precision})
    autocast = autocast_context(torch.device("cpu"), cfg.train.precision)
    data, split = load_data(cfg)
    torch.manual_seed(0)
    features = None
    if ref_style:
        model = RefStyleModel(name, data.n_items, max_len, cfg.model_args)
    else:
        features = synthetic_features(data.n_items) if get_entry(name).needs_features else None
        model = create_model(name, data.n_items, max_len, cfg.model_args, cfg.train.loss, features)
        model.prepare(split.train)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train = split.train
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    n_batches = max(1, len(train) // batch_size)

    def step(i: int) -> None:
        start = (i % n_batches) * batch_size
        batch = train.batch(perm[start:start + batch_size])
        if cfg.train.loss == "bce":
            batch.neg = sample_negatives(batch, data.n_items)
        with autocast():
            loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"step": step, "model": model, "cfg": cfg, "data": data, "features": features, "ref_style": ref_style,
            "name": name, "precision": cfg.train.precision}


def bench_model(name: str, max_len: int, batch_size: int, steps: int, warmup: int, repeats: int,
                max_seconds: float, with_ref_style: bool = False, dataset: str = "LastFM",
                overrides: list[str] | None = None, precisions: tuple[str, ...] = ("fp32",)) -> list[dict]:
    """Time `name` (and, with `with_ref_style`, the reference-style implementation in the same
    process, window by window in ABBA order, so that a change in machine speed during the
    measurement hits both alike and their ratio stays fair). One result per implementation; with
    several `precisions` (train.precision values) one per precision, timed the same way."""
    setups = [_stepper(name, max_len, batch_size, False, dataset, overrides, p) for p in precisions]
    if with_ref_style:
        setups.append(_stepper(name, max_len, batch_size, True, dataset, overrides))
    load_before = load_avg()
    for s in setups:
        for i in range(warmup):
            s["step"](i)
        s.update(windows=[], wall=0.0, cpu=0.0, i=warmup)
    per_window = max(1, steps // repeats)
    for rep in range(repeats):
        if setups[0]["windows"] and setups[0]["wall"] > max_seconds:  # a slow model: fewer windows
            break
        for s in (setups if rep % 2 == 0 else setups[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(per_window):
                s["step"](s["i"])
                s["i"] += 1
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            s["windows"].append(round(per_window / dt, 2))
            s["wall"] += dt
            s["cpu"] += dc
    load_after = load_avg()
    out = []
    for s in setups:
        model, cfg, wall = s["model"], s["cfg"], s["wall"]
        timed = per_window * len(s["windows"])
        res = {
            "model": name + (" (ref-style)" if s["ref_style"] else "")
            + (" (synthetic features)" if s["features"] is not None else "")
            + ("" if s["ref_style"] or s["precision"] == "fp32" else f" ({s['precision']})"),
            "precision": "fp32" if s["ref_style"] else s["precision"],
            "params": sum(p.numel() for p in model.parameters()),
            "loss": cfg.train.loss,
            "lr": cfg.train.lr,
            "model_args": cfg.model_args,
            "n_items": s["data"].n_items,
            "max_seq_length": max_len,
            "batch_size": batch_size,
            "steps_timed": timed,
            "steps_per_s": round(timed / wall, 2),
            "samples_per_s": round(timed * batch_size / wall, 1),
            "best_window_steps_per_s": max(s["windows"]),
            "window_steps_per_s": s["windows"],
            "cpu_over_wall": round(s["cpu"] / wall, 2),
            # the process did not get its threads' worth of CPU: another job shared the cores
            "contended": s["cpu"] / wall < 0.85 * torch.get_num_threads(),
            "load_avg_before": load_before,
            "load_avg_after": load_after,
            # the process's peak so far: the model's own peak when it is the first (or only) one timed
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "dataset": dataset,
            "overrides": list(overrides or []),
        }
        anchored = (max_len == 50 and batch_size == 256 and dataset == "LastFM" and not overrides
                    and not s["ref_style"] and s["precision"] == "fp32")
        ref = REFERENCE_STEPS_PER_S.get(name) if anchored else None
        if ref:
            res["reference_steps_per_s"] = ref
            res["ratio_to_reference"] = round(res["steps_per_s"] / ref, 2)
        out.append(res)
    if with_ref_style:
        ref = out[-1]
        for r in out[:-1]:
            r["ratio_to_ref_style_same_load"] = round(r["steps_per_s"] / ref["steps_per_s"], 2)
            r["window_ratios_to_ref_style"] = [round(a / b, 2) for a, b in zip(r["window_steps_per_s"],
                                                                               ref["window_steps_per_s"])]
    if "fp32" in precisions:
        base = out[precisions.index("fp32")]
        for r in out[:len(precisions)]:
            if r is not base:
                r["ratio_to_fp32_same_load"] = round(r["steps_per_s"] / base["steps_per_s"], 2)
    return out


def cpu_model() -> str:
    """The CPU's model name and widest vector extension (figures differ several-fold between an
    AVX2 and an AVX-512 machine of the same core count)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vec = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name}, {vec}" if vec else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated registry names (default: every registered model)")
    ap.add_argument("--max-seq-length", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timing windows the timed steps are split into")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop timing a model after the window that passes this many seconds")
    ap.add_argument("--with-reference", action="store_true",
                    help="also time a reference-style implementation of wearec/bsarec in windows alternating "
                         "with ours")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--dataset", default="LastFM",
                    help="dataset whose training batches and published settings are used")
    ap.add_argument("--set", action="append", default=[],
                    help="config override for every model, e.g. model_args.variant=bsarec")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated train.precision values timed in alternating windows, e.g. fp32,bf16")
    ap.add_argument("--out", default="",
                    help="output stem (default benchmarks/results/model_speed, _n<N> appended for N != 50)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    import_errors = import_models()
    from athwe.models import list_models

    names = [m.strip() for m in args.models.split(",") if m.strip()] or list_models()
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    from athwe.config import PRECISIONS

    if not precisions or set(precisions) - set(PRECISIONS) or len(set(precisions)) != len(precisions):
        ap.error(f"--precisions: distinct values of {', '.join(PRECISIONS)}, got {args.precisions!r}")
    for name, err in import_errors.items():
        print(f"skipped athwe.models.{name}: {err}", flush=True)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
           "cores": os.cpu_count(), "python": platform.python_version(),
           "keep_freed_memory": keep_freed_memory()}  # as the trainer does (athwe.utils)
    print(f"torch {env['torch']}, {env['threads']} threads, load average {load_avg()}, "
          f"malloc keeps freed memory: {env['keep_freed_memory']}", flush=True)
    results, failures = [], {}
    for name in names:
        try:
            with_ref = args.with_reference and name in REFERENCE_STEPS_PER_S
            timed = bench_model(name, args.max_seq_length, args.batch_size, args.steps, args.warmup, args.repeats,
                                args.max_seconds, with_ref_style=with_ref,
                                dataset=args.dataset, overrides=args.set, precisions=precisions)
        except Exception as e:  # report and go on with the other models
            failures[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: failed ({failures[name]})", flush=True)
            continue
        results.extend(timed)
        ref = timed[-1] if with_ref else None  # bench_model puts the ref-style result last
        for r in timed:
            if r is ref:
                continue
            ratio = (f", {r['ratio_to_reference']:.2f}x the reference's {r['reference_steps_per_s']} steps/s"
                     if "ratio_to_reference" in r else "")
            if ref is not None:
                ratio += (f"; ref-style {ref['steps_per_s']:.2f} steps/s in alternating windows "
                          f"(cpu/wall {ref['cpu_over_wall']}): "
                          f"{r['ratio_to_ref_style_same_load']:.2f}x "
                          f"(per window pair {r['window_ratios_to_ref_style']})")
            if "ratio_to_fp32_same_load" in r:
                ratio += f"; {r['ratio_to_fp32_same_load']:.2f}x fp32 in alternating windows"
            print(f"{r['model']:8s} {args.dataset} N={r['max_seq_length']} batch {r['batch_size']} {r['loss']}: "
                  f"{r['steps_per_s']:6.2f} steps/s, "
                  f"{r['samples_per_s']:8.0f} samples/s (best window {r['best_window_steps_per_s']}){ratio}; "
                  f"cpu/wall {r['cpu_over_wall']}, peak RSS {r['peak_rss_mb']} MB, "
                  f"load {r['load_avg_before']} -> {r['load_avg_after']}"
                  f"{'  [CONTENDED: another job shared the cores; a lower bound]' if r['contended'] else ''}",
                  flush=True)

    stem = args.out or ("benchmarks/results/model_speed"
                        + ("" if args.max_seq_length == 50 else f"_n{args.max_seq_length}"))
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem + ".json", {"command": command, "env": env, "results": results, "failures": failures,
                                       "import_errors": import_errors})
    lines = [
        f"# Model training speed ({args.dataset} batches)",
        "",
        f"Command: `{command}` ({env['threads']} threads on {env['cores']} cores, {env['cpu']}, torch {env['torch']}, "
        f"malloc keeps freed memory: {'yes' if env['keep_freed_memory'] else 'no'})",
        "",
        f"N={args.max_seq_length}, batch {args.batch_size}, published {args.dataset} settings per model"
        + (f" with {', '.join(args.set)}" if args.set else "") + ", Adam; a step = batch, "
        "loss, backward, optimiser step. Reference anchors (the reference code on this machine, idle, N=50): "
        "WEARec 5.0, BSARec 4.9 steps/s.",
        "",
        "| model | params | loss | steps/s | samples/s | best window "
        "| vs reference (5.0 / 4.9 idle; ref-style or fp32 same load) "
        "| cpu/wall | peak RSS MB | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        parts = []
        if "ratio_to_reference" in r:
            parts.append(f"{r['ratio_to_reference']:.2f}x of {r['reference_steps_per_s']}")
        if "ratio_to_ref_style_same_load" in r:
            parts.append(f"{r['ratio_to_ref_style_same_load']:.2f}x ref-style")
        if "ratio_to_fp32_same_load" in r:
            parts.append(f"{r['ratio_to_fp32_same_load']:.2f}x fp32 same load")
        ratio = "; ".join(parts)
        flag = " (contended)" if r["contended"] else ""
        lines.append(f"| {r['model']} | {r['params']:,} | {r['loss']} | {r['steps_per_s']:.2f}{flag} | "
                     f"{r['samples_per_s']:.0f} | "
                     f"{r['best_window_steps_per_s']:.2f} | {ratio} | {r['cpu_over_wall']} | {r['peak_rss_mb']} | "
                     f"{r['load_avg_before']} -> {r['load_avg_after']} |")
    for name, err in {**failures, **{k: v for k, v in import_errors.items()}}.items():
        lines.append(f"| {name} | failed: {err} | | | | | | | | |")
    lines += ["", "(contended): process CPU time / wall time was below 0.85 x the thread count, i.e. another job "
              "shared the cores during the measurement; with 2 OpenMP threads on a shared 2-core machine every "
              "parallel region waits for a descheduled thread, so such figures can be many times too low. "
              "Re-run on an idle machine (or compare with the ref-style row timed in the windows between)."]
    if any(r.get("precision", "fp32") != "fp32" for r in results):
        lines += ["", "(bf16): train.precision bf16, the training step under bfloat16 autocast (matrix products and "
                  "convolutions in bfloat16, parameters and optimizer state in float32), timed in windows alternating "
                  "with the fp32 row of the same model. Its speed-up depends on the CPU's bfloat16 support "
                  "(AMX, AVX-512 BF16); without it bf16 can be slower than fp32."]
    if any("synthetic features" in r["model"] for r in results):
        lines += ["", f"(synthetic features): {args.dataset} has no extracted item text or images here, "
                  "so multimodal models are timed on "
                  "random 768-d text and image tables and 20 random categories of the catalogue's size (ID + text + "
                  "image, the model's full configuration). Speed only; their quality on real features is in "
                  "benchmarks/results/athwe_ml100k_content_routing.md."]
    atomic_write_text(stem + ".md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
