"""The `athwe` command line: parses arguments, calls library functions, prints."""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup

from athwe.config import MAX_BATCH, MAX_KCORE, check_int_setting, check_range
from athwe.errors import AthweError, ConfigError

try:  # recent typer carries its own copy of Click (typer._click)
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on Click itself
    from click import exceptions as click_errors

#: pydantic error types (newer typer parses option values with pydantic) -> what the value is not
_NOT_A = {"int_parsing": "a valid integer", "int_from_float": "a valid integer", "int_type": "a valid integer",
          "float_parsing": "a valid number", "float_type": "a valid number", "bool_parsing": "a valid boolean"}


def _param_name(param: Any) -> str:
    """How the user spells an option (all its names, e.g. -k/--top-k) or an argument (SOURCE)."""
    if getattr(param, "param_type_name", "") == "argument" or not getattr(param, "opts", None):
        return str(param.name or "argument").upper()
    return "/".join(param.opts)


def _bad_value(e: Any) -> str:
    """The problem with an option's value: "'abc' is not a valid integer" (from pydantic's error when
    typer parsed the value with it, else Click's own message)."""
    cause = e.__cause__
    errors = cause.errors() if cause is not None and hasattr(cause, "errors") else None
    if errors and "input" in errors[0]:
        first = errors[0]
        if first.get("type") in _NOT_A:
            return f"{first['input']!r} is not {_NOT_A[first['type']]}"
        msg = str(first.get("msg", "invalid value"))
        return f"{first['input']!r}: {msg[:1].lower()}{msg[1:]}"
    return e.message.rstrip(".")


def usage_error_line(e: Any) -> str:
    """One line for a Click usage error (bad value, unknown option, missing option or argument, unknown
    or missing command) that names the option and ends with where the command's help is."""
    ctx = e.ctx
    param = getattr(e, "param", None)
    if isinstance(e, click_errors.MissingParameter) and param is not None:
        kind = "argument" if getattr(param, "param_type_name", "") == "argument" else "option"
        text = f"{_param_name(param)}: missing (a required {kind})"
    elif isinstance(e, click_errors.BadParameter) and param is not None:
        text = f"{_param_name(param)}: {_bad_value(e)}"
    elif isinstance(e, click_errors.NoSuchOption):
        near = f" (did you mean {', '.join(sorted(e.possibilities))}?)" if e.possibilities else ""
        text = f"{e.option_name}: no such option{near}"
    elif isinstance(e, click_errors.BadOptionUsage) and "requires an argument" in e.message:
        text = f"{e.option_name}: needs a value"
    elif e.message.startswith("Missing command") and ctx is not None:
        text = f"missing command (one of {', '.join(ctx.command.list_commands(ctx))})"
    else:
        text = e.format_message().rstrip(".")
        text = text[:1].lower() + text[1:]  # "no such command 'x'", "got unexpected extra argument(s) (3)"
    names = []
    while ctx is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    if names:
        names[-1] = "athwe"  # the root's info_name is whatever the caller named the program
        text += f" (see `{' '.join(reversed(names))} --help`)"
    return " ".join(text.split())


