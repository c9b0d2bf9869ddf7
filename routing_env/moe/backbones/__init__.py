"""Backbone kinds, one file each, and the registry that picks one from a model's configuration.

* ``encoder.py``: BERT-like encoders (the default MiniLM), a head on each (question, choice) row;
* ``causal_lm.py``: decoder LMs (Llama, Qwen, GPT-2, ...), the answer letters' next-token logits.

``kind_for(config)`` asks the registered kinds in turn, newest first, whether they ``match`` the
configuration (the encoder, registered first, matches anything: the fallback). A new kind is a
``BackboneKind`` subclass in its own file and one ``register`` line below (or, from outside the
package, a ``register(MyKind())`` call before models are built). The protocol: ``base.BackboneKind``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from routing_env.moe.backbones.base import BackboneKind, Rows
from routing_env.moe.backbones.causal_lm import CausalLMKind
from routing_env.moe.backbones.encoder import EncoderKind

__all__ = ["BackboneKind", "CausalLMKind", "EncoderKind", "KINDS", "Rows", "get_kind", "kind_for", "register"]

#: name -> kind, in the order ``kind_for`` asks them (the newest registered first)
KINDS: dict[str, BackboneKind] = {}


def register(kind: BackboneKind) -> BackboneKind:
    """Add ``kind`` (replacing one of the same name), asked before every kind registered earlier."""
    if not kind.name:
        raise ValueError(f"{type(kind).__name__} has no name")
    rest = {n: k for n, k in KINDS.items() if n != kind.name}
    KINDS.clear()
    KINDS.update({kind.name: kind} | rest)
    return kind


def get_kind(kind: str | BackboneKind) -> BackboneKind:
    """A registered kind by name (a ``BackboneKind`` is returned as it is)."""
    if isinstance(kind, BackboneKind):
        return kind
    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; valid: {', '.join(repr(n) for n in KINDS)}")
    return KINDS[kind]


def kind_for(config: PretrainedConfig) -> BackboneKind:
    """The first registered kind (newest first) that matches a model's configuration."""
    for kind in KINDS.values():
        if kind.matches(config):
            return kind
    raise ValueError(f"no backbone kind matches model_type {config.model_type!r}; registered: {', '.join(KINDS)}")


register(EncoderKind())  # the fallback: matches anything, so asked last
register(CausalLMKind())
