"""Stopping: signals and non-finite losses, agreed on by all ranks at a step boundary. (Loader
workers never see the stop signals: rsc_dist.data.streams.HELD_SIGNALS.)"""

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
