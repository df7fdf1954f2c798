"""Score with a learned reward model: `reward.function=reward.model:RewardModel`, `reward.model_path=DIR`.

DIR is a local Hugging Face folder holding a tokenizer and an AutoModelForSequenceClassification
with num_labels=1 (e.g. saved with `save_pretrained`); nothing is downloaded. The model is loaded
once per reward actor (the worker builds the class once) and runs there on CPU, in float32,
`reward.model_batch_size` sequences per forward pass, with the actor's share of threads.

The score of a sample is the model's single logit for the text `prompt + completion`. A model
trained on a chat format needs that format applied: write a small subclass overriding `texts`.
"""

from __future__ import annotations


class RewardModel:
    def __init__(self, path: str, batch_size: int = 8, num_threads: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).float().eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.model_path: {path} has num_labels={self.model.config.num_labels}; "
                             f"a reward model gives one score per sequence (num_labels=1)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the head reads the last non-pad token of each row
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Too long a sequence loses its start, not its end: the end of the completion is what is judged.
        self.tokenizer.truncation_side = "left"

    @classmethod
    def from_config(cls, cfg) -> "RewardModel":
        if not cfg.model_path:
            raise ValueError("reward.model_path: required by reward.model:RewardModel")
        # a reward actor reserves reward.num_cpus (often a fraction): one thread unless it holds more
        return cls(cfg.model_path, cfg.model_batch_size, num_threads=max(1, int(cfg.num_cpus)))

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        return [p + c for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        import torch

        texts = self.texts(prompts, completions)
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     return_tensors="pt")
                # only ids and mask: some tokenizers add token_type_ids, which decoder models refuse
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                out.extend(logits[:, 0].tolist())
        return out
