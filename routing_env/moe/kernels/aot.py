"""Ahead-of-time compilation of a Triton kernel for an NVIDIA GPU that is not there, and its resources.

``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` builds the sm_90 (H100/H200) cubin on any
machine; ``cuobjdump -res-usage`` (shipped with Triton) reads registers per thread, shared memory and
local memory (register spills) from it. Needs Triton not in interpreter mode (``TRITON_INTERPRET``
unset or 0 when Triton is first imported).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cubin_usage", "signature"]


def signature(fn: Any, constexprs: dict[str, Any], dtype: str, pointers: dict[str, str] | None = None,
              floats: tuple[str, ...] = ()) -> dict[str, str]:
    """The compile signature of ``fn``'s arguments, in order: ``constexpr`` for ``constexprs``; a pointer to
    ``dtype`` for a ``*_ptr`` argument (or to ``pointers[name]``); ``fp32`` for ``floats``; else ``i32``."""
    pointers = pointers or {}
    return {a: "constexpr" if a in constexprs else "*" + pointers.get(a, dtype) if a.endswith("_ptr")
            else "fp32" if a in floats else "i32" for a in fn.arg_names}


def cubin_usage(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int = 90,
                num_warps: int = 4) -> dict[str, int]:
    """Compile ``fn`` (a ``@triton.jit`` kernel) for ``sm_<arch>`` and return ``registers``,
    ``static_shared``, ``dynamic_shared`` (bytes) and ``spill_bytes`` (local memory per thread)."""
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(Path(nv.__file__).parent / "bin" / "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(field.split(":") for field in next(ln for ln in out.splitlines() if "REG:" in ln).split())
    return {"registers": int(usage["REG"]), "static_shared": int(usage["SHARED"]),
            "dynamic_shared": int(compiled.metadata.shared), "spill_bytes": int(usage["LOCAL"])}
