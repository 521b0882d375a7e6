"""Load on `athwe serve` over loopback: requests/s, latency and server memory under concurrent
keep-alive clients, with request batching on and off.

    python benchmarks/serve_load.py [--seconds 30] [--clients 1,4,16] [--sasrec-run RUN] [--athwe-run RUN]
                                    [--out benchmarks/results/serve_load]
    python benchmarks/serve_load.py --quick      # 2 s per cell, a 20k-item catalogue: a smoke run

Targets: a SASRec and an ATHWE run on the demo (trained for --epochs in a scratch folder unless
--sasrec-run / --athwe-run name finished runs), and a SASRec run over a synthetic catalogue of
--catalogue-items items (a quarter as many users x 8 interactions) whose weights are its untrained
random initialisation, with an IVF-PQ index: what serving costs at that size, not what it
recommends. Each target's server (`python -m athwe.cli serve`, one torch/FAISS thread, since the
load generator shares the CPUs) is started once per batching mode; C clients (one asyncio process,
one keep-alive HTTP/1.1 connection each) then send requests back to back for --seconds per C. Half the
requests name a known user, half send a known user's history as items + timestamps (k=10).
Server RSS (VmRSS) is read before and after each cell. Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from athwe.utils import atomic_write_json, atomic_write_text  # noqa: E402

K = 10
#: how long a server may take to load its run and answer /health, and to stop after SIGINT
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


# -- targets ---------------------------------------------------------------------------------------
def train_demo(model: str, scratch: Path, epochs: int) -> Path:
    """A run of `model` on the demo (generated in the scratch folder), trained for `epochs`."""
    from athwe.config import resolve_config
    from athwe.training import train

    marker = scratch / f"demo-{model}-{epochs}.run"
    if marker.is_file() and (Path(marker.read_text()) / "index.faiss").is_file():
        return Path(marker.read_text())
    cfg = resolve_config(model, "demo", overrides=[f"train.epochs={epochs}"],
                         flags={"data.data_dir": str(scratch / "data"), "train.runs_dir": str(scratch / "runs")})
    print(f"training {model} on the demo for {epochs} epoch(s) in {scratch}", flush=True)
    run, _ = train(cfg, printer=lambda s: None, progress=False)
    marker.write_text(str(run))
    return run


def write_catalogue(data_dir: Path, name: str, n_items: int, per_user: int = 8, seed: int = 0) -> None:
    """A RecBole .inter file: n_items * 2 / per_user users x per_user interactions, every item at
    least once (a permutation of all items, then as many uniform draws), increasing timestamps."""
    rng = np.random.default_rng(seed)
    n_users = 2 * n_items // per_user
    items = np.concatenate([rng.permutation(n_items), rng.integers(0, n_items, n_users * per_user - n_items)])
    items = rng.permutation(items).reshape(n_users, per_user) + 1
    times = 1_600_000_000 + np.cumsum(rng.integers(60, 86_400, size=(n_users, per_user)), axis=1)
    users = np.repeat(np.arange(n_users), per_user)
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"u{u}\ti{i}\t{t}" for u, i, t in zip(users, items.ravel(), times.ravel()))
    atomic_write_text(folder / f"{name}.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + lines + "\n")


def untrained_run(scratch: Path, n_items: int) -> Path:
    """A SASRec run over a synthetic catalogue whose best checkpoint is its random initialisation,
    with an IVF-PQ index, written through the project's own run-folder functions."""
    import torch

    from athwe import runs
    from athwe.config import resolve_config
    from athwe.dataset.sequences import load_sequences
    from athwe.models import create_model
    from athwe.retrieval.index import write_run_index

    name = f"synthetic{n_items}"
    data_dir = scratch / "data"
    marker = scratch / f"{name}.run"
    if marker.is_file() and (Path(marker.read_text()) / "index.faiss").is_file():
        return Path(marker.read_text())
    print(f"writing a {n_items:,}-item catalogue and an untrained SASRec run with an IVF-PQ index", flush=True)
    write_catalogue(data_dir, name, n_items)
    cfg = resolve_config("sasrec", name, flags={"data.data_dir": str(data_dir), "train.device": "cpu",
                                               "train.runs_dir": str(scratch / "runs")})
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    torch.manual_seed(0)
    model = create_model(cfg.model, data.n_items, cfg.data.max_seq_length, cfg.model_args, cfg.train.loss, None)
    model.eval()
    run = runs.new_run_dir(cfg)
    runs.save_run_files(run, cfg, data)
    runs.save_best(run, model)
    write_run_index(run, model, data.item_fingerprint, kind="ivfpq")
    marker.write_text(str(run))
    return run


