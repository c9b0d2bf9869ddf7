"""mctx side of bench/mcts.py: times DeepMind mctx's ``muzero_policy`` on CPU.

Imported by bench/mcts.py, which compares it with the numba trees; run alone it times mctx only
(JSON). Needs the optional benchmark-only packages ``jax[cpu]`` and ``mctx``; they are imported
lazily inside the function.

    python bench/_mctx_side.py [--batch 64] [--actions 8] [--simulations 64] [--depth 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

__all__ = ["mctx_simulations_per_second"]


def mctx_simulations_per_second(
    batch: int = 64,
    num_actions: int = 8,
    num_simulations: int = 64,
    depth: int = 4,
    repeats: int = 5,
) -> dict[str, Any]:
    """Best-of-``repeats`` throughput of a jitted ``mctx.muzero_policy`` search.

    The toy problem is deterministic: the embedding is the int32 depth so far
    (shape [B]), reward = ((action * 7 + depth * 3) % 11) / 10, discount is 1.0
    until the depth limit is reached and 0.0 after, priors and values are zero.
    Compilation happens in an untimed warm-up call.
    """
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError(
            'mctx benchmark needs `pip install "jax[cpu]" mctx` (benchmark only)'
        ) from exc

    def recurrent_fn(
        params: Any, rng_key: Any, action: Any, embedding: Any
    ) -> tuple[Any, Any]:
        del params, rng_key
        reward = ((action * 7 + embedding * 3) % 11).astype(jnp.float32) / 10.0
        discount = jnp.where(embedding + 1 < depth, 1.0, 0.0).astype(jnp.float32)
        out = mctx.RecurrentFnOutput(
            reward=reward,
            discount=discount,
            prior_logits=jnp.zeros((batch, num_actions), jnp.float32),
            value=jnp.zeros((batch,), jnp.float32),
        )
        return out, embedding + 1

    def search(rng_key: Any) -> Any:
        root = mctx.RootFnOutput(
            prior_logits=jnp.zeros((batch, num_actions), jnp.float32),
            value=jnp.zeros((batch,), jnp.float32),
            embedding=jnp.zeros((batch,), jnp.int32),
        )
        return mctx.muzero_policy(
            params=(),
            rng_key=rng_key,
            root=root,
            recurrent_fn=recurrent_fn,
            num_simulations=num_simulations,
            max_depth=depth,
        )

    policy = jax.jit(search)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(policy(key))  # compile + warm-up, not timed
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(policy(key))
        best = min(best, time.perf_counter() - start)
    return {
        "simulations_per_s": batch * num_simulations / best,
        "seconds_per_search": best,
        "batch": batch,
        "num_actions": num_actions,
        "num_simulations": num_simulations,
        "depth": depth,
        "jax_version": jax.__version__,
        "mctx_version": getattr(mctx, "__version__", "unknown"),
        "jax_devices": str(jax.devices()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--actions", type=int, default=8)
    ap.add_argument("--simulations", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    try:
        out = mctx_simulations_per_second(a.batch, a.actions, a.simulations, a.depth, a.repeats)
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
