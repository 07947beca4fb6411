"""The command line that runs training as a subprocess (what `distill train` executes).

One process: `python -m training.train --config CONFIG`. Several on this node:
`python -m torch.distributed.run --nproc_per_node N --master_port P -m training.train ...`
(torchrun, from the same interpreter, so the same virtualenv). Several nodes: run the same
torchrun line on every node with --nnodes / --node_rank / --master_addr, or use
`deepspeed --hostfile HOSTS --module training.train --config CONFIG`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def build_launch_command(
    config: str | Path,
    num_processes: int = 1,
    *,
    master_port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
) -> list[str]:
    """argv that trains with the YAML at `config` on `num_processes` processes per node."""
    if num_processes < 1 or nnodes < 1:
        raise ValueError(f"num_processes ({num_processes}) and nnodes ({nnodes}) must be ≥ 1")
    entry = ["-m", "distillflow.training.train", "--config", str(config)]
    if num_processes == 1 and nnodes == 1:
        return [sys.executable, *entry]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(num_processes),
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port if master_port is not None else 29511),
    ]
    return command + entry


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the subprocess: CPU accelerator when there is no GPU, one shared
    extensions cache (DeepSpeed's C++ ops are compiled once), quiet tokenizers."""
    env = dict(os.environ if base is None else base)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
