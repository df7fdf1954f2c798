"""learner/lora.py: the adapted layer's numbers by hand, and the model-level contract (a fresh adapter changes
nothing, merged weights are the adapted model, adapters off is the base, only the adapters train, PEFT's
format round-trips through peft itself)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.weights import merge_adapters
from learner.lora import (LoRALinear, adapter_state_dict, adapter_tensors, adapters_off, apply_lora, load_adapter,
                          merged_state_dict, save_adapter, target_names)


def test_adapted_layer_and_its_merged_weight_by_hand():
    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    layer = LoRALinear(base, r=1, alpha=2.0)  # scale alpha / r = 2
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[0.5], [-1.0]]))
    x = torch.tensor([1.0, 2.0])
    # W x = [5, 11]; A x = 3; B A x = [1.5, -3]; times 2 = [3, -6]
    assert layer(x).tolist() == [8.0, 5.0]
    # W + 2 B A = [[1 + 1, 2 + 1], [3 - 2, 4 - 2]]
    assert layer.merged_weight().tolist() == [[2.0, 3.0], [1.0, 2.0]]
    layer.enabled = False
    assert layer(x).tolist() == [5.0, 11.0]


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.tensor([[1, 5, 7, 9, 3, 2], [4, 4, 8, 1, 0, 6]])


def _nudged(model) -> None:
    """Give every adapter a non-zero B, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def test_targets_all_linear_leaves_out_the_head_and_suffixes_pick_layers():
    m = _tiny()
    names = target_names(m, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down, per layer
    assert target_names(m, "q_proj, v_proj") == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                 "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*q_proj"):
        target_names(m, "q_proj,qkv")


def test_fresh_adapters_change_nothing_and_only_adapters_get_gradients():
    base, m = _tiny(), _tiny()
    apply_lora(m, r=4, alpha=8, targets="all-linear")
    assert torch.equal(base(IDS).logits, m(IDS).logits)  # B starts at 0
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _nudged(m)
    m(IDS).logits.sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_A" in n)


def test_merged_weights_are_the_adapted_model_and_adapters_off_is_the_base():
    base, m = _tiny(), _tiny()
    apply_lora(m, r=4, alpha=8, targets="q_proj,v_proj,down_proj")
    _nudged(m)
    merged = merged_state_dict(m)
    assert set(merged) == set(base.state_dict())  # the base model's own names
    plain = _tiny(seed=1)
    plain.load_state_dict(merged)
    adapted = m(IDS).logits
    assert (adapted - base(IDS).logits).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(plain(IDS).logits, adapted, atol=1e-5, rtol=0)
    with adapters_off(m):
        assert torch.equal(m(IDS).logits, base(IDS).logits)
    torch.testing.assert_close(m(IDS).logits, adapted, atol=0, rtol=0)  # back on after the block


def test_adapters_alone_merge_into_the_base_as_the_learner_merges_them():
    """learner.lora_sync=adapter: what a generator computes from the base's state dict and the published adapters
    is bit for bit the learner's merged model, including a target list that adapts part of a fused q/k/v."""
    base, m = _tiny(), _tiny()
    apply_lora(m, r=4, alpha=8, targets="q_proj,v_proj,down_proj")
    _nudged(m)
    sent = adapter_tensors(m)
    assert sorted(sent)[:2] == ["model.layers.0.mlp.down_proj.lora_A", "model.layers.0.mlp.down_proj.lora_B"]
    got = merge_adapters(base.state_dict(), sent, scale=8 / 4)
    want = merged_state_dict(m)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["model.layers.1.self_attn.v_proj.weight"], base.state_dict()["model.layers.1.self_attn.v_proj.weight"])


def test_merge_by_hand_and_an_adapter_that_does_not_fit_is_refused():
    base = {"l.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n.weight": torch.tensor([7.0])}
    adapters = {"l.lora_A": torch.tensor([[1.0, 1.0]]), "l.lora_B": torch.tensor([[0.5], [-1.0]])}
    out = merge_adapters(base, adapters, scale=2.0)
    # W + 2 B A = [[1 + 1, 2 + 1], [3 - 2, 4 - 2]]; the layer without an adapter is passed through
    assert out["l.weight"].tolist() == [[2.0, 3.0], [1.0, 2.0]]
    assert out["n.weight"] is base["n.weight"]
    with pytest.raises(ValueError, match="'l' does not fit"):
        merge_adapters(base, {"l.lora_A": torch.ones(1, 3), "l.lora_B": torch.ones(2, 1)}, scale=1.0)
    with pytest.raises(ValueError, match="'m' does not fit"):
        merge_adapters(base, {"m.lora_A": torch.ones(1, 2), "m.lora_B": torch.ones(2, 1)}, scale=1.0)


def test_peft_folder_round_trips_through_peft_and_back(tmp_path):
    import peft  # a test dependency (pyproject's `test` extra)
    m = _tiny()
    apply_lora(m, r=4, alpha=8, targets="all-linear")
    _nudged(m)
    base_dir = tmp_path / "base"
    _tiny().save_pretrained(base_dir)
    save_adapter(m, tmp_path / "adapter", str(base_dir), r=4, alpha=8)

    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(IDS).logits, m(IDS).logits, atol=1e-5, rtol=0)

    again = _tiny()
    apply_lora(again, r=4, alpha=8, targets="all-linear")
    load_adapter(again, tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(again).values(), adapter_state_dict(m).values()))
    other = _tiny()
    apply_lora(other, r=2, alpha=8, targets="all-linear")
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, tmp_path / "adapter")
