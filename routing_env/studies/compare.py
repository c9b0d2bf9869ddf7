"""Balancing strategies on equal terms: each alone and with LayerMoE on top, one table and plot.

    python -m routing_env.studies.compare --task arc-easy --methods all --seeds 0,1,2
    python -m routing_env.studies.compare --task arc-easy --methods aux,loss-free --seeds 0 --train-limit 500

``mola`` is MoLA's layout, more experts in higher layers (``MOLA_EXPERTS`` per layer, the same
24 experts in all as 4 per layer), with the Switch loss; ``mola+S`` puts strategy S on that layout.

For every strategy S (``routing_env.moe.balancing``): the lora-moe run trained with S, and S +
LayerMoE, which continues that same run from its warm-up checkpoint with routing targets from the
exact oracle (the setting chosen on dev in the LayerMoE ablations: softmax of Q* at temperature
0.05, Sinkhorn-balanced targets, beta 1), so its paired gain is the effect of LayerMoE on top of
S. Each strategy is a ``routing_env.pipeline`` run in its own folder, so the comparison resumes
stage by stage; the table (accuracy mean and spread, paired gain, per-layer CV, max/mean load,
entropy, wall time) goes to ``<results-dir>/<task>-strategies.md`` with JSON and a PNG plot.
"""

from __future__ import annotations

# The command line, before the imports below: --help and flag errors answer without loading torch,
# then run_cli imports this module (routing_env.studies.compare, not __main__) and runs its main.
if __name__ == "__main__":
    from routing_env.common.cli import run_cli
    from routing_env.common.configs import CompareConfig

    run_cli("routing_env.studies.compare:main", CompareConfig, __doc__)
    raise SystemExit(0)

from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from routing_env import pipeline
from routing_env.moe.balancing import STRATEGIES, make_strategy
from routing_env.common.configs import CompareConfig, field_names  # the settings, torch-free for the command line
from routing_env.common.identity import provenance, settings_tag
from routing_env.common.results import check_replace, write_table
from routing_env.common.utils import make_writer, save_config

__all__ = ["CompareConfig", "main", "LAYERMOE", "MOLA_EXPERTS", "strategies", "table_name"]

#: LayerMoE's best setting from the dev ablations (results/ablations.md)
LAYERMOE = {"target_form": "softmax", "target_temperature": 0.05, "target_balance": "sinkhorn", "beta": 1.0,
            "balance_weight": 0.1}

#: MoLA's per-layer expert counts for a 6-layer backbone (MiniLM): 2-4-6 from the bottom layer group up
MOLA_EXPERTS = [2, 2, 4, 4, 6, 6]


def _split_mola(name: str) -> tuple[str, bool]:
    """``"mola+loss-free"`` -> ``("loss-free", True)``; ``"mola"`` -> ``("aux", True)``."""
    parts = [p.strip() for p in name.split("+")]
    rest = "+".join(p for p in parts if p != "mola")
    return rest or "aux", "mola" in parts


def strategies(names: list[str]) -> list[str]:
    """``["all"]`` -> every strategy and ``mola``; otherwise the names, each checked (errors list the valid ones)."""
    chosen = list(STRATEGIES) + ["mola"] if names == ["all"] else names
    for name in chosen:
        try:
            make_strategy(_split_mola(name)[0])
        except ValueError as e:
            raise ValueError(f"{e}; or mola (MoLA's expert counts, alone or as mola+<strategy>)") from None
    return chosen


#: Settings of the comparison that are not the pipeline's own (every other one is, and is passed on).
_OWN = ("methods", "logdir", "results_dir")


def _pipeline_config(cfg: CompareConfig, name: str) -> pipeline.PipelineConfig:
    """Strategy ``name``'s pipeline: lora-moe and LayerMoE over it, in its own folders."""
    balance, mola = _split_mola(name)
    shared = {k: v for k, v in asdict(cfg).items() if k not in _OWN}  # task, seeds, budget, place, table_only
    return pipeline.PipelineConfig(
        **shared, methods=["lora-moe", "layermoe-exhaustive"], num_experts=MOLA_EXPERTS if mola else [4],
        balance=balance, logdir=str(Path(cfg.logdir) / name), results_dir=str(Path(cfg.results_dir) / name), **LAYERMOE)


def table_name(cfg: CompareConfig) -> str:
    """``<task>-strategies``, with a tag of the budget (its budget and search settings) when it is not the default one."""
    task = pipeline.task_folder(pipeline.PipelineConfig(task=cfg.task))  # the task's identity (own data: content hash)
    budget = tuple(k for k in field_names(CompareConfig) if k in pipeline.BUDGET_FIELDS + pipeline.SEARCH_FIELDS)
    return f"{task}-strategies{settings_tag(cfg, budget)}"


def main(cfg: CompareConfig) -> dict:
    chosen = strategies(cfg.methods)
    for name in chosen:  # every strategy's settings, before the first one trains
        pipeline.check(_pipeline_config(cfg, name))
    out = Path(cfg.results_dir)
    rows_of = [f"{n}{suffix}" for n in chosen for suffix in ("", " + LayerMoE")]
    check_replace(out / f"{table_name(cfg)}.json", {r: {"seeds": cfg.seeds} for r in rows_of})
    table: dict[str, dict] = {}
    budget: dict = {}
    skipped: list[str] = []
    for name in tqdm(chosen, desc="strategies", unit="strategy"):
        try:
            rows = pipeline.main(_pipeline_config(cfg, name))
        except ValueError as e:  # --table-only: a strategy with nothing finished at these settings is left out
            if not (cfg.table_only and str(e).startswith("--table-only: no finished stage")):
                raise
            skipped.append(name)
            continue
        if "lora-moe" in rows:
            table[name] = rows["lora-moe"]
        if "layermoe-exhaustive" in rows:
            table[f"{name} + LayerMoE"] = rows["layermoe-exhaustive"]
        budget = {"task": cfg.task, "seeds": cfg.seeds, "epochs": cfg.epochs, "train_limit": cfg.train_limit,
                  "eval_limit": cfg.eval_limit, "search_batch_size": cfg.search_batch_size,
                  "LayerMoE": f"exhaustive oracle, {LAYERMOE}"}
    if not table:
        raise ValueError(f"--table-only: no strategy has finished runs at these settings ({', '.join(chosen)}; epochs "
                         f"{cfg.epochs}, train_limit {cfg.train_limit}, eval_limit {cfg.eval_limit}) under "
                         f"{cfg.results_dir}; run without --table-only, or give the settings the runs were made with")
    if skipped:
        budget["not finished (left out)"] = ", ".join(skipped)
        print(f"[compare] nothing finished at these settings, left out: {', '.join(skipped)}")
    save_config(Path(cfg.logdir) / "compare", cfg)  # beside its TensorBoard log, as every run's
    writer = make_writer(Path(cfg.logdir) / "compare")
    path = write_table(table_name(cfg), table, out, budget, writer, provenance())
    writer.close()
    print(Path(path).read_text())
    return table

