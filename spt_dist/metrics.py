"""What a run reports: TensorBoard scalars and a progress bar on rank 0, throughput and peak memory."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process, or peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class Throughput:
    """Images per second, and the share of the time spent waiting for data, over the window since the last
    `window()` call; `total_data_wait`: the seconds waited for data over the whole run."""

    def __init__(self) -> None:
        self._images = 0
        self._data_wait = 0.0
        self.total_data_wait = 0.0
        self._start = time.perf_counter()

    def add(self, images: int) -> None:
        self._images += images

    def waited(self, seconds: float) -> None:
        self._data_wait += seconds
        self.total_data_wait += seconds

    def window(self) -> tuple[float, float]:
        """(images/s, data-wait share) since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        result = self._images / elapsed, self._data_wait / elapsed
        self._images, self._data_wait, self._start = 0, 0.0, now
        return result


THROUGHPUT_KEYS = ("images_per_s", "images_per_s_per_device", "tflops_per_device", "mfu", "data_wait_share")


def throughput_figures(images_per_s: float, data_share: float, world_size: int, train_flops_per_image: float,
                       peak_tflops: float | None, prefix: str = "") -> dict[str, float | None]:
    """images/s in all and per device, achieved TFLOP/s per device, MFU (where the peak is known) and the share
    of the time spent waiting for data. With a prefix (TensorBoard tags) unknown values are left out."""
    per_device = images_per_s / world_size
    tflops = per_device * train_flops_per_image / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    values = dict(zip(THROUGHPUT_KEYS, (images_per_s, per_device, tflops, mfu, data_share)))
    return {prefix + k: v for k, v in values.items() if v is not None or not prefix}


class RunLogger:
    """TensorBoard writer and tqdm bar, both live on rank 0 only; other ranks get no-ops."""

    def __init__(self, tb_dir: str | None, total_steps: int, show_progress: bool, purge_step: int | None = None,
                 initial_step: int = 0) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard hides what an interrupted run logged from there."""
        self._writer = None
        self._bar = None
        self._lines = False  # progress as plain lines (output to a file: a bar there is a wall of '\r')
        self._step, self._total = initial_step, total_steps
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(tb_dir, purge_step=purge_step)
            if show_progress and sys.stderr.isatty():
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                                 dynamic_ncols=True)
            self._lines = show_progress and self._bar is None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        """Logs a matplotlib figure as an image (and closes it)."""
        if self._writer is not None:
            self._writer.add_figure(tag, figure, step, close=True)

    def progress(self, steps: int, postfix: dict[str, str] | None = None) -> None:
        """`steps` more steps done; `postfix`: the latest figures (a plain line each time, without a terminal)."""
        self._step += steps
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self._lines and postfix:
            print(f"step {self._step}/{self._total}: " + ", ".join(f"{k} {v}" for k, v in postfix.items()), flush=True)

    def write(self, line: str) -> None:
        """Prints on rank 0 without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(line)
        elif self._writer is not None:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
