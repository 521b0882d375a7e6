"""Cold start: items that have no interactions, added from their content to a trained ATHWE run.

For each dataset:
1. 10% of the items of the data after the configured k-core (ATHWE's dataset settings) are held
   out (--holdout, --seed), and a derived dataset `<name>-cold` is written under --work: its
   `.inter` without any interaction of those items, its `.item` without their rows (the derived
   dataset holds no trace of them; their content is read from the original `.item`). The derived
   data is loaded with the same k-core, which can drop more users and items: the table counts them.
2. Item features are extracted for it (text with --text-model, categories; images only where the
   configured ATHWE uses them) and ATHWE is trained with the dataset's configured settings.
3. The held-out items are written as JSON lines from the original `.item` (title, categories,
   brand, description and the other columns) and added with `athwe items add --run RUN FILE`.
4. Test users: the users of the original data (same k-core) whose test target (last interaction)
   is a held-out item; their history is their original sequence before it, with timestamps
   (held-out items in it are known to the run as added items and stay). Every catalogue item,
   trained and added, is scored by the model (query vectors times item vectors, the full
   catalogue rather than the index, history not excluded); a target's rank is the number of items
   scored strictly higher.
5. Baselines on the same users and catalogue: random ranking (exact expectation), popularity
   (interactions of the derived training split; held-out items have none) and a warm ATHWE trained
   with the same settings on the original dataset, for which the same targets are trained items
   (its ranks from the project's test evaluation, athwe.runs.evaluate_run_rows).

Everything is kept under --work (default: athwe-cold-start in the temporary folder), so the same
command resumes: the derived data is rewritten only when it changes, features are extracted once,
finished runs are reused (their saved config and data fingerprint must match, benchmarks/run_cache.py)
and interrupted ones resumed, and items already added to a run are not added again.

Full run (hours on one CPU thread; --jobs 2 trains each dataset's cold and warm runs at once):
    python benchmarks/cold_start.py --out benchmarks/results/cold_start [--jobs 2]
Smoke run (the demo, one epoch):
    python benchmarks/cold_start.py --quick --out /tmp/cold_start_quick
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cache import command_line, run_main, epoch_printer, load_avg, record_of, train_or_reuse, training_command  # noqa: E402
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KS = (10, 20)
#: how many test users' top 10 are also asked of the run's Retriever (a check of the scoring here)
RETRIEVER_CHECK_USERS = 20
ID_COLUMNS = ("item_id", "item", "iid", "asin", "parent_asin")


# -- the derived dataset -------------------------------------------------------------------------------
def source_data_dir(name: str, data_dir: str, work: Path) -> Path:
    """The data dir the original dataset is read and the warm model trained from: the demo is
    generated there; any other dataset's files are copied there from `data_dir` (the shared source
    folder is never written: features are extracted beside the copies)."""
    warm = work / "warm"
    if name == "demo":
        from athwe.dataset.demo import ensure_demo

        ensure_demo(warm)
        return warm
    src = Path(data_dir) / name
    if not src.is_dir():
        raise SystemExit(f"error: {src}: no such dataset folder (--data-dir)")
    dst = warm / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not ((dst / f.name).is_file() and (dst / f.name).stat().st_size == f.stat().st_size):
            shutil.copyfile(f, dst / f.name)
    return warm


def choose_holdout(item_tokens: list[str], fraction: float, seed: int) -> list[str]:
    """`fraction` of the items (at least one), drawn without replacement with numpy's generator."""
    n = max(1, round(fraction * len(item_tokens)))
    picked = np.sort(np.random.default_rng(seed).choice(len(item_tokens), size=n, replace=False))
    return [item_tokens[i] for i in picked]


def id_column(header: str, path: Path) -> int:
    names = [c.split(":")[0] for c in header.rstrip("\r\n").split("\t")]
    for c in ID_COLUMNS:
        if c in names:
            return names.index(c)
    raise SystemExit(f"error: {path}: no item id column ({', '.join(ID_COLUMNS)}) in its header")


