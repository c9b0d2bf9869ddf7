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

    def choice_scores(self, model, hidden, rows):
        self.calls.append("choice_scores")
        return super().choice_scores(model, hidden, rows)


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
    assert kind.calls == ["embed", "run_layers", "run_layers", "choice_scores"]
