"""Weight-sync latency against model size and number of generators, beside the floor.

    python -m bench.weight_sync                      # sizes tiny/small/medium, 1 and 2 generators
    python -m bench.weight_sync --sizes tiny --repeats 5
    python -m bench.weight_sync --sizes medium --lora 8   # + LoRA: the merged model against the adapters alone

For each model size (Llama shapes built locally, random weights) it measures:
- floor: one generator actor reloading the same safetensors blob it already holds in memory
  (checksum + deserialise + vLLM's `reload_weights` + prefix-cache reset), timed inside the actor:
  what any sync must pay at least, with no transfer and no Ray call;
- relayrl: `learner-side serialise + ray.put` plus `GeneratorPool.sync` to N generator actors
  (object-store transfer + checksum + reload on each, in parallel, confirmed by every generator).
- with `--lora R`, a LoRA learner of rank R on every linear layer: `Learner.publish` (merging the adapters
  into the model + serialise + ray.put) and `GeneratorPool.sync` once with the merged model sent
  (`learner.lora_sync=merged`) and once with the adapters alone (`adapter`: each generator merges them into
  the base it holds, then reloads the whole model).
Median of `--repeats` syncs after one warm-up sync (excluded for both). Writes bench/results/weight_sync.{json,md}
(weight_sync_loraR with --lora).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import median, table, write_results

# name -> (hidden, layers, heads, intermediate)
SIZES = {"tiny": (128, 4, 4, 256), "small": (256, 6, 4, 1024), "medium": (512, 8, 8, 1536)}


def _build(size: str, out: str) -> int:
    from cluster.world import build_model, build_tokenizer
    from core.config import ModelConfig

    h, layers, heads, inter = SIZES[size]
    build_tokenizer(out)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out))
    model = build_model(ModelConfig(hidden_size=h, num_layers=layers, num_heads=heads, intermediate_size=inter),
                        vocab, 128, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _floor(path: str, blob: bytes, checksum: str, repeats: int) -> float:
    """One generator's own reload of a blob already in its memory (checksum + vLLM's reload_weights +
    prefix-cache reset), timed inside the actor: the least any sync can cost, with no transfer."""
    import ray

    from actors.generator import EngineSettings, Generator, engine_env

    class FloorGenerator(Generator):
        def time_reload(self, blob_ref: list, checksum: str, repeats: int) -> list[float]:
            data = ray.get(blob_ref[0])
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self.llm.collective_rpc("relayrl_load_weights", args=(data, checksum))
                self.llm.reset_prefix_cache()
                times.append(time.perf_counter() - t0)
            return times[1:]  # the first one is warm-up

    settings = EngineSettings(model_path=path, max_model_len=128)
    actor = ray.remote(FloorGenerator).options(num_cpus=1, runtime_env={"env_vars": engine_env(settings)}).remote(
        "floor", settings)
    try:
        return median(ray.get(actor.time_reload.remote([ray.put(blob)], checksum, repeats), timeout=600))
    finally:
        ray.kill(actor)


def _publishers(path: str, state_dict, lora_rank: int) -> dict[str, object]:
    """What is sent -> a function that publishes one version and returns its WeightsHandle. The whole model as
    serialised by hand (the learner's full-weight path) and, with LORA_RANK > 0, a LoRA `Learner` (in this
    process) publishing through `Learner.publish` both ways: merged model, adapters alone."""
    import ray
    import torch

    from core.messages import WeightsHandle
    from core.weights import serialize_state_dict

    version = iter(range(1, 10**6))

    def whole():
        blob, checksum = serialize_state_dict(state_dict)
        return WeightsHandle(version=next(version), blob_ref=[ray.put(blob)], num_bytes=len(blob), checksum=checksum)

    out = {"whole model": whole}
    if lora_rank:
        from cluster.world import PAD
        from core.config import AlgoConfig, LearnerConfig
        from learner.actor import Learner
        from learner.lora import lora_modules

        for sync in ("merged", "adapter"):
            learner = Learner(path, AlgoConfig(), LearnerConfig(lora_rank=lora_rank, lora_sync=sync), 10, 0, PAD)
            torch.manual_seed(0)
            for m in lora_modules(learner.policy).values():  # B = 0 at start; trained adapters merge to new weights
                torch.nn.init.normal_(m.lora_B.weight, std=1e-3)

            def publish(learner=learner):
                learner.version = next(version) - 1
                return learner.publish()

            out[f"LoRA r={lora_rank}, {sync}"] = publish
    return out


def _relayrl(path: str, publishers: dict, n_generators: int, repeats: int) -> dict[str, tuple[float, float, int]]:
    """What is sent -> (median publish seconds: (merge +) serialise + ray.put, median pool.sync seconds, bytes sent)."""
    from actors.generator import EngineSettings
    from actors.pool import GeneratorPool

    pool = GeneratorPool(EngineSettings(model_path=path, max_model_len=128), num_cpus=1, num_gpus=0,
                         startup_timeout_s=600, call_timeout_s=300, sync_timeout_s=300, log=lambda *_: None)
    out = {}
    try:
        pool.start(n_generators)
        for sent, publish in publishers.items():
            pub, syn = [], []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                handle = publish()
                t1 = time.perf_counter()
                s = pool.sync(handle)
                if i > 0:  # the first is warm-up
                    pub.append(t1 - t0)
                    syn.append(s)
            out[sent] = (median(pub), median(syn), handle.num_bytes)
        return out
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--generators", nargs="*", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="also a LoRA learner of rank R publishing merged weights and adapters alone (learner.lora_sync)")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)

    import ray
    import torch

    from core.weights import serialize_state_dict

    ray.init(address="local", num_cpus=max(4, max(args.generators) + 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 2**20)
    rows = []
    try:
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as path:
                params = _build(size, path)
                from transformers import AutoModelForCausalLM

                sd = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).state_dict()
                blob, checksum = serialize_state_dict(sd)
                floor = _floor(path, blob, checksum, args.repeats)
                publishers = _publishers(path, sd, args.lora)
                for n in args.generators:
                    for sent, (pub, syn, nbytes) in _relayrl(path, publishers, n, args.repeats).items():
                        rows.append({"size": size, "params_m": params / 1e6, "sent": sent, "mib": nbytes / 2**20,
                                     "generators": n, "floor_s": floor, "publish_s": pub, "sync_s": syn,
                                     "total_s": pub + syn, "ratio": (pub + syn) / floor})
                        print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    md = table(rows, [("size", "model", ""), ("params_m", "params (M)", ".2f"), ("sent", "sent", ""),
                      ("mib", "MiB sent", ".2f"),
                      ("generators", "generators", "d"), ("floor_s", "floor: reload inside the actor s", ".3f"),
                      ("publish_s", "serialise+put s", ".3f"), ("sync_s", "pool.sync s", ".3f"),
                      ("ratio", "total / floor", ".2f")])
    print(md)
    name = f"weight_sync_lora{args.lora}" if args.lora else "weight_sync"
    print(f"results: {write_results(name, {'repeats': args.repeats, 'lora': args.lora, 'rows': rows}, md, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