def without_items(path: Path, held: set[str]) -> tuple[str, int]:
    """The atomic file's text without the rows of the `held` items, and how many rows went."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    col = id_column(lines[0], path)
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.rstrip("\r\n").split("\t")[col] not in held]
    return "".join(kept), len(lines) - len(kept)


def write_derived(src: Path, name: str, dst: Path, held: list[str]) -> dict[str, int]:
    """Write `dst/<dst.name>.inter` and `.item` from the source dataset without the held-out items.
    A file is rewritten only when its text changes (then the extracted features go too), so a
    resumed run keeps its data fingerprint and cached sequences."""
    dst.mkdir(parents=True, exist_ok=True)
    removed, changed = {}, False
    for ext in ("inter", "item"):
        text, removed[ext] = without_items(src / f"{name}.{ext}", set(held))
        out = dst / f"{dst.name}.{ext}"
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            atomic_write_text(out, text)
            changed = True
    if changed:
        shutil.rmtree(dst / "features", ignore_errors=True)
    if (src / "images").is_dir() and not (dst / "images").exists():
        (dst / "images").symlink_to((src / "images").resolve(), target_is_directory=True)
    return {"inter_rows_removed": removed["inter"], "item_rows_removed": removed["item"]}


def ensure_features(name: str, data_dir: Path, kcore: int, image: bool, text_model: str, device: str) -> None:
    """Extract the dataset's item features once, aligned to the item map of `kcore`."""
    from athwe.feature_extraction import extract_features
    from athwe.feature_extraction.store import MANIFEST_FILE, features_dir

    if (features_dir(data_dir / name) / MANIFEST_FILE).is_file():
        return
    print(f"extracting {name} item features (text model {text_model}, kcore {kcore})", flush=True)
    extract_features(name, str(data_dir), kcore=kcore, text_model=text_model, image=image, device=device,
                     progress=False, log=lambda s: print(s, flush=True))


def new_item_records(src: Path, name: str, held: list[str], image: bool) -> tuple[list[dict[str, Any]], int]:
    """The held-out items as `athwe items add` records from the original `.item` rows (dataset
    folder `src/name`): title, categories (the category column's tokens), brand and description by
    their column aliases, the other columns under their own names (a text template may use them),
    the image path only where the model reads images. Returns (records, items without a row)."""
    from athwe.feature_extraction.items import read_item_table

    table = read_item_table(src / name, name)
    if table.path is None:
        raise SystemExit(f"error: {src / name}: no {name}.item file to read the held-out items' content from")
    roles = {table.resolve(f): f for f in ("title", "categories", "brand")}
    records, no_row = [], 0
    for tok in held:
        row = table.rows.get(tok)
        rec: dict[str, Any] = {"item": tok}
        if row is None:
            no_row += 1
            records.append(rec)
            continue
        for col, value in row.items():
            role = roles.get(col)
            if role == "categories":
                rec["categories"] = table.seq_rows[tok].get(col) or value.split()
            elif role is not None:
                rec[role] = value
            elif col == "description":
                rec["description"] = value
            elif col == "image":
                if image and value:
                    rec["image"] = str((src / name / value) if not Path(value).is_absolute() else value)
            else:
                rec[col] = value
        records.append(rec)
    return records, no_row


def athwe_command() -> list[str]:
    exe = Path(sys.executable).with_name("athwe")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from athwe.cli import app; app()"]


