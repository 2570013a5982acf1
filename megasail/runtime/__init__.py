"""Process groups, parallel state, seeding and the CPU backend for megatron-core."""

from megasail.runtime.cpu_backend import install as install_cpu_backend
from megasail.runtime.distributed import destroy, free_port, init_process_group, initialize, seed_everything

__all__ = ["destroy", "free_port", "init_process_group", "initialize", "install_cpu_backend", "seed_everything"]
