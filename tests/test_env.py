"""RoutingEnv on the real MiniLM LoRA-MoE: checkers, determinism, the known answer, planning API, errors."""

from __future__ import annotations

import functools
import json
import shutil
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import routing_env  # noqa: F401  (registers the ids)
from routing_env.data import encode_pairs
from routing_env.env import RoutingEnv
from routing_env.moe import load_checkpoint
from tests.conftest import assert_batched_level_matches_single_nodes
from tests.tolerances import LOGP_ATOL, PROB_ATOL


@pytest.fixture(scope="module")
def make(distinct_checkpoint, data_dir):
    # Experts drawn apart (conftest): a wrong expert moves log p far beyond LOGP_ATOL.
    def _make(**kw) -> RoutingEnv:
        base = dict(checkpoint=distinct_checkpoint, max_examples=12, data_dir=data_dir)
        return gym.make("layermoe-arc", **(base | kw)).unwrapped
    return _make


@pytest.fixture(params=["plain", "rmoe"])
def checkpoint(request, distinct_checkpoint):
    """The default router and a layerwise recurrent one (its state cached with the boundaries)."""
    return distinct_checkpoint if request.param == "plain" else request.getfixturevalue("rmoe_checkpoint")


def test_gymnasium_and_sb3_checkers_pass_without_warnings(make, checkpoint):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for mode in ("primary", "combo", "bias"):
        env = make(action_mode=mode, checkpoint=checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env, skip_render_check=True)
            sb3_check_env(env, warn=True)


def _rollout(env: RoutingEnv, seed: int, episodes: int = 3):
    env.reset(seed=seed)
    out = []
    for _ in range(episodes):
        obs, info = env.reset()
        done = False
        while not done:
            obs, r, done, _, info = env.step(env.np_random.integers(env.E))
            out.append((obs.copy(), r))
    return out


def test_same_seed_same_trajectory_and_rewards(make):
    # Bit for bit: both rollouts run the same ops on the same shapes in one process.
    a, b = _rollout(make(), 7), _rollout(make(), 7)
    assert len(a) == 9
    for (oa, ra), (ob, rb) in zip(a, b):
        assert np.array_equal(oa, ob) and ra == rb
    c = _rollout(make(), 8)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_learned_routing_reproduces_the_plain_forward_exactly(make, checkpoint):
    """Zero bias at every group is the learned router's own routing: same log p(correct) as MCModel.forward.

    Stepping one example runs each layer on the same ``[C, T]`` rows as the plain forward of that
    one example (adding a zero bias to router logits is exact), so the same shapes go through the
    same kernels on any CPU and the float32 scores are bit for bit the same. Only the float64
    log-softmax sums the choices in another order (the env keeps rows length-sorted), hence 1e-12:
    a float32 difference anywhere upstream would show as ~1e-7 or more. With ``rmoe`` the routing
    state crosses each group boundary in the env's cache, and must come back exactly.
    """
    env = make(action_mode="bias", checkpoint=checkpoint)
    model = load_checkpoint(checkpoint).eval()
    for i in range(4):
        env.reset(options={"example": i})
        for _ in range(env.G):
            _, _, done, _, info = env.step(np.zeros(env.E, np.float32))
        ex = env.examples[i]
        with torch.no_grad():
            logits = model(encode_pairs(env.tokenizer, [ex]))[0, : len(ex.choices)]
        expected = torch.log_softmax(logits.double(), 0)[ex.answer].item()
        assert info["outcome"] == pytest.approx(expected, abs=1e-12)
        assert info["correct"] == (int(logits.argmax()) == ex.answer)


def test_forcing_an_expert_changes_loads_and_outcome(make):
    env = make()
    outcomes, loads = [], []
    for a in range(env.E):
        env.reset(options={"example": 3})
        for _ in range(env.G):
            _, _, _, _, info = env.step(a)
        outcomes.append(info["outcome"])
        loads.append(info["group_loads"])
        # Every token routes k experts, one of them the forced one.
        assert np.all(info["group_loads"][:, a] == info["group_loads"].sum(1) / env.k)
    # Forcing another expert moves the outcome far beyond the float32 tolerance the other tests use.
    gaps = np.abs(np.subtract.outer(outcomes, outcomes))[np.triu_indices(env.E, 1)]
    assert gaps.min() > 10 * LOGP_ATOL, gaps


