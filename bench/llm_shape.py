"""Benchmark (issue 25): LoRA-MoE against peft LoRA on a causal LM of Qwen2-0.5B's shape, in one run. JSON out.

A ``Qwen2ForCausalLM`` with Qwen2-0.5B's configuration (896 wide, 24 layers, 14 query / 2 key-value
heads, 4864 MLP, 151936 vocab, tied embeddings: ~0.49B parameters) and random weights (nothing is
downloaded). The same backbone gets, in two copies, LoRA-MoE (4 experts, top-2, rank 8, every linear
layer of every transformer layer) and one peft LoRA of rank 8 on the same layers, and both run the
same batch of lettered ARC-Easy prompts (``encode_letter_prompt``; Qwen2's tokenizer is not offline,
so the prompts are cut into ids by the packaged MiniLM WordPiece tokenizer: ids < 30522, valid
Qwen2 ids; the shape, not the text, is what is timed). Per method:

* ``train_step_ms``: one training step (forward + cross-entropy over the answer letters + the
  Switch balance loss for LoRA-MoE, backward, AdamW step over the adapters), median of ``--steps``
  after ``--warmup`` steps; the two methods' timed steps alternate, so a load change on a shared
  machine hits both. fp32 on a CPU, bf16 autocast on a GPU;
* ``eval_sequences_per_s`` / ``eval_tokens_per_s``: no-grad forwards over ``--eval-batch`` prompts
  (median of ``--eval-reps``, alternating as the training steps);
* ``train_peak_mb`` (one training step after the warm-up) / ``eval_peak_mb`` (the eval forwards): on a
  GPU ``torch.cuda.max_memory_allocated`` above what was allocated before the phase; on a CPU the
  process's peak resident set (RSS, sampled every 2 ms by a thread, freed heap trimmed first) above
  the RSS before the phase. Either is what the phase adds (activations, gradients, allocator slack),
  not the weights nor AdamW's state (allocated in the warm-up; ``adamw_state_mb``);
* ``ratio_lora_moe_over_lora`` of each. Goal (issue 25): train step at most 1.5x on a CPU.

Then the routing env (``RoutingEnv`` on the LoRA-MoE model, ARC-Easy dev) scores paths that share
prefixes as a search tree's nodes do (every path over the first ``--env-branch`` actions of each
group, for ``--env-examples`` questions) through ``evaluate_paths``, once with the prefix cache
(``cache_mb`` default) and once with ``cache_mb=0``. ``group_forwards_per_s`` = the (row, group)
transitions the search needs (distinct (question, prefix) nodes x rows per question) per wall second; ``group_forwards_run``
counts those the env actually ran (without the cache it recomputes shared prefixes).
Where the env cannot run a causal LM, ``env.measured`` is false and ``env.reason`` says why.

``--dry`` runs everything on a tiny Qwen2 shape in seconds (tests). ``--device cuda`` runs the same on a GPU.

    python bench/llm_shape.py [--threads 2] [--batch 2] [--prompt-len 96] [--out results/bench/llm_shape_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import inspect
import itertools
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# The library of the checkout this file is in, whatever the environment has installed (an editable
# install may point at another checkout): the measured code is this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routing_env.common.results import report  # noqa: E402  (this checkout's library, above)

#: Qwen2-0.5B (Qwen/Qwen2-0.5B config.json); ``--dry`` uses a tiny shape of the same family.
QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
#: (The vocabulary holds the MiniLM tokenizer's 30522 ids: the env encodes its prompts with it unfolded.)
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=30522, max_position_embeddings=512, rope_theta=1e6,
                 tie_word_embeddings=True)
METHODS = ("lora", "lora-moe")


# ---- memory ----------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Give freed heap back to the OS, so a phase's RSS growth is its own (glibc keeps freed pages)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` -> ``m.peak_mb``: what the block adds at its peak (see the docstring)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_mb = (self.peak - self.start) / 2**20


# ---- models and batches ----------------------------------------------------------------------------
def make_backbone(shape: dict, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, attention_dropout=0.0)
    return Qwen2ForCausalLM(cfg).eval()


def make_models(backbone, layer_groups: int, seed: int) -> dict:
    """The two adapted copies of ``backbone``: peft LoRA and LoRA-MoE, rank 8 on every linear layer."""
    from routing_env.moe import MoEConfig, build_model

    models = {}
    for method in METHODS:
        cfg = MoEConfig(num_experts=[4] * backbone.config.num_hidden_layers, top_k=2, rank=8,
                        target_modules="all-linear", num_groups=layer_groups)
        models[method] = build_model(method, "qwen2-0.5b-shape-random", cfg, seed=seed,
                                     backbone_module=(copy.deepcopy(backbone), "causal"))
    return models


def prompt_batch(tokenizer, data_dir, n: int, prompt_len: int, vocab: int, device, offset: int = 0):
    """``n`` lettered ARC-Easy dev prompts (left padded, cut to ``prompt_len`` tokens), ids folded into ``vocab``."""
    from routing_env.data import encode_letter_prompt, load_task

    examples = load_task("arc-easy", "dev", data_dir, limit=offset + n)[offset:]
    batch = encode_letter_prompt(tokenizer, examples, max_length=prompt_len)
    batch.input_ids = batch.input_ids % vocab
    batch.letter_ids = batch.letter_ids % vocab
    return batch.to(device)


# ---- the phases --------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, batch, device, amp) -> float:
    """One training step as ``finetune.train_step`` runs it (no grad clipping); its wall seconds."""
    import torch
    import torch.nn.functional as F

    from routing_env.common.utils import autocast
    from routing_env.moe import RoutingPlan

    _sync(device)
    t0 = time.perf_counter()
    with model.routed(RoutingPlan(compute_aux=model.method == "lora-moe")) as rec, autocast(device, amp):
        logits = model(batch).float()  # [B, C]
    loss = F.cross_entropy(logits, batch.labels)
    if rec.aux_losses:
        loss = loss + 0.01 * torch.stack(rec.aux_losses).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0


def eval_forward(model, batch, device, amp) -> float:
    """Wall seconds of one no-grad forward of ``batch``."""
    import torch

    from routing_env.common.utils import autocast
    from routing_env.moe import RoutingPlan

    with torch.no_grad(), model.routed(RoutingPlan()), autocast(device, amp):
        _sync(device)
        t0 = time.perf_counter()
        model(batch)
        _sync(device)
    return time.perf_counter() - t0


def env_group_forwards(model, tokenizer, args, device) -> dict:
    """Group forwards per second of the routing env over prefix-sharing paths, with and without its cache."""
    from routing_env.env import RoutingEnv

    kw = dict(task="arc-easy", split="dev", data_dir=args.data_dir, max_examples=args.env_examples,
              device=str(device), model=model)
    if "tokenizer" in inspect.signature(RoutingEnv).parameters:
        kw["tokenizer"] = tokenizer
    else:  # the env asks the model for its backbone's tokenizer; this random backbone has none of its own
        model.tokenizer_for = lambda name: tokenizer
    out: dict = {"examples": args.env_examples, "branch": args.env_branch}
    try:
        envs = {"cached": RoutingEnv(**kw), "uncached": RoutingEnv(**kw, cache_mb=0)}
    except Exception as exc:  # the env's causal-LM support is not there (yet)
        return out | {"measured": False, "reason": f"RoutingEnv(model=<causal MCModel>) raised {type(exc).__name__}: {exc}"}
    env = envs["cached"]
    out["cache_mb"] = inspect.signature(RoutingEnv).parameters["cache_mb"].default
    G, n_ex = env.G, min(args.env_examples, len(env.examples))
    branch = min(args.env_branch, min(env.group_experts))
    paths = [list(p) for p in itertools.product(range(branch), repeat=G)]  # every path of a branch^G tree
    ids = [i for i in range(n_ex) for _ in paths]
    all_paths = [p for _ in range(n_ex) for p in paths]
    try:  # the rows the env runs per question: 1 (the lettered prompt) on a causal LM
        rows = [int(env._example_rows(i).rows.input_ids.shape[0]) for i in range(n_ex)]
    except AttributeError:  # the env's row store moved: a causal LM's one prompt row per question
        rows = [1] * n_ex
    nodes = [sum(branch ** (g + 1) for g in range(G))] * n_ex  # distinct (question, prefix) nodes below the root
    needed = sum(r * k for r, k in zip(rows, nodes))
    out |= {"groups": G, "paths": len(all_paths), "rows_per_question": rows, "group_forwards_needed": needed,
            "group_forwards_without_sharing": sum(r * len(paths) * G for r in rows)}
    envs["uncached"].evaluate_paths([0], [paths[0]])  # warm-up (one path; nothing stays cached at cache_mb=0)
    results = {}
    for name in ("uncached", "cached"):
        ran = [0]
        batched = envs[name]._run_batch  # count the (row, group) forwards the env actually runs

        def counting(ids, hiddens, *rest, batched=batched, ran=ran):
            ran[0] += sum(int(h.shape[0]) for h in hiddens)
            return batched(ids, hiddens, *rest)

        envs[name]._run_batch = counting
        _sync(device)
        t0 = time.perf_counter()
        results[name] = envs[name].evaluate_paths(ids, all_paths)
        _sync(device)
        dt = time.perf_counter() - t0
        out[name] = {"seconds": dt, "group_forwards_per_s": needed / dt, "group_forwards_run": ran[0]}
    import numpy as np

    out["max_abs_outcome_diff"] = float(np.max(np.abs(results["cached"]["outcome"] - results["uncached"]["outcome"])))
    out["ratio_cached_over_uncached"] = out["cached"]["group_forwards_per_s"] / out["uncached"]["group_forwards_per_s"]
    out["measured"] = True
    return out


def machine(device) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import routing_env

    lib = Path(routing_env.__file__).resolve().parent
    root = Path(__file__).resolve().parents[1]
    # Relative to this checkout (no machine paths in committed results); absolute only if it is another one.
    info = {"routing_env": str(lib.relative_to(root)) if lib.is_relative_to(root) else str(lib), "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "load_average_before": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:  # the code measured: the commit, and the library files that differ from it (a shared worktree)
        git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).resolve().parents[1], capture_output=True,  # noqa: E731
                                        text=True, timeout=10).stdout.strip()
        info["git_commit"] = git("rev-parse", "HEAD")
        info["git_changed_library_files"] = git("status", "--porcelain", "--", "routing_env").splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> None:
    # argparse first: `--help` prints the usage and exits before torch or a model is loaded.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on a GPU, fp32 on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--batch", type=int, default=2, help="training batch (questions)")
    ap.add_argument("--eval-batch", type=int, default=None, help="eval batch (default: --batch)")
    ap.add_argument("--prompt-len", type=int, default=96, help="prompts are cut to at most this many tokens")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps per method (then one more for the memory)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per method (median reported)")
    ap.add_argument("--eval-reps", type=int, default=3, help="timed eval forwards per method, after a warm-up and a memory one (median reported)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="shrink the embedding for quick runs (default: Qwen2-0.5B's 151936)")
    ap.add_argument("--layers", type=int, default=None, help="transformer layers (default: 24; a multiple of 3)")
    ap.add_argument("--env-examples", type=int, default=1, help="questions the env scores")
    ap.add_argument("--env-branch", type=int, default=2, help="first actions per group in the path tree (branch^G paths)")
    ap.add_argument("--no-env", action="store_true", help="skip the env part")
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    ap.add_argument("--dry", action="store_true", help="a tiny Qwen2 shape, seconds (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    for name in ("batch", "prompt_len", "warmup", "steps", "eval_reps", "env_examples", "env_branch"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}")

    import torch

    from routing_env.common.utils import autocast_dtype
    from routing_env.moe import MCModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    amp = autocast_dtype("auto", device)
    shape = dict(DRY_SHAPE if args.dry else QWEN2_0_5B)
    if args.vocab_size:
        shape["vocab_size"] = args.vocab_size
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.dry:
        args.prompt_len, args.steps, args.eval_reps = min(args.prompt_len, 48), min(args.steps, 2), min(args.eval_reps, 2)
    eval_batch = args.eval_batch or args.batch
    result: dict = {"dry": args.dry, "device": str(device), "precision": "bf16 autocast" if amp else "fp32",
                    "machine": machine(device), "shape": shape, "real_qwen2_0_5b_shape": shape == QWEN2_0_5B,
                    "adapters": {"lora-moe": "4 experts, top-2, rank 8, alpha 16, every linear layer",
                                 "lora": "peft LoRA rank 8, alpha 16, every linear layer"},
                    "tokenizer": "packaged MiniLM WordPiece (Qwen2's is not offline); ids folded into the vocab",
                    "memory": ("torch.cuda.max_memory_allocated above the phase's start" if device.type == "cuda" else
                               "peak process RSS above the phase's start (sampled every 2 ms, heap trimmed first): "
                               "pages the phase adds; memory the allocator kept from earlier phases and reuses is "
                               "not counted, so the eval figures are lower bounds")}

    t0 = time.perf_counter()
    backbone = make_backbone(shape, args.seed)
    result["backbone_parameters"] = sum(p.numel() for p in backbone.parameters())
    models = make_models(backbone, 3, args.seed)
    del backbone
    for m in models.values():
        m.to(device)
    result["build_seconds"] = time.perf_counter() - t0
    tokenizer = MCModel.tokenizer_for("minilm")
    train = prompt_batch(tokenizer, args.data_dir, args.batch, args.prompt_len, shape["vocab_size"], device)
    evalb = prompt_batch(tokenizer, args.data_dir, eval_batch, args.prompt_len, shape["vocab_size"], device)
    result["batch"] = {"train_questions": args.batch, "eval_questions": eval_batch,
                       "train_shape": list(train.input_ids.shape), "eval_shape": list(evalb.input_ids.shape),
                       "train_tokens": int(train.attention_mask.sum()), "eval_tokens": int(evalb.attention_mask.sum())}

    rows = {m: {"trainable_parameters": sum(p.numel() for p in models[m].parameters() if p.requires_grad)}
            for m in METHODS}
    opts = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4) for m in METHODS}
    for m in METHODS:  # warm-up steps (the first allocates AdamW's state), then one step for the memory
        models[m].train()
        for _ in range(args.warmup):
            train_step(models[m], opts[m], train, device, amp)
        with PeakMemory(device) as mem:
            train_step(models[m], opts[m], train, device, amp)
        rows[m]["train_peak_mb"] = mem.peak_mb
        rows[m]["adamw_state_mb"] = sum(t.numel() * t.element_size() for st in opts[m].state.values()
                                        for t in st.values() if torch.is_tensor(t)) / 2**20
    times = {m: [] for m in METHODS}
    for _ in range(args.steps):  # alternate, so both methods see the same machine
        for m in METHODS:
            times[m].append(train_step(models[m], opts[m], train, device, amp))
    for m in METHODS:
        ms = 1e3 * statistics.median(times[m])
        rows[m] |= {"train_step_ms": ms, "train_step_ms_all": [1e3 * t for t in times[m]],
                    "train_tokens_per_s": result["batch"]["train_tokens"] / (ms / 1e3)}
        del opts[m]
        models[m].eval()
        for p in models[m].parameters():
            p.grad = None
        eval_forward(models[m], evalb, device, amp)  # warm-up
        with PeakMemory(device) as mem:
            eval_forward(models[m], evalb, device, amp)
        rows[m]["eval_peak_mb"] = mem.peak_mb
    times = {m: [] for m in METHODS}
    for _ in range(args.eval_reps):  # alternate, as the training steps
        for m in METHODS:
            times[m].append(eval_forward(models[m], evalb, device, amp))
    for m in METHODS:
        s = statistics.median(times[m])
        rows[m] |= {"eval_forward_ms": 1e3 * s, "eval_forward_ms_all": [1e3 * t for t in times[m]],
                    "eval_sequences_per_s": eval_batch / s, "eval_tokens_per_s": result["batch"]["eval_tokens"] / s}
    result["methods"] = rows
    lm, lo = rows["lora-moe"], rows["lora"]
    result["ratio_lora_moe_over_lora"] = {
        "train_step_ms": lm["train_step_ms"] / lo["train_step_ms"],
        "eval_sequences_per_s": lm["eval_sequences_per_s"] / lo["eval_sequences_per_s"],
        "train_peak_mb": lm["train_peak_mb"] / lo["train_peak_mb"] if lo["train_peak_mb"] > 0 else None,
        "eval_peak_mb": lm["eval_peak_mb"] / lo["eval_peak_mb"] if lo["eval_peak_mb"] > 0 else None}
    result["goal"] = "train step LoRA-MoE / LoRA <= 1.5 on a CPU at the Qwen2-0.5B shape"
    result["met"] = result["ratio_lora_moe_over_lora"]["train_step_ms"] <= 1.5
    del models["lora"]
    _trim_heap()
    if args.no_env:
        result["env"] = {"measured": False, "reason": "--no-env"}
    elif shape["vocab_size"] < len(tokenizer):
        result["env"] = {"measured": False, "reason": f"--vocab-size {shape['vocab_size']} is below the "
                         f"tokenizer's {len(tokenizer)} ids, which the env's prompts use unfolded"}
    else:
        result["env"] = env_group_forwards(models["lora-moe"], tokenizer, args, device)
    result["machine"]["load_average_after"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - t0
    report(result, args.out)


if __name__ == "__main__":
    main()
