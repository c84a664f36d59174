"""What every ril_fast benchmark shares: timing, memory, the measured peaks, the run's identity, CSV rows.

Peaks are measured in the same run as the figures they divide (a utilisation against a datasheet number
hides clock throttling, a busy machine and a wrong dtype): ``ril_fast.flops.matmul_peak_tflops`` for FLOP/s
(the trainer's MFU divides by it too) and ``copy_bandwidth_gbps`` for memory-bound work. On a CPU, times
are ``time.perf_counter`` medians and memory is the process's resident size; on a GPU,
``triton.testing.do_bench`` medians and the CUDA allocator's peak.
"""

import csv
import gc
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------
# Time and memory
# ----------------------------------------------------------------------------------------------------
def free_memory() -> None:
    """Collect garbage (a failed run's model cycles) and give the CUDA allocator's cached blocks back."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def unless_out_of_memory(provider: str, fn) -> dict:
    """``fn()`` (a baseline's result dict), or where it runs out of GPU memory ``{"provider", "note"}`` saying so,
    its memory freed: a baseline that does not fit must not cost the configuration's measured rows."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        note = f"out of memory: {str(e).splitlines()[0][:200]}"
    free_memory()  # here, once the exception (whose traceback holds the frames that hold the tensors) is gone
    print(f"{provider}: {note}", file=sys.stderr)
    return {"provider": provider, "note": note}


def time_ms(fn, reps: int, *, best: bool = False) -> float:
    """Median milliseconds of fn() (``triton.testing.do_bench`` on GPU; a warm-up call, then ``reps``
    timed calls on CPU); ``best``: the fastest call instead, for peaks (interference only slows)."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(20, reps * 10), return_mode="min" if best else "median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * (min(times) if best else statistics.median(times))


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if CUDA:
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """This process's resident memory in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Highest resident size seen while the block runs, sampled every millisecond by a thread::

        with RssPeak() as peak:
            work()
        peak.bytes                      # absolute peak; peak.bytes - peak.base is what the block added
    """

    def __enter__(self) -> "RssPeak":
        self.base = self.bytes = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.bytes = max(self.bytes, rss_bytes())
            time.sleep(1e-3)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.bytes = max(self.bytes, rss_bytes())


def peak_mb(fn) -> float:
    """Peak memory fn() adds above what is allocated before it, in MiB (CUDA allocator; on CPU the
    resident size sampled every millisecond)."""
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with RssPeak() as peak:
        fn()
    return max(0, peak.bytes - peak.base) / 2**20


# ----------------------------------------------------------------------------------------------------
# Peaks measured now
# ----------------------------------------------------------------------------------------------------
def copy_bandwidth_gbps() -> float:
    """Device memory bandwidth measured now, GB/s: a copy of 1 GiB on GPU (64 MiB on CPU) moves twice
    its size (read + write). The floor of memory-bound work such as the optimizer step."""
    numel = (2**30 if CUDA else 2**26) // 4
    src = torch.empty(numel, device="cuda" if CUDA else "cpu")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src), reps=5, best=True) * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------
# The run's identity and its records
# ----------------------------------------------------------------------------------------------------
def device_name() -> str:
    """The GPU's name, or the CPU's model and core count."""
    if CUDA:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def git_sha() -> str:
    """The repository's short HEAD commit ("unknown" outside a git checkout); uncommitted edits are not
    reflected."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sig(x: float) -> float:
    """x to 4 significant digits, for tables and CSV files."""
    return float(f"{x:.4g}")


def versions(*packages: str) -> dict[str, str]:
    """The installed versions of the packages a benchmark's figures depend on: ``packages`` (distribution
    names), by default torch, triton, transformers and liger-kernel; keyed by column name ("-" becomes "_"),
    "" for one that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in packages or ("torch", "triton", "transformers", "liger-kernel"):
        try:
            out[package.replace("-", "_")] = version(package)
        except PackageNotFoundError:
            out[package.replace("-", "_")] = ""
    return out


def append_csv(path: str | Path, rows: list[dict], columns: list[str]) -> Path:
    """Append ``rows`` (dicts; missing keys left empty) to the CSV at ``path``, writing the header when
    the file is new. An existing file with an older header, every column of which is in ``columns``, is
    first rewritten under ``columns`` (each old value kept under its column, the new columns empty for the
    old rows; written to a temporary file, then renamed over it). A header with a column that ``columns``
    lacks, or a column twice, is an error, not a silent loss or misalignment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise ValueError(f"{path}:1: its header repeats the columns {repeated}: write to another file (--out)")
            unknown = [c for c in header if c not in columns]
            if unknown:
                raise ValueError(f"{path}:1: its columns {header} are not this benchmark's {columns} "
                                 f"(they lack its {unknown}): write to another file (--out)")
            with path.open(newline="") as f:
                old = list(csv.DictReader(f))
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(old)
            os.replace(tmp, path)
            print(f"{path}: columns added to its header: {[c for c in columns if c not in header]}", file=sys.stderr)
        new = False
    else:
        new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns`` as ``(key, header)`` pairs: a column holding
    numbers is right-aligned; a missing value is an empty cell."""
    def cell(v):
        return "" if v is None else str(v)

    numeric = [any(isinstance(r.get(k), (int, float)) for r in rows) for k, _ in columns]
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
