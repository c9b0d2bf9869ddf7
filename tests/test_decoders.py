"""Decoder LMs (Llama, Qwen2, GPT-2) through every stage, on tiny random models saved to local folders.

Each family: warm-up (``finetune.py --method lora-moe --backbone <folder>``), the env and its checkers,
the stepped env against the full forward, the exhaustive oracle against brute force, the search and
stage 3 (``--method layermoe``). The models are built from config objects with a locally trained BPE
tokenizer (``tests/conftest.py``): nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents
import routing_env  # noqa: F401  (registers the ids)
from routing_env.data import encode_letter_prompt
from routing_env.env import RoutingEnv
from routing_env.env.vector import RoutingVectorEnv
from routing_env.moe import MoEConfig, build_model, load_checkpoint, moe_layers, save_checkpoint
from routing_env.moe.backbones import CausalLMKind, kind_for
from routing_env.moe.backbones.causal_lm import positions
from routing_env.search import run as train_rl
from routing_env.training import finetune
from tests.conftest import (DECODER_FAMILIES, assert_batched_level_matches_single_nodes, assert_exhaustive_is_brute_force,
                            save_tiny_decoder)
from tests.tolerances import LOGP_ATOL


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backbone(family, decoder_dirs) -> str:
    return str(decoder_dirs[family])


def _ft(tmp, data_dir, backbone, **kw) -> finetune.Config:
    base = dict(task="arc-easy", method="lora-moe", epochs=1, train_limit=16, eval_limit=4, batch_size=8,
                eval_batch_size=8, data_dir=str(data_dir), logdir=str(tmp), name="w", lr=3e-3, backbone=backbone,
                num_groups=2)
    return finetune.Config(**(base | kw))


@pytest.fixture(scope="module")
def warm(tmp_path_factory, family, backbone, data_dir):
    """The warm-up (stage 1) on 16 ARC-Easy questions: ``(checkpoint folder, results)``."""
    out = tmp_path_factory.mktemp(f"warm-{family}")
    res = finetune.main(_ft(out, data_dir, backbone))
    return out / "w" / "final", res


@pytest.fixture(scope="module")
def distinct(tmp_path_factory, family, warm):
    """The warm-up with its experts drawn apart (as conftest's ``distinct_checkpoint``): a wrong expert
    moves log p(correct) far beyond ``LOGP_ATOL`` (asserted below)."""
    model = load_checkpoint(warm[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in moe_layers(model):
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp(f"distinct-{family}") / "final"
    save_checkpoint(model, out)
    return out


def _env(checkpoint, data_dir, **kw) -> RoutingEnv:
    return gym.make("layermoe-arc", **(dict(checkpoint=checkpoint, max_examples=6, data_dir=data_dir) | kw)).unwrapped


def test_warmup_writes_a_causal_checkpoint_that_reloads(warm, backbone):
    path, res = warm
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["kind"] == "causal" and cfg["backbone"] == backbone and cfg["moe"]["num_groups"] == 2
    assert res["test"]["n"] == 4 and set(res["test"]["layers"]) == {"0", "1", "2", "3"}
    assert isinstance(kind_for(load_checkpoint(path).backbone.config), CausalLMKind)


def test_forward_is_the_transformers_forward_and_left_padding_changes_nothing(distinct, data_dir):
    """The kind's own layer loop (embed, layers, final norm, LM head at the last token) against the
    ``*ForCausalLM`` forward, on a left-padded batch of real prompts; and each prompt alone."""
    model = load_checkpoint(distinct).eval()
    env = _env(distinct, data_dir)
    exs = env.examples[:5]
    batch = encode_letter_prompt(env.tokenizer, exs, max_length=128)
    assert (batch.attention_mask == 0).any()  # left padding present
    with torch.no_grad():
        ours = model(batch)
        mask = batch.attention_mask
        hf = model.backbone(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        hf = hf.float().gather(1, batch.letter_ids).masked_fill(~batch.choice_mask, float("-inf"))
        alone = [model(encode_letter_prompt(env.tokenizer, [ex], max_length=128))[0] for ex in exs]
    # Same ops on the same shapes except the LM head (one position here, all of them in transformers):
    # float32 tolerance.
    torch.testing.assert_close(ours, hf, rtol=0, atol=LOGP_ATOL)
    for b, row in enumerate(alone):  # another padding, other shapes: float32 tolerance
        torch.testing.assert_close(ours[b, : len(row)], row, rtol=0, atol=LOGP_ATOL)


def test_gymnasium_and_sb3_checkers_pass_and_the_vector_env_steps(distinct, data_dir):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for mode in ("primary", "combo", "bias"):
        env = _env(distinct, data_dir, action_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env, skip_render_check=True)
            sb3_check_env(env, warn=True)
    kw = dict(checkpoint=distinct, max_examples=6, data_dir=data_dir, balance_weight=0.0)
    venv = RoutingVectorEnv(num_envs=3, **kw)
    venv.reset(seed=0, options={"examples": [0, 2, 5]})
    for t in range(venv.env.G):
        _, rewards, term, _, info = venv.step(np.array([t, 1, 3]))
    assert term.all()
    single = RoutingEnv(**kw)
    for j, (i, a) in enumerate(zip((0, 2, 5), (None, 1, 3))):
        single.reset(options={"example": i})
        for t in range(single.G):
            _, r, _, _, sinfo = single.step(t if a is None else a)
        # Tolerance: the vector env runs three prompts right-padded in one batch, the single env one.
        assert info["outcome"][j] == pytest.approx(sinfo["outcome"], abs=LOGP_ATOL)


def test_a_level_batched_over_prompts_holds_what_each_node_computes_alone(distinct, data_dir):
    """Right-padded prompts of other lengths, answer letters padded to the most choices."""
    nodes = [(i, p) for i in range(6) for p in ((), (1,), (1, 0), (2, 3))]
    assert_batched_level_matches_single_nodes(_env(distinct, data_dir), _env(distinct, data_dir), nodes)


def test_stepped_env_reproduces_the_forward_and_a_forced_expert_matters(distinct, data_dir):
    """The learned router's routing (zero bias) gives the full forward's log p(correct letter) bit for bit:
    one unpadded prompt row runs the same ops on the same shapes in both, group by group or at once."""
    env = _env(distinct, data_dir, action_mode="bias")
    model = load_checkpoint(distinct).eval()
    for i in range(3):
        env.reset(options={"example": i})
        for _ in range(env.G):
            _, _, _, _, info = env.step(np.zeros(env.E, np.float32))
        ex = env.examples[i]
        with torch.no_grad():
            logits = model(encode_letter_prompt(env.tokenizer, [ex], max_length=128))[0]
        logp = torch.log_softmax(logits.double(), 0)  # a softmax over the choices' letter logits
        assert info["outcome"] == logp[ex.answer].item()
        assert info["correct"] == (int(logits.argmax()) == ex.answer)
    env = _env(distinct, data_dir)
    outcomes = []
    for a in range(env.E):
        env.reset(options={"example": 1})
        for _ in range(env.G):
            _, _, _, _, info = env.step(a)
        outcomes.append(info["outcome"])
        assert np.all(info["group_loads"][:, a] == info["group_loads"].sum(1) / env.k)
    gaps = np.abs(np.subtract.outer(outcomes, outcomes))[np.triu_indices(env.E, 1)]
    assert gaps.min() > 10 * LOGP_ATOL, gaps  # a wrong expert breaks the tolerances used above


def test_exhaustive_oracle_is_the_max_over_all_paths(distinct, data_dir):
    env = _env(distinct, data_dir, balance_weight=0.5)
    env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0
    assert_exhaustive_is_brute_force(env, [1, 4])
    found = agents.make("exhaustive").search(_env(distinct, data_dir), [0, 3])
    assert all(len(r.path) == env.G and r.targets.shape == (env.G, env.E) for r in found)


def test_search_then_stage3(tmp_path, warm, backbone, data_dir):
    """Stage 2 (the exhaustive agent through ``train_rl``) and stage 3 (``--method layermoe``) on the warm-up."""
    path, _ = warm
    search = train_rl.main(train_rl.Config(task="arc-easy", agent="exhaustive", checkpoint=str(path), num_examples=8,
                                           data_dir=str(data_dir), logdir=str(tmp_path), name="s"))
    lines = (tmp_path / "s" / "targets.jsonl").read_text().splitlines()
    assert search["targets"].endswith("targets.jsonl") and len(lines) == 1 + 8
    stage3 = finetune.main(_ft(tmp_path, data_dir, backbone, method="layermoe", name="l", init_checkpoint=str(path),
                               targets=search["targets"]))
    assert stage3["targets_coverage"] == 0.5 and stage3["test"]["n"] == 4
    assert json.loads((tmp_path / "l" / "final" / "adapter_config.json").read_text())["kind"] == "causal"


def test_gpt2_conv1d_projections_become_equivalent_linears(decoder_dirs):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    ref = AutoModelForCausalLM.from_pretrained(decoder_dirs["gpt2"]).eval()
    model = build_model("lora-moe", str(decoder_dirs["gpt2"]), MoEConfig(num_groups=2)).eval()
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert {m.name.rsplit(".", 1)[-1] for m in moe_layers(model)} == {"c_attn", "c_proj", "c_fc"}
    x = torch.randn(3, 32)
    conv = ref.transformer.h[0].mlp.c_fc
    lin = model.backbone.transformer.h[0].mlp.c_fc.base
    torch.testing.assert_close(lin(x), conv(x), rtol=0, atol=1e-6)  # addmm vs linear: rounding only


def test_pipeline_runs_a_decoder(tmp_path, bpe_tokenizer, data_dir):
    """Stages 1-3 (plain LoRA through peft, LoRA-MoE, MCTS search + stage 3) on a tiny Llama, and the table.
    The pipeline routes 3 layer groups (no group option), so this Llama has 3 layers."""
    from routing_env import pipeline

    cfg = pipeline.PipelineConfig(task="arc-easy", methods=["lora", "lora-moe", "layermoe-mcts"], seeds=[0], epochs=2,
                                  warmup_epochs=1, train_limit=8, eval_limit=4, search_examples=4, num_simulations=2,
                                  backbone=str(save_tiny_decoder("llama", tmp_path / "llama3", bpe_tokenizer, layers=3)),
                                  data_dir=str(data_dir),
                                  device="cpu", logdir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    table = pipeline.main(cfg)
    assert set(table) >= {"lora", "lora-moe", "layermoe-mcts"}
    assert all(0.0 <= table[m]["accuracy"]["mean"] <= 1.0 for m in ("lora", "lora-moe", "layermoe-mcts"))
