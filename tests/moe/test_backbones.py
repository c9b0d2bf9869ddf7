"""The backbone registry: kinds decided from a model's configuration, and a new kind as one class plus
one ``register`` line, built into an MCModel and a GroupStepper that run it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

from routing_env.data import MCBatch
from routing_env.moe import MCModel, MoEConfig, build_model, save_checkpoint
from routing_env.moe.backbones import KINDS, EncoderKind, get_kind, kind_for, register
from routing_env.moe.stepper import GroupStepper, Rows
from tests.conftest import random_pairs_batch, tiny_bert


@pytest.fixture
def registry():
    """The registry as it was, restored after the test (a test's kinds do not leak into others)."""
    saved = dict(KINDS)
    yield KINDS
    KINDS.clear()
    KINDS.update(saved)


def test_the_kind_comes_from_the_configuration():
    assert kind_for(BertConfig()).name == "encoder"  # the fallback
    for cfg in (LlamaConfig(), Qwen2Config(), GPT2Config(), BertConfig(architectures=["MistralForCausalLM"])):
        assert kind_for(cfg).name == "causal"
    with pytest.raises(ValueError, match="unknown backbone kind 'nope'; valid: 'causal', 'encoder'"):
        MCModel(tiny_bert()[0], "nope")


class TracedEncoder(EncoderKind):
    """A new kind, defined here: the encoder's, claiming configurations that carry ``traced=True`` and
    recording which of its group-wise methods ran."""

    name = "traced-encoder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def matches(self, config) -> bool:
        return bool(getattr(config, "traced", False))

    def embed(self, model, rows):
        self.calls.append("embed")
        return super().embed(model, rows)

    def run_layers(self, model, stack, layers, hidden, attention_mask):
        self.calls.append("run_layers")
        return super().run_layers(model, stack, layers, hidden, attention_mask)

    def row_scores(self, model, hidden, rows):
        self.calls.append("row_scores")
        return super().row_scores(model, hidden, rows)


def test_a_new_kind_is_one_class_and_a_register_line(registry, tmp_path):
    kind = register(TracedEncoder())  # the registry line
    module, _ = tiny_bert()
    module.config.traced = True
    assert kind_for(module.config) is kind and kind_for(BertConfig()).name == "encoder"
    assert get_kind("traced-encoder") is kind
    model = build_model("lora-moe", "tiny", MoEConfig(num_groups=2), backbone_module=(module, "traced-encoder")).eval()
    assert model.kind == "traced-encoder" and model.backbone_kind is kind
    assert json.loads((save_checkpoint(model, tmp_path / "c") / "adapter_config.json").read_text())["kind"] == kind.name

    b = random_pairs_batch(B=2, C=4)
    one = MCBatch(input_ids=b.input_ids[1:], attention_mask=b.attention_mask[1:], token_type_ids=b.token_type_ids[1:],
                  choice_mask=b.choice_mask[1:], labels=b.labels[1:], letter_ids=None, ids=b.ids[1:])
    with torch.no_grad():
        expected = model(one)[0]  # [C]
    # The example's rows as the env encodes them (length-sorted, cut to the longest).
    mask = one.attention_mask[0]
    order = torch.argsort(mask.sum(1), stable=True)
    T = int(mask.sum(1).max())
    rows = Rows(one.input_ids[0][order, :T], mask[order, :T], one.token_type_ids[0][order, :T])
    stepper = GroupStepper(model)
    h = stepper.embed(rows)
    for g in range(stepper.num_groups):
        h = stepper.run_group(h, rows.attention_mask, g, None)
    # Same ops on the same [C, T] rows as the plain forward of this one example: bit for bit.
    assert torch.equal(stepper.choice_scores(h, rows), expected[order])
    assert kind.calls == ["embed", "run_layers", "run_layers", "row_scores"]


def test_mistral_keeps_its_sliding_window():
    """A config with a sliding window and no per-layer types (Mistral) slides in every layer, as transformers'
    forward does: prompts longer than the window would otherwise attend too far (0.045 off on this model)."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.conftest import random_prompt_batch
    from tests.tolerances import LOGP_ATOL

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=48, max_position_embeddings=64, sliding_window=3)
    lm = MistralForCausalLM(cfg).eval()
    batch = random_prompt_batch(T=11)  # left-padded prompts of 4 to 11 tokens: longer than the window
    model = MCModel(lm, "causal")
    with torch.no_grad():
        ours = model(batch)
        hf = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1, :].gather(1, batch.letter_ids)
    torch.testing.assert_close(ours, hf, rtol=0, atol=LOGP_ATOL)


def test_a_causal_lm_the_loop_does_not_know_runs_its_own_forward_and_the_env_refuses_it():
    """GPT-NeoX (Pythia) names its final norm otherwise: the layer loop would skip it and score wrongly, so
    such a model is scored by its own transformers forward, and the group-wise env refuses it by name."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from routing_env.moe.backbones.causal_lm import LOOP_MODEL_TYPES
    from tests.conftest import random_prompt_batch

    torch.manual_seed(4)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        max_position_embeddings=64, architectures=["GPTNeoXForCausalLM"])  # as a hub config names it
    lm = GPTNeoXForCausalLM(cfg).eval()
    assert kind_for(cfg).name == "causal" and "gpt_neox" not in LOOP_MODEL_TYPES
    batch = random_prompt_batch(T=11)
    model = MCModel(lm, "causal")
    with torch.no_grad():
        ours = model(batch)
        hf = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1, :].gather(1, batch.letter_ids)
    assert torch.equal(ours, hf.float())
    rows = Rows(batch.input_ids[:1], batch.attention_mask[:1], None, batch.letter_ids[:1])
    with pytest.raises(ValueError, match="model types llama, mistral, qwen2, qwen3, gpt2; this one is 'gpt_neox'"):
        model.backbone_kind.embed(model, rows)  # what the env's stepper calls first


def test_a_checkpoint_reloads_as_the_kind_it_was_trained_as(tmp_path, registry):
    from routing_env.moe import load_checkpoint

    kind = register(TracedEncoder())
    model = build_model("lora-moe", "minilm", MoEConfig(num_experts=2, top_k=1, rank=2, num_groups=3))
    save_checkpoint(model, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["kind"] = kind.name  # trained as the traced kind (its ``matches`` is false for MiniLM's config)
    cfg_path.write_text(json.dumps(cfg))
    assert load_checkpoint(tmp_path / "ckpt").backbone_kind is kind
    KINDS.pop(kind.name)
    with pytest.raises(ValueError, match="trained as backbone kind 'traced-encoder', which is not registered"):
        load_checkpoint(tmp_path / "ckpt")
