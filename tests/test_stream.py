"""Weight streaming on the CPU: packing, the ring's ordering under a slow copy, and pinned vs mmap stores."""
import time

import pytest
import torch

from wanrt.runtime.config import get_variant
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.stream import ALIGN, BlockLayout, BlockStreamer, MmapStore, PinnedStore, split_blocks


def random_blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.weight": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g),
             "c": torch.randint(0, 9, (2, 2), generator=g)} for _ in range(n)]


def test_layout_packs_aligned_and_round_trips():
    blocks = random_blocks(1)
    layout = BlockLayout.of_block(blocks[0], lambda k, v: v.dtype)
    assert all(s.offset % ALIGN == 0 for s in layout.specs)
    views = layout.views(layout.pack(blocks[0], torch.full((layout.nbytes,), 255, dtype=torch.uint8)))
    assert all(torch.equal(views[k], blocks[0][k]) for k in blocks[0])
    with pytest.raises(ValueError, match="do not match"):
        layout.pack({"a.weight": blocks[0]["a.weight"]}, torch.empty(layout.nbytes, dtype=torch.uint8))


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_ring_never_computes_before_the_copy_lands(slots):
    """A slow fake copy and a slow fake compute: every block must see exactly its own weights, over several passes."""
    blocks = random_blocks(5, seed=slots)
    store = PinnedStore(blocks, BlockLayout.of_block(blocks[0], lambda k, v: v.dtype), pin=False)
    log = []

    def slow_copy(dst, src):
        time.sleep(0.004)
        dst.copy_(src)
        log.append((src.data_ptr(), time.perf_counter()))

    streamer = BlockStreamer(store, "cpu", slots=slots, copy=slow_copy)
    for _ in range(3):  # three forwards: the ring wraps around from the last block to the first
        for i, want in enumerate(blocks):
            w = streamer(i)
            start = time.perf_counter()
            copy_time = max(t for ptr, t in log if ptr == store.buffers[i].data_ptr())
            assert copy_time < start
            time.sleep(0.002)  # a compute that reads the slot for a while: a premature overwrite would show below
            assert all(torch.equal(w[k], want[k]) for k in want), f"block {i} computed on stale weights"
    with pytest.raises(RuntimeError, match="streaming order expects block 0"):
        streamer(3)
    streamer.close()


def test_resident_blocks_bypass_the_ring():
    blocks = random_blocks(4)
    store = PinnedStore(blocks, BlockLayout.of_block(blocks[0], lambda k, v: v.dtype), pin=False)
    streamer = BlockStreamer(store, "cpu", slots=2, resident={0: blocks[0], 2: blocks[2]})
    assert streamer.order == [1, 3] and streamer.device_bytes == 2 * store.layout.nbytes
    for _ in range(2):
        for i, want in enumerate(blocks):
            w = streamer(i)
            assert all(torch.equal(w[k], want[k]) for k in want)
    streamer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pinned_and_mmap_stores_give_identical_outputs(checkpoints, dtype):
    """The DiT streamed from RAM and from the checkpoint's memory-mapped safetensors equals the resident DiT."""
    from wanrt.runtime.checkpoint import open_checkpoint
    from wanrt.runtime.dit import keeps_fp32

    ckpt = open_checkpoint(checkpoints["t2v", "official"])
    cfg = ckpt.variant.dit
    model = WanDiT(cfg)
    model.load_state_dict(ckpt.dit_state())
    model.to_inference_dtype(dtype).eval()
    _, blocks = split_blocks(model.state_dict(), cfg.num_layers)
    layout = BlockLayout.of_block(blocks[0], lambda k, v: v.dtype)
    _, files = split_blocks(ckpt.dit_state(mmap=True), cfg.num_layers)
    assert all(files[0][s.name].dtype == torch.float32 for s in layout.specs)  # fp32 on disk: mmap converts
    assert {s.dtype for s in layout.specs} == ({torch.float32} if dtype == torch.float32 else
                                               {torch.float32, torch.bfloat16})
    x, t = torch.randn(1, cfg.in_dim, 2, 4, 6), torch.tensor([700.0])
    with torch.no_grad():
        ctx, time_ = model.embed_context(torch.randn(1, cfg.text_len, cfg.text_dim)), model.embed_time(t)
        want = model.denoise(x, time_, ctx)
        for store in (PinnedStore(blocks, layout, pin=False), MmapStore(files, layout)):
            streamer = BlockStreamer(store, "cpu", slots=2)
            for _ in range(2):
                assert torch.equal(model.denoise(x, time_, ctx, weights=streamer), want)
            streamer.close()
