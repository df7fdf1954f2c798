"""Run by tests/integration/test_lora_vllm.py in its own process (a vLLM engine never runs inside pytest):
greedy completions of the prompts in PROMPTS (a JSON list of token-id lists) from the base model with the PEFT
adapter applied by vLLM's own LoRA support, from the base alone, and from the merged model; printed as one JSON
line {"adapter": [...], "base": [...], "merged": [...]}."""

from __future__ import annotations

import argparse
import gc
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--base", "--adapter", "--merged", "--prompts"):
        p.add_argument(name, required=True)
    p.add_argument("--max-lora-rank", type=int, default=8)
    args = p.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts = [{"prompt_token_ids": ids} for ids in json.loads(open(args.prompts).read())]
    sp = SamplingParams(temperature=0, max_tokens=8)
    common = dict(dtype="float32", enforce_eager=True, max_model_len=64, enable_chunked_prefill=False,
                  max_num_batched_tokens=4096, seed=0)

    def tokens(outs):
        return [list(o.outputs[0].token_ids) for o in outs]

    llm = LLM(model=args.base, enable_lora=True, max_lora_rank=args.max_lora_rank, **common)
    out = {"adapter": tokens(llm.generate(prompts, sp, lora_request=LoRARequest("relayrl", 1, args.adapter))),
           "base": tokens(llm.generate(prompts, sp))}
    del llm
    gc.collect()
    out["merged"] = tokens(LLM(model=args.merged, **common).generate(prompts, sp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
