"""The *causal* kind (decoder LMs: Llama, Qwen2/3, Mistral, GPT-2, ...): one lettered prompt per question
(``encode_letter_prompt``), scored by the next-token logits of the answer letters.

The forward is the decoder's own loop, written out so that it can stop and resume at any layer: embed
(plus learned positions for GPT-2), the layers under a causal mask and rotary position embeddings
(Llama, Qwen2), then the final norm and the LM head at each row's last real token, gathered at the
letter ids. ``MCModel.forward`` runs all layers at once, ``GroupStepper`` one group at a time; both go
through these methods, so the env's stepped scores are the model's. Positions count from each row's
first real token, so left padding (batches) and right padding (the env's batched groups) leave a
prompt's scores unchanged up to float32 kernel order.

GPT-2's ``Conv1D`` projections are replaced by equivalent ``nn.Linear`` modules when the model is
built (``prepare``), so LoRA-MoE and peft's LoRA attach to them as to any linear layer.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.pytorch_utils import Conv1D

from routing_env.data import MCBatch, MCExample, encode_letter_prompt
from routing_env.moe.backbones.base import BackboneKind, Rows

#: The mask builders' cache argument: ``past_key_values`` in transformers 5.17 (the GPU machine's), ``cache`` in
#: 5.24 (constraints.txt); pyproject allows any 5.x. The layer loop never caches keys: it passes None.
_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

__all__ = ["CausalLMKind", "LOOP_MODEL_TYPES"]

#: model types read as causal LMs even when a config names no architecture
CAUSAL_MODEL_TYPES = {"llama", "qwen2", "qwen3", "gpt2", "mistral", "gemma", "phi3"}
#: model types whose forward the layer loop below reproduces (embeddings, positions, masks, final norm):
#: these run in the env group by group. Other causal LMs (Gemma scales its embeddings, OPT, GPT-NeoX,
#: Bloom, ... name their parts otherwise) are scored by their own transformers forward in stages 1 and
#: 3, and the env refuses them, naming this list.
LOOP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def _lm(backbone: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module (under peft's wrapper for ``--method lora``)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def _decoder(backbone: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``LlamaModel``, ``GPT2Model``, ...)."""
    return _lm(backbone).base_model


def _first(module: nn.Module, *names: str) -> nn.Module | None:
    return next((getattr(module, n) for n in names if getattr(module, n, None) is not None), None)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[R, T]`` positions counted from each row's first real token (left padding as unpadded inference)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


