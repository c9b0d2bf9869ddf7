"""The model backend's layer groups: regrouping, each group's expert count, the routers entering each group."""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe import MCModel, moe_layers, split_layer_groups

__all__ = ["entry_routers", "group_expert_counts", "regroup_layers"]


def regroup_layers(model: MCModel, num_groups: int | None, group_sizes: list[int] | None) -> None:
    groups = split_layer_groups(model.num_layers, num_groups, group_sizes)
    group_of = {layer: g for g, layers in enumerate(groups) for layer in layers}
    for m in moe_layers(model):
        m.group = group_of[m.layer]
    model.moe_config.num_groups, model.moe_config.group_sizes = len(groups), [len(g) for g in groups]


def group_expert_counts(model: MCModel, num_groups: int, num_experts: int | None,
                        action_mode: str) -> tuple[list[int], int]:
    """``([E_g] per group, k)``: a group action forces one expert in all of its layers, so they need one count.

    A MoLA model (``--num-experts 2,2,4,4,6,6``) has more in higher groups; ``num_experts``, when given,
    must match, and only ``primary`` actions fit groups of different widths.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-MoE layers; the env needs a checkpoint trained with --method lora-moe")
    ks = {m.top_k for m in layers}
    if len(ks) != 1:
        raise ValueError(f"the env needs the same top-k in every layer; this model has {sorted(ks)}")
    counts = []
    for g in range(num_groups):
        here = sorted({m.num_experts for m in layers if m.group == g})
        if len(here) != 1:
            raise ValueError(f"the env needs one expert count per layer group; group {g} has layers with {here} "
                             "experts: regroup (group_sizes) so that each group's layers have the same count")
        counts.append(here[0])
    if num_experts is not None and {num_experts} != set(counts):
        has = max(counts) if len(set(counts)) == 1 else f"{counts} per group"
        raise ValueError(f"the env expects {num_experts} experts per layer, the checkpoint has {has}; "
                         f"pass a checkpoint trained with --num-experts {num_experts} or drop num_experts")
    if len(set(counts)) > 1 and action_mode != "primary":
        raise ValueError(f"action_mode={action_mode!r} needs the same expert count in every group; this model has "
                         f"{counts} per group (MoLA): use action_mode='primary'")
    return counts, ks.pop()


def entry_routers(env: Any) -> list[list]:
    """Per group, the MoE modules of ``env.model`` that read exactly the hidden state entering the group.

    Found once by tracing a forward: their routers give the observation's router probabilities
    from cached boundary states alone, without running the group (for BERT: query, key, value; for a
    pre-norm decoder the projections that read the first layer's input norm, which the kind applies).
    """
    ex = env._example_rows(0)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod.name, a[0])) for m in moe_layers(env.model)]
    h = env.stepper.embed(ex.rows)
    entry = []
    try:
        for g in range(env.G):
            seen.clear()
            nxt = env.stepper.run_group(h, ex.rows.attention_mask, g, None)
            x = env.stepper.router_input(g, env.stepper.split(h)[0])
            entry.append([m for m in moe_layers(env.model) if m.group == g and m.name in seen and torch.equal(seen[m.name], x)])
            h = nxt
    finally:
        for hk in hooks:
            hk.remove()
    if not all(entry):
        raise ValueError("could not find, for every group, a router that reads the group's input hidden state")
    return entry