class OneLineErrorGroup(TyperGroup):
    """The `athwe` group: Click's own parse errors (a bad value, an unknown option, a missing option or
    argument) come out as one `error: ...` line with exit code 2 like athwe's own errors, instead of a
    usage box. Done in main() so it holds for the console script and for CliRunner alike."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # help asked for by giving nothing: not an error
            e.show()
            sys.exit(e.exit_code)
        except click_errors.UsageError as e:
            typer.echo(f"error: {usage_error_line(e)}", err=True)
            sys.exit(2)
        except click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # non-standalone main() returns an Exit's code, or the command's return value (None: success)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


app = typer.Typer(cls=OneLineErrorGroup, add_completion=False, no_args_is_help=False,
                  pretty_exceptions_enable=False, help="athwe: multimodal, time-aware sequential recommendation.")
data_app = typer.Typer(add_completion=False, help="Inspect and prepare datasets.")
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


#: the largest values of CLI-only options: beyond them a value is a typo, and FAISS or the downloader
#: would allocate, overflow a C integer or wait for ever rather than fail cleanly
MAX_EXTRACT_BATCH = 100_000
MAX_HNSW_M = 1024
MAX_EF = 10**6
MAX_NLIST = 10**7
MAX_PQ_M = 4096
MAX_NPROBE = 10**6
MAX_REFINE = 1000
MAX_WORKERS = 256
MAX_TIMEOUT_S = 3600.0
MAX_RETRIES = 100
MAX_IMAGE_BYTES = 10**10


def _check_flag(option: str, key: str, value: int | None) -> None:
    """A train flag's range (the config's, see athwe.config.INT_RANGES), named by option and setting."""
    if value is not None:
        try:
            check_int_setting(key, value)
        except ConfigError as e:
            raise ConfigError(f"{option}: {e}") from None


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A warnings.showwarning that prints athwe's own warnings (all worded "athwe: ...") as one
    "warning: ..." line on stderr, without source path and line (they are often raised from a torch
    hook), and leaves other libraries' warnings to `show`."""
    def showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                    line: Any = None) -> None:
        if str(message).startswith("athwe:"):
            typer.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _guard(fn: Callable[[], Any], interrupted: str = "interrupted; `athwe train --resume RUN_DIR` continues from "
                                                      "the last finished epoch") -> Any:
    """Turn user-facing errors into one line on stderr and exit code 2 (and athwe's warnings into
    one line each); Ctrl-C prints `interrupted` and exits with 130."""
    show = warnings.showwarning
    warnings.showwarning = _one_line_warnings(show)
    try:
        return fn()
    except AthweError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.filename}: file not found")
    except OSError as e:  # an output path that is a directory, a parent that is a file, no permission...
        _fail(f"{e.filename}: {e.strerror or e}" if e.filename else f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(code=130)
    finally:
        warnings.showwarning = show


@app.command()
def train(
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Model name (see `athwe models`). Default: athwe (the demo trains it on ID + text features)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", "-d", help="Dataset folder name under --data-dir. Default: the bundled demo."),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="Root holding <dataset>/ folders. Default: ./dataset."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML file with model/data/train/model_args sections."),
    set_: List[str] = typer.Option(
        [], "--set", help="Override, e.g. --set train.lr=5e-4 --set model_args.num_heads=1 (repeatable)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Protocol preset: bsarec or recbole."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce (all items) or bce (one sampled negative)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Input length N."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    threads: Optional[int] = typer.Option(
        None, "--threads",
        help=("CPU threads for torch (train.num_threads; 0 = the CPUs free when the run starts). "
              "With --resume: the threads for the rest of the run.")),
    precision: Optional[str] = typer.Option(
        None, "--precision",
        help=("fp32 (default) or bf16: training steps under bfloat16 autocast (on a CPU, faster only with AMX / "
              "AVX-512 BF16); evaluation stays fp32.")),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Where run folders are created. Default: ./runs."),
    run_dir: Optional[Path] = typer.Option(
        None, "--run-dir", help="Exact run folder to create (default: runs/<model>-<dataset>-<time>)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an interrupted run folder from its last checkpoint."),
    dry_run: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a model and report full-ranking test metrics. With no arguments: the bundled demo."""
    from athwe.config import resolve_config
    from athwe.models import check_run_config
    from athwe.runs import saved_config
    from athwe.training import trainer as tr

    def run() -> None:
        for option, key, value in (("--epochs", "train.epochs", epochs), ("--seed", "train.seed", seed),
                                   ("--batch-size", "train.batch_size", batch_size),
                                   ("--threads", "train.num_threads", threads),
                                   ("--max-seq-length", "data.max_seq_length", max_seq_length)):
            _check_flag(option, key, value)
        if lr is not None and not 0 < lr < math.inf:  # also false for NaN
            raise ConfigError(f"--lr: train.lr must be a positive number, got {lr}")
        if resume is not None:
            tr.resume(resume, num_threads=threads)
            return
        flags = {"data.data_dir": data_dir, "data.preset": preset, "data.max_seq_length": max_seq_length,
                 "train.loss": loss, "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size,
                 "train.seed": seed, "train.device": device, "train.precision": precision,
                 "train.num_threads": threads, "train.runs_dir": runs_dir}
        cfg = resolve_config(model, dataset, str(config) if config else None, set_, flags)
        check_run_config(cfg)
        if dry_run:  # what the run folder's config.yaml would hold: every model setting, defaults included
            import yaml

            typer.echo(yaml.safe_dump(saved_config(cfg), sort_keys=False))
            return
        tr.train(cfg, run_dir=run_dir)

    _guard(run)


@app.command()
def runs(
    runs_dir: str = typer.Option("runs", "--runs-dir", help="The folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the run folders: model, dataset, status, epochs, best validation metric, test NDCG@10."""
    from athwe.runs import list_runs

    def go() -> None:
        rows = list_runs(runs_dir)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo(f"{runs_dir}: no runs yet (`athwe train` writes one)")
            return
        head = (f"{'run':34s} {'model':8s} {'dataset':18s} {'status':10s} {'epochs':>8s} {'best valid':>18s} "
                f"{'test NDCG@10':>12s}")
        typer.echo(head)
        for r in rows:
            best = (f"{r['valid_metric']} {r['best_valid']:.4f}@{r['best_epoch']}" if r["best_valid"] is not None
                    else "-")
            test = f"{r['test_NDCG@10']:.4f}" if r["test_NDCG@10"] is not None else "-"
            typer.echo(f"{Path(r['run']).name[:34]:34s} {r['model'][:8]:8s} {r['dataset'][:18]:18s} "
                       f"{r['status'][:10]:10s} "
                       f"{str(r['epochs']) + '/' + str(r['max_epochs']):>8s} {best:>18s} {test:>12s}")
        stopped = [r for r in rows if r["status"] == "unfinished"]
        if stopped:
            typer.echo(f"{len(stopped)} unfinished run(s): one that is not training any more continues with "
                       f"`athwe train --resume RUN_DIR`")

    _guard(go)


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="A run folder written by `athwe train`."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    history: Optional[str] = typer.Option(
        None, "--history", help="none, zero (BSARec) or exclude. Default: the run's."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Evaluation batch size (results do not depend on it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-evaluate a run's best checkpoint with full ranking."""
    from athwe.evaluation.metrics import HISTORY_MODES
    from athwe.runs import evaluate_run, format_results

    def go() -> None:
        if split not in ("test", "valid"):
            raise AthweError(f"--split must be test or valid, not {split!r}")
        if history is not None and history not in HISTORY_MODES:
            raise AthweError(f"--history must be one of {', '.join(HISTORY_MODES)}, not {history!r}")
        if batch_size is not None:
            check_range("--batch-size", batch_size, 1, MAX_BATCH)
        res = evaluate_run(run, split, history, batch_size)
        typer.echo(json.dumps(res, indent=2) if as_json else format_results(res["header"], res[split]))

    _guard(go)


@app.command()
def index(
    run: Optional[Path] = typer.Option(
        None, "--run", help="Run folder (default: the latest finished run in --runs-dir)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the latest run."),
    kind: str = typer.Option(
        "auto", "--kind",
        help="auto (exact up to 100k items, else IVF-PQ with exact re-ranking), flat, hnsw or ivfpq."),
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
    from athwe.runs import latest_run

    def go() -> None:
        check_range("--hnsw-m", hnsw_m, 2, MAX_HNSW_M)
        check_range("--ef-construction", ef_construction, 1, MAX_EF)
        check_range("--ef-search", ef_search, 1, MAX_EF)
        if nlist is not None:
            check_range("--nlist", nlist, 1, MAX_NLIST)
        if pq_m is not None:
            check_range("--pq-m", pq_m, 1, MAX_PQ_M)
        check_range("--nprobe", nprobe, 1, MAX_NPROBE)
        check_range("--refine", refine, 0, MAX_REFINE, zero="0 = no exact re-ranking")
        target = run or latest_run(runs_dir)
        meta = build_run_index(target, kind, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                               nlist=nlist, pq_m=pq_m, nprobe=nprobe, refine=refine)
        typer.echo(f"{target}/index.faiss: {meta['kind']} index over {meta['n_items']:,} items x {meta['dim']} "
                   f"(built in {meta['build_seconds']:.2f} s)")

    _guard(go)


def _tokens_option(option: str, text: str) -> list[str]:
    """A comma-separated list of tokens (--items, --exclude); an empty entry is an error."""
    tokens = [t.strip() for t in text.split(",")]
    empty = [i for i, t in enumerate(tokens, 1) if not t]
    if empty:
        raise AthweError(f"{option}: entry {empty[0]} is empty (give comma-separated item tokens, e.g. a,b,c)")
    return tokens


def _timestamps_option(text: str) -> list[float]:
    """--timestamps: comma-separated unix times in seconds."""
    out = []
    for i, t in enumerate(text.split(","), 1):
        try:
            out.append(float(t))
        except ValueError:
            raise AthweError(f"--timestamps: entry {i} ({t.strip()!r}) is not a number (unix seconds)") from None
    return out


@app.command()
def retrieve(
    user: Optional[str] = typer.Option(None, "--user", "-u", help="User token as in the dataset files."),
    items: Optional[str] = typer.Option(
        None, "--items", help="A history instead of a user: item tokens, oldest first, comma-separated (a,b,c)."),
    timestamps: Optional[str] = typer.Option(
        None, "--timestamps", help="With --items: unix seconds per item, comma-separated (required when the "
                                   "model reads them, e.g. ATHWE with time-routed experts)."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Item tokens never to return, comma-separated."),
    k: int = typer.Option(10, "-k", "--top-k", help="How many items."),
    run: Optional[Path] = typer.Option(
        None, "--run", help="Run folder (default: the latest finished run in --runs-dir)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the latest run."),
    exclude_history: bool = typer.Option(
        True, "--exclude-history/--include-history", help="Drop items the history already has."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    all_users: bool = typer.Option(False, "--all-users", help="Top-k for every user, written to --out (JSON lines)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file for --all-users."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Users per batch for --all-users."),
) -> None:
    """Top-k items for a user or any history of items, from a run's index, with titles when the
    dataset has them."""
    from athwe.retrieval import Retriever
    from athwe.runs import latest_run

    def go() -> None:
        if sum((all_users, user is not None, items is not None)) != 1:
            raise AthweError("pass exactly one of --user, --items or --all-users")
        if timestamps is not None and items is None:
            raise AthweError("--timestamps goes with --items (a user's come from the dataset)")
        if exclude is not None and all_users:
            raise AthweError("--exclude goes with --user or --items")
        if k < 1:  # at most the catalogue's size: checked once the run is loaded
            raise AthweError(f"-k must be at least 1, got {k}")
        check_range("--batch-size", batch_size, 1, MAX_BATCH)
        history = _tokens_option("--items", items) if items is not None else None
        times = _timestamps_option(timestamps) if timestamps is not None else None
        never = _tokens_option("--exclude", exclude) if exclude is not None else []
        if all_users:
            if out is None:
                raise AthweError("--all-users needs --out FILE")
            if out.is_dir():
                raise AthweError(f"{out}: --out is a directory; give a file path")
            if any(p.exists() and not p.is_dir() for p in out.parents):
                raise AthweError(f"{out}: a parent of --out is a file, not a directory")
        retriever = Retriever(run or latest_run(runs_dir))
        if all_users:
            n = retriever.write_all(out, k, exclude_history, batch_size)
            typer.echo(f"{out}: top-{k} for {n:,} users")
            return
        recs = retriever.recommend(user, items=history, timestamps=times, k=k, exclude=never,
                                   exclude_history=exclude_history)
        if as_json:
            typer.echo(json.dumps([r.__dict__ for r in recs], indent=2))
            return
        who = f"user {user}" if user is not None else f"a history of {len(history or [])} item(s)"
        typer.echo(f"top-{k} for {who} ({retriever.run.name}, {retriever.meta['kind']} index, "
                   f"history {'excluded' if exclude_history else 'included'})")
        for r in recs:
            typer.echo(f"{r.rank:3d}  {r.item:>12s}  {r.score:9.4f}  {r.title or ''}")

    _guard(go)


items_app = typer.Typer(add_completion=False, help="Add items a run was not trained on, from their content (ATHWE).")
app.add_typer(items_app, name="items")


@items_app.command("add")
def items_add(
    file: Path = typer.Argument(..., help="JSON lines, one new item per line: item, title, categories, brand, "
                                          "description, image (a path or an http(s) URL)."),
    run: Path = typer.Option(..., "--run", help="Run folder of an ATHWE run with text or image features."),
    id_part: str = typer.Option(
        "content", "--id-part", help="The new items' ID part: content (predicted from their content by a ridge "
                                     "map fitted on the trained items) or mean (the mean trained ID embedding)."),
) -> None:
    """Embed new items as the dataset's features were extracted and add them to a run's catalogue
    (recorded in RUN/added_items/; the checkpoint, item map and index file stay as trained)."""
    from athwe.retrieval import Retriever, new_items

    def go() -> None:
        retriever = Retriever(run, id_part=id_part)
        reason = new_items.refusal(retriever.model, retriever.cfg.model)
        if reason is not None:
            raise AthweError(reason)
        tokens = retriever.add_items(new_items.read_new_items(file))
        ids = [retriever.token_index[t] for t in tokens]
        span = f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]}..{ids[-1]}"
        info = retriever.info()
        typer.echo(f"{run}: added {len(tokens):,} item(s), {span} (catalogue: {info['trained_items']:,} trained + "
                   f"{info['added_items']:,} added)")
        for tok, i in zip(tokens, ids):
            typer.echo(f"{i:8d}  {tok}")

    _guard(go)


@items_app.command("list")
def items_list(
    run: Path = typer.Option(..., "--run", help="Run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The items added to a run from their content, in the order they were added."""
    from athwe.retrieval import Retriever

    def go() -> None:
        retriever = Retriever(run)
        rows = [retriever.item(tok) for tok in retriever.tokens[retriever.data.n_items + 1:]]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo(f"{run}: no added items")
            return
        for r in rows:
            typer.echo(f"{r['id']:8d}  {r['token']:>12s}  {r['title'] or ''}")

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
    """Users, items, interactions, sequence-length statistics, timestamp ties and gaps."""
    from athwe.dataset.sequences import format_seconds, load_sequences

    def go() -> None:
        check_range("--kcore", kcore, 0, MAX_KCORE, zero="0 = no filtering")
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
            f"timestamp ties {ties}\n"
            + (f"gaps          {'  '.join(f'{k} {format_seconds(v)}' for k, v in s['gap_seconds'].items())}"
               "  (between a user's consecutive interactions)\n" if s["gap_seconds"] else "")
            + f"item map      {s['item_fingerprint']}")

    _guard(go)


IMPORT_FORMATS = {"2014": "amazon2014", "2018": "amazon2018", "2023": "amazon2023"}


@data_app.command("import")
def data_import(
    source: Path = typer.Argument(
        ..., help=("Amazon reviews file (2014/2018 JSON lines, 2023 JSONL or CSV), a RecBole atomic folder or "
                   ".inter file, or a BSARec .txt file.")),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name: the folder <data-dir>/<name>/ to create."),
    meta: Optional[Path] = typer.Option(
        None, "--meta", help="Amazon metadata file (default: a meta_<Category> file beside SOURCE)."),
    fmt: str = typer.Option("auto", "--format", help="auto, 2014, 2018, 2023, atomic or txt."),
    kcore: int = typer.Option(0, "--kcore", help="Keep users and items with >= K interactions (0 = off)."),
    data_dir: str = typer.Option("dataset", "--data-dir", help="Root holding <dataset>/ folders."),
    skip_bad_lines: bool = typer.Option(
        False, "--skip-bad-lines", help="Skip and count malformed lines instead of failing."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing dataset folder (downloaded images are kept)."),
    no_find_meta: bool = typer.Option(False, "--no-find-meta", help="Do not look for a metadata file beside SOURCE."),
    as_json: bool = typer.Option(False, "--json", help="Print the import summary as JSON."),
) -> None:
    """Import raw interactions (and Amazon metadata) into a dataset folder."""
    from athwe.dataset.importers import import_dataset

    def go() -> None:
        check_range("--kcore", kcore, 0, MAX_KCORE, zero="0 = no filtering")
        s = import_dataset(source, data_dir, name, fmt=IMPORT_FORMATS.get(fmt, fmt), meta=meta, kcore=kcore,
                           skip_bad_lines=skip_bad_lines, overwrite=overwrite, find_meta=not no_find_meta,
                           progress=not as_json)
        if as_json:
            typer.echo(json.dumps(s, indent=2))
            return
        typer.echo(f"{s['out_dir']}: {s.get('users', 0):,} users, {s.get('items', 0):,} items, "
                   f"{s.get('interactions', 0):,} interactions ({s['format']}, {s['elapsed_s']:.1f} s)")
        if "items_with_metadata" in s:
            typer.echo(f"metadata: {s['items_with_metadata']:,} items with, {s['items_without_metadata']:,} without; "
                       f"{s.get('items_without_image_url', 0):,} items without an image URL")
        if s.get("bad_lines"):
            typer.echo(f"skipped {s['bad_lines']:,} malformed lines (e.g. {s['bad_line_examples'][0]})")

    _guard(go)


@data_app.command("images")
def data_images(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset folder name."),
    data_dir: str = typer.Option("dataset", "--data-dir", help="Root holding <dataset>/ folders."),
    workers: int = typer.Option(8, "--workers", help="Concurrent downloads."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per socket operation."),
    retries: int = typer.Option(2, "--retries", help="Retries per URL on timeouts, connection errors and 5xx."),
    max_bytes: int = typer.Option(5_000_000, "--max-bytes", help="Largest image accepted, in bytes."),
) -> None:
    """Download item images into <dataset>/images/ (resumable; a manifest records every item)."""
    from athwe.dataset.images import download_dataset_images

    def go() -> None:
        folder = Path(data_dir) / dataset
        check_range("--workers", workers, 1, MAX_WORKERS)
        if not 0 < timeout <= MAX_TIMEOUT_S:  # also false for NaN
            raise AthweError(f"--timeout must be above 0 and at most {MAX_TIMEOUT_S:,.0f} seconds, got {timeout:g}")
        check_range("--retries", retries, 0, MAX_RETRIES)
        check_range("--max-bytes", max_bytes, 1, MAX_IMAGE_BYTES)
        m = download_dataset_images(folder, dataset, max_workers=workers, timeout=timeout, retries=retries,
                                    max_bytes=max_bytes)
        counts = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items()) or "no items"
        typer.echo(f"{folder / 'images'}: {m['with_image']:,} of {len(m['items']):,} items have an image "
                   f"({counts}; {m['elapsed_s']:.1f} s)")

    _guard(go)


@app.command()
def extract(
    dataset: str = typer.Option(
        "demo", "--dataset", "-d", help="Dataset folder name under --data-dir. Default: the bundled demo."),
    data_dir: str = typer.Option("dataset", "--data-dir", help="Root holding <dataset>/ folders."),
    text_model: Optional[str] = typer.Option(
        None, "--text-model",
        help=("Hugging Face name or local folder (default: bert-base-uncased; the packaged all-MiniLM-L6-v2 for the "
              "demo; 'packaged-minilm').")),
    text_pooling: str = typer.Option(
        "auto", "--text-pooling", help="auto (sentence-transformers settings, else cls), cls or mean."),
    text_fields: Optional[str] = typer.Option(
        None, "--text-fields", help="Comma-separated .item columns (default: title,categories,brand)."),
    text_template: Optional[str] = typer.Option(
        None, "--text-template", help="Format string over .item columns, e.g. '{title}, {release_year}'."),
    image_model: Optional[str] = typer.Option(
        None, "--image-model", help="open_clip architecture (default: ViT-L-14; ViT-B-16 with --image-pooling cls)."),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", help="open_clip weights tag or checkpoint file (default: openai)."),
    image_pooling: str = typer.Option(
        "embed", "--image-pooling",
        help="embed (CLIP image embedding) or cls (HM4SR: CLS token before the projection)."),
    no_text: bool = typer.Option(False, "--no-text", help="Skip text features."),
    no_image: bool = typer.Option(False, "--no-image", help="Skip image features."),
    no_categories: bool = typer.Option(False, "--no-categories", help="Skip category features."),
    all_category_paths: bool = typer.Option(
        False, "--all-category-paths",
        help="Multi-hot over every category path (from <name>.meta.jsonl), not just the first."),
    batch_size: int = typer.Option(64, "--batch-size", help="Items per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    kcore: int = typer.Option(0, "--kcore", help="The k-core filter training will use (the item map must match)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace features already extracted."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Extract text, image and category features into <dataset>/features/ (resumable)."""
    from athwe.feature_extraction.extract import extract_features, summarize

    def go() -> None:
        check_range("--batch-size", batch_size, 1, MAX_EXTRACT_BATCH)
        check_range("--kcore", kcore, 0, MAX_KCORE, zero="0 = no filtering")
        if image_pooling not in ("embed", "cls"):
            raise AthweError(f"--image-pooling must be embed or cls, not {image_pooling!r}")
        if text_pooling not in ("auto", "cls", "mean"):
            raise AthweError(f"--text-pooling must be auto, cls or mean, not {text_pooling!r}")
        fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields else None
        try:
            m = extract_features(dataset, data_dir, text=not no_text, image=not no_image, categories=not no_categories,
                                 text_model=text_model, text_pooling=text_pooling, text_fields=fields,
                                 text_template=text_template, image_model=image_model, pretrained=pretrained,
                                 image_pooling=image_pooling, all_category_paths=all_category_paths,
                                 batch_size=batch_size, device=device, kcore=kcore, overwrite=overwrite,
                                 progress=not as_json, log=lambda msg: typer.echo(msg, err=True))
        except KeyboardInterrupt:
            typer.echo("interrupted; run the same command again to resume from the last finished batch", err=True)
            raise typer.Exit(code=130)
        if as_json:
            typer.echo(json.dumps(m, indent=2))
            return
        for line in summarize(m, Path(data_dir) / dataset / "features"):
            typer.echo(line)

    _guard(go)


@app.command()
def serve(
    run: Optional[Path] = typer.Option(
        None, "--run", help="Run folder (default: the latest finished run in --runs-dir)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the latest run."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most /recommend requests answered by one model pass."),
    max_wait_ms: float = typer.Option(
        2.0, "--max-wait-ms", help="Longest wait for a batch to fill after its first request, in ms."),
    batching: bool = typer.Option(
        True, "--batching/--no-batching", help="Gather concurrent requests into batches (off: one pass each)."),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", help="Largest request body accepted."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="torch and FAISS threads of the model (default: the libraries' own)."),
    log_level: str = typer.Option("info", "--log-level", help="critical, error, warning, info or debug."),
) -> None:
    """Serve a run's recommendations over HTTP (FastAPI; API docs at /docs) until Ctrl-C or SIGTERM."""
    from athwe.runs import latest_run
    from athwe.serving import serve as serve_run

    def go() -> None:
        if log_level not in ("critical", "error", "warning", "info", "debug"):
            raise AthweError(f"--log-level must be one of critical, error, warning, info, debug; got {log_level!r}")
        try:
            serve_run(run or latest_run(runs_dir), host=host, port=port, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, batching=batching, log_level=log_level,
                      max_body_bytes=max_body_bytes, threads=threads)
        except KeyboardInterrupt:  # Ctrl-C while the run loads, before the server handles the signals
            raise typer.Exit(code=130)

    _guard(go)



@app.command()
def tune(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (see `athwe models`)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", "-d", help="Dataset folder name under --data-dir. Default: the bundled demo."),
    space: Optional[Path] = typer.Option(
        None, "--space", help="Search space YAML. Default: the model's athwe/configs/spaces/<model>.yaml."),
    trials: int = typer.Option(20, "--trials", help="Finished (complete or pruned) trials to reach, earlier "
                                                     "sessions included."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds after which no new trial starts (the one under way finishes)."),
    study: Optional[Path] = typer.Option(
        None, "--study", help="Study folder (default: studies/<model>-<dataset>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --study (after a kill too)."),
    set_: List[str] = typer.Option(
        [], "--set", help="Override for every trial, e.g. --set train.batch_size=512 (repeatable)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Root holding <dataset>/ folders."),
    epochs_cap: Optional[int] = typer.Option(
        None, "--epochs-cap", help="At most this many epochs per trial (best.yaml keeps the full budget)."),
    sampler_seed: int = typer.Option(0, "--sampler-seed", help="Seed of the TPE sampler."),
) -> None:
    """Search a model's hyper-parameters on validation (Optuna TPE, median pruning); resumable."""
    from athwe import tuning

    def go() -> None:
        flags = {"data.data_dir": data_dir}
        res = tuning.run_study(model, dataset, space, trials=trials, timeout=timeout, study_dir=study, resume=resume,
                        overrides=set_, flags=flags if data_dir else {}, epochs_cap=epochs_cap, seed=sampler_seed,
                        printer=typer.echo)
        if res["best_trial"] is None:
            typer.echo(f"no trial completed yet; see {Path(res['study']) / tuning.TRIALS_MD}")
            return
        typer.echo(f"best: trial {res['best_trial']}, valid {res['best_value']:.4f}; {res['best_yaml']} "
                   f"(athwe train --config {res['best_yaml']}); all trials: {Path(res['study']) / tuning.TRIALS_MD}")

    _guard(go, "interrupted; `athwe tune --study DIR --resume` continues the study")


def main() -> None:  # pragma: no cover
    from athwe.utils import keep_freed_memory

    keep_freed_memory()
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
