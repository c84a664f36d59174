"""A run's training curves: one PNG (matplotlib) and TensorBoard events (when tensorboard is installed).

    python -m ril_fast.curves RUN_DIR         # (re)draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl

``RunLog`` (``ril_fast.metrics``) feeds both on the main rank: each logged record goes to TensorBoard as
it is written (``RUN_DIR/tensorboard/``, read with ``tensorboard --logdir RUN_DIR``), and at the end of
the run :func:`plot_curves` draws ``curves.png``: one panel per quantity of ``PANELS`` against the step.
"""

import math
import sys
from pathlib import Path

# (panel title, metric keys drawn in it). A key missing from every record (e.g. the discriminator's
# in RL-only runs) is left out, and so is a panel with none of its keys.
PANELS = (
    ("rewards (student, teacher)", ("student_answer_reward", "student_similarity_reward",
                                    "teacher_answer_reward", "teacher_similarity_reward")),
    ("discriminator accuracy", ("disc_accuracy",)),
    ("policy loss", ("loss",)),
    ("KL to reference", ("kl",)),
    ("gradient norm (before clipping)", ("grad_norm", "disc_grad_norm")),
    ("held-out accuracy", ("eval_accuracy", "eval_accuracy/*")),
    ("tokens / s", ("tokens_per_s",)),
    ("model FLOPs utilisation", ("mfu",)),
    ("peak memory (GiB)", ("peak_memory_gib",)),
    ("learning rate", ("lr",)),
)
COLUMNS = 4
PANEL_INCHES = (4.0, 3.0)  # width, height of one panel
DPI = 100  # so a panel is 400 x 300 pixels and the PNG is COLUMNS * 400 wide
# Room around each panel's axes, in inches: tick labels at the left, the step label below, the title above (and
# the figure's title above the first row). Fixed, not matplotlib's constrained layout, which draws the figure
# twice (half of plot_curves' time: ~0.7 of 1.4 s, paid at the end of every run).
MARGINS = {"left": 0.55, "right": 0.15, "below": 0.5, "above": 0.35, "suptitle": 0.35}


def _series(records: list[dict], pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of the finite numbers under ``pattern`` (a key, or ``prefix/*``)."""
    keys = []
    for r in records:
        for k in r:
            if k not in keys and (k == pattern or (pattern.endswith("/*") and k.startswith(pattern[:-1]))):
                keys.append(k)
    out = {}
    for k in keys:
        points = [(r["step"], float(r[k])) for r in records
                  if k in r and isinstance(r[k], (int, float)) and math.isfinite(r[k])]
        if points:
            out[k] = ([s for s, _ in points], [v for _, v in points])
    return out


def plot_curves(records: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """Draw ``records`` (metrics.jsonl records, each with a ``step``) as a grid of panels into the PNG
    ``path``; returns the path, or None when no panel has data. The image is ``COLUMNS × 400`` pixels
    wide and ``rows × 300`` high (rows = ⌈panels with data / COLUMNS⌉)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    panels = [(name, series) for name, keys in PANELS
              if (series := {k: v for key in keys for k, v in _series(records, key).items()})]
    if not panels:
        return None
    rows = -(-len(panels) // COLUMNS)
    width, height, m = COLUMNS * PANEL_INCHES[0], rows * PANEL_INCHES[1], MARGINS
    fig = Figure(figsize=(width, height), dpi=DPI)
    top = m["above"] + (m["suptitle"] if title else 0)
    gap_w, gap_h = m["left"] + m["right"], m["below"] + m["above"]  # between neighbouring panels' axes
    axes_w = (width - m["left"] - m["right"] - (COLUMNS - 1) * gap_w) / COLUMNS
    axes_h = (height - m["below"] - top - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["below"] / height,
                        top=1 - top / height, wspace=gap_w / axes_w, hspace=gap_h / axes_h)
    axes = fig.subplots(rows, COLUMNS, squeeze=False).flatten()
    for ax, (name, series) in zip(axes, panels):
        for key, (steps, values) in series.items():
            marker = "o" if len(steps) < 30 else None  # sparse series (evaluations) show their points
            ax.plot(steps, values, label=key, marker=marker, markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def tensorboard_writer(log_dir: str | Path, *, purge_step: int | None = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or None when the tensorboard package
    is not installed (it is optional). ``purge_step``: TensorBoard hides the events that earlier writers
    logged at that step or later (a resumed run logs those steps again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard raises ImportError without the tensorboard package
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def add_scalars(writer, record: dict) -> None:
    """Every finite number of ``record`` except ``step`` as a TensorBoard scalar at ``record["step"]``."""
    step = int(record.get("step", 0))
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(key, value, global_step=step)


if __name__ == "__main__":
    from ril_fast.metrics import read_metrics

    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/ril")
    if not (run_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"error: no {run_dir / 'metrics.jsonl'}: give a run's output_dir (default runs/ril)")
    print(plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", title=str(run_dir)))