def add_held_out(run: Path, records: list[dict[str, Any]], path: Path, threads: int) -> str:
    """Add the held-out items to the run with `athwe items add` unless the run has them already;
    returns what was done."""
    from athwe.retrieval import Retriever

    have = Retriever(run).token_index
    present = sum(r["item"] in have for r in records)
    if present == len(records):
        return "already added"
    if present:
        raise SystemExit(f"error: {run} has {present} of the {len(records)} held-out items: move "
                         f"{run / 'added_items'} away and run again")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = athwe_command() + ["items", "add", "--run", str(run), str(path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out.stderr.strip() or out.stdout.strip()}")
    print(out.stdout.strip().splitlines()[0], flush=True)
    return "added"


# -- training ------------------------------------------------------------------------------------------
def train_athwe(name: str, dataset: str, data_dir: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Train (or reuse, or resume) ATHWE with the settings configured for dataset `name`, on the
    dataset folder `data_dir/dataset` (the derived data keeps the original's settings under its own
    name). Returns the run's record (run_cache.record_of) with how it was obtained."""
    from athwe.config import resolve_config

    base = resolve_config("athwe", name)
    flags = {"data.data_dir": str(data_dir), "train.runs_dir": str(Path(args.work) / name / "runs"),
             "train.device": args.device, "train.num_threads": args.threads,
             "train.epochs": min(base.train.epochs, args.epochs) if args.epochs else None}
    cfg = resolve_config("athwe", name, flags=flags)
    cfg.data.dataset = dataset
    say = epoch_printer(label, args.quiet)
    run_dir, how, seconds = train_or_reuse(cfg, args.fresh, log=lambda s: print(f"[{label}] {s}", flush=True),
                                           printer=say)
    rec = record_of(run_dir, how, seconds)
    rec["how"] = how
    return rec


# -- scoring -------------------------------------------------------------------------------------------
def history_batch(histories: list[tuple[np.ndarray, np.ndarray]], n: int) -> Any:
    """The last `n` items of each history, left-padded with id 0 and time 0 (as the trainer's
    evaluation samples and the Retriever build them)."""
    from athwe.dataset.split import Batch

    ids = torch.zeros(len(histories), n, dtype=torch.long)
    ts = torch.zeros(len(histories), n, dtype=torch.float64)
    for row, (h, t) in enumerate(histories):
        h, t = h[-n:], t[-n:]
        ids[row, n - len(h):] = torch.from_numpy(np.ascontiguousarray(h, dtype=np.int64))
        ts[row, n - len(t):] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64))
    zeros = torch.zeros(len(histories), dtype=torch.long)
    return Batch(ids, ts, zeros, zeros.clone(), ts[:, -1])


@torch.inference_mode()
def full_scores(model: Any, histories: list[tuple[np.ndarray, np.ndarray]], n: int,
                batch_size: int = 256) -> torch.Tensor:
    """(users, catalogue + 1) scores: query vectors times every item vector the model holds
    (trained and added), column 0 (padding) at -inf."""
    device = next(model.parameters()).device
    items = model.item_vectors().float()
    out = []
    for s in range(0, len(histories), batch_size):
        q = model.query_vectors(history_batch(histories[s:s + batch_size], n).to(device)).float()
        out.append((q @ items.T).cpu())
    scores = torch.cat(out)
    scores[:, 0] = -float("inf")
    return scores


def summarise(ranks: torch.Tensor) -> dict[str, float]:
    """HR and NDCG at KS, with the median and quartiles of the ranks (0 = first)."""
    from athwe.evaluation.metrics import metrics_from_ranks

    m = metrics_from_ranks(ranks, KS)
    r = ranks.double().numpy()
    return {**{f"{x}@{k}": m[f"{x}@{k}"] for k in KS for x in ("HR", "NDCG")},
            "median_rank": float(np.median(r)), "rank_p25": float(np.percentile(r, 25)),
            "rank_p75": float(np.percentile(r, 75))}


def random_expectation(catalogue: int) -> dict[str, float]:
    """Exact expectations under a uniformly random ranking of `catalogue` items: the target's rank
    is uniform on 0..catalogue-1."""
    out: dict[str, float] = {}
    for k in KS:
        out[f"HR@{k}"] = min(k, catalogue) / catalogue
        out[f"NDCG@{k}"] = sum(1.0 / np.log2(r + 2.0) for r in range(min(k, catalogue))) / catalogue
    return {**out, "median_rank": (catalogue - 1) / 2, "rank_p25": (catalogue - 1) / 4,
            "rank_p75": 3 * (catalogue - 1) / 4}


