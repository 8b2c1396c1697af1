"""Consumer-link emulation: throttle the streamed blocks' host-to-device copies to a desktop PCIe rate, so a
datacenter GPU predicts what streaming costs on a desktop (PCIe 4.0 x16 moves about 23 GB/s in practice).

On the copy stream, a one-thread Triton kernel stamps the GPU's wall clock (%globaltimer) before each copy and
another spins after it until bytes / rate has passed since the stamp: later copies queue behind it exactly as behind
a slower link, whatever the copy's own speed under load or the SM clock, while the compute stream is untouched (the
spin occupies one thread of one SM). An earlier cycle-count spin (torch.cuda._sleep) ran 1.5x too long under load.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch


def h2d_rate(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes per second of a pinned host-to-device copy on this machine (median of 3)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(4):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[1:])


@functools.cache
def _pacer():
    """(stamp, wait_until) Triton kernels on the GPU's nanosecond wall clock."""
    import triton
    import triton.language as tl

    @triton.jit
    def stamp(clock_ptr):
        tl.store(clock_ptr, tl.extra.cuda.globaltimer())

    @triton.jit
    def wait_until(clock_ptr, ns):
        start = tl.load(clock_ptr)
        now = tl.extra.cuda.globaltimer()
        while now - start < ns:
            now = tl.extra.cuda.globaltimer()
    return stamp, wait_until


class LinkEmulator:
    """A `copy(dst, src)` for BlockStreamer that makes each copy take nbytes / (gbps * 1e9) seconds. With `record`,
    it keeps CUDA events around every copy (and its padding) so the achieved time per block can be checked."""

    def __init__(self, gbps: float, device: torch.device | str):
        self.device = torch.device(device)
        self.rate = gbps * 1e9
        self.record = False
        self.events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        if self.device.type == "cuda":
            self.native = h2d_rate(self.device)
            self.clock = torch.zeros(1, dtype=torch.int64, device=self.device)
        else:  # a CPU "device": the worker thread sleeps instead
            self.native = float("inf")

    def padding(self, nbytes: int) -> float:
        """Seconds to add to a copy of nbytes at the native rate (0 when the native link is already slower)."""
        return max(nbytes / self.rate - nbytes / self.native, 0.0)

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        if self.device.type != "cuda":
            dst.copy_(src)
            time.sleep(self.padding(nbytes))
            return
        stamp, wait_until = _pacer()
        start = torch.cuda.Event(enable_timing=True) if self.record else None
        if start is not None:
            start.record()
        stamp[(1,)](self.clock)
        dst.copy_(src, non_blocking=True)
        wait_until[(1,)](self.clock, int(nbytes / self.rate * 1e9))
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((nbytes, start, end))

    def check(self) -> dict:
        """Achieved time per recorded block copy against bytes / rate (after a synchronize)."""
        if not self.events:
            raise RuntimeError("no block copies were recorded: nothing streamed while record was on")
        torch.cuda.synchronize(self.device)
        nbytes = self.events[0][0]
        measured = statistics.median(s.elapsed_time(e) for _, s, e in self.events)
        expected = nbytes / self.rate * 1e3
        return {"gbps": self.rate / 1e9, "block_bytes": nbytes, "blocks_measured": len(self.events),
                "expected_ms": round(expected, 3), "measured_ms": round(measured, 3),
                "ratio": round(measured / expected, 4), "native_gbps": round(self.native / 1e9, 1)}
