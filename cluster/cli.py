"""`relayrl` command line.

    relayrl train [--config FILE.yaml] [--key.path=value ...]
    relayrl config [--config FILE.yaml] [overrides]    # print the resolved, validated config

Overrides use the dotted field names printed by `relayrl train --help`, e.g.
`--learner.lr=1e-4 --generator.num_generators=3`.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from core.config import ConfigError, help_text, load_config, to_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayrl", description="Distributed RL fine-tuning of language models on Ray + vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, desc in (("train", "Run a training job."), ("config", "Print the resolved, validated config.")):
        s = sub.add_parser(name, help=desc, description=desc + "\n\nConfig fields (override as --key=value):\n" + help_text(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", help="YAML config file (fields as below, nested by section).")
    return p


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
    try:
        cfg = load_config(args.config, _split_overrides(rest))
    except ConfigError as e:
        print(f"relayrl: config error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from cluster.driver import run

    summary = run(cfg, log=lambda msg: print(msg, flush=True))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
