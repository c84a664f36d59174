"""ril_fast: unified reinforcement and imitation learning (RIL) for vision-language models."""

__version__ = "0.1.0"
