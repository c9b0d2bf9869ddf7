"""routing-gym: expert routing in LoRA mixtures-of-experts as a reinforcement-learning problem."""

__version__ = "0.1.0"

__all__ = ["__version__"]
