"""An RLHF pipeline: comparisons -> validate -> SFT -> reward model -> PPO -> evaluate -> promote -> serve."""

__version__ = "0.1.0"
