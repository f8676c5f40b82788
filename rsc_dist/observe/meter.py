"""Step metrics (loss, accuracy, the method's metrics, images/s, data wait): accumulated on the
device and read, with one all-reduce, only when logged, so steps carry no host sync."""

from __future__ import annotations

import time

import torch


class Meter:
    def __init__(self, accelerator, metrics: tuple[str, ...] = ()):
        """``metrics``: the method's per-step metrics (rsc_dist.methods), logged as train/NAME."""
        self.accelerator = accelerator
        self.metrics = tuple(metrics)
        device = accelerator.device
        # loss, correct, samples, then each method metric (sample-weighted)
        self.sums = torch.zeros(3 + len(self.metrics), device=device, dtype=torch.float64)
        self.wait_seconds = 0.0
        self.window_start = time.perf_counter()
        self.train_seconds = 0.0
        self.train_samples = 0
        self.excluded_seconds = 0.0
        self._wait_start = None

    def start_wait(self) -> None:
        self._wait_start = time.perf_counter()

    def end_wait(self) -> None:
        if self._wait_start is not None:
            self.wait_seconds += time.perf_counter() - self._wait_start
            self._wait_start = None

    def update(self, out: dict, inputs) -> None:
        n = inputs.labels.shape[0]
        # torch.full is a fill kernel; torch.tensor(n, device=cuda) would be a blocking copy.
        count = torch.full((), float(n), device=self.sums.device, dtype=torch.float64)
        self.sums += torch.stack([out["loss"].double() * n, out["correct"].double(), count]
                                 + [out["metrics"][name].double() * n for name in self.metrics])

    @staticmethod
    def due(step: int, every: int) -> bool:
        return step % every == 0

    def flush(self, optimizer, progress=None) -> dict:
        totals = self.accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        elapsed = time.perf_counter() - self.window_start - self.excluded_seconds
        loss, correct, samples, *metric_sums = totals
        values = {
            "train/loss": loss / max(samples, 1),
            "train/acc": correct / max(samples, 1),
            **{f"train/{name}": total / max(samples, 1) for name, total in zip(self.metrics, metric_sums)},
            "train/lr": optimizer.param_groups[0]["lr"],
            "perf/img_s": samples / elapsed if elapsed > 0 else 0.0,
            "perf/data_wait_fraction": self.wait_seconds / elapsed if elapsed > 0 else 0.0,
        }
        self.train_seconds += elapsed
        self.train_samples += int(samples)
        if progress is not None:
            progress.set_postfix(loss=f"{values['train/loss']:.3f}", img_s=f"{values['perf/img_s']:.0f}",
                                 wait=f"{values['perf/data_wait_fraction']:.0%}")
        self.sums.zero_()
        self.wait_seconds = 0.0
        self.excluded_seconds = 0.0
        self.window_start = time.perf_counter()
        return values

    def close(self) -> None:
        """Fold the steps since the last flush into the run's totals, so that ``throughput`` also
        counts a run (or its last stretch) shorter than train.log_every_steps. One all-reduce:
        every rank calls it, at the end of its loop."""
        samples = int(self.accelerator.reduce(self.sums[2:3].clone(), reduction="sum").item())
        if samples:
            self.train_seconds += time.perf_counter() - self.window_start - self.excluded_seconds
            self.train_samples += samples
        self.sums.zero_()
        self.wait_seconds = self.excluded_seconds = 0.0
        self.window_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Keep evaluation and checkpoint time out of the training rate."""
        self.excluded_seconds += seconds

    @property
    def throughput(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0
