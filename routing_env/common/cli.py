"""The command line of every script: a config dataclass as flags, ``--config FILE``, ``--threads``,
and user errors as one line instead of a traceback.

Imports nothing heavy (no torch, numpy, transformers): a script parses its command line, and answers
``--help`` or a typo, before it imports the module that does the work (``run_cli("pkg.mod:main", ...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["cfg_field", "cfg_like", "field_names", "parse_config", "run_cli", "save_config", "set_threads", "unwritable_reason", "OUTPUT_DIRS"]

T = TypeVar("T")

#: Config fields naming folders a run writes into: checked before any work (``unwritable_reason``).
OUTPUT_DIRS = ("logdir", "results_dir")

#: Modules whose RuntimeErrors (NonFiniteLoss, RunLockedError, ...) carry a message for the user.
_PROJECT_MODULES = ("routing_env", "agents", "finetune", "train_rl", "__main__")

#: errnos of a folder that cannot be written (an OSError with one of them, inside an output folder,
#: is the user's choice of folder, not a bug).
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOSPC,
               errno.EDQUOT}


def cfg_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes the ``--help`` of its flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


_KEEP: Any = object()


def cfg_like(group: type, name: str, default: Any = _KEEP, help: str | None = None) -> Any:
    """The field ``name`` of the settings dataclass ``group`` again, for a config that takes it alone or
    with another default (and, where its meaning differs there, another help text).

    The help and choices stay declared once, in ``group``: an entry point that defaults a setting
    otherwise (the pipeline's 32 simulations, its own logdir) restates the default only. Used in a
    subclass of ``group`` the field keeps its place among the group's fields.
    """
    f = group.__dataclass_fields__[name]  # type: ignore[attr-defined]
    meta = dict(f.metadata)
    text = meta.pop("help") if help is None else help
    meta.pop("help", None)
    if default is _KEEP:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return cfg_field(default, text, **meta)


def field_names(*groups: type) -> tuple[str, ...]:
    """The field names of the settings groups (dataclasses), in declaration order, each once."""
    return tuple(dict.fromkeys(f.name for g in groups for f in dataclasses.fields(g)))


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(s)


#: what a value of each type must be, as error messages say it ("must be an int, got 'two'")
_KINDS = {int: ("an int", "ints"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values")}


class _Converter:
    """One field's conversion of a flag's text (or a ``--config`` value) to its type.

    Raises ``argparse.ArgumentTypeError`` saying what was expected, so a bad flag reads
    ``argument --epochs: must be an int, got 'two'`` and a bad file value the same way.
    """

    def __init__(self, typ: Any, optional: bool) -> None:
        self.item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
        self.base = self.item or typ
        one, many = _KINDS.get(self.base, (f"a {getattr(self.base, '__name__', self.base)}", "values"))
        self.kind = f"a comma-separated list of {many}" if self.item else one
        if optional:
            self.kind += ", or none"
        self.optional = optional

    def _one(self, s: str) -> Any:
        return _parse_bool(s) if self.base is bool else self.base(s)

    def __call__(self, s: str) -> Any:
        if self.optional and s.lower() == "none":
            return None
        try:
            if self.item:
                return [self._one(v.strip()) for v in s.split(",") if v.strip()]
            return self._one(s)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {self.kind}, got {s!r}") from None

    def from_file(self, value: Any) -> Any:
        """A JSON / YAML value. Text converts as the flag's would; other values carry their type, so
        ``true`` for an int, ``2.5`` for an int, ``null`` for a required setting are errors."""
        bad = argparse.ArgumentTypeError(f"must be {self.kind}, got {value!r}")
        if value is None:
            if self.optional:
                return None
            raise bad
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list) and not self.item:
            raise bad
        items = value if isinstance(value, list) else [value]
        if any(v is None or isinstance(v, (list, dict)) or (isinstance(v, bool) != (self.base is bool)
                                                            and not isinstance(v, str)) for v in items):
            raise bad
        try:
            out = [v if isinstance(v, bool) else self._one(str(v)) for v in items]
        except (ValueError, TypeError):
            raise bad from None
        return out if self.item else out[0]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept; each flag's default shown once (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"


def _build_parser(cls: type, description: str | None) -> tuple[argparse.ArgumentParser, dict[str, _Converter], dict]:
    """The parser of ``cls``'s fields, their converters, and their ``choices`` (for values from a file)."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of settings (field names as keys); flags given as well win")
    hints = typing.get_type_hints(cls)
    convert: dict[str, _Converter] = {}
    choices: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        optional = False
        args = typing.get_args(typ)
        if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args:
            optional = True
            typ = next(a for a in args if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        conv = convert[f.name] = _Converter(typ, optional)
        if f.metadata.get("choices"):
            choices[f.name] = f.metadata["choices"]
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
    return parser, convert, choices


def _parse(parser: argparse.ArgumentParser, convert: dict[str, _Converter], choices: dict,
           argv: list[str] | None) -> dict[str, Any]:
    """The parsed settings: defaults, then the ``--config`` file, then the flags."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config_file(pre.config, convert, choices, parser))
    ns = vars(parser.parse_args(argv))
    ns.pop("config")
    return ns


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Build an argparse CLI from a config dataclass (``field_name`` -> ``--field-name``) and parse it.

    Booleans take ``--flag`` / ``--no-flag`` (or ``--flag false``); optional fields accept ``none``;
    list fields take comma-separated values; ``choices`` in a field's metadata are enforced with the
    valid values in the error. ``--config FILE`` (JSON or YAML, keys = field names) sets values that
    flags on the same command line override; a run's ``config.json`` is such a file.
    """
    parser, convert, choices = _build_parser(cls, description)
    return cls(**_parse(parser, convert, choices, argv))


def _read_config_file(path: str, convert: dict[str, _Converter], choices: dict,
                      parser: argparse.ArgumentParser) -> dict:
    """Settings of a JSON/YAML file, checked against the fields and converted as their flags would be."""
    p = Path(path)
    if not p.is_file():
        parser.error(f"--config {path}: no such file")
    yaml_file = p.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml  # only for YAML files: it is not needed to parse flags

            data = yaml.safe_load(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 -- any parse error is the file's
        parser.error(f"--config {path} is not valid {'YAML' if yaml_file else 'JSON'}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of setting -> value, got {type(data).__name__}")
    unknown = sorted(set(data) - set(convert))
    if unknown:
        parser.error(f"--config {path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(convert)}")
    out = {}
    for k, v in data.items():
        try:
            out[k] = convert[k].from_file(v)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--config {path}: setting '{k}' {e}")
        # argparse checks choices of flags only; a file's value is checked here
        if k in choices and out[k] is not None and out[k] not in choices[k]:
            parser.error(f"--config {path}: setting '{k}' must be one of {', '.join(map(str, choices[k]))}, "
                         f"got {v!r}")
    return out


def save_config(run_dir: str | Path, cfg: Any) -> Path:
    """Write the resolved config of a run as ``config.json`` (``--config`` reads it back)."""
    from routing_env.common.safefiles import atomic_write_text

    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return path


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` and, where torch still allows it, its inter-op pool too (None: leave torch's default)."""
    if n is None:
        return
    import torch  # here, not at the top: --help and parse errors are answered without torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # allowed once per process, before any inter-op work; the intra-op count above is what matters on CPU


def unwritable_reason(folder: str | Path) -> str | None:
    """Why a run cannot write into ``folder`` (made when missing), or None when it can.

    Probed with a temporary folder made and removed in ``folder``, or in its nearest existing parent
    when it is missing, so nothing is left behind: permission bits alone would pass for root, and a
    read-only file system or a file in the way fails the probe the same as it would fail the run.
    """
    p = Path(folder).expanduser().absolute()
    probe = p
    try:
        while not probe.exists():
            probe = probe.parent
    except OSError as e:  # e.g. a parent that cannot be listed
        return e.strerror or str(e)
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
    except OSError as e:
        reason = e.strerror or str(e)
        return reason if probe == p else f"cannot make a folder in {probe} ({reason})"
    return None


def _output_dirs(cfg: Any) -> dict[str, str]:
    """``flag -> folder`` of the config's output folders (``OUTPUT_DIRS`` among its fields)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return {"--" + n.replace("_", "-"): str(getattr(cfg, n)) for n in OUTPUT_DIRS if n in names}


def _unwritable_flag(e: OSError, dirs: dict[str, str]) -> str | None:
    """The output flag whose folder ``e`` (an error writing inside it) is about, if any."""
    if e.errno not in _UNWRITABLE or not e.filename:
        return None
    target = Path(os.fsdecode(e.filename)).absolute()
    for flag, folder in dirs.items():
        root = Path(folder).expanduser().absolute()
        if target == root or root in target.parents:
            return flag
    return None


def _resolve_main(main: Callable[[T], Any] | str) -> Callable[[T], Any]:
    """``"package.module:function"`` -> the function, imported now (after parsing); a callable as it is."""
    if callable(main):
        return main
    module, _, attr = main.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_cli(main: Callable[[T], Any] | str, cls: type[T], description: str | None = None,
            argv: list[str] | None = None) -> None:
    """Parse ``cls`` from the command line and run ``main``; a user error ends in one line, not a traceback.

    ``main`` is a function or ``"module:function"``: the latter is imported only after the command
    line is parsed, so ``--help`` and flag errors never wait for torch. Adds ``--threads N``
    (``torch.set_num_threads``), which is not a field of ``cls``: it is no part of a run's
    config.json or identity. Before any work, the config's output folders (``--logdir``,
    ``--results-dir``) must be writable.

    User errors are ``ValueError`` (``DataError`` included) and ``RuntimeError`` subclasses the
    project raises with a fix in the message; exit status 2 for bad input, 1 for a run that failed.
    ``ROUTING_GYM_TRACEBACK=1`` shows the traceback as well.
    """
    parser, convert, choices = _build_parser(cls, description)
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads of torch's kernels (torch.set_num_threads, and its inter-op pool); "
                             "default: torch's own choice (the core count). Not a setting of the run (not in its "
                             "config.json): results agree up to float rounding, as a sum split over another "
                             "number of threads adds in another order")
    ns = _parse(parser, convert, choices, argv)
    threads = ns.pop("threads")
    cfg = cls(**ns)
    dirs = _output_dirs(cfg)
    for flag, folder in dirs.items():
        reason = unwritable_reason(folder)
        if reason:
            _fail(f"cannot write to {folder}: {reason}; choose another {flag}", 2)
    set_threads(threads)
    run = _resolve_main(main)
    try:
        run(cfg)
    except OSError as e:
        flag = _unwritable_flag(e, dirs)
        if os.environ.get("ROUTING_GYM_TRACEBACK") or flag is None:
            raise
        _fail(f"cannot write to {os.fsdecode(e.filename)}: {e.strerror}; choose another {flag}", 2)
    except (ValueError, RuntimeError) as e:
        ours = type(e).__module__.split(".")[0] in _PROJECT_MODULES
        if os.environ.get("ROUTING_GYM_TRACEBACK") or not (isinstance(e, ValueError) or ours):
            raise  # torch's and other libraries' runtime errors are bugs to see in full
        _fail(str(e), 2 if isinstance(e, ValueError) else 1)


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
