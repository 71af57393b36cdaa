"""Split one prompt file across GPUs or machines: shard I of N takes prompt lines I, I+N, I+2N, ...

Given explicitly (`--num-shards N --shard-index I`, e.g. one job per machine), or, under
`accelerate launch` / `torchrun` with neither flag, from the process's rank and world size.
Lines are dealt by their position among the file's prompt lines (not their raw line
number), so comments and blank lines do not unbalance the shards. A line's images stay
in one shard, and every shard writes its own manifest, so no two processes ever append
to the same file.
"""

import os
from dataclasses import dataclass
from typing import List, Optional

from ldm.errors import LdmError


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1
    device: Optional[object] = None  # the process's own device when launched by accelerate
    is_main: bool = True  # shows the progress bar (the rank-0 process under accelerate)

    def take(self, items: List) -> List:
        return items[self.index :: self.count]

    def close(self) -> None:
        """Leave the process group accelerate opened (we never communicate; this only ends it cleanly)."""
        if self.device is None:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def suffix(self) -> str:
        """'' for the whole file, '-shardI-of-N' otherwise: for per-shard file names."""
        return "" if self.count == 1 else f"-shard{self.index}-of-{self.count}"


def launched_distributed() -> bool:
    """True under a multi-process `accelerate launch` or `torchrun` (both set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_shard(num_shards: Optional[int], shard_index: Optional[int]) -> Shard:
    """The shard this process samples, from the flags or else from accelerate's process state."""
    if (num_shards is None) != (shard_index is None):
        raise LdmError("give --num-shards and --shard-index together (or neither)")
    if num_shards is not None:
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise LdmError(f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_index}")
        return Shard(shard_index, num_shards)
    if not launched_distributed():
        return Shard()
    from accelerate import PartialState

    state = PartialState()
    return Shard(state.process_index, state.num_processes, device=state.device, is_main=state.is_main_process)
