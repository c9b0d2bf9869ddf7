"""The package holds the logic: no library module imports a top-level script, and the scripts' names still work."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}  # finetune, train_rl, ...


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_a_script():
    assert {"finetune", "train_rl"} <= SCRIPTS
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & SCRIPTS)
                 for pkg in ("routing_env", "agents") for p in (ROOT / pkg).rglob("*.py") if _imports(p) & SCRIPTS}
    assert offenders == {}


def test_scripts_are_command_lines_over_the_package():
    import routing_env.finetune
    import routing_env.search

    for script, module in (("finetune", routing_env.finetune), ("train_rl", routing_env.search)):
        spec = importlib.util.spec_from_file_location(f"_{script}_cli", ROOT / f"{script}.py")
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        assert cli.Config is module.Config and cli.main is module.main  # public names keep working
        assert all(getattr(cli, n) is getattr(module, n) for n in module.__all__)
