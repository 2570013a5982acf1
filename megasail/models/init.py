"""Initial weights that depend on the seed and each parameter's global name only, not on the layout.

megatron-core draws its initial weights from the RNG stream of each rank (offset per pipeline stage,
consumed in build order, sliced per TP rank), so TP=1, TP=2 and PP=2 runs from one seed start from
different models. Here every randomly initialised tensor is redrawn whole on the CPU from a
generator seeded by (seed, global name), with the initialiser megatron gave it, and this rank keeps
its tensor-parallel shard. Tensor-parallel weights with megatron's i.i.d. normal init are drawn in
BLOCK-wide slices along their partition dim, each from its own (seed, name, block) generator, so a rank
draws only the slices it holds (init time scales with the shard, not the model). Constant-initialised tensors (biases, norms, layer scale, zeroed
embeddings) are already layout-independent and stay as built.
"""

from __future__ import annotations

import hashlib
import re

import torch
from megatron.core import parallel_state

from megasail.models.compat import is_elementwise_normal

_COLUMN = re.compile(
    r"(linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|word_embeddings\.weight|output_layer\.weight)$"
)
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_LM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.*)$")


def tp_shard(key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of an unsharded tensor named ``key`` (megasail state-dict name) that TP rank holds.

    Column-parallel weights split along dim 0 (fused qkv rows are grouped per query group, so
    whole groups split); row-parallel along dim 1; the LLM's SwiGLU fc1 is [gate; up] and each
    rank holds [gate_r; up_r]. Everything else is replicated.
    """
    if tp_size == 1:
        return full
    if key.startswith("language_model.") and key.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    if _COLUMN.search(key):
        return full.chunk(tp_size, dim=0)[tp_rank].clone()
    if _ROW.search(key):
        return full.chunk(tp_size, dim=1)[tp_rank].clone()
    return full


def global_names(chunk) -> dict[str, str]:
    """Local parameter name -> name in the unsplit model (decoder layers numbered globally).

    ``chunk`` is one SailVLModel (unwrapped); megatron's ``layer_number`` is the 1-based global index.
    """
    layers = chunk.language_model.decoder.layers
    out = {}
    for name, _ in chunk.named_parameters():
        m = _LM_LAYER.match(name)
        if m:
            name_global = f"language_model.decoder.layers.{layers[int(m[1])].layer_number - 1}.{m[2]}"
        else:
            name_global = name
        out[name] = name_global
    return out


def _generator_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(seed: int, name: str, init_fn, shape, dtype) -> torch.Tensor:
    """``init_fn`` (megatron's init methods and torch's reset_parameters draw from the global CPU
    generator) run on a fresh fp32 tensor under a private seed; the global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_generator_seed(seed, name))
        full = torch.empty(shape, dtype=torch.float32)
        init_fn(full)
    return full.to(dtype)


BLOCK = 256  # slices along the partition dim drawn from one generator each


def _shard_ranges(key: str, size: int, tp_rank: int, tp_size: int) -> list[tuple[int, int]]:
    """[start, end) along the partition dim of the full tensor that TP rank holds, in order (tp_shard's rule)."""
    if key.startswith("language_model.") and key.endswith("mlp.linear_fc1.weight"):
        half = size // 2
        n = half // tp_size
        return [(tp_rank * n, (tp_rank + 1) * n), (half + tp_rank * n, half + (tp_rank + 1) * n)]
    n = size // tp_size
    return [(tp_rank * n, (tp_rank + 1) * n)]


def _draw_slice(
    seed: int, key: str, init_fn, full_shape, dim: int, start: int, end: int, dtype
) -> torch.Tensor:
    """Rows [start, end) along ``dim`` of the full tensor whose BLOCK-wide slices each come from a
    generator seeded by (seed, name, block): only the blocks this rank holds are drawn."""
    size = full_shape[dim]
    pieces = []
    with torch.random.fork_rng(devices=[]):
        for block in range(start // BLOCK, -(-end // BLOCK)):
            shape = list(full_shape)
            shape[dim] = min(BLOCK, size - block * BLOCK)
            torch.default_generator.manual_seed(_generator_seed(seed, f"{key}#{block}"))
            piece = torch.empty(shape, dtype=torch.float32)
            init_fn(piece)
            pieces.append(piece)
    first = (start // BLOCK) * BLOCK
    return torch.cat(pieces, dim).narrow(dim, start - first, end - start).to(dtype)


def _full_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _is_constant(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return flat.numel() == 0 or bool((flat == flat[0]).all())


@torch.no_grad()
def init_weights(chunks, seed: int) -> int:
    """Redraw this rank's randomly initialised parameters as slices of seed-and-name-determined
    full tensors. ``chunks``: unwrapped SailVLModels (before DDP). Returns the number redrawn.

    Raises for a random-looking parameter without a known initialiser (a new module type needs a
    rule here, or its runs would again depend on the layout).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    redrawn = 0
    for chunk in chunks:
        names = global_names(chunk)
        owner = {}
        for mod_name, module in chunk.named_modules():
            for p_name, _ in module.named_parameters(recurse=False):
                owner[f"{mod_name}.{p_name}" if mod_name else p_name] = (module, p_name)
        for local, param in chunk.named_parameters():
            if _is_constant(param):
                continue
            module, attr = owner[local]
            key = names[local]
            if attr == "weight" and getattr(param, "partition_dim", -1) in (0, 1):
                # megatron's parallel weight (local or Transformer Engine linears, the vocabulary-parallel
                # embedding): megatron sets tensor_model_parallel / partition_dim / partition_stride on
                # every one, and inits row-parallel (partition_dim 1) weights with output_layer_init_method
                config = getattr(module, "config", chunk.config)  # the embedding lives in the LLM (chunk.config)
                init_fn = config.output_layer_init_method if param.partition_dim == 1 else config.init_method
                full_shape = _full_shape(param, tp_size)
                if is_elementwise_normal(init_fn) and getattr(param, "tensor_model_parallel", False):
                    dim = param.partition_dim
                    ranges = _shard_ranges(key, full_shape[dim], tp_rank, tp_size)
                    local = [
                        _draw_slice(seed, key, init_fn, full_shape, dim, a, b, param.dtype) for a, b in ranges
                    ]
                    param.copy_(torch.cat(local, dim))
                else:
                    full = _draw(seed, key, init_fn, full_shape, param.dtype)
                    sharded = getattr(param, "tensor_model_parallel", False)
                    param.copy_(tp_shard(key, full, tp_rank, tp_size) if sharded else full)
            elif isinstance(module, torch.nn.Conv2d):  # ViT patch embedding: torch's own init, replicated
                prefix = key[: -len(attr)]
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(_generator_seed(seed, prefix))
                    fresh = torch.nn.Conv2d(
                        module.in_channels,
                        module.out_channels,
                        module.kernel_size,
                        module.stride,
                        bias=module.bias is not None,
                    )
                param.copy_(getattr(fresh, attr).to(param.dtype))
            else:
                raise NotImplementedError(
                    f"no layout-independent initialiser for parameter {key} "
                    f"({type(module).__name__}.{attr}: neither a megatron parallel weight nor the patch "
                    "embedding); add one in megasail/models/init.py"
                )
            redrawn += 1
    return redrawn
