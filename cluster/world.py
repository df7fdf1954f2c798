"""The tiny world relayrl builds for itself, because no model can be downloaded here.

- a character-level tokenizer saved as a Hugging Face `PreTrainedTokenizerFast`;
- a task family with checkable answers (reverse a word over a small alphabet), written as
  Parquet train and held-out files (disjoint words);
- a small Llama causal LM saved with `save_pretrained`, warm-started by a short supervised run so
  that RL begins from a policy that is right some of the time.

Everything is cached under `model.cache_dir` keyed by a hash of the settings that shape it, so a
second run (or the test suite) reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.config import Config, ModelConfig, TaskConfig

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789=+-*:>?., ")
PAD, BOS, EOS = 0, 1, 2
WORLD_FORMAT = 1  # bump when the layout below changes, so caches are rebuilt


@dataclass(frozen=True)
class World:
    model_path: str
    train_path: str
    heldout_path: str


def build_tokenizer(out_dir: str | os.PathLike) -> None:
    """Character-level tokenizer: every character is a token; BOS is prepended by the caller."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right")
    fast.save_pretrained(str(out_dir))


def encode(tokenizer, text: str) -> list[int]:
    """Prompt token ids as the whole system uses them: the tokenizer's BOS (if it has one) + the text's
    tokens. Chat-templated text already carries its special tokens, so none are added twice."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)) else [bos] + ids


def word_lengths(word_length: int, max_word_length: int) -> list[int]:
    """The word lengths the task draws from: just WORD_LENGTH, or WORD_LENGTH..MAX_WORD_LENGTH (weights 1/L^2)."""
    return list(range(word_length, max(word_length, max_word_length) + 1))


def make_reverse_task(cfg: TaskConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows {prompt, answer}; held-out words never appear in training."""
    letters = "abcdefghijklmnopqrstuvwxyz"[: cfg.alphabet_size]
    total = cfg.train_size + cfg.heldout_size
    if total > cfg.alphabet_size ** cfg.word_length:
        raise ValueError("task: train_size + heldout_size exceeds the number of distinct words")
    rng = random.Random(seed)
    lengths = word_lengths(cfg.word_length, cfg.max_word_length)
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < total:
        # fixed length draws nothing for it, so the default task's words (and cached worlds) stay as they were
        n = lengths[0] if len(lengths) == 1 else rng.choices(lengths, weights=[1 / L ** 2 for L in lengths])[0]
        w = "".join(rng.choice(letters) for _ in range(n))
        if w not in words:
            words.add(w)
            ordered.append(w)
    rows = [{"prompt": f"{w}=", "answer": w[::-1]} for w in ordered]
    return rows[: cfg.train_size], rows[cfg.train_size:]


def write_rows(rows: list[dict], path: str | os.PathLike) -> None:
    table = pa.table({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})
    pq.write_table(table, str(path))


def read_rows(path: str | os.PathLike) -> list[dict]:
    return pq.read_table(str(path)).to_pylist()


def build_model(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    mc = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=max_len,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
        dtype="float32",
    )
    return LlamaForCausalLM(mc)


def _key(cfg: Config) -> str:
    task = dataclasses.asdict(cfg.task)
    if not task["max_word_length"]:  # a field added later: fixed-length worlds keep their cache keys
        del task["max_word_length"]
    payload = {"format": WORLD_FORMAT, "task": task, "seed": cfg.seed,
               "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("cache_dir", "path")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def ensure_world(cfg: Config, log=print) -> World:
    """Build (or reuse from cache) the tokenizer, data and warm-started model for `cfg`."""
    root = Path(cfg.model.cache_dir) / f"world-{cfg.task.name}-{_key(cfg)}"
    world = World(str(root / "model"), str(root / "train.parquet"), str(root / "heldout.parquet"))
    if (root / "DONE").exists():
        return world
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    log(f"building the tiny world in {root} (once; cached afterwards)")

    train, heldout = make_reverse_task(cfg.task, cfg.seed)
    write_rows(train, tmp / "train.parquet")
    write_rows(heldout, tmp / "heldout.parquet")
    build_tokenizer(tmp / "model")

    from transformers import AutoTokenizer

    from learner.sft import supervised_warmstart

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "model"))
    max_len = 1 + max(len(r["prompt"]) + len(r["answer"]) for r in train + heldout) + 1
    model = build_model(cfg.model, len(tokenizer), max(64, 4 * max_len), cfg.seed)
    examples = [(encode(tokenizer, r["prompt"]), tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [EOS])
                for r in train]
    if cfg.model.warmstart_steps:
        loss = supervised_warmstart(model, examples, steps=cfg.model.warmstart_steps, lr=cfg.model.warmstart_lr,
                                    batch_size=cfg.model.warmstart_batch, seed=cfg.seed, pad_id=PAD)
        log(f"warm-start: {cfg.model.warmstart_steps} SFT steps, final loss {loss:.3f}")
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # atomic: a half-built world is never seen as done
    return world
