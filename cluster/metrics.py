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


class RayMetrics:
    """Custom metrics through `ray.util.metrics`, for the Ray dashboard and its Prometheus endpoint
    (each node's metrics agent serves them as `ray_relayrl_*`). Recorded once per step by the driver."""

    GAUGES = {
        "samples_per_second": "Trained samples per second over the last step.",
        "tokens_per_second": "Generated tokens per second over the last step.",
        "reward_mean": "Mean training reward of the last step.",
        "kl_to_reference": "KL to the reference policy (per token) of the last update.",
        "approx_kl": "Approximate KL between the policy before and after the last update.",
        "policy_version": "Policy version the generators serve.",
        "staleness_max": "Most policy versions a sample of the last step lagged.",
        "buffer_groups": "Scored groups waiting for the learner.",
        "sync_seconds": "Weight-sync seconds of the last step.",
        "generators": "Generators serving.",
        "heldout_accuracy": "Latest held-out greedy accuracy.",
    }

    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self.gauges = {k: Gauge(f"relayrl_{k}", description=d) for k, d in self.GAUGES.items()}
        self.failures = Counter("relayrl_failures_total", description="Failures by kind.", tag_keys=("kind",))
        self._seen: dict[str, int] = {}

    def record(self, values: dict[str, float], failures: dict[str, int]) -> None:
        for k, v in values.items():
            if k in self.gauges and v is not None:
                self.gauges[k].set(float(v))
        for kind, total in failures.items():  # counters only go up: add what is new since last time
            new = total - self._seen.get(kind, 0)
            if new > 0:
                self.failures.inc(new, tags={"kind": kind})
                self._seen[kind] = total
