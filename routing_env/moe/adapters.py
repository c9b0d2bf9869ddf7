"""Attaching adapters to a backbone (LoRA-MoE, or one plain LoRA through peft) and saving / loading them.

A checkpoint is a folder with ``adapter.safetensors`` (every trainable tensor: experts, routers, head)
and ``adapter_config.json`` (method, backbone, MoE config, layer count, format version). We keep one
format for both methods instead of peft's ``save_pretrained`` because peft knows neither our routers
nor the multiple-choice head, and one loader can then rebuild and check either kind of model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file
from torch import nn

from routing_env.moe.balancing import attach_reset_hook, make_strategy
from routing_env.moe.backbone import DEFAULT_BACKBONE, MCModel, layer_of, load_backbone, transformer_layers
from routing_env.moe.backbones import KINDS
from routing_env.moe.config import ALL_LINEAR, MoEConfig
from routing_env.moe.layer import LoRAMoELinear
from routing_env.common.safefiles import COMPLETE, atomic_write, atomic_write_text, mark_complete

__all__ = [
    "METHODS",
    "target_module_names",
    "inject_lora_moe",
    "apply_lora",
    "build_model",
    "moe_layers",
    "save_checkpoint",
    "load_adapter_state",
    "load_checkpoint",
    "read_checkpoint_config",
    "FORMAT_VERSION",
    "model_fingerprint",
]

METHODS = ("lora", "lora-moe")
FORMAT_VERSION = 1


def target_module_names(backbone: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules inside transformer layers that ``target_modules`` selects.

    ``"all-linear"`` takes every linear layer of every transformer layer; a list is matched with peft's
    own rule (exact name or dotted suffix), so ``["query", "value"]`` means what it means in peft.
    """
    peft_cfg = None if target_modules == ALL_LINEAR else LoraConfig(target_modules=list(target_modules))
    names = []
    for name, mod in backbone.named_modules():
        if not isinstance(mod, nn.Linear) or layer_of(name) is None:
            continue
        if peft_cfg is None or check_target_module_exists(peft_cfg, name):
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer inside the transformer layers of "
            f"{type(backbone).__name__}; use 'all-linear' or names such as "
            f"{sorted({n.rsplit('.', 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})}"
        )
    return names


def inject_lora_moe(model: MCModel, cfg: MoEConfig) -> list[LoRAMoELinear]:
    """Replace the targeted linear layers of ``model.backbone`` by ``LoRAMoELinear`` (in place)."""
    L = model.num_layers
    cfg.validate(L)
    cfg.num_layers = L
    experts = cfg.experts_per_layer(L)
    group_of = {layer: g for g, layers in enumerate(cfg.layer_groups(L)) for layer in layers}
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    layers = []
    for name in target_module_names(model.backbone, cfg.target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.backbone.get_submodule(parent_name)
        layer = layer_of(name)
        moe = LoRAMoELinear(
            getattr(parent, child),
            num_experts=experts[layer],
            top_k=cfg.top_k,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            layer=layer,
            group=group_of[layer],
            name=name,
            context=model.routing,
        )
        setattr(parent, child, moe)
        layers.append(moe)
    # The default (Switch loss, top-k) runs the layer's own code path; any other strategy its hooks.
    strategy = None if cfg.balance == "aux" else make_strategy(cfg.balance)
    model.routing.strategy = strategy
    for moe in layers if strategy is not None else ():
        strategy.attach(moe)
    if strategy is not None and strategy.state_dim:
        attach_reset_hook(model)
    model.moe_config = cfg
    return layers


def apply_lora(model: MCModel, rank: int, alpha: float, dropout: float, target_modules: str | list[str]) -> None:
    """One plain LoRA per targeted layer, through peft: the reference the LoRA-MoE methods are compared with."""
    names = target_module_names(model.backbone, target_modules)
    lora_cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    model.backbone = get_peft_model(model.backbone, lora_cfg)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}


def moe_layers(model: nn.Module) -> list[LoRAMoELinear]:
    return [m for m in model.modules() if isinstance(m, LoRAMoELinear)]


