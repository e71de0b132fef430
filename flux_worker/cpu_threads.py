"""How many torch threads a CPU renderer runs: the cores it was given, never more than its machine has.

Ray sets OMP_NUM_THREADS to an actor's `num_cpus`, a logical count: a node that declares more CPUs than it
has cores (the test cluster declares 4 on a 2-core machine; an operator may oversubscribe on purpose) would
otherwise run more compute threads than cores, and torch's threads then spin against each other.
"""

from __future__ import annotations

import os


def cpu_threads(asked: int) -> int:
    """`asked` torch threads, at most the cores this process may run on (its CPU affinity), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        cores = os.cpu_count() or 1
    return max(1, min(asked, cores))
