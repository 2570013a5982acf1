"""megasail: Megatron-core training stack for SAIL-VL style vision-language models."""

__version__ = "0.1.0"
