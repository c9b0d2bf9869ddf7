"""Balancing strategies on equal terms: each alone and with LayerMoE on top, one table and plot.

    python -m routing_env.compare --task arc-easy --methods all --seeds 0,1,2
    python -m routing_env.compare --task arc-easy --methods aux,loss-free --seeds 0 --train-limit 500

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

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from routing_env import pipeline
from routing_env.moe.balancing import STRATEGIES, make_strategy
from routing_env.identity import provenance, settings_tag
from routing_env.results import check_replace, write_table
from routing_env.utils import cfg_field, make_writer, run_cli, save_config

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


@dataclass
class CompareConfig:
    """Every balancing strategy alone and with LayerMoE on top, paired by seed."""

    task: str = cfg_field("arc-easy", "task name or your own data (as in routing_env.pipeline)")
    methods: list[str] = cfg_field(["all"], f"comma-separated strategies or combinations ({', '.join(STRATEGIES)}, "
                                   "mola, e.g. loss-free+z-loss or mola+loss-free), or all")
    seeds: list[int] = cfg_field([0, 1, 2], "comma-separated seeds")
    epochs: int = cfg_field(2, "epochs of every run (LayerMoE: warm-up + stage 3)")
    train_limit: int | None = cfg_field(None, "use only the first N training questions")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions")
    search_batch_size: int = cfg_field(16, "questions searched together")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA)")
    device: str = cfg_field("auto", "device of every stage")
    logdir: str = cfg_field("runs/compare", "parent of the per-strategy pipeline folders")
    results_dir: str = cfg_field("results/compare", "where the table, JSON, plot and the stage records go")
    table_only: bool = cfg_field(False, "run nothing: the table from the finished stages")


def strategies(names: list[str]) -> list[str]:
    """``["all"]`` -> every strategy and ``mola``; otherwise the names, each checked (errors list the valid ones)."""
    chosen = list(STRATEGIES) + ["mola"] if names == ["all"] else names
    for name in chosen:
        try:
            make_strategy(_split_mola(name)[0])
        except ValueError as e:
            raise ValueError(f"{e}; or mola (MoLA's expert counts, alone or as mola+<strategy>)") from None
    return chosen


def _pipeline_config(cfg: CompareConfig, name: str) -> pipeline.PipelineConfig:
    balance, mola = _split_mola(name)
    return pipeline.PipelineConfig(
        task=cfg.task, methods=["lora-moe", "layermoe-exhaustive"], seeds=cfg.seeds, epochs=cfg.epochs,
        num_experts=MOLA_EXPERTS if mola else [4],
        train_limit=cfg.train_limit, eval_limit=cfg.eval_limit, search_batch_size=cfg.search_batch_size,
        data_dir=cfg.data_dir, device=cfg.device, balance=balance, logdir=str(Path(cfg.logdir) / name),
        results_dir=str(Path(cfg.results_dir) / name), table_only=cfg.table_only, **LAYERMOE)


def table_name(cfg: CompareConfig) -> str:
    """``<task>-strategies``, with a tag of the budget when it is not the default one."""
    task = pipeline.task_folder(pipeline.PipelineConfig(task=cfg.task))  # the task's identity (own data: content hash)
    return f"{task}-strategies{settings_tag(cfg, ('epochs', 'train_limit', 'eval_limit', 'search_batch_size'))}"


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


if __name__ == "__main__":
    run_cli(main, CompareConfig, __doc__)
