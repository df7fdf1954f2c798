"""Generation overhead: relayrl's generator actors against bare in-process vLLM, same model, same work.

    python -m bench.generation                       # tiny + medium models, 1 then 2 generators, 5 repeats
    python -m bench.generation --models tiny --generators 1 --prompts 16 --repeats 1 --results-dir /tmp/gen
    python -m bench.generation --models medium --generators 2 --dtypes float32 bfloat16   # bf16 (AMX CPUs)

Work, identical for every path: the first --prompts training prompts of the default task (the default
world's train parquet, BOS + characters), each sampled --n times (the job's group size, 8) at temperature 1
with at most --max-new-tokens new tokens (the job's 8), the sampled token's log-prob returned at every
position (RL needs it, so both sides pay for it), seeded sampling, text detokenised. Seeds: relayrl gives each
prompt its own (core.messages.sample_seed; a run repeats exactly), the bare call one per request (vLLM derives
each sample's from it). Seeding makes vLLM sample each request with its own torch generator; the row
"bare vLLM, unseeded" (no seed at all, what a user who does not need to repeat a run would write) shows what
that costs. Ratios are against the seeded bare call, the same work as relayrl's.

Models: `tiny` is the default job's model (cluster.world.ensure_world(Config()): 0.67M parameters, warm-started);
`medium` is a randomly initialised 27M-parameter Llama (hidden 512, 8 layers) built like bench/weight_sync.py.

Paths (same model folder, same engine settings as actors/generator.py: its engine_args, i.e. float32,
enforce_eager, seed, gpu_memory_utilization, max_model_len, the same worker extension, chunked prefill off
on CPU, and engine_env:
VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE):
- bare vLLM: one `vllm.LLM.generate` call over all prompts in this process, what a user would write
  (and again without a seed);
- relayrl rollout: the training loop's path. `cluster.rollout.Rollout` streams requests of
  rollout.prompts_per_request prompts (default auto: the queue split over the free slots) to the least-loaded generator actor, at most
  rollout.max_inflight_per_generator (2) outstanding each, and collects `Completion`s through Ray. The
  reward step is a no-op stub (instant zero scores), so only generation and its plumbing are timed;
- relayrl pool.generate: `GeneratorPool.generate`, one call per generator with its share of the prompts
  (the path held-out evaluation uses).

Tokens/s = generated tokens (as vLLM counts them, EOS included) / wall time of the whole batch as the caller
sees it (for relayrl: Ray calls, Completion serialisation and the driver loop included).

Timing: for each (model, generators) block the bare engine and the generator actors are all up at once (idle
when not measured; the in-process engine coexists with Ray actors because of VLLM_ENABLE_V1_MULTIPROCESSING=0).
Each path first gets one untimed warm-up pass over the whole workload, then --repeats timed passes,
interleaved in rounds of one pass per path, each round starting one path later than the previous (bare,
rollout, pool, unseeded; then rollout, pool, unseeded, bare; ...), so drifting machine load hits all paths
alike; the median is reported. Ratio = the median over rounds of (a path's tokens/s / the seeded bare call's tokens/s in
the same round of the same block), so a machine whose speed drifts during the run (seen here: +30% from the
first round to the last) shifts both sides of each ratio alike (target: >= 0.95 for the rollout path with 1
generator). With 2 generators on a 2-core machine the driver, 2 engines and Ray share
2 cores: expect no gain there, it shows what the second generator costs or buys on this machine.
Threads: a generator actor reserves generator.num_cpus=1 CPU, so Ray runs it with OMP_NUM_THREADS=1 (1 torch
thread); the bare engine gets the same (--bare-threads 1) so both run the same engine on the same thread count
(with torch's default of every core, 2 threads here, bare vLLM was much slower on a busy 2-core machine:
--bare-threads 0 shows it). The threads and CPU affinity of every engine process go into the JSON.
Start-up (engine load) is excluded everywhere. Writes bench/results/generation.{json,md} (or --results-dir).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import tempfile
import time

from bench.common import median, model_params, table, write_results

PATHS = ("bare vLLM (in-process)", "relayrl rollout", "relayrl pool.generate", "bare vLLM, unseeded")
MODELS = ("tiny", "medium")


class _NoReward:
    """Stands in for the RewardPool: instant zero scores, so the rollout path times generation only."""

    def score(self, completions):
        from core.messages import ScoreResult

        return ScoreResult(tuple(0.0 for _ in completions))


def _model_folder(name: str, tmp: str) -> tuple[str, int]:
    """(model folder, parameter count)."""
    if name == "tiny":
        from cluster.world import ensure_world
        from core.config import Config

        path = ensure_world(Config(), log=lambda *_: None).model_path
        return path, model_params(path)
    from bench.weight_sync import _build

    path = os.path.join(tmp, name)
    os.makedirs(path, exist_ok=True)
    return path, _build(name, path)


def _prompts(model_path: str, k: int):
    from transformers import AutoTokenizer

    from cluster.world import encode, ensure_world, read_rows
    from core.config import Config
    from core.messages import Prompt

    rows = read_rows(ensure_world(Config(), log=lambda *_: None).train_path)[:k]
    tok = AutoTokenizer.from_pretrained(model_path)
    return [Prompt(i, r["prompt"], tuple(encode(tok, r["prompt"])), r["answer"]) for i, r in enumerate(rows)]


def _set_threads(n: int) -> None:
    """torch intra-op threads of this process. vLLM's CPU worker replaces torch.set_num_threads with a no-op once an
    engine lives in the process, so go underneath it."""
    import torch

    getattr(torch._C, "_set_num_threads", torch.set_num_threads)(n)


def _bare_engine(settings, threads: int):
    """The engine a user would create, with exactly the generator actor's settings (actors/generator.py), and the
    generator's torch thread count (a generator actor reserves generator.num_cpus=1 CPU, so Ray gives it
    OMP_NUM_THREADS=1; in a plain process torch would take every core)."""
    if threads:
        _set_threads(threads)
    from vllm import LLM

    from actors.generator import engine_args

    llm = LLM(**engine_args(settings))
    if threads:
        _set_threads(threads)
    return llm


def _bare_pass(llm, prompts, args, seed: int | None) -> tuple[int, int, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_new_tokens, logprobs=0, seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    samples = [o for ro in outs for o in ro.outputs]
    return sum(len(o.token_ids) for o in samples), len(samples), dt


def _rollout_pass(pool, prompts, args, seed: int) -> tuple[int, int, float]:
    from cluster.rollout import Accounting, Rollout

    kw = {}
    if "reward_cfg" in inspect.signature(Rollout).parameters:  # the reward section's failure policy (defaults)
        from core.config import RewardConfig

        kw["reward_cfg"] = RewardConfig()
    rollout = Rollout(pool, _NoReward(), group_size=args.n, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, seed=seed, prompts_per_request=args.prompts_per_request,
                      max_inflight_per_generator=args.max_inflight, call_timeout_s=600, acct=Accounting(),
                      log=lambda *_: None, **kw)
    t0 = time.perf_counter()
    rollout.add(prompts)
    while rollout.busy():
        rollout.pump(0.05)
    dt = time.perf_counter() - t0
    groups = rollout.take(len(prompts), 0, None)
    if len(groups) != len(prompts):
        raise RuntimeError(f"rollout returned {len(groups)} groups for {len(prompts)} prompts")
    comps = [c for g in groups for c in g.completions]
    return sum(len(c.token_ids) for c in comps), len(comps), dt


def _pool_pass(pool, prompts, args, seed: int) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    comps = pool.generate(prompts, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=seed)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for c in comps), len(comps), dt


def _wait_started(pool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.starting:
        pool.poll()
        if time.monotonic() > deadline:
            raise RuntimeError(f"generators {sorted(pool.starting)} did not start within {timeout_s:.0f}s")
        time.sleep(0.1)
    if pool.stats.failures:
        raise RuntimeError(f"generator failures: {pool.stats.failures}")


def _process_info(pool) -> dict:
    """torch threads and CPU affinity of this process (bare engine) and of each generator actor."""
    import ray
    import torch

    def probe(_self=None):
        import os as _os

        import torch as _torch

        return {"torch_threads": _torch.get_num_threads(), "affinity": sorted(_os.sched_getaffinity(0)),
                "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS")}

    info = {"bare (this process)": {"torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
                                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
    for name, actor in pool.actors.items():
        try:
            info[name] = ray.get(actor.__ray_call__.remote(probe), timeout=60)
        except Exception as e:  # diagnostics only
            info[name] = {"error": repr(e)}
    return info


def _block(model: str, params: int, gens: int, llm, pool, prompts, args, dtype: str = "float32") -> tuple[list[dict], dict]:
    """Warm up, then measure the paths (PATHS) in rotating rounds; rows for this (model, generators) block."""
    runners = {PATHS[0]: lambda s: _bare_pass(llm, prompts, args, s),
               PATHS[1]: lambda s: _rollout_pass(pool, prompts, args, s),
               PATHS[2]: lambda s: _pool_pass(pool, prompts, args, s),
               PATHS[3]: lambda s: _bare_pass(llm, prompts, args, None)}
    for run in runners.values():  # warm-up, excluded for every path alike
        run(10_000)
    raw: dict[str, list[tuple[int, int, float]]] = {p: [] for p in runners}
    order = list(runners)
    for rep in range(args.repeats):  # each round starts one path later: no path always runs first or last
        for path in order[rep % len(order):] + order[:rep % len(order)]:
            raw[path].append(runners[path](rep))
    rows = []
    for path in runners:
        tps = median([t / s for t, _, s in raw[path]])
        rows.append({"model": model, "dtype": dtype, "params_m": params / 1e6, "generators": 1 if path in (PATHS[0], PATHS[3]) else gens,
                     "path": path, "tokens_per_s": tps, "samples_per_s": median([n / s for _, n, s in raw[path]]),
                     "seconds": median([s for _, _, s in raw[path]]),
                     "tokens": median([t for t, _, _ in raw[path]]), "repeats": args.repeats})
    base = [t / s for t, _, s in raw[PATHS[0]]]
    for r in rows:
        r["ratio"] = median([(t / s) / b for (t, _, s), b in zip(raw[r["path"]], base)])
    return rows, {p: [{"tokens": t, "samples": n, "seconds": s} for t, n, s in v] for p, v in raw.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--generators", nargs="*", type=int, default=[1, 2], help="Generator counts, measured in this order.")
    p.add_argument("--prompts", type=int, default=256, help="Prompts per pass (each sampled --n times).")
    p.add_argument("--n", type=int, default=8, help="Samples per prompt (algo.group_size).")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generator.max_new_tokens.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompts-per-request", type=int, default=0, help="rollout.prompts_per_request (0 = auto, the default).")
    p.add_argument("--max-inflight", type=int, default=2, help="rollout.max_inflight_per_generator.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bare-threads", type=int, default=1,
                   help="torch threads of the bare engine (default 1, as each generator actor gets with "
                        "generator.num_cpus=1); 0 = torch's default (every core).")
    p.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "bfloat16"],
                   help="generator.dtype, for every path alike; each one is a block of its own (bfloat16 pays on CPUs "
                        "with AMX; the 'vs float32' column compares a path's tokens/s with its float32 block's).")
    p.add_argument("--target", type=float, default=0.95, help="Wanted ratio (rollout path, 1 generator).")
    p.add_argument("--results-dir", default=None, help="Where generation.{json,md} go (default bench/results).")
    args = p.parse_args(argv)
    gens_list = sorted(set(args.generators))
    if not gens_list or gens_list[0] < 1:
        p.error("--generators: need counts >= 1")

    from actors.generator import EngineSettings, engine_env

    # the bare engine must see exactly the environment the generator actors get through Ray's runtime_env
    for k, v in engine_env(EngineSettings(model_path="", max_model_len=64)).items():
        os.environ[k] = v
    import ray

    from actors.pool import GeneratorPool

    # address="local": our own Ray instance even where a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=max(4, gens_list[-1] + 2), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    rows, raw, procs = [], {}, {}
    try:
        for model, dtype in ((m, d) for m in args.models for d in args.dtypes):
            with tempfile.TemporaryDirectory() as tmp:
                path, params = _model_folder(model, tmp)
                prompts = _prompts(path, args.prompts)
                settings = EngineSettings(model_path=path, max_model_len=max(64, max(len(q.token_ids) for q in prompts)
                                                                             + args.max_new_tokens), dtype=dtype)
                pool = GeneratorPool(settings, num_cpus=1, num_gpus=0, startup_timeout_s=600, call_timeout_s=600,
                                     sync_timeout_s=600, log=lambda *_: None, max_restarts=0)
                llm = None
                try:
                    pool.scale(gens_list[0])  # actors start in the background while the bare engine loads here
                    llm = _bare_engine(settings, args.bare_threads)
                    _wait_started(pool, 600)
                    for gens in gens_list:
                        if gens != len(pool.actors):
                            pool.scale(gens)
                            _wait_started(pool, 600)
                        block, block_raw = _block(model, params, gens, llm, pool, prompts, args, dtype)
                        rows += block
                        key = f"{model}/{gens}" + ("" if dtype == "float32" else f"/{dtype}")
                        raw[key] = block_raw
                        procs[key] = _process_info(pool)
                        for r in block:
                            print(f"{model} {dtype} {gens} gen  {r['path']:<24} {r['tokens_per_s']:>9.0f} tok/s  "
                                  f"ratio {r['ratio']:.3f}", flush=True)
                finally:
                    pool.shutdown()
                    del llm
                    gc.collect()
    finally:
        ray.shutdown()

    def suffix(r: dict) -> str:  # float32 keys as before bfloat16 blocks existed
        return "" if r["dtype"] == "float32" else f"/{r['dtype']}"

    ratios = {f"{r['model']}/{r['generators']}gen/{r['path']}{suffix(r)}": r["ratio"] for r in rows if r["path"] in PATHS[1:3]}
    unseeded = {f"{r['model']}/{r['generators']}gen{suffix(r)}": r["ratio"] for r in rows if r["path"] == PATHS[3]}
    one = {r["model"] + suffix(r): r["ratio"] for r in rows if r["path"] == PATHS[1] and r["generators"] == 1}
    fp32 = {(r["model"], r["generators"], r["path"]): r["tokens_per_s"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        base = fp32.get((r["model"], r["generators"], r["path"]))
        r["vs_float32"] = r["tokens_per_s"] / base if base else None
    cols = [("model", "model", ""), ("params_m", "params (M)", ".2f"), ("path", "path", ""),
            ("generators", "generators", "d"), ("tokens_per_s", "tokens/s", ".0f"),
            ("samples_per_s", "samples/s", ".0f"), ("seconds", "s per pass", ".3f"),
            ("ratio", "vs bare vLLM", ".3f"), ("repeats", "runs", "d")]
    if args.dtypes != ["float32"]:
        cols[1:1] = [("dtype", "dtype", "")]
        cols.insert(-1, ("vs_float32", "vs float32", ".2f"))
    md = table(rows, cols)
    md += (f"\n\n{args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, temperature "
           f"{args.temperature}; median of {args.repeats} interleaved rounds (one pass of each path) after one warm-up "
           f"pass each; 'vs bare vLLM' is the median of the per-round ratios. "
           f"Ratios against the seeded bare call (the same work: relayrl seeds every prompt); the unseeded bare row "
           f"shows what seeding costs vLLM itself. Target: relayrl rollout with 1 generator >= {args.target} x bare vLLM.")
    print(md)
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "results_dir"}, "rows": rows,
               "ratios": ratios, "unseeded_vs_seeded_bare": unseeded, "ratio_rollout_1gen": one, "target": args.target,
               "target_met": {m: r >= args.target for m, r in one.items()}, "processes": procs, "raw": raw}
    print(f"results: {write_results('generation', payload, md, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
