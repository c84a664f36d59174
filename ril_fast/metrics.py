"""The run's record: ``metrics.jsonl`` (one JSON object per logged step), a progress bar, phase timers.

Only the main rank writes. Every value logged is a plain float or int, so the file reads back with
``json.loads`` per line (``read_metrics``) for tests, plots and comparisons between runs.
"""

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The numbers shown on the progress bar, in order, when present.
_BAR_KEYS = ("student_answer_reward", "student_similarity_reward", "disc_accuracy", "loss", "eval_accuracy")


class PhaseTimer:
    """Wall-clock seconds per phase of a step: ``with timer("rollout"): ...`` adds to ``seconds["rollout"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` for the step log."""
        return {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}


class RunLog:
    """Appends step metrics to ``out_dir/metrics.jsonl`` and shows progress (main rank only)."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, progress: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # a fresh run starts a fresh file
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="RIL", unit="step", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        """Write one line; advance the bar (or print a short line when there is no terminal)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = {k: metrics[k] for k in _BAR_KEYS if k in metrics}
        if self.bar is not None:
            if metrics.get("step", 0) > self.bar.n:
                self.bar.update(metrics["step"] - self.bar.n)
            self.bar.set_postfix({k.split("_")[0][:4] + "_" + k.split("_")[-1][:4]: f"{v:.3g}" for k, v in shown.items()})
        else:
            print(f"step {metrics.get('step')}: " + ", ".join(f"{k} {v:.3g}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