def test_step_after_end_and_invalid_actions_raise(make):
    env = make()
    env.reset(seed=0)
    for bad in (env.E, -1, 1.5, "a", np.array([0, 1])):
        with pytest.raises(ValueError, match="primary action must be an integer"):
            env.step(bad)
    for _ in range(env.G):
        env.step(0)
    with pytest.raises(ValueError, match="after the episode ended; call reset"):
        env.step(0)
    benv = make(action_mode="bias")
    benv.reset(seed=0)
    with pytest.raises(ValueError, match="bias action must be 4 finite floats"):
        benv.step(np.array([np.nan, 0, 0, 0]))
    with pytest.raises(ValueError, match="valid: primary, combo, bias"):
        make(action_mode="topk")


def test_unknown_id_is_a_clear_error():
    with pytest.raises(gym.error.Error, match="layermoe-arcc"):
        gym.make("layermoe-arcc")


def test_mismatched_checkpoint_is_refused(make, warm_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="expects 8 experts per layer, the checkpoint has 4"):
        make(num_experts=8)
    bad = tmp_path / "bad"
    shutil.copytree(warm_checkpoint, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["num_layers"] = 12
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained on a 12-layer backbone.*has 6 layers"):
        make(checkpoint=bad)


def test_get_set_state_replays_exactly(make):
    env = make(reward_mode="process")
    env.reset(seed=3)
    env.step(1)
    saved = env.get_state()
    first = [env.step(a)[:2] for a in (2, 0)]
    env.set_state(saved)
    again = [env.step(a)[:2] for a in (2, 0)]
    for (o1, r1), (o2, r2) in zip(first, again):
        assert np.array_equal(o1, o2) and r1 == r2


def test_evaluate_paths_matches_stepping_and_leaves_loads_alone(make, checkpoint):
    make = functools.partial(make, checkpoint=checkpoint)
    env = make()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 12, 10)
    paths = rng.integers(0, env.E, (10, env.G))
    before = env.load_stats.copy()
    res = env.evaluate_paths(ids, paths)
    assert np.array_equal(env.load_stats, before)
    fresh = make()
    for n in range(10):
        fresh.reset(options={"example": int(ids[n])})
        for a in paths[n]:
            _, _, _, _, info = fresh.step(int(a))
        fresh.load_stats[:] = 0  # score every path against the same (empty) running loads
        # Tolerance, not equality: the batch stacks 10 questions' rows, stepping runs one question's.
        assert res["outcome"][n] == pytest.approx(info["outcome"], abs=LOGP_ATOL)
        assert res["correct"][n] == info["correct"]
        np.testing.assert_array_equal(res["loads"][n], info["group_loads"])  # integer token counts
    # ... and that tolerance would catch a wrong expert: changing one group's choice of these paths
    # moves log p by two orders of magnitude more (median over every single-group change).
    wrong_ids, wrong_paths, right = [], [], []
    for n in range(10):
        for g in range(env.G):
            for d in range(1, env.E):
                p = paths[n].copy()
                p[g] = (p[g] + d) % env.E
                wrong_ids.append(ids[n]), wrong_paths.append(p), right.append(res["outcome"][n])
    gaps = np.abs(env.evaluate_paths(wrong_ids, wrong_paths)["outcome"] - np.array(right))
    assert np.median(gaps) > 100 * LOGP_ATOL, np.median(gaps)


def test_evaluate_prefixes_gives_process_rewards_and_router_priors(make, checkpoint):
    env = make(reward_mode="process", balance_weight=0.5, checkpoint=checkpoint)
    env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0
    path = (2, 0, 3)
    res = env.evaluate_prefixes([4] * 4, [path[:n] for n in range(4)])
    assert res["terminal"].tolist() == [False, False, False, True] and res["reward"][0] == 0.0
    # Stepping in a fresh env: its own transitions and router probabilities, not the cached batch's.
    loads = env.load_stats.copy()
    env = make(reward_mode="process", balance_weight=0.5, checkpoint=checkpoint)
    env.load_stats[:] = loads
    env.reset(options={"example": 4})
    for g, a in enumerate(path):
        s = env.get_state()
        expected = env.router_probs(4, s.prefix) / env.router_probs(4, s.prefix).sum()
        np.testing.assert_allclose(res["prior"][g], expected, atol=PROB_ATOL)  # batched prefixes vs one
        _, r, done, _, info = env.step(a)
        if not done:
            assert res["reward"][g + 1] == pytest.approx(r, rel=1e-9)  # the balance term: from integer loads
    # Tolerance: the batch holds every prefix's rows, stepping one question's.
    assert res["reward"][3] == pytest.approx(r, abs=LOGP_ATOL)
    assert res["outcome"][3] == pytest.approx(info["outcome"], abs=LOGP_ATOL)
    assert np.isnan(res["outcome"][:3]).all() and (res["prior"][3] == 0).all()
    with pytest.raises(ValueError, match="at most 3 actions"):
        env.evaluate_prefixes([0], [(0, 0, 0, 0)])
    with pytest.raises(ValueError, match="out of range"):
        env.evaluate_prefixes([99], [()])


