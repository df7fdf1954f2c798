"""The same update as TRL's GRPOTrainer? One RL step, the same samples, relayrl's learner against TRL's own code.

    .venv-bench/bin/python -m bench.trl_parity                   # the default job (0.67M model)
    .venv-bench/bin/python -m bench.trl_parity --model large     # bench.trl_compare's 27M model
    make bench-parity

bench.trl_compare trains the same job with each framework and compares speed and held-out accuracy. Each run
draws its own samples, so its accuracy column carries run-to-run spread (three relayrl runs of one seed, with
different numerics, ended 0.25-0.35 held-out at 27M). This checks what a fair comparison rests on: given the same
weights and the same samples, relayrl's learner and TRL's GRPOTrainer make the same update.

One RL step of the job, with trl_compare's settings (TRL's config from trl_compare.grpo_config):
1. samples: prompts_per_step prompts x group_size samples from relayrl's generator (actors.generator.Generator in
   this process: a real vLLM engine, the request path the rollout uses), scored by the job's reward;
2. relayrl: Learner.train_step on those groups, as the learner actor runs it. For each optimizer step its rows
   (the learner's minibatch split) and its gradient before clipping are recorded, and the weights after the step;
3. TRL: a GRPOTrainer gets the same samples through its rollout_func hook; its _generate_and_score_completions
   scores them (the job's reward again), computes the group advantages, the old log-probs (its no-grad pass) and
   the token count its loss divides by. Then, from the same start weights, each of relayrl's optimizer steps runs
   on the same rows through TRL's training_step (its compute_loss and loss scaling, per_device_train_batch_size
   rows at a time), its gradient is read, clipped as the Trainer clips (max_grad_norm) and stepped by the
   optimizer TRL builds (trainer.create_optimizer: fused AdamW, the same hyper-parameters);
4. compared, per optimizer step: the cosine of the two gradients (whole model, and the least-aligned tensor), their
   norm ratio against the ratio the two frameworks' documented conventions predict, and after each step the two
   models' weights: |relayrl's update - TRL's update| / |relayrl's update| (updates measured from the start weights).
   The conventions: TRL divides a group's rewards by their sample std + 1e-4, relayrl by the population std + 1e-6
   (sqrt((G-1)/G) = 0.935 at G = 8, for groups whose std is well above 1e-4); TRL's token-mean divides by the
   generation batch's completion tokens / optimizer steps, relayrl's by the minibatch's own tokens. Both clip the
   gradient norm to max_grad_norm before the optimizer, so while both norms exceed it the steps are the same size.
Writes bench/results/trl_parity[_large].{json,md} (or --results-dir).
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import contextmanager
from pathlib import Path

from bench.common import LARGE_MODEL, table, write_results


def sample_groups(cfg, world, seed: int):
    """prompts_per_step x group_size samples of the job's first train prompts, through relayrl's generator, scored by
    the job's reward: the groups the learner would train on."""
    from transformers import AutoTokenizer

    from actors.generator import EngineSettings, Generator
    from bench.trl_compare import scorer_fn
    from cluster.world import encode, read_rows
    from core.messages import GenerateRequest, Group, Prompt

    tok = AutoTokenizer.from_pretrained(world.model_path)
    rows = read_rows(world.train_path)[: cfg.prompts_per_step]
    prompts = tuple(Prompt(i, r["prompt"], tuple(encode(tok, r["prompt"])), r["answer"]) for i, r in enumerate(rows))
    gen = Generator("parity", EngineSettings(model_path=world.model_path, max_model_len=64, seed=seed,
                                             dtype=cfg.generator.dtype))
    G = cfg.algo.group_size
    comps = gen.generate(GenerateRequest(prompts, G, cfg.generator.temperature, cfg.generator.max_new_tokens, seed))
    score = scorer_fn(cfg)
    groups = []
    for i, p in enumerate(prompts):
        cs = comps[i * G:(i + 1) * G]
        scores = score([p.text] * G, [c.text for c in cs], [p.answer] * G)
        groups.append(Group(p, tuple(cs), tuple(float(s) for s in scores)))
    del gen
    return groups


def flat_grad(model):
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in model.parameters()])


def flat_weights(model):
    import torch

    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@contextmanager
