"""The `athwe` command line: parses arguments, calls library functions, prints."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from athwe.errors import AthweError

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="athwe: multimodal, time-aware sequential recommendation.")
data_app = typer.Typer(add_completion=False, help="Inspect and prepare datasets.")
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _guard(fn: Callable[[], Any]) -> Any:
    """Turn user-facing errors into one line on stderr and exit code 2."""
    try:
        return fn()
    except AthweError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.filename}: file not found")
    except KeyboardInterrupt:
        typer.echo("interrupted; `athwe train --resume RUN_DIR` continues from the last finished epoch", err=True)
        raise typer.Exit(code=130)


@app.command()
def train(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (see `athwe models`). Default: sasrec."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset folder name under --data-dir. Default: the bundled demo."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Root holding <dataset>/ folders. Default: ./dataset."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with model/data/train/model_args sections."),
    set_: List[str] = typer.Option([], "--set", help="Override, e.g. --set train.lr=5e-4 --set model_args.num_heads=1 (repeatable)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Protocol preset: bsarec or recbole."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce (all items) or bce (one sampled negative)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Input length N."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Where run folders are created. Default: ./runs."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run folder to create (default: runs/<model>-<dataset>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder from its last checkpoint."),
    dry_run: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a model and report full-ranking test metrics. With no arguments: the bundled demo."""
    from athwe.config import resolve_config
    from athwe.training import trainer as tr

    def run() -> None:
        if resume is not None:
            tr.resume(resume)
            return
        flags = {"data.data_dir": data_dir, "data.preset": preset, "data.max_seq_length": max_seq_length,
                 "train.loss": loss, "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size,
                 "train.seed": seed, "train.device": device, "train.runs_dir": runs_dir}
        cfg = resolve_config(model, dataset, str(config) if config else None, set_, flags)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return
        tr.train(cfg, run_dir=run_dir)

    _guard(run)


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="A run folder written by `athwe train`."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    history: Optional[str] = typer.Option(None, "--history", help="none, zero (BSARec) or exclude. Default: the run's."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (results do not depend on it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-evaluate a run's best checkpoint with full ranking."""
    from athwe.training.trainer import evaluate_run, format_results

    def go() -> None:
        if split not in ("test", "valid"):
            raise AthweError(f"--split must be test or valid, not {split!r}")
        res = evaluate_run(run, split, history, batch_size)
        typer.echo(json.dumps(res, indent=2) if as_json else format_results(res["header"], res[split]))

    _guard(go)


def _latest_run(runs_dir: str) -> Path:
    runs = sorted((p for p in Path(runs_dir).glob("*/results.json")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise AthweError(f"{runs_dir}: no finished run found (train one with `athwe train`, or pass --run)")
    return runs[-1].parent


@app.command()
def index(
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder (default: the latest finished run in --runs-dir)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the latest run."),
    kind: str = typer.Option("auto", "--kind", help="auto (exact up to 100k items, else HNSW), flat, hnsw or ivfpq."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="HNSW graph degree."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build breadth."),
    ef_search: int = typer.Option(128, "--ef-search", help="HNSW search breadth."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default 4*sqrt(n))."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="PQ sub-quantizers (default dim/2)."),
    nprobe: int = typer.Option(32, "--nprobe", help="IVF lists searched per query."),
    refine: int = typer.Option(10, "--refine", help="IVF-PQ: re-rank refine*k candidates exactly (0 = off)."),
) -> None:
    """Build a FAISS inner-product index over a run's item vectors (saved in the run folder)."""
    from athwe.retrieval import build_run_index

    def go() -> None:
        target = run or _latest_run(runs_dir)
        meta = build_run_index(target, kind, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                               nlist=nlist, pq_m=pq_m, nprobe=nprobe, refine=refine)
        typer.echo(f"{target}/index.faiss: {meta['kind']} index over {meta['n_items']:,} items x {meta['dim']} "
                   f"(built in {meta['build_seconds']:.2f} s)")

    _guard(go)


@app.command()
def retrieve(
    user: Optional[str] = typer.Option(None, "--user", "-u", help="User token as in the dataset files."),
    k: int = typer.Option(10, "-k", "--top-k", help="How many items."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder (default: the latest finished run in --runs-dir)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the latest run."),
    exclude_history: bool = typer.Option(True, "--exclude-history/--include-history", help="Drop items the user already has."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    all_users: bool = typer.Option(False, "--all-users", help="Top-k for every user, written to --out (JSON lines)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file for --all-users."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Users per batch for --all-users."),
) -> None:
    """Top-k items for a user from a run's index, with titles when the dataset has them."""
    from athwe.retrieval import Retriever

    def go() -> None:
        if all_users == (user is not None):
            raise AthweError("pass exactly one of --user or --all-users")
        if k < 1:
            raise AthweError("-k must be at least 1")
        retriever = Retriever(run or _latest_run(runs_dir))
        if all_users:
            if out is None:
                raise AthweError("--all-users needs --out FILE")
            n = retriever.write_all(out, k, exclude_history, batch_size)
            typer.echo(f"{out}: top-{k} for {n:,} users")
            return
        recs = retriever.recommend(user, k, exclude_history)
        if as_json:
            typer.echo(json.dumps([r.__dict__ for r in recs], indent=2))
            return
        typer.echo(f"top-{k} for user {user} ({retriever.run.name}, {retriever.meta['kind']} index, "
                   f"history {'excluded' if exclude_history else 'included'})")
        for r in recs:
            typer.echo(f"{r.rank:3d}  {r.item:>12s}  {r.score:9.4f}  {r.title or ''}")

    _guard(go)


@app.command()
def models() -> None:
    """List the registered models."""
    from athwe.models import get_entry, list_models

    for name in list_models():
        typer.echo(f"{name:10s} {get_entry(name).description}")


@data_app.command("info")
def data_info(
    dataset: str = typer.Option("demo", "--dataset", "-d", help="Dataset folder name."),
    data_dir: str = typer.Option("dataset", "--data-dir", help="Root holding <dataset>/ folders."),
    kcore: int = typer.Option(0, "--kcore", help="Apply k-core filtering first (0 = none)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Users, items, interactions, sequence-length statistics and timestamp ties."""
    from athwe.dataset.sequences import load_sequences

    def go() -> None:
        if dataset == "demo":
            from athwe.dataset.demo import ensure_demo

            ensure_demo(data_dir)
        s = load_sequences(data_dir, dataset, kcore=kcore).summary()
        if as_json:
            typer.echo(json.dumps(s, indent=2))
            return
        ties = (f"{s['timestamp_ties']:,} interactions share their timestamp with the user's previous one"
                if s["has_timestamps"] else "none (no timestamps in the source; positions are used)")
        typer.echo(
            f"dataset       {s['dataset']}  ({s['source']})\n"
            f"users         {s['users']:,}\nitems         {s['items']:,}\ninteractions  {s['interactions']:,}\n"
            f"density       {s['density']:.5f}\n"
            f"seq length    min {s['seq_len_min']}  median {s['seq_len_median']:g}  mean {s['seq_len_mean']:g}  "
            f"p90 {s['seq_len_p90']:g}  max {s['seq_len_max']}\n"
            f"timestamp ties {ties}\nitem map      {s['item_fingerprint']}")

    _guard(go)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
