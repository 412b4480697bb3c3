"""joyai-megatron: training recipes for JoyAI-LLM Flash on Megatron-Core."""

__version__ = "0.1.0"
