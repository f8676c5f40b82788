"""Stopping: signals and non-finite losses, agreed on by all ranks at a step boundary; loader
workers started with the stop signals held back."""

from __future__ import annotations

import signal

import torch


class StopFlags:
    """SIGTERM/SIGUSR1 only set a flag; ``agree`` all-reduces it (MAX) with the NaN flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device):
        self.signalled = ""  # why a stop was requested on this rank
        self.nonfinite = torch.zeros((), device=device, dtype=torch.bool)

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.signalled = reason

    def track_loss(self, loss: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(loss)

    def agree(self, accelerator) -> tuple[bool, bool]:
        """(stop requested on any rank, non-finite loss on any rank). One collective."""
        flags = torch.stack([
            torch.tensor(float(bool(self.signalled)), device=self.nonfinite.device),
            self.nonfinite.float(),
        ])
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, nonfinite = flags.tolist()
        return stop > 0, nonfinite > 0


def start_loader(loader):
    """``iter(loader)`` with the stop signals held back while it forks its workers.

    A job's SIGTERM reaches every process, loader workers included. torch gives a new worker a
    handler that dies on SIGTERM before the worker's init function can set it to ignored; a
    worker killed in that window would end its rank with "DataLoader worker exited unexpectedly"
    instead of a checkpoint, and workers are forked at every epoch start and evaluation.
    Forked workers inherit the blocked mask and keep it (they ignore these signals anyway);
    in this process a signal that arrived meanwhile is delivered when the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopFlags.SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
