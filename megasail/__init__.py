"""megasail: Megatron-core training stack for SAIL-VL style vision-language models."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces each optional-kernel fallback at import; the runtime logs the backend once instead
for _pattern in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    ".*(all_gather_into_tensor|reduce_scatter_tensor). is deprecated",
    "When using async grad allreduce it is recommended",
):
    _warnings.filterwarnings("ignore", message=_pattern)
