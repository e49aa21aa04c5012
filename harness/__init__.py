"""The shared machinery every method runs on: model, sampler, likelihoods, rollout record, RL loop, run I/O.

Importing the package tunes glibc's allocator for this workload. Every forward pass frees and re-allocates
megabytes of activations, and by default glibc hands freed memory back to the kernel (heap trimming,
mmap for large blocks), so the next pass page-faults it in again, which is slow in a VM. Blocks below
32 MiB are kept on the heap and the heap is not trimmed below 1 GiB (`python -m harness.bench` measures the
effect on forward passes: the "allocator" figure).
"""

import ctypes


def _keep_freed_memory() -> None:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


_keep_freed_memory()
