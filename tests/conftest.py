"""Shared fixtures: the real offline data folder, the packaged MiniLM, and tiny random backbones."""

from __future__ import annotations

import os

# Triton kernels run in Triton's CPU interpreter in the tests (tests/moe/test_triton_kernel.py). Set
# before anything imports triton (transformers does): the interpreter only works when the variable is
# set at import time. On a GPU machine, TRITON_INTERPRET=0 runs them compiled instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from routing_env.data import MCBatch


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("ROUTING_ENV_DATA")
    if not d or not Path(d).is_dir():
        pytest.skip("ROUTING_ENV_DATA is not set to the offline data folder")
    return Path(d)


def tiny_bert(layers: int = 4) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).eval(), "encoder"


def tiny_llama(layers: int = 4) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), "causal"


#: the decoder families the tests build tiny random models of (``save_tiny_decoder``)
DECODER_FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_bpe_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    end = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=tk, eos_token=end, bos_token=end, unk_token=end)


def save_tiny_decoder(family: str, folder: Path, tokenizer, layers: int = 4) -> Path:
    """A tiny random causal LM of ``family`` saved with ``tokenizer`` to ``folder``: a ``--backbone`` folder.

    No download: the model is built from a config object (``layers`` layers, hidden 32, ``vocab_size``
    the tokenizer's). Qwen2 uses a sliding window from its third layer on (shorter than ARC prompts), so
    both of its mask types are exercised.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    V, end = len(tokenizer), tokenizer.eos_token_id
    torch.manual_seed({"llama": 11, "qwen2": 12, "gpt2": 13}[family])
    common = dict(vocab_size=V, bos_token_id=end, eos_token_id=end)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=48, max_position_embeddings=256, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=48, max_position_embeddings=256, use_sliding_window=True,
                                             sliding_window=24, max_window_layers=2, **common))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=2, n_inner=48, n_positions=256, **common))
    else:
        raise ValueError(f"unknown decoder family {family!r}; valid: {DECODER_FAMILIES}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer(data_dir):
    """``tiny_bpe_tokenizer`` trained on 200 ARC-Easy training prompts (about a second)."""
    from routing_env.data import letter_prompt_text, resolve_task

    return tiny_bpe_tokenizer([letter_prompt_text(e) for e in resolve_task("arc-easy").load("train", data_dir, limit=200)])


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory, bpe_tokenizer) -> dict[str, Path]:
    """family -> a tiny random decoder's ``--backbone`` folder (``save_tiny_decoder``), for each of ``DECODER_FAMILIES``."""
    root = tmp_path_factory.mktemp("decoders")
    return {f: save_tiny_decoder(f, root / f, bpe_tokenizer) for f in DECODER_FAMILIES}


def tiny_moe_with_distinct_experts(moe, seed: int = 0):
    """A LoRA-MoE on ``tiny_bert`` whose trainable tensors are random (scale 0.3) instead of LoRA's zero ``B``:
    experts that differ, so a wrong expert or gate changes the output (by ~1e-1)."""
    from routing_env.moe import build_model

    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=moe, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def random_pairs_batch(B: int = 3, C: int = 4, T: int = 9, seed: int = 0) -> MCBatch:
    """An encoder batch of random ids with ragged lengths and one padded choice."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (B, C, T), generator=g)
    lengths = torch.randint(3, T + 1, (B, C), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
    choice_mask = torch.ones(B, C, dtype=torch.bool)
    choice_mask[0, -1] = False
    return MCBatch(input_ids=ids * mask, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                   choice_mask=choice_mask, labels=torch.randint(0, C - 1, (B,), generator=g),
                   letter_ids=None, ids=[str(i) for i in range(B)])


def random_prompt_batch(B: int = 3, C: int = 4, T: int = 11, seed: int = 0) -> MCBatch:
    """A causal-LM batch: left-padded random prompts and letter token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (B, T), generator=g)
    lengths = torch.randint(4, T + 1, (B,), generator=g)
    mask = (torch.arange(T) >= (T - lengths).unsqueeze(-1)).long()
    return MCBatch(input_ids=ids * mask, attention_mask=mask, token_type_ids=None,
                   choice_mask=torch.ones(B, C, dtype=torch.bool), labels=torch.randint(0, C, (B,), generator=g),
                   letter_ids=torch.arange(1, C + 1).repeat(B, 1), ids=[str(i) for i in range(B)])


