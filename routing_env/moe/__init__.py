"""LoRA mixture-of-experts on Hugging Face backbones: layers, routing control, adapters, checkpoints."""

from routing_env.moe.adapters import (
    METHODS,
    apply_lora,
    build_model,
    inject_lora_moe,
    load_adapter_state,
    load_checkpoint,
    model_fingerprint,
    moe_layers,
    read_checkpoint_config,
    save_checkpoint,
    target_module_names,
)
from routing_env.moe.backbone import DEFAULT_BACKBONE, MCModel, load_backbone, resolve_backbone, transformer_layers
from routing_env.moe.config import ALL_LINEAR, MoEConfig, split_layer_groups
from routing_env.moe.layer import LoRAMoELinear
from routing_env.moe.routing import (LayerStats, RoutingContext, RoutingPlan, RoutingRecorder, combo_bias, load_stats,
                                     primary_bias)

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_BACKBONE",
    "METHODS",
    "LayerStats",
    "LoRAMoELinear",
    "MCModel",
    "MoEConfig",
    "RoutingContext",
    "RoutingPlan",
    "RoutingRecorder",
    "apply_lora",
    "build_model",
    "combo_bias",
    "inject_lora_moe",
    "load_adapter_state",
    "load_backbone",
    "load_checkpoint",
    "load_stats",
    "model_fingerprint",
    "moe_layers",
    "primary_bias",
    "read_checkpoint_config",
    "resolve_backbone",
    "save_checkpoint",
    "split_layer_groups",
    "target_module_names",
    "transformer_layers",
]
