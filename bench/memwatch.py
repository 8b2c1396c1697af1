"""Peak memory as the machine sees it, beside the caching allocator's own statistics: device-level used memory
(cudaMemGetInfo: CUDA context, cuDNN and cuBLAS workspaces, other libraries' allocations) and the process's resident
host memory, sampled on a thread while a phase runs."""
from __future__ import annotations

import os
import resource
import threading

import torch

GiB = 2**30


def host_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakWatch:
    """`with PeakWatch(device) as w: ...` then w.device_peak and w.host_peak (bytes; device_peak None on a CPU)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = torch.device(device), interval
        self.device_peak: int | None = None
        self.host_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.host_peak = max(self.host_peak, host_rss())
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak or 0, total - free)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakWatch":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def as_gib(self) -> dict:
        return {"device_peak_gib": None if self.device_peak is None else round(self.device_peak / GiB, 3),
                "host_peak_gib": round(self.host_peak / GiB, 3)}
