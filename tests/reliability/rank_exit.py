"""One rank of a launched job, with its exit status written down (the launcher does not tell it).

    torchrun --nproc_per_node 2 rank_exit.py EXITS_DIR SCRIPT [arguments]

The launcher starts this in place of SCRIPT; it runs `python SCRIPT arguments` as its
child (the rank itself, with the launcher's RANK, WORLD_SIZE, ... inherited), passes on
the SIGINT / SIGTERM the launcher sends it, and writes EXITS_DIR/rank{RANK}.exit: the
child's exit status, negative when a signal killed it (-15: SIGTERM). It then exits as
the child did, so the launcher sees what it would have seen.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(exits: Path, script: str, argv) -> int:
    child = subprocess.Popen([sys.executable, script, *argv])
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    (exits / f"rank{os.environ['RANK']}.exit").write_text(str(status))
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