def request_bodies(run: Path, n: int, seed: int = 0) -> list[bytes]:
    """n JSON bodies for random known users: alternately by user and by history (items + timestamps,
    the last max_seq_length interactions)."""
    from athwe.dataset.sequences import load_sequences
    from athwe.runs import load_run_config

    cfg = load_run_config(run)
    data = load_sequences(cfg.data.data_dir, cfg.data.dataset, kcore=cfg.data.kcore)
    rng = np.random.default_rng(seed)
    bodies = []
    for j, u in enumerate(rng.integers(0, data.n_users, n)):
        if j % 2 == 0:
            body = {"user": data.user_tokens[u], "k": K}
        else:
            a, b = int(data.offsets[u]), int(data.offsets[u + 1])
            a = max(a, b - cfg.data.max_seq_length)
            body = {"items": [data.item_tokens[i] for i in data.items[a:b].tolist()],
                    "timestamps": data.times[a:b].tolist(), "k": K}
        bodies.append(json.dumps(body).encode())
    return bodies


# -- the server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    """`python -m athwe.cli serve` on a free loopback port, ready once /health answers."""

    def __init__(self, run: Path, batching: bool, args: argparse.Namespace, log: Path):
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-m", "athwe.cli", "serve", "--run", str(run), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", str(args.server_threads), "--log-level", "warning",
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        if not batching:
            cmd.append("--no-batching")
        self.log, self.stderr = log, open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr)
        t0, deadline = time.perf_counter(), time.perf_counter() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited with {self.proc.returncode}: {self.last_log_line()}")
            if time.perf_counter() > deadline:
                self.stop()
                raise SystemExit(f"error: the server did not answer /health within {START_TIMEOUT_S:.0f} s")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0

    def last_log_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def stop(self) -> dict:
        """SIGINT, then the exit code and how long the graceful shutdown took (killed if it hangs)."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = f"killed after {STOP_TIMEOUT_S:.0f} s"
        self.stderr.close()
        return {"exit": code, "stop_s": round(time.perf_counter() - t0, 2)}


# -- the load --------------------------------------------------------------------------------------
async def http_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes) -> int:
    """One HTTP/1.1 POST on a keep-alive connection: the status once the whole response is read.
    Written on asyncio streams rather than with an HTTP client library: the load generator shares
    the CPUs with the server, so it should spend as little of them as it can, and a client's own
    connection pool would add its queueing to the latencies measured."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:  # the server always sends Content-Length; anything else is a broken answer
        raise ConnectionError("response without Content-Length")
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` keep-alive connections sending bodies back to back for `seconds`; latency of each
    answer, from the first byte sent to the last byte read."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    nxt = 0

    async def one_client() -> None:
        nonlocal nxt
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                body = bodies[nxt % len(bodies)]
                nxt += 1
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(http_post(reader, writer, "/recommend", body), 60.0)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
        finally:
            writer.close()

    # warm-up: a connection per client and a few requests, not counted
    end = time.perf_counter() + 0.3
    await asyncio.gather(*(one_client() for _ in range(clients)))
    latencies.clear()
    errors.clear()
    t0 = time.perf_counter()
    end = t0 + seconds
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": sum(errors.values()),
            "error_kinds": errors}


def http_stack() -> str:
    """uvicorn's HTTP parser and event loop in this environment (its "auto" choice, which the
    servers started here make too)."""
    from importlib.util import find_spec

    parser = "httptools" if find_spec("httptools") else "h11"
    loop = "uvloop" if find_spec("uvloop") else "asyncio"
    return f"uvicorn with {parser} and {loop}"


# -- report ----------------------------------------------------------------------------------------
def write(out: Path, command: str, env: dict, targets: list[dict], rows: list[dict], args: argparse.Namespace) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"command": command, "env": env, "targets": targets, "rows": rows})
    lines = ["# Serving: requests/s and latency of `athwe serve` under load", "",
             f"Command: `{command}`", "",
             f"{env['cpus']} CPUs ({env['machine']}), torch {env['torch']}, faiss {env['faiss']}, "
             f"{env.get('http', 'uvicorn')}. Loopback only. "
             f"The server runs with {args.server_threads} torch/FAISS thread(s) because the load generator "
             f"(one asyncio process, one keep-alive HTTP/1.1 connection per client on asyncio streams) "
             f"shares the CPUs with it; "
             f"batching on: at most {args.max_batch} requests per model call, waiting at most "
             f"{args.max_wait_ms:g} ms for a batch to fill. Each cell: {args.seconds:g} s of requests sent back "
             f"to back by every client, half by user and half by history (items + timestamps), k={K}. "
             f"RSS: the server's VmRSS before and after the cell. "
             f"Load average before/after: {env['load_avg_before']} / {env['load_avg_after']}.", "",
             "| target | clients | batching | req/s | p50 ms | p95 ms | p99 ms | errors | RSS before/after MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['rss_before_mb']:.0f} / {r['rss_after_mb']:.0f}" if r["rss_after_mb"] else "-"
        lines.append(f"| {r['target']} | {r['clients']} | {'on' if r['batching'] else 'off'} | {r['req_per_s']:,.1f} "
                     f"| {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {rss} |")
    lines += ["", "| target | run | items | index | server start s (batching on / off) | exit after SIGINT |",
              "|---|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['label']} | `{t['run']}` | {t['n_items']:,} | {t['index']} | "
                     f"{' / '.join(str(s) for s in t['start_s'])} | {'; '.join(t['stops'])} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out.with_suffix(".md"), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="load per cell")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--targets", default="sasrec,athwe,catalogue")
    ap.add_argument("--sasrec-run", default=None, help="a finished SASRec demo run (default: train one)")
    ap.add_argument("--athwe-run", default=None, help="a finished ATHWE demo run (default: train one)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the demo runs trained here")
    ap.add_argument("--catalogue-items", type=int, default=1_000_000)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--scratch", default=None, help="folder for data, runs and server logs (default: a new "
                                                     "temporary folder); reused when given again")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 s per cell, 1 epoch, a 20,000-item catalogue, results in the scratch folder")
    ap.add_argument("--out", default=None, help="table path without suffix (default benchmarks/results/serve_load)")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="athwe-serve-load-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.seconds, args.epochs, args.catalogue_items = 2.0, 1, 20_000
    out = Path(args.out or (scratch / "serve_load_quick" if args.quick else ROOT / "benchmarks/results/serve_load"))
    os.environ.setdefault("ATHWE_CACHE_DIR", str(scratch / "cache"))  # for this process and the servers
    import faiss
    import torch

    env = {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
           "faiss": faiss.__version__, "http": http_stack(), "load_avg_before": [round(v, 2) for v in os.getloadavg()]}
    targets, rows = [], []
    for name in args.targets.split(","):
        if name == "sasrec":
            run, label = Path(args.sasrec_run) if args.sasrec_run else train_demo("sasrec", scratch, args.epochs), \
                "SASRec demo"
        elif name == "athwe":
            run, label = Path(args.athwe_run) if args.athwe_run else train_demo("athwe", scratch, args.epochs), \
                "ATHWE demo"
        elif name == "catalogue":
            run = untrained_run(scratch, args.catalogue_items)
            label = f"SASRec {args.catalogue_items:,} items (untrained weights: serving cost only)"
        else:
            raise SystemExit(f"error: unknown target {name!r} (sasrec, athwe, catalogue)")
        index = json.loads((run / "index.json").read_text())
        target = {"label": label, "run": str(run), "n_items": index["n_items"], "index": index["kind"],
                  "start_s": [], "stops": []}
        targets.append(target)
        bodies = request_bodies(run, 2000)
        for batching in (True, False):
            server = Server(run, batching, args, scratch / f"server-{name}-{'on' if batching else 'off'}.log")
            target["start_s"].append(round(server.start_s, 1))
            try:
                for clients in (int(c) for c in args.clients.split(",")):
                    before = rss_mb(server.proc.pid)
                    m = asyncio.run(load(server.port, bodies, clients, args.seconds))
                    row = {"target": label, "clients": clients, "batching": batching, **m,
                           "rss_before_mb": before, "rss_after_mb": rss_mb(server.proc.pid)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stop = server.stop()
            target["stops"].append(f"{'on' if batching else 'off'}: exit {stop['exit']} in {stop['stop_s']} s")
    env["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(write(out, command, env, targets, rows, args))
    print(f"written: {out.with_suffix('.md')} and .json; scratch folder: {scratch}")


if __name__ == "__main__":
    main()
