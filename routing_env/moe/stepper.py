"""Run a multiple-choice LoRA-MoE one layer group at a time (what an env step costs: one group).

``embed`` turns rows into the hidden states entering group 0, ``run_group`` advances hidden states
through one group's layers under a routing override, ``row_scores`` (many examples' rows) and
``choice_scores`` (one example's choices) score them. Chaining them over all groups gives exactly
the logits of ``MCModel.forward`` (tests check this bit for bit), so
the env's cached, step-wise execution and a plain forward are the same model.

Every backbone kind (``routing_env.moe.backbones``): an encoder's rows are an example's (question,
choice) pairs, a causal LM's row its lettered prompt; the kind embeds, runs layers and scores.
"""

from __future__ import annotations

import torch

from routing_env.moe.backbone import MCModel, transformer_layers
from routing_env.moe.backbones import Rows
from routing_env.moe.routing import RoutingPlan, RoutingRecorder
from routing_env.common.utils import autocast

__all__ = ["Rows", "GroupStepper"]


class GroupStepper:
    def __init__(self, model: MCModel, amp_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.kind = model.backbone_kind
        self.amp_dtype = amp_dtype  # autocast of every group step (None: fp32); outputs are fp32 either way
        self.layers = transformer_layers(model.backbone)
        self.groups = model.moe_config.layer_groups(model.num_layers)
        # A recurrent router's state (rmoe) travels with the hidden states as their last H
        # features, so whatever caches, pads or slices boundaries (the env) carries it unchanged.
        self.state_dim = getattr(model.routing.strategy, "state_dim", 0)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def split(self, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A boundary ``[R, T, d (+ H)]`` -> ``(hidden [R, T, d], routing state [R*T, H] or None)``."""
        if not self.state_dim:
            return boundary, None
        H = self.state_dim
        return boundary[..., :-H], boundary[..., -H:].reshape(-1, H)

    def _join(self, hidden: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        if not self.state_dim:
            return hidden
        if state is None:
            state = hidden.new_zeros(hidden.shape[0] * hidden.shape[1], self.state_dim)
        return torch.cat([hidden, state.reshape(*hidden.shape[:2], -1).to(hidden.dtype)], -1)

    @torch.no_grad()
    def embed(self, rows: Rows) -> torch.Tensor:  # [R, T, d (+ H)]
        with autocast(rows.input_ids.device, self.amp_dtype):
            hidden = self.kind.embed(self.model, rows)
        return self._join(hidden.float(), None)

    @torch.no_grad()
    def run_group(self, hidden: torch.Tensor, attention_mask: torch.Tensor, group: int,
                  selection_bias: torch.Tensor | None) -> torch.Tensor:
        """Hidden states ``[R, T, d (+ H)]`` after layer group ``group``; ``selection_bias [R, E]`` overrides its routing."""
        return self._run(hidden, attention_mask, group, self._plan(group, selection_bias))[0]

    @torch.no_grad()
    def run_group_counts(self, hidden: torch.Tensor, attention_mask: torch.Tensor, group: int,
                         selection_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``run_group`` and the expert assignments it made: ``(hidden, counts [R, E_g])`` per row."""
        out, rec = self._run(hidden, attention_mask, group, self._plan(group, selection_bias, record_rows=True))
        return out, rec.row_counts[group]

    @staticmethod
    def _plan(group: int, selection_bias: torch.Tensor | None, record_rows: bool = False) -> RoutingPlan:
        return RoutingPlan(selection_bias={} if selection_bias is None else {group: selection_bias}, record_rows=record_rows)

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, group: int,
             plan: RoutingPlan) -> tuple[torch.Tensor, RoutingRecorder]:
        """``run_group`` under ``plan``: the hidden states after the group and what the plan recorded."""
        ctx = self.model.routing
        hidden, state = self.split(hidden)
        with ctx.routed(plan) as rec:
            ctx.begin_pass(token_mask=attention_mask.bool(), router_state=state)
            with autocast(hidden.device, self.amp_dtype):
                hidden = self.kind.run_layers(self.model, self.layers, self.groups[group], hidden, attention_mask)
            state = ctx.state.router_state
        return self._join(hidden.float(), state), rec  # cached between steps: fp32 whatever the autocast

    @torch.no_grad()
    def entry_prob_sums(self, boundary: torch.Tensor, attention_mask: torch.Tensor, modules: list,
                        group: int) -> torch.Tensor:
        """``[R, E + 1]`` per row of ``boundary``: the router probabilities of ``modules`` (group ``group``'s
        entry routers, in forward order) summed over the row's real tokens and over the modules, then the
        row's real tokens; the strategy's scores, from the cached state alone. Rows of many examples
        at once: an example's mean probabilities are its rows' sums added up, divided by its real
        tokens and by the number of modules (``routing_env.env.batching.probs_from_sums``)."""
        ctx = self.model.routing
        hidden, state = self.split(boundary)
        hidden = self.router_input(group, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])  # [R*T, d]
        R, T = attention_mask.shape
        w = attention_mask.reshape(-1, 1).float()  # [R*T, 1]
        with ctx.routed(RoutingPlan()):
            ctx.begin_pass(token_mask=attention_mask.bool(), router_state=state)
            total = modules[0].scores(flat).softmax(-1) * w  # [R*T, E]
            for m in modules[1:]:
                total += m.scores(flat).softmax(-1) * w
        return torch.cat([total.view(R, T, -1).sum(1), w.view(R, T).sum(1, keepdim=True)], 1)

    @torch.no_grad()
    def feature_sums(self, boundary: torch.Tensor, attention_mask: torch.Tensor,
                     projection: torch.Tensor) -> torch.Tensor:
        """``[R, P + 1]`` per row of ``boundary``: ``projection [P, d]`` of its hidden states summed over its
        real tokens, then its real tokens (an example's projected mean hidden state is its rows' sums
        added up, divided by its tokens)."""
        hidden = self.split(boundary)[0]
        w = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [R, T, 1]
        return torch.cat([(hidden * w).sum(1) @ projection.t(), w.sum(1)], 1)

    @torch.no_grad()
    def router_input(self, group: int, hidden: torch.Tensor) -> torch.Tensor:
        """What group ``group``'s entry routers read when the hidden states entering it are ``hidden``."""
        return self.kind.router_input(self.model, self.layers, self.groups[group][0], hidden)

    @torch.no_grad()
    def row_scores(self, boundary: torch.Tensor, rows: Rows) -> torch.Tensor:  # [R, S] fp32
        """Every row's scores from the hidden states after the last group (the kind's ``row_scores``;
        rows of many examples at once, right-padded; ``rows`` needs the mask, and a causal LM's letters)."""
        hidden = self.split(boundary)[0]
        with autocast(hidden.device, self.amp_dtype):
            return self.kind.row_scores(self.model, hidden, rows).float()

    def choice_scores(self, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:  # [C] in the rows' choice order
        """One example's choice scores from the hidden states after the last group."""
        return self.kind.example_scores(self.row_scores(hidden, rows))
