"""An env made without a checkpoint trains a warm-up once, caches it, and reuses it after; the registered
ids' entry point does that, ``RoutingEnv`` itself never trains."""

from __future__ import annotations

import pytest

from routing_env.training import finetune
from routing_env.training import warmup


@pytest.mark.slow
def test_default_checkpoint_is_trained_once_then_reused(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.setenv("ROUTING_GYM_CACHE", str(tmp_path))
    monkeypatch.setattr(warmup, "DEMO_WARMUP", dict(method="lora-moe", epochs=1, train_limit=8, eval_limit=4))
    first = warmup.default_checkpoint("arc-easy", data_dir=data_dir)
    assert "training a demo-size one" in capsys.readouterr().out
    assert first == tmp_path / "warmup-arc-easy-minilm" / "final" and (first / "adapter.safetensors").is_file()

    def no_training(cfg):  # a second call must not train again
        raise AssertionError("trained twice")

    monkeypatch.setattr(finetune, "main", no_training)
    assert warmup.default_checkpoint("arc-easy", data_dir=data_dir) == first
    assert "training" not in capsys.readouterr().out


def test_env_without_checkpoint_uses_the_cache(tmp_path, monkeypatch, warm_checkpoint, data_dir):
    import shutil

    import gymnasium as gym

    import routing_env  # noqa: F401

    monkeypatch.setenv("ROUTING_GYM_CACHE", str(tmp_path))
    shutil.copytree(warm_checkpoint, tmp_path / "warmup-arc-easy-minilm" / "final")
    monkeypatch.setattr(finetune, "main", lambda cfg: pytest.fail("should have used the cached checkpoint"))
    env = gym.make("layermoe-arc", max_examples=4, data_dir=data_dir).unwrapped
    assert env.E == 4 and env.G == 3


def test_routing_env_itself_never_trains(monkeypatch, data_dir):
    from routing_env.env import RoutingEnv

    monkeypatch.setattr(warmup, "default_checkpoint", lambda *a, **k: pytest.fail("RoutingEnv resolved a warm-up"))
    with pytest.raises(ValueError, match="needs checkpoint= .* or model="):
        RoutingEnv(task="arc-easy", max_examples=2, data_dir=data_dir)


def test_registered_id_resolves_the_warm_up_after_checking_arguments_and_data(monkeypatch, data_dir):
    import gymnasium as gym

    import routing_env  # noqa: F401

    asked = []

    def resolve(source, data_dir=None):  # stands in for training the demo warm-up: records, then stops
        asked.append((source.name, data_dir))
        raise RuntimeError("resolved")

    monkeypatch.setattr(warmup, "default_checkpoint", resolve)
    with pytest.raises(ValueError, match="cache_mb"):  # a bad argument: refused before any warm-up
        gym.make("layermoe-obqa", cache_mb=-5, data_dir=data_dir)
    assert asked == []
    with pytest.raises(RuntimeError, match="resolved"):
        gym.make("layermoe-obqa", max_examples=2, data_dir=data_dir)
    assert asked == [("obqa", data_dir)]
