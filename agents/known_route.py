"""The positive control's known route: the question's sub-task tag names its expert, in every group.

Only meaningful on the generated routing control (``routing_env.data.generated``), whose questions
are ``"<tag> <word>"``: tag ``k`` of ``generated.TAGS`` routes to expert ``k mod A_g`` (``A_g``, the
group's valid actions). The experts of a LoRA-MoE are exchangeable, so "the" known route is this map
up to a permutation of experts per group; ``experiments/routing_control.py`` (``tag_agreement``) scores
routes against it that way. Stage 3 with this agent's targets (``layermoe-known-route``) is the control's upper
arm: what the right route is worth when it is given, not searched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import AgentError, action_widths, current_example, current_group
from routing_env.data.generated import TAGS

__all__ = ["KnownRouteAgent", "question_tag"]


def question_tag(question: str) -> int:
    """Index in ``generated.TAGS`` of a routing-control question's tag (its first word)."""
    word = question.split(maxsplit=1)[0] if question.strip() else ""
    if word not in TAGS:
        raise AgentError(f"known-route: question {question[:40]!r} does not start with a routing-control tag "
                         f"({', '.join(TAGS)}); this agent routes the generated task of routing_env.data.generated only")
    return TAGS.index(word)


class KnownRouteAgent:
    """Expert ``tag mod A_g`` in every group g: the route the generated task was built around."""

    def act(self, obs: np.ndarray, env: Any) -> int:
        base = getattr(env, "unwrapped", env)
        tag = question_tag(base.examples[current_example(env)].question)
        return tag % action_widths(base)[current_group(obs, env)]

    def policy(self, obs: np.ndarray, env: Any) -> np.ndarray:
        base = getattr(env, "unwrapped", env)
        p = np.zeros(int(base.action_space.n))
        p[self.act(obs, env)] = 1.0
        return p

    def config(self) -> dict:
        return {}