def test_a_level_batched_over_examples_holds_what_each_node_computes_alone(make, checkpoint):
    nodes = [(i, p) for i in range(6) for p in ((), (1,), (1, 2), (1, 2, 3), (3,), (3, 0), (3, 0, 2))]
    assert_batched_level_matches_single_nodes(make(checkpoint=checkpoint), make(checkpoint=checkpoint), nodes)


def test_observation_features_are_the_projected_mean_hidden_state(make):
    """The features the chunk computes for each node (``feature_sums``, per row, added up per node) are
    ``tanh(projection @ mean hidden state)`` over the example's real tokens, also after the last group,
    whose hidden states the env does not keep (run here again)."""
    from routing_env.env.batching import selection_row

    env = make()
    mask = env._example_rows(3).rows.attention_mask

    def expected(boundary: torch.Tensor) -> np.ndarray:
        h, w = env.stepper.split(boundary)[0], mask.unsqueeze(-1).float()
        return torch.tanh(env.projection @ ((h * w).sum((0, 1)) / w.sum())).numpy()

    for prefix in ((), (2,), (2, 1)):
        np.testing.assert_allclose(env._features(3, prefix), expected(env._boundary(3, prefix).hidden), atol=1e-5)
    parent = env._boundary(3, (2, 1)).hidden
    bias = torch.from_numpy(np.broadcast_to(selection_row(env, 0, 2), (parent.shape[0], env.E)).copy())
    last = env.stepper.run_group(parent, mask, 2, bias)
    assert env._boundary(3, (2, 1, 0)).hidden is None
    np.testing.assert_allclose(env._features(3, (2, 1, 0)), expected(last), atol=1e-5)
    assert env._features(3, ()).shape == (16,) and np.abs(env._features(3, ())).max() > 0.05  # not all zero


def test_a_node_is_read_as_what_it_is(make):
    """A node's readout is the next group's router probabilities while groups remain, the choices'
    log-probabilities once all are routed: asking one for the other is refused, not misread."""
    env = make()
    assert env.router_probs(0, (1,)).sum() == pytest.approx(1.0, abs=1e-6)
    assert np.exp(env.outcome(0, (1, 2, 3))[0]) <= 1.0
    with pytest.raises(ValueError, match="still to route"):
        env.action_priors(0, (1, 2, 3))
    with pytest.raises(ValueError, match="routes all 3 groups"):
        env.outcome(0, (1,))


def test_expanding_nodes_reads_the_device_per_batch_not_per_node(make, monkeypatch):
    """``evaluate_prefixes`` copies results to the host a fixed number of times, however many nodes."""
    from routing_env.common.opcount import OpCounter

    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(1) or real_cpu(t, *a, **k))
    env = make()
    env.batch_rows = 10_000  # one chunk per group level
    for i in range(8):
        env._example_rows(i)  # tokenised once, on the host (not part of a search step)
    counts = []
    for n in (2, 8):
        env.cache.clear()
        reads.clear()
        nodes = [(i, p) for i in range(n) for p in ((), (1,), (1, 2), (1, 2, 3))]  # open and complete nodes
        with OpCounter() as ops:
            env.evaluate_prefixes([i for i, _ in nodes], [p for _, p in nodes])
        counts.append((len(reads), ops.syncs))
    # One read per level, the embeddings' and each group's (its row counts beside its nodes' priors or
    # outcomes), and transformers' one mask check (``mask.all()``) per group. The same for 8 nodes as for 32.
    assert counts[0] == counts[1] == (1 + env.G, {"_local_scalar_dense": env.G}), counts


def test_mcts_on_the_real_env_matches_its_own_records(make):
    """A small real search: recorded outcomes and loads are those of the chosen paths."""
    import agents

    env = make()
    res = agents.run_agent(agents.make("mcts", num_simulations=6, batch_size=4), env, [0, 1, 2, 3])
    check = env.evaluate_paths([r.example for r in res], [r.path for r in res])
    for n, r in enumerate(res):
        # Tolerance: the search scored these paths in batches of other trees' leaves.
        assert r.outcome == pytest.approx(check["outcome"][n], abs=LOGP_ATOL)
        assert np.array_equal(r.loads, check["loads"][n])
        assert np.allclose(r.targets.sum(1), 1.0) and r.values[0, r.path[0]] <= 0.5
    assert env.load_stats.sum() == pytest.approx(sum(r.loads.sum() for r in res))  # batch fed the running loads


