"""Prompt datasets: Parquet or JSON lines, validated row by row before anything starts.

Schema (one row per prompt):
    prompt    str, non-empty              the prompt text, or instead:
    messages  list of {role, content}     a chat, rendered with the tokenizer's chat template
    answer    str                         the label the reward function checks against

A malformed row stops the job before Ray or vLLM start, with the file and row number (0-based, as
pyarrow and pandas count) and what is wrong, instead of failing mid-run or being silently skipped.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    pass


def read_table(path: str) -> list[dict]:
    """Rows of a .parquet or .jsonl file as dicts."""
    p = Path(path)
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(str(p)).to_pylist()
        if p.suffix == ".jsonl":
            import json

            rows = []
            for i, line in enumerate(p.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}: row {len(rows)} (line {i + 1}): not valid JSON ({e})") from None
            return rows
    except DatasetError:
        raise
    except Exception as e:  # unreadable file: say which
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    raise DatasetError(f"{path}: unsupported file type {p.suffix!r} (use .parquet or .jsonl)")


def prompt_text(row: dict, tokenizer) -> str:
    if "messages" in row and row["messages"] is not None:
        return tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
    return row["prompt"]


def _row_error(row, tokenizer) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object with fields prompt/messages and answer, got {type(row).__name__}"
    has_prompt = row.get("prompt") is not None
    has_messages = row.get("messages") is not None
    if not has_prompt and not has_messages:
        return "missing field 'prompt' (or 'messages')"
    if has_prompt and not isinstance(row["prompt"], str):
        return f"field 'prompt' must be a string, got {type(row['prompt']).__name__}"
    if has_prompt and not row["prompt"].strip():
        return "field 'prompt' is empty"
    if has_messages:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs)):
            return "field 'messages' must be a non-empty list of {role: str, content: str}"
        if getattr(tokenizer, "chat_template", None) is None:
            return "field 'messages' needs a tokenizer with a chat template (this model has none)"
    if "answer" not in row or row["answer"] is None:
        return "missing field 'answer'"
    if not isinstance(row["answer"], str):
        return f"field 'answer' must be a string, got {type(row['answer']).__name__}"
    return None


def load_prompts(path: str, tokenizer, encode, max_prompt_tokens: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(text, token ids, answer) per row; raises DatasetError naming the first bad row.

    encode(tokenizer, text) -> token ids, as the rest of the system tokenizes prompts.
    max_prompt_tokens: the model's context minus the generation budget.
    """
    rows = read_table(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows):
        err = _row_error(row, tokenizer)
        if err:
            raise DatasetError(f"{path}: row {i}: {err}")
        text = prompt_text(row, tokenizer)
        ids = tuple(encode(tokenizer, text))
        if len(ids) > max_prompt_tokens:
            raise DatasetError(f"{path}: row {i}: prompt is {len(ids)} tokens, longer than the {max_prompt_tokens} "
                               f"the model's context leaves after generator.max_new_tokens")
        out.append((text, ids, row["answer"]))
    return out