def build_model(
    method: str,
    backbone: str = DEFAULT_BACKBONE,
    moe: MoEConfig | None = None,
    *,
    seed: int = 0,
    backbone_module: tuple[nn.Module, str] | None = None,
) -> MCModel:
    """A fresh multiple-choice model with adapters for ``method`` ("lora" or "lora-moe").

    ``backbone_module`` passes an already built ``(module, kind)`` (tests build tiny random models).
    Adapter initialisation is seeded so the same seed gives the same starting weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    module, kind = backbone_module if backbone_module is not None else load_backbone(backbone)[::2]
    torch.manual_seed(seed)
    model = MCModel(module, kind, backbone)
    moe = moe or MoEConfig()
    if method == "lora-moe":
        inject_lora_moe(model, moe)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        apply_lora(model, moe.rank, moe.alpha, moe.dropout, moe.target_modules)
    model.method = method
    return model


def _config_dict(model: MCModel) -> dict:
    d = {
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "backbone": model.backbone_name,
        "kind": model.kind,
        "num_layers": model.num_layers,
    }
    if model.method == "lora-moe":
        d["moe"] = asdict(model.moe_config)
    else:
        d["lora"] = model.lora_config
    return d


def save_checkpoint(model: MCModel, directory: str | Path, extra: dict | None = None, complete: bool = True) -> Path:
    """Write the trainable tensors and the config needed to rebuild the model on a fresh backbone.

    ``lora`` models also get ``peft/``: the backbone's LoRA as peft's ``save_pretrained`` writes it
    (the multiple-choice head is only in ``adapter.safetensors``). Each file is written atomically
    (``peft/`` by peft, covered by the marker); ``complete`` then writes the folder's ``COMPLETE`` marker
    (pass ``False`` when more files follow, and mark the folder yourself after the last).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)  # an overwritten folder is incomplete until re-marked
    state = {k: v.contiguous().cpu() for k, v in model.trainable_state().items()}
    atomic_write(out / "adapter.safetensors", lambda tmp: save_file(state, str(tmp)))
    cfg = _config_dict(model) | {"extra": extra or {}}
    atomic_write_text(out / "adapter_config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if model.method == "lora":  # plain LoRA also in peft's own format, for PeftModel.from_pretrained
        model.backbone.save_pretrained(str(out / "peft"))
    if complete:
        mark_complete(out)
    return out


def read_checkpoint_config(directory: str | Path) -> dict:
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {directory}: {path} is missing (was it written by finetune.py?)")
    cfg = json.loads(path.read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {cfg.get('format_version')}, this code reads {FORMAT_VERSION}")
    return cfg


def load_checkpoint(directory: str | Path, backbone_module: tuple[nn.Module, str] | None = None) -> MCModel:
    """Rebuild a model saved by ``save_checkpoint``: fresh backbone, same adapters, identical logits."""
    cfg = read_checkpoint_config(directory)
    if cfg["method"] == "lora-moe":
        moe = MoEConfig.from_dict(cfg["moe"])
    else:
        lc = cfg["lora"]
        moe = MoEConfig(rank=lc["rank"], alpha=lc["alpha"], dropout=lc["dropout"], target_modules=lc["target_modules"])
    if backbone_module is None:
        module, _, kind = load_backbone(cfg["backbone"])
        saved = cfg.get("kind", kind)  # the kind the checkpoint was trained as (older ones: decided again)
        if saved != kind:
            if saved not in KINDS:
                raise ValueError(f"checkpoint {directory} was trained as backbone kind {saved!r}, which is not registered "
                                 f"here (registered: {', '.join(KINDS)}); register it (routing_env.moe.backbones.register) "
                                 "before loading")
            kind = saved
        backbone_module = (module, kind)
    # Checked before the adapters are attached, so a mismatch is reported as such rather than as
    # whatever the layer grouping makes of the wrong layer count.
    layers = len(transformer_layers(backbone_module[0]))
    if layers != cfg["num_layers"]:
        raise ValueError(
            f"checkpoint {directory} was trained on a {cfg['num_layers']}-layer backbone, "
            f"but {cfg['backbone']} has {layers} layers"
        )
    model = build_model(cfg["method"], cfg["backbone"], moe, backbone_module=backbone_module)
    return load_adapter_state(model, directory)


def load_adapter_state(model: MCModel, directory: str | Path) -> MCModel:
    """Load a checkpoint's trainable tensors into ``model`` in place, refusing any that do not fit."""
    state = load_file(str(Path(directory) / "adapter.safetensors"))
    expected = model.trainable_state()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    return model


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the trainable tensors (adapters, routers, head) in name order: names one warm-up."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
