"""The package map, held: each stage imports only the stages below it (deferred imports too), no cycles,
no library module imports a top-level script, and the scripts' names still work.

    common <- data <- moe <- env, targets <- agents / search <- training <- pipeline <- studies

(``routing_env`` and ``routing_env.registration`` sit with ``common``: they name the env's entry point
as a string and import nothing above. ``routing_env.targets``, the routing-targets contract, sits with
the env, below the agents and the search that write targets and the training that reads them.)
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from structure import cycles, import_graph  # noqa: E402  (tools/ is not a package)

SCRIPTS = {p.stem for p in ROOT.glob("*.py")}  # finetune, train_rl, ...

#: (prefix, floor): a module's floor is that of the longest prefix it starts with
FLOORS = [("routing_env", 0), ("routing_env.registration", 0), ("routing_env.common", 0), ("routing_env.data", 1),
          ("routing_env.moe", 2), ("routing_env.env", 3), ("routing_env.targets", 3), ("agents", 4), ("routing_env.search", 4),
          ("routing_env.training", 5), ("routing_env.pipeline", 6), ("routing_env.studies", 7)]


def floor_of(module: str) -> int:
    best = max((p for p, _ in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return dict(FLOORS)[best]


def test_every_module_has_a_floor_and_no_stage_imports_one_above_it():
    graph = import_graph()
    assert {"routing_env.env.model", "routing_env.training.finetune", "agents.mcts.tree"} <= set(graph)
    loose = [m for m in graph if m.count(".") == 1 and m.startswith("routing_env.") and floor_of(m) == 0
             and m not in dict(FLOORS)]
    assert loose == [], "a new top-level module: put it in the stage folder it belongs to (or add it to FLOORS)"
    upward = sorted(f"{m} ({floor_of(m)}) imports {t} ({floor_of(t)})" for m, ts in graph.items() for t in ts
                    if floor_of(t) > floor_of(m))
    assert upward == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_graph_sees_deferred_imports(tmp_path):
    pkg = tmp_path / "routing_env"
    (pkg / "env").mkdir(parents=True)
    (pkg / "training").mkdir()
    for p in (pkg / "__init__.py", pkg / "env" / "__init__.py", pkg / "training" / "__init__.py", pkg / "training" / "loop.py"):
        p.write_text("")
    (pkg / "env" / "model.py").write_text("def f():\n    from routing_env.training import loop\n")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "__init__.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["routing_env.env.model"] == {"routing_env.training.loop"}


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
    import routing_env.search.run
    import routing_env.training.finetune

    for script, module in (("finetune", routing_env.training.finetune), ("train_rl", routing_env.search.run)):
        spec = importlib.util.spec_from_file_location(f"_{script}_cli", ROOT / f"{script}.py")
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        assert cli.Config is module.Config and cli.main is module.main  # public names keep working
        assert all(getattr(cli, n) is getattr(module, n) for n in module.__all__)
