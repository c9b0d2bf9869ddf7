"""An env made without a checkpoint trains a warm-up once, caches it, and reuses it after."""

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