class CausalLMKind(BackboneKind):
    name = "causal"

    def matches(self, config: PretrainedConfig) -> bool:
        archs = config.architectures or []
        return (any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
                or config.model_type in CAUSAL_MODEL_TYPES)

    def load(self, path: str) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def prepare(self, backbone: nn.Module) -> None:
        """GPT-2's ``Conv1D`` (``x @ W + b``, ``W [in, out]``) -> the same map as ``nn.Linear`` (``W.T``)."""
        for parent in list(backbone.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    d_in, d_out = child.weight.shape
                    lin = torch.nn.utils.skip_init(nn.Linear, d_in, d_out, dtype=child.weight.dtype,
                                                   device=child.weight.device)  # no init: no RNG draws
                    with torch.no_grad():
                        lin.weight.copy_(child.weight.t())
                        lin.bias.copy_(child.bias)
                    lin.requires_grad_(child.weight.requires_grad)
                    setattr(parent, child_name, lin)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: Sequence[MCExample], max_length: int) -> MCBatch:
        return encode_letter_prompt(tokenizer, examples, max_length=max_length)

    def example_rows(self, tokenizer: Any, example: MCExample, max_length: int) -> tuple[Rows, torch.Tensor]:
        b = encode_letter_prompt(tokenizer, [example], max_length=max_length)  # one prompt row, unpadded
        return Rows(b.input_ids, b.attention_mask, None, b.letter_ids), torch.arange(len(example.choices))

    # ---- the whole model --------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        ids, mask = batch.input_ids, batch.attention_mask
        model.routing.begin_pass(token_mask=mask.bool(), row_example=self.row_examples(model, batch))
        if not self.steppable(model):  # the model's own forward: left-padded prompts end at the last position
            logits = model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1, :]
            return logits.float().gather(1, batch.letter_ids).masked_fill(~batch.choice_mask, float("-inf"))
        stack = self.stack(model)
        hidden = self.embed(model, Rows(ids, mask, None))
        hidden = self.run_layers(model, stack, range(len(stack)), hidden, mask)
        scores = self.letter_logits(model, hidden, mask, batch.letter_ids)  # [B, C]
        return scores.masked_fill(~batch.choice_mask, float("-inf"))

    @staticmethod
    def steppable(model: nn.Module) -> bool:
        """Whether the layer loop reproduces this model's forward (``LOOP_MODEL_TYPES``)."""
        return _decoder(model.backbone).config.model_type in LOOP_MODEL_TYPES

    def _check_steppable(self, model: nn.Module) -> None:
        if not self.steppable(model):
            raise ValueError(f"the env runs a causal LM group by group for model types {', '.join(LOOP_MODEL_TYPES)}; "
                             f"this one is {_decoder(model.backbone).config.model_type!r}, which runs in stages 1 and 3 "
                             "(its own transformers forward) but not in the env")

    def row_examples(self, model: nn.Module, batch: MCBatch) -> torch.Tensor:
        return torch.arange(batch.choice_mask.shape[0], device=batch.choice_mask.device)  # one prompt row per question

    @staticmethod
    def stack(model: nn.Module) -> nn.ModuleList:
        return _first(_decoder(model.backbone), "layers", "h")

    # ---- one layer group at a time ----------------------------------------------------------------
    def embed(self, model: nn.Module, rows: Rows) -> torch.Tensor:
        self._check_steppable(model)
        decoder = _decoder(model.backbone)
        hidden = decoder.get_input_embeddings()(rows.input_ids)
        wpe = getattr(decoder, "wpe", None)  # learned positions (GPT-2)
        if wpe is not None:
            hidden = hidden + wpe(positions(rows.attention_mask))
        drop = getattr(decoder, "drop", None)
        return drop(hidden) if drop is not None else hidden

    def run_layers(self, model: nn.Module, stack: nn.ModuleList, layers: Sequence[int], hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = _decoder(model.backbone)
        config = decoder.config
        pos = positions(attention_mask)
        # As in the stepper's encoder masks: off the CPU always built (skipping asks ``mask.all()``, a host sync).
        args = {"config": config, "inputs_embeds": hidden, "attention_mask": attention_mask, _CACHE_ARG: None,
                "position_ids": pos, "allow_is_causal_skip": hidden.device.type == "cpu"}
        layer_types = getattr(config, "layer_types", None)
        if not layer_types and getattr(config, "sliding_window", None) is not None:
            # Mistral: no per-layer types, a sliding window in every layer whenever one is set (as MistralModel)
            layer_types = ["sliding_attention"] * len(stack)
        masks = {"full_attention": create_causal_mask(**args)}
        if layer_types and "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
        kwargs = {}
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is not None:
            kwargs = {"position_embeddings": rotary(hidden, pos), "position_ids": pos}
        for layer in layers:
            mask = masks[layer_types[layer]] if layer_types else masks["full_attention"]
            hidden = stack[layer](hidden, attention_mask=mask, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def router_input(self, model: nn.Module, stack: nn.ModuleList, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        norm = _first(stack[layer], "input_layernorm", "ln_1")  # pre-norm layers: the projections read the norm
        return hidden if norm is None else norm(hidden)

    def letter_logits(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                      letter_ids: torch.Tensor) -> torch.Tensor:
        """``[R, C]``: final norm and LM head at each row's last real token, read at the letters' ids."""
        lm, decoder = _lm(model.backbone), _decoder(model.backbone)
        T = mask.shape[1]
        last = (mask * torch.arange(T, device=mask.device)).argmax(-1)  # [R] last real token, left or right padded
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [R, d]
        norm = _first(decoder, "norm", "ln_f", "final_layernorm")
        logits = lm.get_output_embeddings()(norm(h) if norm is not None else h)  # [R, V]
        return logits.float().gather(1, letter_ids)

    def row_scores(self, model: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self.letter_logits(model, hidden, rows.attention_mask, rows.letter_ids)  # [R, C]

    def example_scores(self, scores: Any) -> Any:
        return scores[0]  # one prompt row per example
