"""Worker process pools that are safe to start from a process that has already used torch.

Why: ``ProcessPoolExecutor``'s default on Linux forks the parent. A child forked after torch has
run its intra-op thread pool (OpenMP) hangs -- forever, without an error -- the first time it runs
a parallel tensor operation: the pool's threads were not copied, their lock was. Reproduced:
evaluating the demo checkpoint and then building a volume cache with ``workers=2`` in the same
process left both workers idle in ``torch.cat``. A spawned child starts a fresh interpreter
(about a second of imports per worker), whatever the parent has done.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["process_pool"]


def process_pool(workers: int, **kwargs: Any) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of `workers` spawned (not forked) processes; `kwargs` go to
    the executor (``initializer``...). As with any spawned pool, the submitted function must be
    importable (module level) and a script that starts the pool needs the ``if __name__ ==
    "__main__":`` guard (each child imports the script's main module)."""
    return ProcessPoolExecutor(
        max_workers=int(workers), mp_context=multiprocessing.get_context("spawn"), **kwargs
    )
