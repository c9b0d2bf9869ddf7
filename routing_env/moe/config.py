"""Configuration of a LoRA-MoE: which linear layers get experts, how many, and how layers are grouped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["MoEConfig", "split_layer_groups", "ALL_LINEAR"]

#: Sentinel for ``target_modules``: every ``nn.Linear`` inside the transformer layers (as peft's "all-linear").
ALL_LINEAR = "all-linear"


@dataclass
class MoEConfig:
    """How LoRA experts and routers are attached to a backbone.

    ``num_experts`` is one number for every layer, or one per transformer layer (MoLA's
    "higher layers need more experts"). ``group_sizes`` cuts the layers into contiguous layer
    groups, the unit of one routing decision of the env; ``None`` means ``num_groups`` equal groups.
    """

    target_modules: str | list[str] = ALL_LINEAR
    num_experts: int | list[int] = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    num_groups: int = 3
    group_sizes: list[int] | None = None
    # Routing / balancing strategy (``routing_env.moe.balancing``): "aux" is the Switch loss alone.
    balance: str = "aux"
    # Filled in by ``inject_lora_moe`` from the backbone, so a checkpoint can be checked against a model.
    num_layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        if isinstance(self.num_experts, int):
            counts = [self.num_experts] * num_layers
        else:
            counts = list(self.num_experts)
            if len(counts) != num_layers:
                raise ValueError(
                    f"num_experts lists {len(counts)} values but the backbone has {num_layers} layers; "
                    f"give one number per layer or a single number for all"
                )
        for layer, e in enumerate(counts):
            if e < 1:
                raise ValueError(f"layer {layer} has {e} experts; every layer needs at least 1")
            if self.top_k > e:
                raise ValueError(
                    f"top_k={self.top_k} is larger than the {e} experts of layer {layer}; "
                    f"choose top_k <= {e} or more experts"
                )
        return counts

    def validate(self, num_layers: int) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        self.experts_per_layer(num_layers)
        split_layer_groups(num_layers, self.num_groups, self.group_sizes)

    def layer_groups(self, num_layers: int) -> list[list[int]]:
        return split_layer_groups(num_layers, self.num_groups, self.group_sizes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoEConfig fields {sorted(unknown)}; valid fields: {sorted(known)}")
        return cls(**d)


def split_layer_groups(
    num_layers: int, num_groups: int | None = None, group_sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Contiguous layer groups, bottom to top: ``[[0, 1], [2, 3], [4, 5]]`` for 6 layers in 3 groups.

    An uneven split is refused rather than guessed (which group would take the remainder changes the
    MDP), and the error says how to ask for one explicitly with ``group_sizes``.
    """
    if group_sizes is not None:
        sizes = list(group_sizes)
        if any(s < 1 for s in sizes) or sum(sizes) != num_layers:
            raise ValueError(
                f"group_sizes {sizes} must be positive and sum to the backbone's {num_layers} layers"
            )
    else:
        if num_groups is None or num_groups < 1 or num_groups > num_layers:
            raise ValueError(f"num_groups must be between 1 and the {num_layers} layers, got {num_groups}")
        if num_layers % num_groups:
            base, rem = divmod(num_layers, num_groups)
            example = ",".join(str(base + (1 if i < rem else 0)) for i in range(num_groups))
            raise ValueError(
                f"{num_layers} layers cannot be cut into {num_groups} equal layer groups; "
                f"choose a num_groups that divides {num_layers} or give the sizes explicitly, "
                f"e.g. group_sizes={example} (--group-sizes {example})"
            )
        sizes = [num_layers // num_groups] * num_groups
    groups, start = [], 0
    for s in sizes:
        groups.append(list(range(start, start + s)))
        start += s
    return groups
