"""MCTS: numba kernels equal the plain-Python reference; known trees, known backups, known answers."""

from __future__ import annotations

import numpy as np
import pytest

import agents
from agents.mcts import LeafEvaluator, MCTSConfig, mcts_search, search_tree
from agents.mcts.reference import RefTree
from agents.mcts.tree import expand_and_backup, init_roots, new_tree, root_q, root_visits, select
from routing_env.env.synthetic import SyntheticRoutingEnv


def _select(t, c):
    return select(t.visits, t.value_sum, t.reward, t.prior, t.children, t.terminal, t.qmin, t.qmax, c)


def _expand(t, depth, nodes, actions, prior, reward, value):
    return expand_and_backup(t.visits, t.value_sum, t.reward, t.prior, t.children, t.parent, t.depth, t.path,
                             t.terminal, t.num_nodes, t.qmin, t.qmax, depth, nodes, actions, prior, reward, value)


def _mark_missing(prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give each row a random number of missing trailing actions (prior -1; at least one action left)."""
    for row in prior:
        row[len(row) - int(rng.integers(0, len(row))):] = -1.0
    return prior


@pytest.mark.parametrize("A,D,c,ragged", [(3, 3, 1.25, False), (5, 2, 0.5, False), (2, 4, 3.0, False),
                                          (4, 3, 1.25, True), (6, 2, 0.5, True)])
def test_numba_kernels_equal_the_reference_op_by_op(A, D, c, ragged):
    """``ragged``: nodes lack some actions (negative prior, as a MoLA model's lower groups): never selected."""
    rng = np.random.default_rng(A * 10 + D)
    B, S = 6, 40
    t = new_tree(B, S, A, D)
    root_prior = rng.dirichlet(np.ones(A), size=B)
    if ragged:
        root_prior = _mark_missing(root_prior, rng)
    root_value = rng.normal(size=B)
    init_roots(t.visits, t.value_sum, t.prior, t.terminal, t.num_nodes, t.qmin, t.qmax, D, root_prior, root_value)
    refs = [RefTree(list(root_prior[b]), float(root_value[b]), D) for b in range(B)]
    for _ in range(S):
        nodes, actions = _select(t, c)
        ref_sel = [r.select(c) for r in refs]
        assert [(int(n), int(a)) for n, a in zip(nodes, actions)] == ref_sel
        assert all(a < 0 or t.prior[b, n, a] >= 0 for b, (n, a) in enumerate(zip(nodes, actions)))
        prior, reward, value = rng.dirichlet(np.ones(A), size=B), rng.normal(size=B), rng.normal(size=B)
        if ragged:
            prior = _mark_missing(prior, rng)
        leaves = _expand(t, D, nodes, actions, prior, reward, value)
        ref_leaves = [r.expand_and_backup(n, a, list(prior[b]), float(reward[b]), float(value[b]))
                      for b, (r, (n, a)) in enumerate(zip(refs, ref_sel))]
        assert list(leaves) == ref_leaves
        for b, r in enumerate(refs):
            assert t.num_nodes[b] == len(r.nodes)
            for node in r.nodes:
                k = node.index
                assert t.visits[b, k] == node.visits and t.value_sum[b, k] == node.value_sum
                assert tuple(t.path[b, k, : t.depth[b, k]]) == node.path and t.terminal[b, k] == node.terminal
                for a, child in node.children.items():
                    assert t.children[b, k, a] == child.index
            assert (t.qmin[b], t.qmax[b]) == (r.qmin, r.qmax)
    assert np.array_equal(root_visits(t), [r.root_visits(A) for r in refs])
    # A rich enough run that selection really re-visited terminals and expanded deep nodes.
    assert (t.depth == D).any()


def test_hand_computed_backups():
    """Depth 1, two actions, equal priors, c=1.25, root value 0, edge rewards 1 (a=0) and 0.2 (a=1)."""
    t = new_tree(1, 3, 2, 1)
    init_roots(t.visits, t.value_sum, t.prior, t.terminal, t.num_nodes, t.qmin, t.qmax, 1,
               np.array([[0.5, 0.5]]), np.array([0.0]))
    rewards = {0: 1.0, 1: 0.2}
    picks = []
    for _ in range(3):
        nodes, actions = _select(t, 1.25)
        picks.append(int(actions[0]))
        a = int(actions[0])
        _expand(t, 1, nodes, actions, np.zeros((1, 2)), np.array([rewards.get(a, 0.0)]), np.array([5.0]))
    # Sim 1: tie -> action 0 (Q 1). Sim 2: a0 scores 1 + 1.25*.5*sqrt2/2 = 1.442 > a1 0.5 + 1.25*.5*sqrt2 = 1.384,
    # so the terminal child is re-visited (-1). Sim 3: sqrt3: a0 1 + 0.361 = 1.361 < a1 0.667 + 1.083 = 1.749.
    assert picks == [0, -1, 1]
    assert t.visits[0, :3].tolist() == [4, 2, 1]
    # Terminal leaves back up 0 (their value estimate 5.0 is ignored): root sums 0 + 1 + 1 + 0.2.
    assert t.value_sum[0, 0] == pytest.approx(2.2)
    assert np.allclose(root_q(t)[0], [1.0, 0.2]) and root_visits(t)[0].tolist() == [2, 1]


def test_a_missing_action_is_never_selected_even_where_it_would_score_best():
    """Depth 1, c = 0 (pure Q), action 1 missing (prior -1). After action 0 pays -1, the parent's
    first-play value (-0.5, normalised 0.5) beats action 0's Q (normalised 0): without the mask
    action 1 would be expanded; with it the terminal action 0 is re-visited (-1)."""
    t = new_tree(1, 2, 2, 1)
    init_roots(t.visits, t.value_sum, t.prior, t.terminal, t.num_nodes, t.qmin, t.qmax, 1,
               np.array([[1.0, -1.0]]), np.array([0.0]))
    ref = RefTree([1.0, -1.0], 0.0, 1)
    picks, ref_picks = [], []
    for _ in range(2):
        nodes, actions = _select(t, 0.0)
        picks.append(int(actions[0]))
        ref_picks.append(ref.select(0.0)[1])
        _expand(t, 1, nodes, actions, np.zeros((1, 2)), np.array([-1.0]), np.array([0.0]))
        ref.expand_and_backup(0 if ref_picks[-1] >= 0 else 1, ref_picks[-1], [0.0, 0.0], -1.0, 0.0)
    assert picks == ref_picks == [0, -1]


def test_finds_the_best_path_of_a_known_tree_and_visits_sum_to_simulations():
    """Depth 2, three actions, terminal rewards only; the best leaf (2, 0) has a low prior."""
    table = np.array([[0.1, 0.3, 0.2], [0.4, 0.0, 0.5], [0.9, 0.1, 0.2]])

    def evaluate(paths):
        prior = np.tile([0.6, 0.3, 0.1], (len(paths), 1))
        reward = np.array([table[p] if p is not None and len(p) == 2 else 0.0 for p in paths])
        return prior, reward, np.zeros(len(paths))

    cfg = MCTSConfig(num_simulations=300, c_puct=2.0, leaf_value="zero")
    tree = search_tree(evaluate, 1, 3, 2, cfg)
    visits = root_visits(tree)[0]
    assert visits.sum() == 300
    assert int(np.argmax(visits)) == 2
    child = tree.children[0, 0, 2]
    assert int(np.argmax([tree.visits[0, c] if c >= 0 else 0 for c in tree.children[0, child]])) == 0
    # A terminal node's Q is its edge reward exactly, however often it was visited.
    leaf = tree.children[0, child, 0]
    assert tree.reward[0, leaf] + tree.value_sum[0, leaf] / tree.visits[0, leaf] == 0.9
    assert tree.num_nodes[0] == 1 + 3 + 9  # the whole tree got expanded, nothing twice


def test_mcts_search_on_synthetic_env_beats_the_router_and_records_targets():
    env = SyntheticRoutingEnv(num_examples=24, router_accuracy=0.4)
    res = mcts_search(env, list(range(24)), MCTSConfig(num_simulations=24), np.random.default_rng(0))
    router = agents.run_agent(agents.make("router"), SyntheticRoutingEnv(num_examples=24, router_accuracy=0.4), range(24))
    assert np.mean([r.outcome for r in res]) > np.mean([r.outcome for r in router])
    assert np.mean([r.correct for r in res]) == 1.0  # 24 sims per group cover the 4 actions: the exact answer
    for r in res:
        assert r.targets.shape == (env.G, env.E) and np.allclose(r.targets.sum(1), 1.0)
        assert np.array_equal(r.path, env.best[r.example])
        # The chosen last action's Q is that path's exact return (balance weight 0).
        assert r.values[-1, r.path[-1]] == pytest.approx(r.outcome)
        assert r.outcome == env.evaluate_paths([r.example], [r.path])["outcome"][0]


def test_greedy_leaf_value_is_the_return_of_the_router_completion():
    env = SyntheticRoutingEnv(num_examples=4, balance_weight=0.2)
    env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E)  # make balance terms non-trivial
    ev = LeafEvaluator(env)
    prior, reward, value = ev([(1, (2,)), (3, ())])
    greedy = [2] + [int(np.argmax(env.priors[1, g])) for g in (1, 2)]
    res = env.evaluate_paths([1], [greedy])
    assert value[0] == pytest.approx(res["outcome"][0] + res["balance"][0] - reward[0])
    assert reward[0] == pytest.approx(env.balance_reward(0, env.step_loads(2)))
    assert np.allclose(prior[1], env.priors[3, 0])


def test_agent_errors():
    with pytest.raises(ValueError, match="num_simulations"):
        agents.make("mcts", num_simulations=0)
    with pytest.raises(ValueError, match="leaf_value"):
        LeafEvaluator(SyntheticRoutingEnv(num_examples=2), "rollouts")


def test_mcts_agent_as_a_plain_step_by_step_agent():
    """``act`` searches from the env's current node; stepping with it reaches the known best path."""
    env = SyntheticRoutingEnv(num_examples=6, router_accuracy=0.3)
    res = agents.rollout(agents.make("mcts", num_simulations=24), env, range(6))
    assert all(np.array_equal(r.path, env.best[r.example]) for r in res)
