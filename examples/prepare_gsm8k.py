"""Write GSM8K as relayrl chat datasets: OUT/gsm8k-{train,test}.jsonl, one row per problem with
`messages` (a user turn asking for a boxed answer) and `answer` (the final number).

    pip install datasets && python examples/prepare_gsm8k.py data/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{N}."


def main(out: str) -> None:
    from datasets import load_dataset

    Path(out).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(Path(out) / f"gsm8k-{split}.jsonl", "w") as f:
            for row in load_dataset("openai/gsm8k", "main", split=split):
                answer = row["answer"].split("####")[-1].strip().replace(",", "")
                msg = [{"role": "user", "content": f"{row['question']}\n\n{INSTRUCTION}"}]
                f.write(json.dumps({"messages": msg, "answer": answer}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data")