def recording_relayrl(learner):
    """While inside: each optimizer step of LEARNER appends {rows, grad (before clipping), weights (after)}."""
    import torch

    steps: list[dict] = []
    opt_step, clip, adam_step = learner._optimizer_step, torch.nn.utils.clip_grad_norm_, learner.opt.step

    def optimizer_step(b, rows, *a, **kw):
        steps.append({"rows": rows.clone()})
        out = opt_step(b, rows, *a, **kw)
        steps[-1]["weights"] = flat_weights(learner.policy)
        return out

    def clip_recording(params, *a, **kw):
        params = list(params)
        if "grad" not in steps[-1]:  # the policy's clip comes first (a critic's, if any, after it)
            steps[-1]["grad"] = flat_grad(learner.policy)
        return clip(params, *a, **kw)

    def adam_recording(*a, **kw):
        if "grad" not in steps[-1]:  # max_grad_norm = 0: no clipping, the gradient is read here
            steps[-1]["grad"] = flat_grad(learner.policy)
        return adam_step(*a, **kw)

    learner._optimizer_step, learner.opt.step = optimizer_step, adam_recording
    torch.nn.utils.clip_grad_norm_ = clip_recording
    try:
        yield steps
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        del learner._optimizer_step, learner.opt.step


def trl_trainer(cfg, world, out_dir: str, groups):
    """A GRPOTrainer with trl_compare's settings whose rollout_func hands out GROUPS' samples."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from bench.trl_compare import grpo_config, trl_reward, trl_spec

    tok = AutoTokenizer.from_pretrained(world.model_path)
    by_prompt = {tok.bos_token + g.prompt.text: g for g in groups}

    def rollout(prompts, trainer):
        """TRL's prompts come G times each, group by group: sample i of its group, in relayrl's order."""
        seen: dict[str, int] = {}
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for p in prompts:
            g, i = by_prompt[p], seen.get(p, 0)
            seen[p] = i + 1
            out["prompt_ids"].append(list(g.prompt.token_ids))
            out["completion_ids"].append(list(g.completions[i].token_ids))
            out["logprobs"].append(list(g.completions[i].logprobs))
        return out

    spec = trl_spec(cfg, "", [], world, Path(out_dir), use_vllm=False)

    ds = Dataset.from_list([{"prompt": tok.bos_token + g.prompt.text, "answer": g.prompt.answer} for g in groups])
    model = AutoModelForCausalLM.from_pretrained(world.model_path, dtype=torch.float32)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(cfg, tok.bos_token),
                          args=grpo_config(spec, logging_steps=10**9),
                          train_dataset=ds, processing_class=tok, rollout_func=rollout)
    return trainer, spec


def trl_steps(trainer, spec, groups, minibatch_rows, max_grad_norm: float):
    """TRL's update on GROUPS, one optimizer step per entry of MINIBATCH_ROWS, each from the weights TRL's own previous
    step left: ([{grad (before clipping), weights (after the step)}], TRL's scored batch)."""
    import torch

    model = trainer.model
    model.train()
    G = spec["group_size"]
    inputs = [{"prompt": trainer.processing_class.bos_token + g.prompt.text, "answer": g.prompt.answer}
              for g in groups for _ in range(G)]
    batch = trainer._generate_and_score_completions(inputs)  # rewards, advantages, old log-probs, token count
    trainer._prepare_inputs = lambda x: x  # training_step's own hook would generate again: feed slices instead
    micro = spec["per_device"]
    trainer.current_gradient_accumulation_steps = spec["grad_accum"]
    opt = trainer.create_optimizer()
    out = []
    for rows in minibatch_rows:
        model.zero_grad(set_to_none=True)
        for s in range(0, len(rows), micro):
            idx = rows[s:s + micro]
            piece = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(inputs) else v)
                     for k, v in batch.items()}
            trainer.training_step(model, piece, piece["num_items_in_batch"])
        grad = flat_grad(model)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        out.append({"grad": grad, "weights": flat_weights(model)})
    return out, batch


def predicted_ratio(minibatch_tokens: float, batch_tokens: float, steps: int, G: int | None = None) -> float:
    """|TRL grad| / |relayrl grad| from the two conventions alone: relayrl's token normaliser (the minibatch's
    tokens) over TRL's (batch tokens / steps), times sqrt((G-1)/G) for the advantages (sample against population
    std; for groups whose std is well above 1e-4) unless G is None (relayrl given TRL's advantages)."""
    return (1.0 if G is None else math.sqrt((G - 1) / G)) * minibatch_tokens / (batch_tokens / steps)


@contextmanager
def advantages_given(adv_PG):
    """While inside, relayrl's GRPO advantages are ADV_PG (P, G; TRL's, in the learner's row order): the control
    that tells the advantage conventions apart from everything else."""
    from learner import algos

    grpo = algos.grpo_advantages
    algos.grpo_advantages = lambda r, scale_by_std=True: adv_PG.to(r.dtype).reshape(r.shape)
    try:
        yield
    finally:
        algos.grpo_advantages = grpo


