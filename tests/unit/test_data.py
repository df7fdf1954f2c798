"""Prompt datasets: every kind of malformed row is refused with its file and row number."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data import DatasetError, load_prompts


class CharTok:
    """Stand-in tokenizer: one token per character, BOS id 1 (what cluster.world.encode adds)."""

    bos_token, bos_token_id, chat_template = "<s>", 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def encode(tok, text):
    return [1] + tok(text)["input_ids"]


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


GOOD = {"prompt": "abc=", "answer": "cba"}


def test_good_rows_load_as_text_ids_answer(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {"prompt": "ab=", "answer": "ba", "extra": 1}])
    assert load_prompts(path, CharTok(), encode, 10) == [
        ("abc=", (1, 97, 98, 99, 61), "cba"), ("ab=", (1, 97, 98, 61), "ba")]


def test_parquet_rows_load(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["abc="], "answer": ["cba"]}), str(p))
    assert load_prompts(str(p), CharTok(), encode, 10)[0][2] == "cba"


@pytest.mark.parametrize("bad, message", [
    ({"answer": "x"}, "row 1: missing field 'prompt' (or 'messages')"),
    ({"prompt": 5, "answer": "x"}, "row 1: field 'prompt' must be a string, got int"),
    ({"prompt": "   ", "answer": "x"}, "row 1: field 'prompt' is empty"),
    ({"prompt": "abc="}, "row 1: missing field 'answer'"),
    ({"prompt": "abc=", "answer": 3}, "row 1: field 'answer' must be a string, got int"),
    ({"prompt": "abcdefghijklmnop=", "answer": "x"}, "row 1: prompt is 18 tokens, longer than the 10"),
    ({"messages": "hi", "answer": "x"}, "row 1: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "answer": "x"}, "row 1: field 'messages' needs a tokenizer with a chat template"),
    ("[1, 2]", "row 1: expected an object"),
    ("{not json", "row 1 (line 2): not valid JSON"),
])
def test_malformed_row_is_named(tmp_path, bad, message):
    path = _jsonl(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DatasetError) as e:
        load_prompts(path, CharTok(), encode, 10)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_wrong_type_column_in_parquet_is_named(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["abc=", "ab="], "answer": [1, 2]}), str(p))
    with pytest.raises(DatasetError, match=r"row 0: field 'answer' must be a string, got int"):
        load_prompts(str(p), CharTok(), encode, 10)


def test_empty_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="no rows"):
        load_prompts(_jsonl(tmp_path, []), CharTok(), encode, 10)
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DatasetError, match="cannot read"):
        load_prompts(str(bad), CharTok(), encode, 10)
