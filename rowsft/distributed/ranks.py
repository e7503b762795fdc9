"""Facts about the process group (rank, world size, main process) and "rank 0 does it, the others wait".

Every function is a no-op or the trivial answer in a single process, so library code calls them
unconditionally.
"""
from __future__ import annotations

import builtins
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (torchrun, accelerate launch, spawn)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that saves adapters and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def run_on_main_process(fn: Callable[[], T], what: str = "the main process's work") -> T:
    """``fn()`` on rank 0 only; every rank waits for it and returns its (picklable) result.

    When ``fn`` raises on rank 0, rank 0 re-raises its error and the other ranks raise an error of the
    same built-in class (RuntimeError otherwise) with rank 0's message, so no rank is left waiting in a
    later collective. ``what`` names the work in those messages. A single process just calls ``fn``.
    """
    if not is_distributed():
        return fn()
    outcome: list = [None]
    error: BaseException | None = None
    if is_main_process():
        try:
            outcome = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, then re-raised here
            error = e
            outcome = [("error", (type(e).__name__, str(e)))]
    torch.distributed.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if error is not None:
        raise error
    if status == "error":
        name, message = value
        kind = getattr(builtins, name, None)
        kind = kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError
        raise kind(f"rank 0 failed in {what}: {message}")
    return value


__all__ = ["is_distributed", "world_size", "rank", "is_main_process", "barrier", "run_on_main_process"]
