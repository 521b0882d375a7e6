"""Small shared helpers: atomic writes, devices, seeding, the allocator, fingerprints."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from athwe.errors import AthweError, ConfigError, brief


def resolve_device(device: str | None = None) -> torch.device:
    """`auto`/None -> CUDA when present, else CPU; anything else is parsed by torch and checked
    here, so asking for a GPU the machine lacks is a one-line error, not a driver traceback."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, {build}, "
                              f"no usable GPU found); use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "meta":
        raise ConfigError(f"device {device!r} holds no data; use auto, cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError) as e:  # e.g. mps on a build without it
            raise ConfigError(f"device {device!r} is not usable here ({brief(e)}); use auto, cpu or cuda") from None
    return dev


def read_json(path: str | Path) -> Any:
    """Parse a JSON file the toolkit wrote, with a one-line error naming it when it is damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AthweError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AthweError(f"{path}: cannot be read ({e})") from None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the system.

    By default glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free,
    so a training step whose tensors exceed that (FEARec's three stacked views, a full-catalogue
    score matrix) pays a page fault for every 4 KB page of them, at every step. Raising the mmap
    and trim thresholds keeps those blocks in the heap, so those page faults are avoided at the
    cost of a little more peak memory. The process keeps its peak memory until it exits. Applied
    once per process; a no-op except on Linux with glibc, when the MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ environment variables already set the thresholds, or when
    ATHWE_KEEP_FREED_MEMORY=0. Returns whether the thresholds were set."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if (os.environ.get("ATHWE_KEEP_FREED_MEMORY", "1") == "0" or sys.platform != "linux"
            or platform.libc_ver()[0] != "glibc"
            or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                             and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        pass
    return _malloc_tuned


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot from /proc/stat; None where it is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


def busy_cpus_elsewhere(window: float = 0.1) -> float | None:
    """How many CPUs other processes keep busy, measured over `window` seconds while this one
    sleeps (Linux /proc/stat, less this process's own CPU time); None where it cannot be measured."""
    start, own = _cpu_jiffies(), time.process_time()
    if start is None:
        return None
    time.sleep(window)
    end, own_s = _cpu_jiffies(), time.process_time() - own
    if end is None or end[1] <= start[1]:
        return None
    n = os.cpu_count() or 1
    busy = (end[0] - start[0]) / (end[1] - start[1]) * n
    return max(0.0, busy - own_s / window)


def oversubscription_note(threads: int, busy: float | None, cores: int | None) -> str | None:
    """A warning when `threads` torch threads would share the CPU's `cores` with `busy` CPUs'
    worth of other work: torch's threads wait for each other at every operation, so one of them
    held up by another process holds up all. None when they fit or nothing was measured."""
    if busy is None or not cores or busy < 0.75 or threads + busy <= cores + 0.5:
        return None
    free = int(cores - busy + 0.5)
    advice = (f"--threads {free} (train.num_threads) fits beside them" if free >= 1
              else "no CPU is free: expect it to be slow, or start it when they are done")
    return (f"other processes keep about {busy:.1f} of this machine's {cores} CPUs busy, and {threads} more "
            f"training thread(s) oversubscribe it, which can slow training several-fold; {advice}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The permissions a plain open(path, "w") would leave: the existing file's, else 0o666 less the
    umask (mkstemp's own 0o600 would make artefacts unreadable to everyone else on a shared machine)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty folder in `parent` (to fill, then rename into place) with the permissions
    os.mkdir would give it (0o777 less the umask), not mkdtemp's 0o700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds. The
    file keeps the permissions a direct write would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _new_file_mode(path))
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Hasher(Protocol):
    """What `hash_file` needs of a hash object (any of hashlib's)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def hash_file(path: str | Path, h: Hasher | None = None) -> Hasher:
    """Stream a file's bytes into `h` (a new sha256 when None) and return it."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def fingerprint_tokens(tokens: list[str]) -> str:
    """Stable short hash of an ordered token list (the item map: index i holds id i's token)."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
