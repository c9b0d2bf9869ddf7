"""Routing and balancing strategies for LoRA-MoE, one interface, chosen by name (``finetune.py --balance``).

``aux`` (the default, today's ``lora-moe``), ``z-loss``, ``loss-free``, ``top-p``, ``sinkhorn``,
``bip``, ``loramoe``, ``dynmole``, ``mar`` and ``rmoe``;
``+`` combines them (``loss-free+z-loss``, ``top-p+aux``), with at most one strategy that chooses
the experts. A model's strategy is part of its ``MoEConfig`` (``balance``), so checkpoints, the env
(search) and stage 3 run on top of whichever one trained it.
"""

from __future__ import annotations

from routing_env.moe.balancing.aux import SwitchAux
from routing_env.moe.balancing.base import Combination, Strategy, topk_mask
from routing_env.moe.balancing.bip import BIP
from routing_env.moe.balancing.dynmole import TsallisRouting
from routing_env.moe.balancing.loramoe import LocalizedBalance
from routing_env.moe.balancing.loss_free import LossFree
from routing_env.moe.balancing.mar import MemoryAwareRouting
from routing_env.moe.balancing.rmoe import RecurrentRouter, attach_reset_hook
from routing_env.moe.balancing.sinkhorn import SelectiveSinkhorn, sinkhorn_plan
from routing_env.moe.balancing.top_p import TopP
from routing_env.moe.balancing.zloss import ZLoss

__all__ = ["STRATEGIES", "Strategy", "Combination", "make_strategy", "topk_mask", "sinkhorn_plan", "attach_reset_hook"]

#: name -> strategy class (constructed with its defaults)
STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (SwitchAux, ZLoss, LossFree, TopP, SelectiveSinkhorn,
                                                             BIP, LocalizedBalance, TsallisRouting, MemoryAwareRouting,
                                                             RecurrentRouter)}


def make_strategy(spec: str) -> Combination:
    """``"loss-free+z-loss"`` -> the combined strategy; unknown names and clashes are errors naming the valid ones."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"empty balancing strategy {spec!r}; valid: {', '.join(STRATEGIES)} (combine with '+')")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown balancing strateg{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"valid: {', '.join(STRATEGIES)} (combine with '+', e.g. loss-free+z-loss)")
    if len(set(names)) != len(names):
        raise ValueError(f"balancing strategy {spec!r} names one strategy twice")
    choosers = [n for n in names if STRATEGIES[n].selects]
    if len(choosers) > 1:
        raise ValueError(f"{' and '.join(choosers)} both choose the experts and cannot be combined; combine at most one "
                         f"of {', '.join(n for n, s in STRATEGIES.items() if s.selects)} with "
                         f"{', '.join(n for n, s in STRATEGIES.items() if not s.selects)}")
    return Combination([STRATEGIES[n]() for n in names])