@pytest.fixture(scope="session")
def warm_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A real, tiny LoRA-MoE warm-up on ARC-Easy (48 questions, 1 epoch), shared by the env tests."""
    from routing_env.training import finetune
    out = tmp_path_factory.mktemp("warmup")
    finetune.main(finetune.Config(task="arc-easy", method="lora-moe", epochs=1, train_limit=48, eval_limit=8,
                                  batch_size=8, data_dir=str(data_dir), logdir=str(out), name="w", lr=3e-3))
    return out / "w" / "final"


@pytest.fixture(scope="session")
def distinct_checkpoint(tmp_path_factory, warm_checkpoint) -> Path:
    """The warm-up with its experts and head drawn apart, for tests that compare two computations.

    The 48-question warm-up barely separates its experts (its head is near zero, so a wrong expert
    moves log p(correct) by ~3e-4, the order of a float32 tolerance). Here a wrong expert in one
    group moves it by ~2e-2 (median), two orders of magnitude above ``LOGP_ATOL``, so a tolerance
    comparison still fails on a routing bug.
    """
    from routing_env.moe import load_checkpoint, moe_layers, save_checkpoint

    model = load_checkpoint(warm_checkpoint)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in moe_layers(model):
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
        model.head.weight.normal_(0.0, 0.5, generator=g)
    out = tmp_path_factory.mktemp("distinct") / "final"
    save_checkpoint(model, out)
    return out


@pytest.fixture(scope="session")
def rmoe_checkpoint(tmp_path_factory, distinct_checkpoint) -> Path:
    """``distinct_checkpoint`` with a layerwise recurrent router (``rmoe``) whose recurrent part is
    drawn large, so a routing state carried wrongly between groups changes the choices."""
    import dataclasses

    from routing_env.moe import build_model, load_checkpoint, moe_layers, save_checkpoint

    base = load_checkpoint(distinct_checkpoint)
    model = build_model("lora-moe", base.backbone_name, dataclasses.replace(base.moe_config, balance="rmoe"))
    state = base.trainable_state()
    new = set(model.trainable_state()) - set(state)
    assert new and all(".balance_" in k for k in new)  # only the recurrent router is new
    model.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in moe_layers(model):
            m.balance_out.weight.normal_(0.0, 1.0, generator=g)
    out = tmp_path_factory.mktemp("rmoe") / "final"
    save_checkpoint(model, out)
    return out


def assert_exhaustive_is_brute_force(env, example_ids: list[int]) -> list:
    """The exhaustive agent's values at the root of each example equal the best return over every one
    of the ``E ** G`` complete paths (``evaluate_paths``), overall and per first action; returns them.

    Tolerance: the same rows batched another way (per tree level vs per path), float32 rounding.
    """
    import itertools

    import numpy as np

    from agents.exhaustive import exhaustive_q
    from tests.tolerances import LOGP_ATOL

    q = exhaustive_q(env, example_ids)
    paths = np.array(list(itertools.product(range(env.E), repeat=env.G)))
    for n, i in enumerate(example_ids):
        res = env.evaluate_paths([i] * len(paths), paths)
        ret = res["outcome"] + res["balance"]
        assert q[n][()].max() == pytest.approx(ret.max(), abs=LOGP_ATOL)
        for a in range(env.E):
            assert q[n][()][a] == pytest.approx(ret[paths[:, 0] == a].max(), abs=LOGP_ATOL)
    return q


def assert_batched_level_matches_single_nodes(batched, single, nodes: list) -> None:
    """Nodes expanded together (``prefetch``: every example's embeddings in one padded pass, then one
    padded multi-example chunk per group level) hold what each node computes alone in another env:
    loads exactly (integer counts), hidden states, entry-router probabilities, choice log-probabilities
    and the observation's features within float32 tolerance (other shapes, other summation order)."""
    import numpy as np

    from tests.tolerances import HIDDEN_ATOL, LOGP_ATOL, PROB_ATOL

    lengths = {batched._example_rows(i).host.attention_mask.shape[1] for i, _ in nodes}
    assert len(lengths) > 1  # the chunks pad examples of different lengths
    batched.batch_rows = 10_000  # one chunk per level
    batched.prefetch(nodes)
    assert all(node in batched.cache for node in nodes)  # computed by the prefetch, not one by one below
    for i, p in nodes:
        a, b = batched._boundary(i, p), single._boundary(i, p)
        if p:
            np.testing.assert_array_equal(a.loads, b.loads)
        if len(p) == batched.G:  # a complete path keeps no hidden states, only what is read of them
            assert a.hidden is None and b.hidden is None
        else:
            torch.testing.assert_close(a.hidden, b.hidden, atol=HIDDEN_ATOL, rtol=HIDDEN_ATOL)
        np.testing.assert_allclose(a.readout, b.readout, rtol=0,
                                   atol=LOGP_ATOL if len(p) == batched.G else PROB_ATOL)
        np.testing.assert_allclose(a.features, b.features, rtol=0, atol=PROB_ATOL)  # tanh: in [-1, 1]
