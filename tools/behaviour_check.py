"""Behaviour unchanged across a restructuring: a fixed tiny pipeline, and digests of what it made.

    python tools/behaviour_check.py --write results/refactor/behaviour.json   # record the digests
    python tools/behaviour_check.py --check results/refactor/behaviour.json   # rerun, compare byte for byte

Runs warm-up (lora-moe), the exhaustive search and stage 3 (layermoe-exhaustive) on 48 ARC-Easy
training questions for one seed, on CPU in fp32 with one thread (the same kernels every time on
one machine), then hashes the routing-targets file and every adapter / checkpoint tensor file the
stages wrote. Files that record when and where a run happened (dates, commit, command, timings)
are not hashed: only what the computation produced. Float results depend on the CPU's kernels
(AVX2 vs AVX-512), so the digests compare runs on one machine: record before the change, check after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--task", "arc-easy", "--methods", "lora-moe,layermoe-exhaustive", "--seeds", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--train-limit", "48", "--eval-limit", "16", "--search-examples", "16",
            "--gate-examples", "0", "--device", "cpu", "--threads", "1"]
#: keys of the targets file's records that say when / where / how fast, not what was computed
VOLATILE = {"date", "commit", "command", "seconds", "time", "elapsed", "created", "provenance", "host",
            "checkpoint"}  # the warm-up's folder: a path, not a result (its adapters are hashed themselves)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _tensor_bytes(obj) -> bytes:
    """A canonical byte form of nested dicts / lists of tensors and plain values."""
    import torch

    if isinstance(obj, torch.Tensor):
        return str(obj.dtype).encode() + str(list(obj.shape)).encode() + obj.contiguous().numpy().tobytes()
    if isinstance(obj, dict):
        return b"{" + b",".join(repr(k).encode() + b":" + _tensor_bytes(obj[k]) for k in sorted(obj, key=repr)) + b"}"
    if isinstance(obj, (list, tuple)):
        return b"[" + b",".join(_tensor_bytes(v) for v in obj) + b"]"
    return repr(obj).encode()


def digests(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of the targets files (volatile keys dropped) and tensor files."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        if p.name == "targets.jsonl":
            lines = [json.dumps(_clean(json.loads(l)), sort_keys=True) for l in p.read_text().splitlines() if l.strip()]
            out[rel] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        elif p.suffix == ".safetensors":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.name == "training_state.pt":  # the optimiser, schedule and RNG; not the history (it has timings)
            import torch

            state = torch.load(p, map_location="cpu", weights_only=False)
            h = hashlib.sha256()
            for key in ("optimizer", "scheduler", "torch_rng", "epoch"):
                h.update(_tensor_bytes(state[key]))
            out[rel] = h.hexdigest()
    return out


def run(workdir: Path) -> dict[str, str]:
    """Run the fixed pipeline in ``workdir`` (emptied first) and hash what it made."""
    shutil.rmtree(workdir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "routing_env.pipeline", *SETTINGS, "--logdir", str(workdir / "runs"),
           "--results-dir", str(workdir / "results")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return digests(workdir / "runs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="JSON", help="record the digests here")
    g.add_argument("--check", metavar="JSON", help="compare with the digests recorded here")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "behaviour-check"),
                    help="scratch folder of the run (emptied first; default runs/behaviour-check)")
    args = ap.parse_args()
    got = run(Path(args.workdir))
    if not any(k.endswith("targets.jsonl") for k in got) or not any(k.endswith(".safetensors") for k in got):
        print(f"expected a targets file and adapters, got {sorted(got)}", file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps({"settings": SETTINGS, "digests": got}, indent=1) + "\n")
        print(f"{len(got)} digests -> {args.write}")
        return 0
    want = json.loads(Path(args.check).read_text())["digests"]
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    for k in diff:
        print(f"DIFFERS {k}: {want.get(k, 'missing')[:12]} before, {got.get(k, 'missing')[:12]} now")
    print(f"{len(want) - len(diff)} of {len(want)} files identical" if diff else f"all {len(got)} files byte-identical")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