def training_counts(data: Any) -> torch.Tensor:
    """Interactions per item (index = id) in the training split of `data`: each user's sequence
    without its last two (the validation and test targets); users with fewer than 3 interactions
    have no training samples (athwe.dataset.split)."""
    lengths = data.lengths
    owner = torch.repeat_interleave(torch.arange(data.n_users), lengths)
    pos = torch.arange(data.n_interactions) - data.offsets[owner]
    keep = (lengths[owner] >= 3) & (pos < lengths[owner] - 2)
    return torch.bincount(data.items[keep], minlength=data.n_items + 1).double()


def test_users(data: Any, held: set[str]) -> list[int]:
    """Users of `data` in its test split (3 or more interactions) whose last item is held out."""
    out = []
    for u in torch.nonzero(data.lengths >= 3).squeeze(1).tolist():
        last = int(data.items[int(data.offsets[u + 1]) - 1])
        if data.item_tokens[last] in held:
            out.append(u)
    return out


def one_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from athwe.config import resolve_config
    from athwe.dataset.sequences import load_sequences
    from athwe.evaluation.metrics import rank_of_target
    from athwe.models import resolved_model_args
    from athwe.retrieval import Retriever, new_items
    from athwe.runs import evaluate_run_rows, load_run_model

    t0 = time.perf_counter()
    cfg = resolve_config("athwe", name)
    kcore, modalities = cfg.data.kcore, list(resolved_model_args("athwe", cfg.model_args)["modalities"])
    image = "image" in modalities
    work = Path(args.work) / name
    src_dir = source_data_dir(name, args.data_dir, work)
    original = load_sequences(src_dir, name, kcore=kcore)
    held = choose_holdout(original.item_tokens[1:], args.holdout, args.seed)
    held_set = set(held)
    cold_name = f"{name}-cold"
    cold_dir = work / f"holdout{args.holdout:g}-seed{args.seed}"
    removed = write_derived(src_dir / name, name, cold_dir / cold_name, held)
    atomic_write_json(cold_dir / "held_out.json", {"dataset": name, "kcore": kcore, "fraction": args.holdout,
                                                   "seed": args.seed, "items": held})
    derived = load_sequences(cold_dir, cold_name, kcore=kcore)
    kept_items = set(derived.item_tokens[1:])
    sizes = {
        "kcore": kcore,
        "original": {"users": original.n_users, "items": original.n_items, "interactions": original.n_interactions},
        "held_out_items": len(held),
        "held_out_interactions": int(torch.isin(original.items, torch.tensor(
            [i for i, tok in enumerate(original.item_tokens) if tok in held_set])).sum()),
        **removed,
        "derived": {"users": derived.n_users, "items": derived.n_items, "interactions": derived.n_interactions},
        "derived_kcore_dropped_items": sum(t not in kept_items and t not in held_set
                                           for t in original.item_tokens[1:]),
        "derived_kcore_dropped_users": len(set(original.user_tokens) - set(derived.user_tokens)),
    }
    print(f"{name}: {json.dumps(sizes)}", flush=True)

    timing: dict[str, float] = {}
    t = time.perf_counter()
    ensure_features(cold_name, cold_dir, kcore, image, args.text_model, args.device)
    ensure_features(name, src_dir, kcore, image, args.text_model, args.device)
    timing["features_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if args.jobs > 1:  # the two trainings are independent: one process each (each with --threads)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            cold_job = pool.submit(train_athwe, name, cold_name, cold_dir, args, f"{name} cold")
            warm_job = pool.submit(train_athwe, name, name, src_dir, args, f"{name} warm")
            cold, warm = cold_job.result(), warm_job.result()
    else:
        cold = train_athwe(name, cold_name, cold_dir, args, f"{name} cold")
        warm = train_athwe(name, name, src_dir, args, f"{name} warm")
    timing["training_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    records, no_row = new_item_records(src_dir, name, held, image)
    added = add_held_out(Path(cold["run_dir"]), records, cold_dir / "held_out_items.jsonl", args.threads)
    timing["add_items_s"] = round(time.perf_counter() - t, 1)

    # the test users, their histories in the cold run's ids (added items included)
    t = time.perf_counter()
    retriever = Retriever(cold["run_dir"])
    info = retriever.info()
    catalogue = retriever.n_catalogue
    users = test_users(original, held_set)
    hist_cold, hist_warm, targets, kept_users = [], [], [], []
    added_positions = dropped_positions = users_with_added = 0
    for u in users:
        a, b = int(original.offsets[u]), int(original.offsets[u + 1])
        ids, times = original.items[a:b - 1].numpy(), original.times[a:b - 1].numpy()
        toks = [original.item_tokens[int(i)] for i in ids]
        known = np.array([tok in retriever.token_index for tok in toks], dtype=bool)
        n_added = sum(tok in held_set for tok in toks)
        added_positions += n_added
        users_with_added += n_added > 0
        dropped_positions += int((~known).sum())
        if not known.any():
            continue
        kept_users.append(u)
        hist_cold.append((np.array([retriever.token_index[tok] for tok, k in zip(toks, known) if k]), times[known]))
        hist_warm.append((ids, times))
        targets.append(retriever.token_index[original.item_tokens[int(original.items[b - 1])]])
    if not kept_users:
        raise SystemExit(f"error: {name}: no test user's last interaction is a held-out item")
    target = torch.tensor(targets)
    n = retriever.cfg.data.max_seq_length
    torch.manual_seed(0)
    scores = full_scores(retriever.model, hist_cold, n)
    if scores.shape[1] != catalogue + 1:
        raise SystemExit(f"error: the model scores {scores.shape[1] - 1} items, the catalogue has {catalogue}")
    cold_ranks = rank_of_target(scores, target)
    first_added = retriever.data.n_items + 1
    among_added = rank_of_target(scores[:, first_added:], target - first_added)
    top10 = scores.topk(10, dim=1).indices
    added_share = float((top10 >= first_added).double().mean())
    # the same additions with the mean trained ID embedding as their ID part (`athwe items add --id-part mean`)
    mean_ranks = None
    if "id" in retriever.model.modalities:
        table = retriever.model.item_embedding.weight
        with torch.no_grad():
            saved = table[first_added:].clone()
            table[first_added:] = new_items.mean_id_rows(retriever.model, retriever.data.n_items, len(saved))
        torch.manual_seed(0)
        mean_ranks = rank_of_target(full_scores(retriever.model, hist_cold, n), target)
        with torch.no_grad():
            table[first_added:] = saved
    agree = 0
    checked = min(RETRIEVER_CHECK_USERS, len(kept_users))
    for row in range(checked):
        h, ts = hist_cold[row]
        got = retriever.recommend(items=[retriever.tokens[int(i)] for i in h], timestamps=ts.tolist(), k=10,
                                  exclude_history=False)
        agree += [r.item_id for r in got] == top10[row].tolist()

    # popularity: derived training interactions; added items 0 (ties: items counted strictly higher)
    pop = torch.zeros(catalogue + 1, dtype=torch.float64)
    pop[:first_added] = training_counts(retriever.data)
    pop[0] = -1.0
    pop_ranks = rank_of_target(pop.expand(len(targets), -1), target)

    # warm model: the project's test evaluation of the run trained on the original data
    res, eval_users, eval_ranks = evaluate_run_rows(warm["run_dir"], "test")
    by_user = dict(zip(eval_users.tolist(), eval_ranks.tolist()))
    warm_ranks = torch.tensor([by_user[u] for u in kept_users])
    warm_model, warm_data, warm_cfg = load_run_model(warm["run_dir"])
    if warm_data.item_tokens != original.item_tokens:
        raise SystemExit(f"error: {warm['run_dir']}: trained on another item map than the original data")
    warm_target = torch.tensor([int(original.items[int(original.offsets[u + 1]) - 1]) for u in kept_users])
    mine = rank_of_target(full_scores(warm_model, hist_warm, warm_cfg.data.max_seq_length), warm_target)
    warm_agree = int((mine == warm_ranks).sum())
    # the added items' raw content features against the same items' features extracted with the original data
    held_ids = torch.tensor([original.item_tokens.index(tok) for tok in held])
    added_ids = torch.tensor([retriever.token_index[tok] for tok in held])
    content_diff = {m: float((getattr(retriever.model, f"{m}_raw")[added_ids].float()
                              - getattr(warm_model, f"{m}_raw")[held_ids].float()).abs().max())
                    for m in ("text", "image") if hasattr(warm_model, f"{m}_raw")}
    timing["scoring_s"] = round(time.perf_counter() - t, 1)
    timing["dataset_wall_s"] = round(time.perf_counter() - t0, 1)

    rand = random_expectation(catalogue)
    rows = [
        {"ranking": "cold ATHWE, held-out items added from their content (ID part predicted from content)",
         "catalogue": catalogue,
         **summarise(cold_ranks)},
        *([{"ranking": "cold ATHWE, the same items with the mean trained ID embedding as ID part (--id-part mean)",
            "catalogue": catalogue, **summarise(mean_ranks)}] if mean_ranks is not None else []),
        {"ranking": "random (exact expectation)", "catalogue": catalogue, **rand},
        {"ranking": "popularity (derived training interactions; held-out items 0)", "catalogue": catalogue,
         **summarise(pop_ranks)},
        {"ranking": "warm ATHWE (trained on the original data: the targets are trained items)",
         "catalogue": warm_data.n_items, **summarise(warm_ranks)},
    ]
    for r in rows:
        r["users"] = len(kept_users)
        r["hr10_vs_random"] = r["HR@10"] / random_expectation(r["catalogue"])["HR@10"]
    return {
        "dataset": name, "cold_dataset": cold_name, "sizes": sizes, "modalities": modalities,
        "configured_epochs": cfg.train.epochs,
        "test_users": len(kept_users), "test_users_without_known_history": len(users) - len(kept_users),
        "history_positions_added_items": added_positions, "users_with_added_items_in_history": users_with_added,
        "history_positions_dropped": dropped_positions,
        "held_out_items_without_item_row": no_row, "items_added": added, "cold_catalogue": info,
        "rows": rows,
        "cold_rank_among_added": {"median_rank": float(np.median(among_added.double().numpy())),
                                  "random_median": (catalogue - first_added) / 2,
                                  "added_items": catalogue - first_added + 1},
        "added_share_of_top10": added_share, "added_share_of_catalogue": (catalogue - first_added + 1) / catalogue,
        "retriever_check": {"users": checked, "same_top10": agree},
        "warm_scoring_check": {"users": len(kept_users), "same_rank": warm_agree},
        "added_content_max_abs_diff": content_diff,
        "context_test_ndcg10": {"cold_run_own_test_users": cold["test"]["NDCG@10"],
                                "cold_run_test_users": int((retriever.data.lengths >= 3).sum()),
                                "warm_run_all_test_users": res["test"]["NDCG@10"],
                                "warm_run_test_users": len(eval_users)},
        "runs": {"cold": slim(cold), "warm": slim(warm)},
        "timing": timing,
    }


def slim(rec: dict[str, Any]) -> dict[str, Any]:
    """What the table keeps of a run record."""
    keys = ("run_dir", "how", "best_epoch", "epochs", "samples_per_s", "train_seconds", "wall_s", "test", "valid",
            "threads", "data_fingerprint")
    out = {k: rec[k] for k in keys if k in rec}
    out["seed"] = rec["config"]["train"]["seed"]
    out["configured_epochs"] = rec["config"]["train"]["epochs"]
    return out


# -- the table -----------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    return f"{x:.4f}"


def run_cell(rc: dict[str, Any]) -> str:
    return (f"{rc['epochs']} epoch{'s' * (rc['epochs'] != 1)} (best {rc['best_epoch']}), "
            f"{rc['samples_per_s']:.0f} samples/s, {rc['train_seconds']:.0f} s training")


def rank_cell(r: dict[str, Any]) -> str:
    return f"{r['median_rank']:g} ({r['rank_p25']:g}-{r['rank_p75']:g})"


def write(out: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [f"# Cold start: held-out items added to ATHWE from their content ({', '.join(meta['datasets'])})", "",
             command_line(meta["command"], False), "",
             f"Machine: CPU {meta['cpu']}, {meta['threads']} torch thread(s), device {meta['device']}, "
             f"torch {meta['torch']}; load average before {meta['load_avg']}. Held out: {meta['holdout']:.0%} of "
             f"the items, seed {meta['seed']}; epoch cap {meta['epochs'] or 'none (configured epochs)'}; "
             f"text model {meta['text_model']}.", "",
             "Protocol: the project's (docs/protocol.md): a test user's target is their last interaction, every "
             "catalogue item is ranked (no history exclusion), a target's rank is the number of items scored "
             "strictly higher (0 = first). Test users: those of the original data whose target is a held-out "
             "item, the same users in every row."]
    for res in results:
        s, rc, rw = res["sizes"], res["runs"]["cold"], res["runs"]["warm"]
        o, d = s["original"], s["derived"]
        lines += ["", f"## {res['dataset']}", "",
                  f"Original ({s['kcore']}-core): {o['users']:,} users, {o['items']:,} items, "
                  f"{o['interactions']:,} interactions. Held out: {s['held_out_items']:,} items with "
                  f"{s['held_out_interactions']:,} interactions. Derived `{res['cold_dataset']}` "
                  f"({s['kcore']}-core again): {d['users']:,} users, {d['items']:,} items, {d['interactions']:,} "
                  f"interactions; the k-core dropped {s['derived_kcore_dropped_items']:,} more items and "
                  f"{s['derived_kcore_dropped_users']:,} users. Test users: {res['test_users']:,}.", "",
                  f"ATHWE (modalities {', '.join(res['modalities'])}), training seed {rc['seed']}, at most "
                  f"{rc['configured_epochs']} epoch{'s' * (rc['configured_epochs'] != 1)} (configured "
                  f"{res['configured_epochs']}"
                  f"{', --epochs ' + str(meta['epochs']) if meta['epochs'] else ''}): cold run {run_cell(rc)}, "
                  f"warm run {run_cell(rw)}.", "",
                  "| ranking | catalogue | users | HR@10 | NDCG@10 | HR@20 | NDCG@20 | median rank (p25-p75) "
                  "| HR@10 / random |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['ranking']} | {r['catalogue']:,} | {r['users']:,} | {fmt(r['HR@10'])} | "
                         f"{fmt(r['NDCG@10'])} | {fmt(r['HR@20'])} | {fmt(r['NDCG@20'])} | {rank_cell(r)} | "
                         f"{r['hr10_vs_random']:.2f}x |")
        cold = res["rows"][0]
        ctx, among, tm = res["context_test_ndcg10"], res["cold_rank_among_added"], res["timing"]
        checks = res["warm_scoring_check"], res["retriever_check"]
        ratio = cold["hr10_vs_random"]
        untested = res["test_users_without_known_history"]
        lines += ["", f"- Cold targets' HR@10 is {ratio:.2f}x random ({'meets' if ratio >= 5 else 'below'} the 5x "
                  f"target). Among the {among['added_items']:,} added items alone the targets' median rank is "
                  f"{among['median_rank']:g} (random {among['random_median']:g}); added items fill "
                  f"{res['added_share_of_top10']:.1%} of the top 10 lists ({res['added_share_of_catalogue']:.1%} of "
                  "the catalogue).",
                  "- Histories: the test users' original sequences before the target, with timestamps. "
                  f"{res['history_positions_added_items']:,} history positions "
                  f"({res['users_with_added_items_in_history']:,} users) are held-out items: they are kept, known to "
                  f"the cold run as added items. {res['history_positions_dropped']:,} positions are items the derived "
                  "k-core dropped (not in the cold catalogue) and are left out"
                  + (f"; {untested:,} users had no known item left and are not tested" if untested else "") + ".",
                  "- Popularity counts the derived training split (each user's sequence without its last two "
                  "interactions); a held-out target has no count, so every item with one ranks above it.",
                  "- Warm ATHWE's catalogue is the original one; its ranks are the project's test evaluation of that "
                  "run (athwe.runs.evaluate_run_rows), which the scoring here reproduces for "
                  f"{checks[0]['same_rank']:,} of {checks[0]['users']:,} users; the cold run's Retriever (its index, "
                  f"exclude_history off) returns the same top 10 as the scoring here for {checks[1]['same_top10']} "
                  f"of {checks[1]['users']} users checked. The added items' raw content features differ from the "
                  "same items' features extracted with the original data by at most "
                  + ", ".join(f"{v:.1e} ({m})" for m, v in res["added_content_max_abs_diff"].items()) + ".",
                  "- Context, test NDCG@10 of each run on all its own test users: cold run "
                  f"{fmt(ctx['cold_run_own_test_users'])} ({ctx['cold_run_test_users']:,} users, derived data), "
                  f"warm run {fmt(ctx['warm_run_all_test_users'])} ({ctx['warm_run_test_users']:,} users, original "
                  "data).",
                  f"- Wall time: {tm['dataset_wall_s']:.0f} s (features {tm['features_s']:.0f} s, training "
                  f"{tm['training_s']:.0f} s, adding items {tm['add_items_s']:.0f} s, scoring {tm['scoring_s']:.0f} "
                  f"s); cold run {rc['how']}, warm run {rw['how']}, held-out items {res['items_added']}."]
    text = "\n".join(lines) + "\n"
    atomic_write_json(out + ".json", {**meta, "results": results})
    atomic_write_text(out + ".md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="demo,ml-100k", help="comma-separated; the demo is generated under --work")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                    help="where the other datasets' folders are (read only: copied under --work)")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of the items held out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (training uses the configured one)")
    ap.add_argument("--epochs", type=int, default=None, help="cap on the configured epochs, for every model trained")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (training, adding items, scoring)")
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                    help="2: train a dataset's cold and warm runs at once, one process each (for 2+ cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text-model", default="packaged-minilm", help="feature extraction text model (offline)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "athwe-cold-start"),
                    help="scratch folder (derived data, features, runs); reused, so the same command resumes")
    ap.add_argument("--fresh", action="store_true", help="train anew instead of reusing finished runs in --work")
    ap.add_argument("--quick", action="store_true", help="smoke run: the demo only, one epoch")
    ap.add_argument("--quiet", action="store_true", help="do not print the trainer's line per epoch")
    ap.add_argument("--out", required=True, help="table path without extension (writes .json and .md)")
    args = ap.parse_args()
    if args.quick:
        args.datasets, args.epochs = "demo", 1
    if not 0 < args.holdout < 1:
        ap.error("--holdout must be between 0 and 1")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    torch.set_num_threads(args.threads)
    from athwe.utils import resolve_device

    t0 = time.perf_counter()
    cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                         text=True).stdout.strip() or platform.processor()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    meta = {"command": training_command(), "datasets": datasets, "cpu": cpu, "threads": args.threads,
            "device": str(resolve_device(args.device)), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": load_avg(), "holdout": args.holdout,
            "seed": args.seed, "epochs": args.epochs, "jobs": args.jobs, "text_model": args.text_model,
            "work": args.work}
    print(f"work folder {args.work} (the same command resumes from it)", flush=True)
    results = []
    for name in datasets:
        results.append(one_dataset(name, args))
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        text = write(args.out, meta, results)
    print(text)


if __name__ == "__main__":
    run_main(main)
