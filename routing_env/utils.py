"""The one place for helpers every script shares: seeding, device choice, TensorBoard writers, config CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["seed_everything", "pick_device", "PRECISIONS", "autocast_dtype", "autocast", "make_writer", "parse_config",
           "save_config", "cfg_field", "log_hparams", "run_cli"]

T = TypeVar("T")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on CPU also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a ``--precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 on a CUDA GPU that supports it (matmuls in bf16, softmax, norms and the
    routing statistics in fp32) and fp32 elsewhere, so CPU runs stay exactly as before.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and (device.type != "cuda" or not torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; off when ``dtype`` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def make_writer(logdir: str | Path):
    """A TensorBoard ``SummaryWriter`` (imported here so library modules don't pay for it)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(logdir))


def log_hparams(writer: Any, cfg: Any) -> None:
    """The run's configuration as a Markdown table under ``hyperparameters`` (as CleanRL does)."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")


def cfg_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes the ``--help`` of its flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept; each flag's default shown once (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Build an argparse CLI from a config dataclass (``field_name`` -> ``--field-name``) and parse it.

    Booleans take ``--flag`` / ``--no-flag`` (or ``--flag false``); optional fields accept ``none``;
    list fields take comma-separated values; ``choices`` in a field's metadata are enforced with the
    valid values in the error. ``--config FILE`` (JSON or YAML, keys = field names) sets values that
    flags on the same command line override; a run's ``config.json`` is such a file.
    """
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of settings (field names as keys); flags given as well win")
    hints = typing.get_type_hints(cls)
    convert: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        optional = False
        args = typing.get_args(typ)
        if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args:
            optional = True
            args = tuple(a for a in args if a is not type(None))
            typ = args[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if typing.get_origin(typ) is list:
            inner = typing.get_args(typ)[0]
            conv = lambda s, inner=inner: [inner(v) for v in s.split(",") if v]  # noqa: E731
        elif typ is bool:
            conv = _parse_bool
        else:
            conv = typ
        if optional:
            conv = lambda s, conv=conv: None if s.lower() == "none" else conv(s)  # noqa: E731
        convert[f.name] = conv
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=conv,
            default=default,
            help=f.metadata.get("help", ""),
            choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else "BOOL" if typ is bool else f.name.upper(),
            nargs="?" if typ is bool else None,
            const=True if typ is bool else None,
        )
        if typ is bool:
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as {flag} false")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config_file(pre.config, convert, parser))
    ns = vars(parser.parse_args(argv))
    ns.pop("config")
    return cls(**ns)


def _read_config_file(path: str, convert: dict[str, Callable[[Any], Any]], parser: argparse.ArgumentParser) -> dict:
    """Settings of a JSON/YAML file, checked against the fields and converted as their flags would be."""
    p = Path(path)
    if not p.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 -- any parse error is the file's
        parser.error(f"--config {path} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of setting -> value, got {type(data).__name__}")
    unknown = sorted(set(data) - set(convert))
    if unknown:
        parser.error(f"--config {path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(convert)}")
    out = {}
    for k, v in data.items():
        if v is None or isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list):
            out[k] = convert[k](",".join(map(str, v)))
        else:
            out[k] = convert[k](str(v))
    return out


def save_config(run_dir: str | Path, cfg: Any) -> Path:
    """Write the resolved config of a run as ``config.json`` (``--config`` reads it back)."""
    from routing_env.safefiles import atomic_write_text

    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return path


def run_cli(main: Callable[[T], Any], cls: type[T], description: str | None = None,
            argv: list[str] | None = None) -> None:
    """Parse ``cls`` from the command line and run ``main``; a user error ends in one line, not a traceback.

    User errors are ``ValueError`` (``DataError`` included) and ``RuntimeError`` subclasses the
    project raises with a fix in the message; exit status 2 for bad input, 1 for a run that failed.
    ``ROUTING_GYM_TRACEBACK=1`` shows the traceback as well.
    """
    cfg = parse_config(cls, argv, description)
    try:
        main(cfg)
    except (ValueError, RuntimeError) as e:
        ours = type(e).__module__.split(".")[0] in _PROJECT_MODULES
        if os.environ.get("ROUTING_GYM_TRACEBACK") or not (isinstance(e, ValueError) or ours):
            raise  # torch's and other libraries' runtime errors are bugs to see in full
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)


#: Modules whose RuntimeErrors (NonFiniteLoss, RunLockedError, ...) carry a message for the user.
_PROJECT_MODULES = ("routing_env", "agents", "finetune", "train_rl", "__main__")
