"""The backbone protocol: what a kind of backbone supplies to the model, the stepper and the env.

A kind (``BackboneKind``) knows, for its family of Hugging Face models:

* ``matches(config)``, ``load(path)``, ``prepare(backbone)``, ``build_head(backbone)``: which models it
  is for, how to load one, what to adapt before adapters attach, and its multiple-choice head;
* ``encode(tokenizer, examples, max_length) -> MCBatch`` (training, evaluation) and
  ``example_rows(tokenizer, example, max_length) -> (Rows, order)`` (the env: one example's token rows);
* ``forward(model, batch) -> [B, C]`` and ``row_examples(model, batch) -> [R]``: the whole model;
* ``embed(model, rows)``, ``run_layers(model, stack, layers, hidden, attention_mask)``,
  ``router_input(model, stack, layer, hidden)``, ``row_scores(model, hidden, rows)`` and
  ``example_scores(scores)``: the model one layer group at a time (``GroupStepper``; the env scores
  many examples' rows at once), chained to the same scores as ``forward``.

``MCModel``, ``GroupStepper``, ``training.evaluation.batch_encoder`` and the env's rows call only these;
a new kind is one file with a subclass and one ``register`` line (``routing_env.moe.backbones``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from routing_env.data import MCBatch, MCExample

__all__ = ["BackboneKind", "Rows"]


@dataclass
class Rows:
    """Token rows of one or more examples, and what every group step of them needs."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T] 1 for real tokens
    token_type_ids: torch.Tensor | None  # [R, T]
    letter_ids: torch.Tensor | None = None  # [R, C] the answer letters' token ids (letter prompts only)


class BackboneKind:
    """One kind of backbone (subclass it; see the module docstring). ``name`` is what checkpoints record."""

    name: str = ""

    # ---- which models, loading, the head ---------------------------------------------------------
    def matches(self, config: PretrainedConfig) -> bool:
        """Whether a model with this configuration is of this kind (the registry asks kinds in turn)."""
        raise NotImplementedError

    def load(self, path: str) -> nn.Module:
        """The backbone module from a folder or hub id, in float32."""
        raise NotImplementedError

    def prepare(self, backbone: nn.Module) -> None:
        """Adapt ``backbone`` in place before adapters attach (called by ``MCModel``); nothing by default."""

    def build_head(self, backbone: nn.Module) -> nn.Module | None:
        """The multiple-choice head (trained, saved in checkpoints), or None when the backbone scores itself."""
        return None

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: Sequence[MCExample], max_length: int) -> MCBatch:
        """A batch of examples as ``forward`` reads it."""
        raise NotImplementedError

    def example_rows(self, tokenizer: Any, example: MCExample, max_length: int) -> tuple[Rows, torch.Tensor]:
        """One example's token rows for group-wise execution, and ``order [C]``: score ``r`` of
        ``example_scores`` is that of choice ``order[r]``."""
        raise NotImplementedError

    # ---- the whole model --------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        """Scores ``[B, C]``, padded choices at ``-inf`` (``MCModel.forward`` ends the routing pass)."""
        raise NotImplementedError

    def row_examples(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        """``[R]`` the example of each row ``forward(batch)`` runs (per-row routing overrides)."""
        raise NotImplementedError

    # ---- one layer group at a time ----------------------------------------------------------------
    def embed(self, model: nn.Module, rows: Rows) -> torch.Tensor:
        """Hidden states ``[R, T, d]`` entering the first layer."""
        raise NotImplementedError

    def run_layers(self, model: nn.Module, stack: nn.ModuleList, layers: Sequence[int], hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """``hidden [R, T, d]`` through layers ``layers`` of ``stack`` (the transformer layers), with the
        attention mask (and positions) that ``attention_mask [R, T]`` implies. Routing is set up by the caller."""
        raise NotImplementedError

    def router_input(self, model: nn.Module, stack: nn.ModuleList, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the routers at the entry of ``layer`` read when the layer's input is ``hidden`` (identity
        for post-norm layers; the input norm for pre-norm ones)."""
        return hidden

    def row_scores(self, model: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        """``[R, S]`` every row's scores from its last hidden states (rows of one or many examples,
        right-padded); ``example_scores`` reads one example's choice scores from its rows' scores."""
        raise NotImplementedError

    def example_scores(self, scores: Any) -> Any:
        """``[C']`` one example's choice scores (in ``order``; its first ``C`` when a batch padded them)
        from its rows' ``row_scores`` ``[n, S]``, a tensor or an array."""
        raise NotImplementedError
