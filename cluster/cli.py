"""`relayrl` command line.

    relayrl train [--config FILE.yaml] [--key.path=value ...]
    relayrl config [--config FILE.yaml] [overrides]    # print the resolved, validated config
    relayrl submit [--address http://HEAD:8265] [--no-wait] -- [train args]   # as a Ray job
    relayrl scale --generators N [--address ADDR]      # resize a running job's generators
    relayrl stop | status [--address ADDR]            # end a running job / print its live state
    relayrl reward-server --function module:fn [--host 127.0.0.1] [--port 8000] [--max-body-bytes N]
                          [--config FILE.yaml] [--reward.field=value ...]   # serve a reward over HTTP

Overrides use the dotted field names printed by `relayrl train --help`, e.g.
`--learner.lr=1e-4 --generator.num_generators=3`.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from core.config import ConfigError, help_text, load_config, to_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayrl", description="Distributed RL fine-tuning of language models on Ray + vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, desc in (("train", "Run a training job."), ("config", "Print the resolved, validated config."),
                       ("eval", "Evaluate a model folder (--model.path; default: the built-in warm start) on the "
                                "held-out prompts as a job does: greedy accuracy by the job's reward, pass@k with "
                                "--eval_samples, multi-turn episodes with --rollout.env. Prints JSON on stdout "
                                "(progress on stderr); trains and writes nothing.")):
        s = sub.add_parser(name, help=desc, description=desc + "\n\nConfig fields (override as --key=value):\n" + help_text(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", help="YAML config file (fields as below, nested by section).")
        if name == "train":
            s.add_argument("--resume", metavar="RUN_DIR",
                           help="Continue a stopped or killed job from its latest checkpoint (its config.yaml, "
                                "plus any overrides given here).")
    desc = ("Serve a reward function over HTTP (POST /score, GET /health) for reward.http:HttpScorer. "
            "The reward.* fields (e.g. --reward.model_path for reward.model:RewardModel) configure a scorer class.")
    s = sub.add_parser("reward-server", help="Serve a reward function over HTTP.", description=desc)
    s.add_argument("--function", help="Reward as 'module:function' or 'module:Class' (default: reward.function).")
    s.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000).")
    s.add_argument("--max-body-bytes", type=_positive_int, default=8 * 2**20,
                   help="Refuse larger request bodies with 413 (default 8 MiB).")
    s.add_argument("--config", help="YAML config file whose reward section configures the scorer.")
    s = sub.add_parser("submit", help="Submit `relayrl train` to a Ray cluster through the Jobs API.",
                       description="Submit `relayrl train ARGS` as a Ray job (working directory uploaded). "
                                   "Usage: relayrl submit --address http://HEAD:8265 -- [train args]")
    s.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / Jobs API address.")
    s.add_argument("--no-wait", action="store_true", help="Return after submitting instead of following the job.")
    s.add_argument("--timeout", type=float, default=24 * 3600, help="Seconds to follow the job (default 1 day).")
    for name, desc in (("scale", "Change the number of generators of a running job."),
                       ("stop", "End a running job after its current step (model and summary are written)."),
                       ("status", "Print a running job's live state as JSON.")):
        s = sub.add_parser(name, help=desc, description=desc)
        s.add_argument("--address", default="auto",
                       help="Ray cluster of the job (default: auto = the local cluster, or RAY_ADDRESS).")
        if name == "scale":
            s.add_argument("--generators", type=_positive_int, required=True, help="New number of generators.")
    return p


def _control(args) -> int:
    """scale / stop / status: talk to the running job's control actor."""
    import json

    from cluster.control import find_control

    import ray

    try:
        control = find_control(args.address)
    except (RuntimeError, ConnectionError) as e:
        print(f"relayrl: {e}", file=sys.stderr)
        return 1
    if args.cmd == "scale":
        ray.get(control.request_generators.remote(args.generators), timeout=30)
        print(f"requested {args.generators} generators; the job applies it between calls "
              f"(watch with `relayrl status`)")
    elif args.cmd == "stop":
        ray.get(control.request_stop.remote(), timeout=30)
        print("stop requested; the job ends after its current step")
    else:
        print(json.dumps(ray.get(control.status.remote(), timeout=30), indent=2))
    return 0


def _positive_int(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return int(v)


def _port(v: str) -> int:
    if not v.isdigit() or not 0 < int(v) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {v!r}")
    return int(v)


def _split_overrides(rest: list[str]) -> list[str]:
    """Accept both `--a.b=v` and `--a.b v`."""
    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --section.field=value")
        if "=" in tok:
            out.append(tok[2:])
            i += 1
        elif i + 1 < len(rest):
            out.append(f"{tok[2:]}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{tok[2:]}: missing value")
    return out


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    from cluster.control import client_auth_env

    if args.cmd == "submit":
        from cluster.submit import submit

        client_auth_env()
        return submit(args.address, [a for a in rest if a != "--"], wait=not args.no_wait, timeout_s=args.timeout,
                      log=lambda m: print(m, flush=True))
    if args.cmd in ("scale", "stop", "status"):
        if rest:
            print(f"relayrl: unexpected arguments {rest}", file=sys.stderr)
            return 2
        client_auth_env()  # before anything imports ray, which reads it once
        return _control(args)
    try:
        overrides = _split_overrides(rest)
        if args.cmd == "reward-server" and args.function:
            overrides.append(f"reward.function={args.function}")
        if getattr(args, "resume", None):
            from cluster.driver import resume_config

            cfg = resume_config(args.resume, overrides)
        else:
            cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"relayrl: config error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if args.cmd == "reward-server":
        from reward.server import serve
        from reward.worker import check_source

        # like uvicorn's --app-dir: a reward module in the working directory is found without installing it
        # (Ray reward actors get the driver's working directory on their path in the same way)
        sys.path.insert(0, os.getcwd())
        try:
            check_source(cfg.reward)
        except ValueError as e:
            print(f"relayrl: config error: {e}", file=sys.stderr)
            return 2
        print(f"serving {cfg.reward.function} on http://{args.host}:{args.port}/score", flush=True)
        serve(cfg.reward, args.host, args.port, args.max_body_bytes)
        return 0
    from cluster.driver import evaluate_model, run

    from cluster.data import DatasetError

    if cfg.ray_address:
        client_auth_env()  # a client of an existing cluster; before run() imports ray
    try:
        if args.cmd == "eval":
            import json

            result = evaluate_model(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
            print(json.dumps(result, indent=2), flush=True)
            return 0
        summary = run(cfg, log=lambda msg: print(msg, flush=True), resume=bool(args.resume))
    except DatasetError as e:  # raised before Ray or vLLM start
        print(f"relayrl: data error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # e.g. a run directory that already holds a run; raised before anything starts
        print(f"relayrl: config error: {e}", file=sys.stderr)
        return 2
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