@pytest.mark.parametrize("backend", ["model", "synthetic"])
def test_both_backends_share_the_mdp_core_and_its_reward_breakdown(make, backend):
    """``RoutingEnv`` and ``SyntheticRoutingEnv`` run one MDP (``RoutingMDP``): episode, rewards and
    planning are its code, and every reward is its breakdown's total, ``outcome + balance``."""
    from routing_env.env import RoutingMDP, SyntheticRoutingEnv

    for mode in ("outcome", "process"):
        if backend == "model":
            env = make(reward_mode=mode, balance_weight=0.3)
        else:
            env = SyntheticRoutingEnv(num_examples=8, balance_weight=0.3, reward_mode=mode)
        assert isinstance(env, RoutingMDP)
        for name in ("reset", "step", "balance_reward", "get_state", "set_state", "evaluate_prefixes",
                     "evaluate_paths", "finish_episode", "_observation", "_action_key"):
            assert getattr(type(env), name) is getattr(RoutingMDP, name), name
        env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0  # imbalanced history
        path = [1, 0, 2][: env.G] + [0] * (env.G - 3)
        planned = env.evaluate_paths([2, 2], [path, [0] * env.G])
        assert np.array_equal(planned["reward"], planned["outcome"] + planned["balance"])
        nodes = env.evaluate_prefixes([2] * (env.G + 1), [path[:g] for g in range(env.G + 1)])
        assert np.array_equal(nodes["reward"][:-1], nodes["balance"][:-1])
        assert nodes["reward"][-1] == nodes["outcome"][-1] + nodes["balance"][-1]

        env.reset(options={"example": 2})
        rewards, balances = [], []
        for a in path:
            _, reward, done, _, info = env.step(a)
            terms = info["reward_terms"]
            assert reward == terms["total"] == terms.get("outcome", 0.0) + terms["balance"]
            rewards.append(reward)
            balances.append(info["balance_reward"])
        assert done and info["path"] == path and "id" in info and "group_loads" in info
        episode = info["return_terms"]  # the whole episode's terms, as evaluate_paths scored the path
        assert episode["outcome"] == info["outcome"] == planned["outcome"][0]
        assert episode["balance"] == sum(balances)
        assert episode["total"] == episode["outcome"] + episode["balance"]
        # Tolerance: a step reads its group's loads in float32, evaluate_paths in float64.
        assert episode["balance"] == pytest.approx(planned["balance"][0], abs=1e-6)
        assert episode["total"] == pytest.approx(planned["reward"][0], abs=1e-6)
        assert sum(rewards) == pytest.approx(episode["total"], abs=1e-12)
        if mode == "outcome":
            assert rewards[:-1] == [0.0] * (env.G - 1) and rewards[-1] == episode["total"]


def test_process_and_outcome_rewards_sum_to_the_same_return(make):
    totals = {}
    for mode in ("outcome", "process"):
        env = make(reward_mode=mode, balance_weight=0.5)
        env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0  # imbalanced history
        env.reset(options={"example": 5})
        rewards = [env.step(a)[1] for a in (0, 3, 1)]
        totals[mode] = (sum(rewards), rewards)
    assert totals["outcome"][1][:2] == [0.0, 0.0] and totals["process"][1][0] != 0.0
    # Same shapes on both sides (one question stepped), only the bookkeeping of rewards differs.
    assert totals["outcome"][0] == pytest.approx(totals["process"][0], abs=1e-9)


def test_combo_mode_and_regrouping(make):
    env = make(action_mode="combo", num_groups=2)
    assert env.G == 2 and env.action_space.n == 6 and env.observation_space.shape == (2 + 8 + 16,)
    env.reset(seed=0)
    for _ in range(2):
        _, _, done, _, info = env.step(5)  # combos[5] == (2, 3)
    assert done and np.all(info["group_loads"][:, :2] == 0)


def test_cache_stays_within_its_bound(make):
    env = make(cache_mb=0.5)
    for i in range(12):
        env.reset(options={"example": i})
        for _ in range(env.G):
            env.step(0)
    assert env.cache.bytes <= 0.5 * 2**20 or len(env.cache) == 1
    assert len(env.cache) < 12 * env.G  # entries were evicted
    # Per-example memory is bounded too: token rows by cache_mb / 8, embeddings inside the cache.
    assert env._encoded.bytes <= 0.5 * 2**20 / 8 or len(env._encoded) == 1


def test_evicted_examples_come_back_identical(make):
    """Eviction only costs time: an example's rows and embeddings recomputed give the same scores."""
    roomy, tight = make(), make(cache_mb=0.05)
    for env in (roomy, tight):
        for i in (0, 1, 2, 0):  # example 0 again, after the tight env has dropped it
            env.reset(options={"example": i})
            for _ in range(env.G):
                _, reward, *_ = env.step(1)
        env.last = reward
    assert len(tight._encoded) < 3 and tight.last == roomy.last
