"""Block-by-block weight streaming: a host store of every block's weights and a ring of preallocated GPU slots.

While block i computes, blocks i+1 .. i+k-1 are copied into the other slots on a side stream. Events order the two
streams: a copy into a slot waits for the compute that last read it, and compute on a slot waits for its copy. Slots are
allocated once and reused (no allocator churn, no `record_stream`); each block is one contiguous host buffer, so one
copy moves a whole block.

Host stores: `PinnedStore` packs every block once into page-locked RAM (fastest, needs RAM for the whole model);
`MmapStore` reads blocks from safetensors files through memory maps into a small pinned staging ring when RAM is short.
"""
from __future__ import annotations

import math
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

Weights = dict[str, torch.Tensor]
ALIGN = 256  # bytes; every tensor starts on an aligned offset inside its block buffer


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor of a block sits in one contiguous byte buffer; every block of a model shares one layout."""
    specs: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> "BlockLayout":
        specs, offset = [], 0
        for name, (shape, dtype) in sorted(tensors.items()):
            specs.append(TensorSpec(name, tuple(shape), dtype, offset))
            offset += -(-specs[-1].nbytes // ALIGN) * ALIGN
        return cls(tuple(specs), offset)

    @classmethod
    def of_block(cls, block: Weights, dtype_of) -> "BlockLayout":
        return cls.of({k: (tuple(v.shape), dtype_of(k, v)) for k, v in block.items()})

    def views(self, buf: torch.Tensor) -> Weights:
        """Typed views of a uint8 buffer holding one packed block."""
        return {s.name: buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.specs}

    def pack(self, block: Weights, buf: torch.Tensor) -> torch.Tensor:
        views = self.views(buf)
        if views.keys() != block.keys():
            raise ValueError(f"block tensors {sorted(block)} do not match the layout {sorted(views)}")
        for name, view in views.items():
            view.copy_(block[name])
        return buf


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer, page-locked when `pin`. Registered with cudaHostRegister rather than allocated with
    `pin_memory=True`, whose caching allocator rounds every buffer up to a power of two (a 28 GB model would pin 32)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        cudart = torch.cuda.cudart()
        if cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0) != 0:
            raise RuntimeError(f"could not pin {nbytes / 2**30:.1f} GiB of host RAM (cudaHostRegister failed)")
        weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    return buf


class PinnedStore:
    """Every block packed once into page-locked host RAM (one registered allocation), in the inference dtype."""
    needs_staging = False

    def __init__(self, blocks: list[Weights], layout: BlockLayout, pin: bool = True):
        self.layout = layout
        self._all = host_buffer(layout.nbytes * len(blocks), pin)
        n = layout.nbytes
        self.buffers = [layout.pack(b, self._all[i * n : (i + 1) * n]) for i, b in enumerate(blocks)]

    def __len__(self) -> int:
        return len(self.buffers)

    def host_bytes(self, i: int, staging: torch.Tensor | None = None) -> torch.Tensor:
        return self.buffers[i]


class MmapStore:
    """Blocks whose tensors are views of memory-mapped checkpoint files (`checkpoint.mmap_safetensors`, or `.pth`
    through `torch.load(mmap=True)`): the OS pages them in on demand, and each is packed into a pinned staging buffer
    just before its copy. Costs no RAM beyond the staging ring; a tensor stored in another dtype than the layout's is
    converted on the host, in the worker thread, while the GPU computes."""
    needs_staging = True

    def __init__(self, blocks: list[Weights], layout: BlockLayout):
        self.layout, self.blocks = layout, blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def host_bytes(self, i: int, staging: torch.Tensor | None = None) -> torch.Tensor:
        return self.layout.pack(self.blocks[i], staging)


class BlockStreamer:
    """`streamer(i)` returns block i's weights on the device, for i in a fixed cyclic order (the forward's block order,
    repeated every call). Blocks in `resident` stay on the device; the others rotate through `slots` GPU buffers with
    up to slots - 1 blocks prefetched ahead. Pass it as the model's `weights` callable.

    `copy` replaces the host-to-device copy (tests use a deliberately slow one); on a CPU device the "copy" runs in the
    worker thread and the future orders it before compute.
    """

    def __init__(self, store, device: torch.device | str, slots: int, resident: dict[int, Weights] | None = None,
                 copy=None):
        self.store, self.device = store, torch.device(device)
        self.resident = resident or {}
        self.order = [i for i in range(len(store)) if i not in self.resident]
        if self.order and slots < 1:
            raise ValueError("streaming needs at least one GPU slot")
        self.slots = min(slots, len(self.order))
        n = store.layout.nbytes
        self._buf = [torch.empty(n, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        self._views = [store.layout.views(b) for b in self._buf]
        pin = self.device.type == "cuda"
        self._staging = ([host_buffer(n, pin) for _ in range(self.slots)]
                         if store.needs_staging else [None] * self.slots)
        self._copy = copy or (lambda dst, src: dst.copy_(src, non_blocking=True))
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._freed: list = [None] * self.slots  # event: compute finished reading the slot
        self._copied: list = [None] * self.slots  # event: the last copy into the slot finished
        self._pending: dict[int, tuple[int, Future]] = {}  # position in order -> (slot, future of the copy event)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanrt-stream")
        self._pos = 0  # next position in `order` to be computed
        self._issued = 0  # next position in `order` to be copied
        self._in_use: int | None = None  # slot being computed on

    def __call__(self, i: int) -> Weights:
        if i in self.resident:
            return self.resident[i]
        expected = self.order[self._pos % len(self.order)]
        if i != expected:
            raise RuntimeError(f"block {i} requested, but the streaming order expects block {expected}")
        self._release_previous()
        self._prefetch()
        slot, fut = self._pending.pop(self._pos)
        event = fut.result()  # host waits only until the copy is issued (or done, on the CPU)
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(event)
        self._in_use, self._pos = slot, self._pos + 1
        return self._views[slot]

    def _release_previous(self) -> None:
        """Everything that reads the previous slot is enqueued by now: mark it free for the next copy."""
        if self._in_use is None:
            return
        if self._cuda:
            self._freed[self._in_use] = torch.cuda.Event()
            self._freed[self._in_use].record(torch.cuda.current_stream(self.device))
        self._in_use = None

    def _prefetch(self) -> None:
        """Issue copies for positions pos .. pos + slots - 1, each into the slot of position p % slots."""
        while self._issued < self._pos + self.slots:
            p, slot = self._issued, self._issued % self.slots
            block = self.order[p % len(self.order)]
            self._pending[p] = (slot, self._worker.submit(self._copy_block, block, slot))
            self._issued += 1

    def _copy_block(self, block: int, slot: int):
        """Worker thread: stage (mmap stores), then copy into the slot once compute has released it."""
        staging = self._staging[slot]
        if staging is not None and self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the previous copy out of this staging buffer must be done
        src = self.store.host_bytes(block, staging)
        if not self._cuda:
            self._copy(self._buf[slot], src)
            return None
        with torch.cuda.stream(self._stream):
            if self._freed[slot] is not None:
                self._stream.wait_event(self._freed[slot])
            self._copy(self._buf[slot], src)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied[slot] = event
        return event

    def reset(self) -> None:
        """Wait for outstanding copies and restart the order at its first block."""
        for _, fut in self._pending.values():
            fut.result()
        if self._cuda:  # queued copies may still write the slots: later work on the compute stream waits for them
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._release_previous()
        self._pending.clear()
        self._pos = self._issued = 0

    def close(self) -> None:
        """Free the slots, staging buffers and resident blocks, once no copy can still touch them."""
        self.reset()
        self._worker.shutdown(wait=True)
        if self._cuda:
            self._stream.synchronize()
        self._buf = self._views = self._staging = []
        self.resident = {}

    @property
    def device_bytes(self) -> int:
        return self.slots * self.store.layout.nbytes


def split_blocks(state: dict, num_blocks: int, prefix: str = "blocks") -> tuple[dict, list[dict]]:
    """{'blocks.3.attn.q.weight': t, 'head.weight': u} -> ({'head.weight': u}, [..., {'attn.q.weight': t}, ...]).
    Works on any values."""
    rest, blocks = {}, [{} for _ in range(num_blocks)]
    for key, value in state.items():
        head, _, tail = key.partition(".")
        index, _, name = tail.partition(".")
        if head == prefix and index.isdigit() and int(index) < num_blocks:
            blocks[int(index)][name] = value
        else:
            rest[key] = value
    return rest, blocks


def make_streamer(store, device: torch.device | str, resident: int, slots: int, copy=None) -> BlockStreamer:
    """A streamer whose first `resident` blocks are copied to the device once and stay there; `copy` as for
    BlockStreamer (e.g. a link emulator) applies to the streamed ones."""
    on_device = {}
    for i in range(resident):
        staging = torch.empty(store.layout.nbytes, dtype=torch.uint8) if store.needs_staging else None
        on_device[i] = store.layout.views(store.host_bytes(i, staging).to(device))
    return BlockStreamer(store, device, slots, on_device, copy)


def make_store(blocks: list[Weights], dtype_of, in_ram: bool) -> PinnedStore | MmapStore:
    """Pack blocks (dtype_of(name, tensor) -> inference dtype) into RAM, pinned where CUDA exists, or leave them
    memory-mapped."""
    layout = BlockLayout.of_block(blocks[0], dtype_of)
    return PinnedStore(blocks, layout, pin=torch.cuda.is_available()) if in_ram else MmapStore(blocks, layout)
