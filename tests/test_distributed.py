"""Data-parallel training under torchrun, two CPU processes (gloo) on the tiny dataset."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from athwe.errors import AthweError
from athwe import runs
from athwe.training import trainer as tr
from athwe.training.distributed import World, world_from_env
from test_train import tiny_cfg

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NO_DROPOUT = ["--set", "model_args.hidden_dropout=0", "--set", "model_args.attn_dropout=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if Path("/sys/class/net/lo").exists():  # gloo on the loopback device, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _cli_args(data_dir: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return ["-m", "athwe.cli", "train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(data_dir),
            "--max-seq-length", "8", "--batch-size", "32", "--epochs", "3", "--preset", "recbole", "--threads", "1",
            "--set", "model_args.hidden_size=16", "--set", "model_args.inner_size=32",
            "--set", "model_args.num_layers=1",
            "--run-dir", str(run_dir), *extra]


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in runs.read_metrics(run / "metrics.jsonl")]


def test_world_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == World() and not World().active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert world_from_env() == World(2, 4, 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == World(2, 4, 0) and world_from_env().active and not world_from_env().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(AthweError, match="RANK < WORLD_SIZE"):
        world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(AthweError, match="must be integers"):
        world_from_env()


def test_world_size_without_torchrun_is_a_one_line_error(tiny_data_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from athwe.cli import app

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    res = CliRunner().invoke(app, ["train", "--model", "sasrec", "--dataset", "tiny", "--data-dir", str(tiny_data_dir),
                                   "--epochs", "1", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "cannot join the process group" in res.stderr and "torchrun" in res.stderr
    assert not (tmp_path / "run").exists()


def test_two_processes_train_as_one_on_the_whole_batch(tiny_data_dir, tmp_path):
    """Without dropout, two processes splitting every batch take the one-process steps: the same
    losses, weights to float rounding and the same test metrics; rank 0 alone prints and writes."""
    cfg = tiny_cfg(tiny_data_dir, tmp_path / "runs", epochs=3, num_threads=1)
    cfg.model_args.update({"hidden_dropout": 0.0, "attn_dropout": 0.0})
    before = torch.get_num_threads()
    try:
        one, res_one = tr.train(cfg, run_dir=tmp_path / "one", printer=lambda s: None, progress=False)
    finally:
        torch.set_num_threads(before)
    out = _torchrun(_cli_args(tiny_data_dir, tmp_path / "two", NO_DROPOUT), tmp_path)
    two = tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    rows = runs.read_metrics(two / "metrics.jsonl")
    assert [r["processes"] for r in rows] == [2, 2, 2]
    a, b = torch.load(one / "best.pt", weights_only=True), torch.load(two / "best.pt", weights_only=True)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    res_two = json.loads((two / "results.json").read_text())
    assert res_two["test"] == pytest.approx(res_one["test"], abs=1e-6)
    assert out.stdout.count("epoch   1  loss") == 1 and out.stdout.count("run folder:") == 1
    last = torch.load(two / "last.pt", weights_only=True)
    assert len(last["rng_ranks"]) == 2


def test_two_processes_resume_exactly(tiny_data_dir, tmp_path):
    """With dropout, a two-process run stopped after epoch 2 and resumed ends exactly as the run
    that was not stopped (each process's random state is kept in last.pt)."""
    script = tmp_path / "go.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_train import tiny_cfg
        from athwe import runs
        from athwe.training import trainer as tr
        cfg = tiny_cfg(Path({str(tiny_data_dir)!r}), Path({str(tmp_path / "runs")!r}), epochs=4, num_threads=1)
        out, mode = sys.argv[1], sys.argv[2]
        if mode == "whole":
            tr.train(cfg, run_dir=out, progress=False)
        else:
            tr.train(cfg, run_dir=out, progress=False, stop_after=2)
            assert len(runs.read_metrics(Path(out) / "metrics.jsonl")) == 2
            tr.resume(out, progress=False)
    """))
    _torchrun([str(script), str(tmp_path / "whole"), "whole"], tmp_path)
    _torchrun([str(script), str(tmp_path / "split"), "split"], tmp_path)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole") and len(_losses(tmp_path / "whole")) == 4
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert whole["test"] == split["test"]