def relayrl_step(world, cfg, groups):
    """relayrl's Learner.train_step on GROUPS: (start weights, recorded optimizer steps, the step's metrics)."""
    from learner.actor import Learner

    learner = Learner(world.model_path, cfg.algo, cfg.learner, total_steps=cfg.steps, seed=cfg.seed,
                      sampler_dtype=cfg.generator.dtype)
    w0 = flat_weights(learner.policy)
    with recording_relayrl(learner) as steps:
        stats = learner.train_step(groups)
    return w0, steps, stats.metrics


def compare(name: str, ref: list[dict], other: list[dict], start, names, sizes, predicted) -> list[dict]:
    """Per optimizer step: gradient cosine (whole model, least-aligned tensor), norms (PREDICTED(step) is the norm
    ratio other / ref the conventions predict), and how far OTHER's weights are from REF's, relative to REF's update
    from START."""
    import torch

    cos_of = lambda x, y: float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))  # noqa: E731
    out = []
    for k, (a, b) in enumerate(zip(ref, other)):
        tensors = [(cos_of(x, y), n) for n, x, y in zip(names, a["grad"].split(sizes), b["grad"].split(sizes))
                   if x.norm() > 0 and y.norm() > 0]
        worst, worst_name = min(tensors)
        d_ref = a["weights"] - start
        out.append({"against": name, "step": k + 1, "rows": len(a["rows"]),
                    "one_minus_cos": 1 - cos_of(a["grad"], b["grad"]),
                    "worst_one_minus_cos": 1 - worst, "worst_tensor": worst_name,
                    "norm_ref": float(a["grad"].norm()), "norm_other": float(b["grad"].norm()),
                    "norm_ratio": float(b["grad"].norm() / a["grad"].norm()), "norm_ratio_predicted": predicted(a),
                    "update_rel_diff": float((d_ref - (b["weights"] - start)).norm() / d_ref.norm()),
                    "update_norm": float(d_ref.norm())})
        r = out[-1]
        print(f"{name}, optimizer step {k + 1}: 1 - cos {r['one_minus_cos']:.1e} (least-aligned tensor "
              f"{r['worst_one_minus_cos']:.1e}, {worst_name}), |g| {r['norm_ref']:.4f} and "
              f"{r['norm_other']:.4f}, ratio {r['norm_ratio']:.4f} (predicted {r['norm_ratio_predicted']:.4f}); "
              f"update difference {r['update_rel_diff']:.2e}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny",
                   help="tiny: the default 0.67M model; large: trl_compare's 27M model (lr 3e-5).")
    p.add_argument("--seed", type=int, default=0, help="The run's seed: warm start (world) and sampling.")
    p.add_argument("--config", default="examples/demo.yaml")
    p.add_argument("--extra", nargs="*", action="extend", default=[], help="More relayrl overrides, one per --extra=.")
    p.add_argument("--out", default="runs/bench-parity", help="TRL's output folder (nothing is saved there).")
    p.add_argument("--results-dir", default=None, help="Where trl_parity*.{json,md} go (default bench/results).")
    args = p.parse_args(argv)

    import torch
    import trl

    from cluster.world import ensure_world
    from core.config import load_config
    from learner.algos import grpo_advantages

    overrides = [*(LARGE_MODEL if args.model == "large" else []), f"--seed={args.seed}", *args.extra]
    cfg = load_config(args.config, overrides)
    if cfg.algo.estimator != "grpo" or cfg.algo.kl_coef or cfg.algo.entropy_coef:
        raise SystemExit("trl_parity compares GRPO without KL or entropy terms, as trl_compare runs it")
    if cfg.learner.warmup_steps:  # TRL's optimizer is stepped here at its configured rate, without its scheduler
        raise SystemExit("trl_parity compares the first step at the full learning rate: learner.warmup_steps=0")
    world = ensure_world(cfg)
    groups = sample_groups(cfg, world, args.seed)
    ordered = sorted(groups, key=lambda g: g.prompt.uid)  # the learner's row order (Learner.train_step)

    start, rl, metrics = relayrl_step(world, cfg, groups)
    # the rounding floor: the same update computed another exact way (one plain forward per row, no shared prompt
    # prefix; tests/unit/test_forward.py pins the two equal up to rounding) differs from relayrl's by this much
    plain_cfg = load_config(args.config, [*overrides, "--learner.shared_prefix=false"])
    _, rl_plain, _ = relayrl_step(world, plain_cfg, groups)

    trainer, spec = trl_trainer(cfg, world, args.out, groups)
    if not torch.equal(flat_weights(trainer.model), start):
        raise SystemExit("TRL's model does not start from relayrl's weights")
    tr, batch = trl_steps(trainer, spec, ordered, [s["rows"] for s in rl], cfg.learner.max_grad_norm)
    tokens, batch_tokens = batch["completion_mask"].sum(1), float(batch["num_items_in_batch"])

    G = cfg.algo.group_size
    adv_trl = batch["advantages"].reshape(-1, G)
    with advantages_given(adv_trl):
        _, rl_adv, _ = relayrl_step(world, cfg, groups)

    names = [n for n, _ in trainer.model.named_parameters()]
    sizes = [q.numel() for q in trainer.model.parameters()]
    rows_out = [
        *compare("TRL vs relayrl", rl, tr, start, names, sizes,
                 lambda s: predicted_ratio(float(tokens[s["rows"]].sum()), batch_tokens, len(rl), G)),
        *compare("TRL vs relayrl given TRL's advantages", rl_adv, tr, start, names, sizes,
                 lambda s: predicted_ratio(float(tokens[s["rows"]].sum()), batch_tokens, len(rl))),
        *compare("relayrl, plain forward vs relayrl (rounding floor)", rl, rl_plain, start, names, sizes,
                 lambda s: 1.0)]

    adv_rl = grpo_advantages(torch.tensor([list(g.rewards) for g in ordered]))
    untied = adv_rl.abs().sum(1) > 0
    adv_ratio = adv_trl[untied].norm(dim=1) / adv_rl[untied].norm(dim=1)
    tied = int((~untied).sum())
    md = table(rows_out, [("against", "B vs A", ""), ("step", "optimizer step", "d"),
                          ("rows", "samples", "d"), ("one_minus_cos", "1 - gradient cosine", ".1e"),
                          ("worst_one_minus_cos", "least-aligned tensor", ".1e"),
                          ("norm_ref", "|grad| A", ".4f"), ("norm_other", "|grad| B", ".4f"),
                          ("norm_ratio", "B / A", ".4f"), ("norm_ratio_predicted", "predicted", ".4f"),
                          ("update_rel_diff", "weights: update difference", ".1e")])
    md += (f"\n\nModel: {args.model}, seed {args.seed}; one RL step of {len(groups)} prompts x {G} samples "
           f"({cfg.algo.minibatches} optimizer steps, minibatch_split={cfg.algo.minibatch_split}), "
           f"lr {cfg.learner.lr:g}, "
           f"max_grad_norm {cfg.learner.max_grad_norm:g}, learner.compute_dtype {cfg.learner.compute_dtype}, "
           f"generator.dtype {cfg.generator.dtype}; TRL {trl.__version__}. Samples from relayrl's generator (vLLM); "
           f"TRL scored them and computed its advantages, old log-probs, loss and optimizer step with its own code, "
           f"on relayrl's minibatch rows. Gradients before clipping. Predicted norm ratio: TRL's sample std + 1e-4 "
           f"against relayrl's population std + 1e-6 (sqrt({G - 1}/{G}) = {math.sqrt((G - 1) / G):.4f}; measured "
           f"per untied group: {float(adv_ratio.min()):.4f}-{float(adv_ratio.max()):.4f}) times the token "
           f"normalisers (TRL: the batch's tokens / optimizer steps; relayrl: the minibatch's tokens). {tied} tied "
           f"group(s) (relayrl 0 exactly, TRL max |A| {float(adv_trl[~untied].abs().max()) if tied else 0.0:.1e}). "
           f"Update difference: |A's update - B's| / |A's update|, both from the same start weights, after each "
           f"optimizer step. 'relayrl given TRL's advantages': relayrl's learner with TRL's advantage numbers in place "
           f"of its own, everything else its own. Rounding floor: relayrl's update computed another exact way "
           f"(learner.shared_prefix=false).")
    print(md)
    payload = {"model": args.model, "seed": args.seed, "config": args.config, "extra": args.extra,
               "trl": trl.__version__, "rows": rows_out, "relayrl_metrics": metrics,
               "advantage_ratio": [float(adv_ratio.min()), float(adv_ratio.max())], "tied_groups": tied}
    name = "trl_parity" + ("" if args.model == "tiny" else f"_{args.model}")
    print(f"results: {write_results(name, payload, md, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
