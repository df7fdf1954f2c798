"""Run outputs: metrics as JSON lines and TensorBoard events, and a PNG plot of the main curves."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a core dependency; this only guards odd installs
            self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k.replace(".", "/"), v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def plot_run(run_dir: Path) -> Path:
    """reward_mean and held-out accuracy against step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "train/reward_mean", "training reward (mean over samples)"),
                           (axes[1], "eval/heldout_accuracy", "held-out accuracy (greedy, exact match)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
