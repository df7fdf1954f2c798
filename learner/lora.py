"""LoRA (Hu et al., 2021) for the learner: `learner.lora_rank = r > 0`.

Every targeted linear layer y = W x + b keeps W and b frozen and gains two trained matrices,
A (r x in) and B (out x r), so that it computes

    y = W x + b + (alpha / r) * B (A x)

B starts at zero, so the first forward is the base model's exactly. Only A and B (and a PPO critic's
value head) are trained: AdamW holds state for them alone, and the weight gradients of the frozen
matrices are never computed. The base model with every adapter switched off (`adapters_off`) is the
frozen initial policy, so KL to the reference needs no second copy of the model (as TRL does with
peft's `disable_adapter`).

What vLLM serves and what is saved is always a plain model, W + (alpha / r) B A under the base model's own
parameter names. Versions travel to the generators as the adapters alone (`adapter_tensors`, about 1/40 of the
model at r = 8 on the 27M model) and each generator merges them into the base it read from disk, with the same
formula (core.weights.lora_merge); `learner.lora_sync=merged` sends the merged model instead
(`merged_state_dict`, also what the final model is). The adapter alone is also written in PEFT's format
(`save_adapter`: adapter_config.json + adapter_model.safetensors), which peft's `PeftModel.from_pretrained` and
vLLM's LoRA support read.

Module layout follows peft's, so the names line up: a wrapped `q_proj` holds `base_layer`, `lora_A`
and `lora_B` (peft adds an adapter name level, `lora_A.default`, which its saved files leave out,
as ours do).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from core.weights import lora_merge

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."  # how peft names a causal LM's modules in its saved adapters


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default initialisation
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return lora_merge(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scale)


def target_names(model: torch.nn.Module, targets: str) -> list[str]:
    """Names of the linear layers TARGETS selects: `all-linear` (every nn.Linear but the output head, as peft's
    `all-linear`) or comma-separated module-name suffixes (`q_proj,v_proj`). Raises ValueError naming the
    suffixes that match nothing, and the linear layers there are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if targets.strip() == ALL_LINEAR:
        return linear
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise ValueError(f"no target modules in {targets!r}")
    unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"{unmatched} match no linear layer of the model (its linear layers: {kinds})")
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]


def apply_lora(model: torch.nn.Module, r: int, alpha: float, targets: str) -> list[str]:
    """Freeze MODEL and wrap its targeted linear layers in place; returns their names."""
    names = target_names(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
    return names


def lora_modules(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: torch.nn.Module):
    """MODEL as its frozen base inside the block (the reference policy)."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """MODEL's weights with every adapter folded in, under the base model's parameter names (what a plain
    model of the same architecture loads)."""
    mods = lora_modules(model)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    for name, m in mods.items():
        out[f"{name}.weight"] = m.merged_weight()
    return out


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained matrices as adapter-only publishing sends them: `<module>.lora_A` and `<module>.lora_B`, module
    names as in the base model (core.weights.merge_adapters reads them)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B"] = m.lora_B.weight.detach()
    return out


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained matrices under peft's saved names (`base_model.model.<module>.lora_A.weight`)."""
    return {f"{PEFT_PREFIX}{k}.weight": v.contiguous() for k, v in adapter_tensors(model).items()}


def save_adapter(model: torch.nn.Module, out_dir: str | Path, base_model: str, r: int, alpha: float) -> None:
    """Write MODEL's adapter as a PEFT folder: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(lora_modules(model))
    save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}), "use_rslora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Inverse of save_adapter into a model that apply_lora wrapped the same way; raises ValueError when the
    folder's matrices and the model's adapters differ in names or shapes."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    mine = adapter_state_dict(model)
    if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):
        raise ValueError(f"adapter {adapter_dir} does not match the model's adapters "
                         f"(missing {sorted(set(mine) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(mine))[:3]})")
    for k, v in mine.items():
        v.copy_(saved[k])
