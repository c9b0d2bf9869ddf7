"""Property-based tests (hypothesis): malformed data, MCTS invariants, any action sequence.

Counts of generated inputs: ``pytest tests/test_properties.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import gzip
import json
import string

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.mcts import MCTSConfig, search_tree
from agents.mcts.reference import RefTree
from agents.mcts.tree import expand_and_backup, init_roots, new_tree, root_visits, select
from routing_env.data import DataError, load_file, load_task

# ---- malformed JSONL: the project's DataError (file and line), never another exception ---------------

_KEYS = ["id", "question", "stem", "choices", "text", "label", "answerKey", "article", "options", "answer"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                     st.text(string.ascii_letters + "ABCD1234", max_size=4))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)),
                     max_leaves=12)
_valid = st.builds(lambda qid, key, n: {"id": qid, "question": {"stem": "s", "choices": [
    {"text": f"t{i}", "label": "ABCDE"[i]} for i in range(n)]}, "answerKey": key},
    st.text(string.ascii_lowercase, min_size=1, max_size=3), st.sampled_from("ABCDE"), st.integers(0, 5))
_line = st.one_of(_valid.map(json.dumps), _json.map(json.dumps), st.text(max_size=20),
                  st.just('{"id": "x", "question": {"stem": "s", "choices": ['))  # torn line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, min_size=0, max_size=8), gz=st.booleans(), as_task=st.booleans())
def test_malformed_jsonl_gives_the_projects_error(tmp_path_factory, lines, gz, as_task):
    path = tmp_path_factory.mktemp("prop") / "data.jsonl"
    raw = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if gz:
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    try:
        out = load_task(str(path), "train") if as_task else load_file(path)
    except DataError as e:
        assert str(path) in str(e)  # names the file (and, for a line's problem, the line)
        return
    except UnicodeEncodeError:  # a lone surrogate hypothesis drew cannot even be written as UTF-8
        return
    assert all(len(ex.choices) >= 2 and 0 <= ex.answer < len(ex.choices) for ex in out)
    assert len({ex.id for ex in out}) == len(out)


# ---- MCTS: the numba kernels equal the reference, and the tree invariants hold ----------------------

@settings(max_examples=120, deadline=None)
@given(A=st.integers(2, 5), D=st.integers(1, 4), S=st.integers(1, 40), c=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_mcts_kernels_match_reference_and_keep_invariants(A, D, S, c, seed):
    rng = np.random.default_rng(seed)
    B = 3
    t = new_tree(B, S, A, D)
    root_prior, root_value = rng.dirichlet(np.ones(A), size=B), rng.normal(size=B)
    init_roots(t.visits, t.value_sum, t.prior, t.terminal, t.num_nodes, t.qmin, t.qmax, D, root_prior, root_value)
    refs = [RefTree(list(root_prior[b]), float(root_value[b]), D) for b in range(B)]
    for _ in range(S):
        nodes, actions = select(t.visits, t.value_sum, t.reward, t.prior, t.children, t.terminal, t.qmin, t.qmax, c)
        assert [(int(n), int(a)) for n, a in zip(nodes, actions)] == [r.select(c) for r in refs]
        assert ((actions >= -1) & (actions < A)).all()  # a valid action, or -1 (re-visit a terminal)
        prior, reward, value = rng.dirichlet(np.ones(A), size=B), rng.normal(size=B), rng.normal(size=B)
        expand_and_backup(t.visits, t.value_sum, t.reward, t.prior, t.children, t.parent, t.depth, t.path,
                          t.terminal, t.num_nodes, t.qmin, t.qmax, D, nodes, actions, prior, reward, value)
        for b, r in enumerate(refs):
            r.expand_and_backup(int(nodes[b]), int(actions[b]), list(prior[b]), float(reward[b]), float(value[b]))
    assert (root_visits(t).sum(1) == S).all()  # every simulation passes through one root child
    for b in range(B):
        n = int(t.num_nodes[b])
        assert n <= S + 1 and t.visits[b, 0] == S + 1
        for k in range(1, n):
            kids = t.children[b, k][t.children[b, k] >= 0]
            # A node's visits: its own expansion plus its children's (a terminal leaf: plus re-visits).
            if len(kids):
                assert t.visits[b, k] == 1 + t.visits[b, kids].sum()
            else:
                assert t.visits[b, k] >= 1
            q = t.reward[b, k] + t.value_sum[b, k] / t.visits[b, k]
            assert t.qmin[b] - 1e-9 <= q <= t.qmax[b] + 1e-9  # Q inside the normalisation bounds
            assert 1 <= t.depth[b, k] <= D and ((t.path[b, k, : t.depth[b, k]] >= 0) & (t.path[b, k, : t.depth[b, k]] < A)).all()
            assert t.terminal[b, k] == (t.depth[b, k] == D)
        assert (t.visits[b, 0], t.value_sum[b, 0]) == (refs[b].nodes[0].visits, refs[b].nodes[0].value_sum)


@settings(max_examples=60, deadline=None)
@given(A=st.integers(2, 4), D=st.integers(1, 3), S=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_search_tree_visit_counts_sum_to_the_budget(A, D, S, seed):
    table = np.random.default_rng(seed).normal(size=(A,) * D)

    def evaluate(paths):
        prior = np.full((len(paths), A), 1.0 / A)
        reward = np.array([table[p] if p is not None and len(p) == D else 0.0 for p in paths])
        return prior, reward, np.zeros(len(paths))

    tree = search_tree(evaluate, 1, A, D, MCTSConfig(num_simulations=S, leaf_value="zero"))
    assert root_visits(tree)[0].sum() == S and tree.num_nodes[0] <= min(S + 1, sum(A**d for d in range(D + 1)))


# ---- the real env: any action sequence gives a finite forward ----------------------------------------

@pytest.fixture(scope="module")
def envs(distinct_checkpoint, data_dir):
    make = lambda mode: gym.make("layermoe-arc", checkpoint=distinct_checkpoint, max_examples=8, data_dir=data_dir,  # noqa: E731
                                 action_mode=mode).unwrapped
    return {mode: make(mode) for mode in ("primary", "combo", "bias")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["primary", "combo", "bias"]), example=st.integers(0, 7), data=st.data())
def test_any_action_sequence_gives_a_finite_forward(envs, mode, example, data):
    env = envs[mode]
    obs, _ = env.reset(options={"example": example})
    done, total = False, 0.0
    while not done:
        if mode == "bias":
            action = np.array(data.draw(st.lists(st.floats(-1, 1, width=32), min_size=env.E, max_size=env.E)), np.float32)
        else:
            action = data.draw(st.integers(0, int(env.action_space.n) - 1))
        obs, reward, done, truncated, info = env.step(action)
        assert np.isfinite(obs).all() and np.isfinite(reward) and not truncated
        total += reward
    assert np.isfinite(info["outcome"]) and info["outcome"] <= 0.0  # a log-probability
