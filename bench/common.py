"""Shared helpers for the benchmarks: machine description, tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The environment as the user started the benchmark. Creating a vLLM engine in this process (bare-vLLM
# baselines, final evaluations) rewrites os.environ (LD_PRELOAD=libgomp, LOCAL_WORLD_SIZE, VLLM_* ...), and a
# `relayrl train` started after that inherited it and generated 2-3x slower; every side starts from this copy.
CLEAN_ENV = dict(os.environ)

# The default job's 27M-parameter variant (`--model large` in bench/trl_compare.py and bench/algos.py)
LARGE_MODEL = ["--model.hidden_size=512", "--model.num_layers=8", "--model.num_heads=8", "--model.intermediate_size=1536",
               "--model.warmstart_lr=2e-4",  # 80 SFT steps at 2e-4: ~0.34 held-out (1e-3 leaves this size at ~0.10)
               "--learner.lr=3e-5"]  # at 1e-4 held-out accuracy falls from 0.34 to 0.10 in 10 steps


def machine() -> dict:
    """What the numbers were measured on (goes into every result file)."""
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    info["cpu_isa"] = cpu_isa()
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


# Vector extensions torch's and vLLM's CPU kernels choose between. VMs behind the same "AMD EPYC" name differ:
# shared/FACTS.md's had AVX-512 (bf16, VNNI); the one of 2026-12-01 had AVX2 only and ran every benchmark
# about 1.8x slower (generation, TRL comparison). Only ratios from one run, on one host, compare.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ISA_FLAGS if f in flags]


def add_seed_args(p) -> None:
    """--repeats and --seeds, as every multi-seed benchmark takes them; `seed_list(args)` resolves them."""
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seeds", nargs="*", type=int, default=None,
                   help="Seeds to run, one repetition each (default 0..repeats-1); a seed picks the warm start too.")


def seed_list(args) -> list[int]:
    return args.seeds if args.seeds else list(range(args.repeats))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if f and isinstance(r[k], (int, float)) else str(r[k])
                              for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(name: str, payload: dict, markdown: str, results_dir: str | Path | None = None) -> Path:
    """Write RESULTS_DIR/NAME.json (payload + machine) and NAME.md; RESULTS_DIR defaults to bench/results."""
    folder = Path(results_dir) if results_dir is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.json"
    out.write_text(json.dumps({**payload, "machine": machine()}, indent=2))
    (folder / f"{name}.md").write_text(markdown + "\n")
    return out


def relayrl_train(args: list[str], run_dir: Path, name: str, timeout_s: float) -> dict:
    """Run `relayrl train ARGS` as a user would (its own process, its own local Ray) into RUN_DIR/NAME;
    return its summary.json. Raises with the log tail on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / name, ignore_errors=True)  # a rerun replaces its previous outputs (relayrl refuses to mix)
    log_path = run_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "cluster.cli", "train", *args, f"--run_dir={run_dir}", f"--run_name={name}"]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=CLEAN_ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return json.loads((run_dir / name / "summary.json").read_text())


def model_params(folder: str | Path) -> int:
    """Parameters in a Hugging Face model folder (its safetensors files), without loading the model."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
