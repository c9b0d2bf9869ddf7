"""The *encoder* kind (BERT-like; the default MiniLM-L6): one row per (question, choice) pair, scored by a
linear head on the mean-pooled last hidden state. The fallback kind: any model no other kind claims."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask

from routing_env.data import MCBatch, MCExample, encode_pairs
from routing_env.moe.backbones.base import BackboneKind, Rows

__all__ = ["EncoderKind", "score_hidden"]


def score_hidden(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Encoder head: mean-pool ``hidden [R, T, d]`` over real tokens -> one score per row ``[R]``."""
    w = mask.unsqueeze(-1).to(hidden.dtype)  # [R, T, 1]
    pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)  # [R, d]
    return model.head(pooled).squeeze(-1).float()


class EncoderKind(BackboneKind):
    name = "encoder"

    def matches(self, config: PretrainedConfig) -> bool:
        return True  # the fallback, asked last

    def load(self, path: str) -> nn.Module:
        try:
            # The head mean-pools the last hidden state, so BERT's pooler would be dead weight.
            return AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False)
        except TypeError:  # encoders without a pooler option
            return AutoModel.from_pretrained(path, dtype=torch.float32)

    def build_head(self, backbone: nn.Module) -> nn.Module:
        head = nn.Linear(backbone.config.hidden_size, 1)
        # Zero init: every choice starts equally likely and the head's first gradients are clean.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: Sequence[MCExample], max_length: int) -> MCBatch:
        return encode_pairs(tokenizer, examples, max_length=max_length)

    def example_rows(self, tokenizer: Any, example: MCExample, max_length: int) -> tuple[Rows, torch.Tensor]:
        b = encode_pairs(tokenizer, [example], max_length=max_length)
        C = len(example.choices)
        ids, mask = b.input_ids[0, :C], b.attention_mask[0, :C]
        types = b.token_type_ids[0, :C] if b.token_type_ids is not None else None
        # Rows in the length order MCModel.forward uses, so the env's scores are bit-identical to it.
        order = torch.argsort(mask.sum(1), stable=True)
        T = int(mask.sum(1).max())
        return Rows(ids[order, :T], mask[order, :T], None if types is None else types[order, :T]), order

    # ---- the whole model --------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        if model._one_pass(batch.input_ids.device):
            return self._forward_slots(model, batch)
        return self._forward_rows(model, batch)

    def row_examples(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        B, C = batch.choice_mask.shape
        device = batch.choice_mask.device
        slots = torch.arange(B * C, device=device) // C
        return slots if model._one_pass(device) else slots[batch.choice_mask.reshape(-1)]

    def _forward_rows(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        """Scores ``[B, C]`` of the real rows, in length-sorted chunks."""
        B, C, T = batch.input_ids.shape
        # Only real choices are encoded: one 5-choice question would otherwise make every
        # question of the batch pay for a fifth, empty row.
        real = batch.choice_mask.reshape(B * C)  # [B*C]
        ids = batch.input_ids.reshape(B * C, T)[real]  # [R, T]
        mask = batch.attention_mask.reshape(B * C, T)[real]
        types = batch.token_type_ids.reshape(B * C, T)[real] if batch.token_type_ids is not None else None
        row_example = self.row_examples(model, batch)  # [R]
        row_scores = self._encode_rows(model, ids, mask, types, row_example)  # [R]
        scores = row_scores.new_zeros(B * C).masked_scatter(real, row_scores).reshape(B, C)
        return scores.masked_fill(~batch.choice_mask, float("-inf"))

    def _forward_slots(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        """Scores ``[B, C]`` from one pass over all ``B * C`` slots (fixed shapes, no sync).

        Padded choice slots hold a short real encoding (see ``encode_pairs``), so they run like any
        row; they are left out of the routing statistics (zero token weight) and scored ``-inf``.
        """
        B, C, T = batch.input_ids.shape
        mask = batch.attention_mask.reshape(B * C, T)  # [R, T], R = B * C
        model.routing.begin_pass(token_mask=mask.bool() & batch.choice_mask.reshape(B * C, 1),
                                 row_example=self.row_examples(model, batch))  # row_example [R]
        types = batch.token_type_ids.reshape(B * C, T) if batch.token_type_ids is not None else None
        # The 4D mask built here, not inside the backbone: transformers would first ask whether any
        # token is padding (``mask.all()``, a host sync) to skip the mask; built once, it is passed through.
        dtype = next(model.backbone.parameters()).dtype
        mask4d = create_bidirectional_mask(config=model.backbone.config, inputs_embeds=mask.new_empty((B * C, T, 0), dtype=dtype),
                                           attention_mask=mask, allow_is_bidirectional_skip=False)
        hidden = model.backbone(input_ids=batch.input_ids.reshape(B * C, T), attention_mask=mask4d,
                                token_type_ids=types).last_hidden_state
        scores = score_hidden(model, hidden, mask).reshape(B, C)
        return scores.masked_fill(~batch.choice_mask, float("-inf"))

    def _encode_rows(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                     row_example: torch.Tensor) -> torch.Tensor:
        """Scores of ``R`` (question, choice) rows, encoded in length-sorted chunks.

        Each chunk is cut to its own longest row; on ARC this removes most padding (a batch is
        padded to its single longest row otherwise), and the result is the same as one padded pass
        because attention never looks at padding.
        """
        lengths = mask.sum(1)  # [R]
        order = torch.argsort(lengths, stable=True)
        scores = torch.empty(ids.shape[0], device=ids.device)
        for start in range(0, len(order), model.chunk_rows):
            rows = order[start : start + model.chunk_rows]
            t = int(lengths[rows].max())
            m = mask[rows, :t]
            model.routing.begin_pass(token_mask=m.bool(), row_example=row_example, row_index=rows, num_rows=ids.shape[0])
            hidden = model.backbone(input_ids=ids[rows, :t], attention_mask=m,
                                    token_type_ids=None if types is None else types[rows, :t]).last_hidden_state
            scores = scores.index_put((rows,), score_hidden(model, hidden, m))
        return scores

    # ---- one layer group at a time ----------------------------------------------------------------
    def embed(self, model: nn.Module, rows: Rows) -> torch.Tensor:
        return model.backbone.embeddings(input_ids=rows.input_ids, token_type_ids=rows.token_type_ids)

    def run_layers(self, model: nn.Module, stack: nn.ModuleList, layers: Sequence[int], hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        # Off the CPU the mask is always built: transformers' test for skipping it (``mask.all()``) is a
        # host sync. On the CPU it may skip it, as ``MCModel``'s chunked forward does (bit-identical).
        mask = create_bidirectional_mask(config=model.backbone.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask,
                                         allow_is_bidirectional_skip=hidden.device.type == "cpu")
        for layer in layers:
            hidden = stack[layer](hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def row_scores(self, model: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        return score_hidden(model, hidden, rows.attention_mask)[:, None]  # [R, 1]: one row per choice

    def example_scores(self, scores: Any) -> Any:
        return scores[:, 0]
