"""Expert computation kernels for LoRA-MoE layers."""

from routing_env.moe.kernels.lora_moe import lora_moe, lora_moe_lowrank, lora_moe_naive, lora_moe_reference, use_lowrank

__all__ = ["lora_moe", "lora_moe_lowrank", "lora_moe_naive", "lora_moe_reference", "use_lowrank"]
