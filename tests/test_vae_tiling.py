"""Spatial tiling and the bf16 compute path of WanVAE, on the tiny config with random weights (fp32, CPU).

Random weights make seams larger than a trained VAE would (nothing in them is smooth), so the tiled-vs-untiled
thresholds below are floors measured on this model, not quality targets; the printed PSNRs are the numbers to watch.
"""
import pytest
import torch
from randomize import randomize_gains_and_biases

from wanrt.runtime.config import VARIANTS
from wanrt.runtime.vae import CausalCache, RMSNorm, WanVAE, decode_tiles, tile_blend_weights, tile_spans

CFG = VARIANTS["tiny-t2v"].vae


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return randomize_gains_and_biases(WanVAE(CFG).eval())


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, CFG.z_dim, 3, 10, 14, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(1, 3, 5, 80, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB for signals spanning `peak_to_peak` (video in [-1, 1]: 2)."""
    return (10 * torch.log10(peak_to_peak ** 2 / ((a.float() - b.float()) ** 2).mean())).item()


def snr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB, for latents (unbounded)."""
    return (10 * torch.log10(ref.var() / ((a.float() - ref.float()) ** 2).mean())).item()


# --- tile geometry -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [1, 4, 5, 8, 13])
def test_tile_spans_cover_exactly(tile):
    for overlap in range(tile // 3 + 1):
        for length in range(1, 60):
            spans = tile_spans(length, tile, overlap)
            sizes = [b - a for a, b in spans]
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(0 < n <= tile for n in sizes) and max(sizes) - min(sizes) <= 1  # balanced: no thin tile
            assert len(spans) == 1 or min(sizes) >= 2 * overlap  # a span's two overlaps never meet
            if length <= tile:
                assert spans == [(0, length)]
            for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
                assert b0 - a1 == overlap and a1 > a0 and b1 > b0, (length, tile, overlap, spans)
            # no more spans than needed: dropping the last one would leave the frame's end uncovered
            assert len(spans) == 1 or spans[-2][1] < length


@pytest.mark.parametrize("h, w, tile, overlap", [(7, 13, (4, 6), 1), (11, 5, (3, 8), 1), (3, 2, (8, 8), 2),
                                                 (60, 104, (34, 40), 8), (60, 104, (33, 31), 6), (9, 9, (5, 5), 0)])
def test_decode_tiles_and_weights_partition_the_frame(h, w, tile, overlap):
    tiles = decode_tiles(h, w, tile, overlap)
    count = torch.zeros(h, w, dtype=torch.int64)
    for rs, cs in tiles:
        assert rs.stop - rs.start <= tile[0] and cs.stop - cs.start <= tile[1]
        count[rs, cs] += 1
    assert count.min() >= 1, "a cell no tile covers"
    if h <= tile[0] and w <= tile[1]:  # a frame smaller than one tile: one tile, the frame itself
        assert tiles == [(slice(0, h), slice(0, w))]
    # Overlaps as asked: cells shared by neighbours along each axis = overlap, none by three.
    rows, cols = tile_spans(h, tile[0], overlap), tile_spans(w, tile[1], overlap)
    assert count.max() <= 4 and count[:, 0].max() <= 2 and count[0].max() <= 2
    assert (count[:, 0] == 2).sum() == overlap * (len(rows) - 1)
    assert (count[0] == 2).sum() == overlap * (len(cols) - 1)
    # Blend weights (at pixel resolution, as decode uses them) sum to one everywhere.
    for scale in (1, 8):
        total = torch.zeros(h * scale, w * scale)
        for (r0, r1), wr in zip(rows, tile_blend_weights(rows, scale)):
            for (c0, c1), wc in zip(cols, tile_blend_weights(cols, scale)):
                assert wr.min() >= 0 and wc.min() >= 0
                total[r0 * scale:r1 * scale, c0 * scale:c1 * scale] += wr[:, None] * wc[None, :]
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_blend_weights_ramp():
    # overlap 2 = the cross-fade (blend 2): a smoothstep over the whole overlap, at cell centres 0.25 and 0.75
    up, mid, down = tile_blend_weights([(0, 4), (2, 6), (4, 8)], blend=2)
    torch.testing.assert_close(up, torch.tensor([1, 1, 0.84375, 0.15625]))
    torch.testing.assert_close(mid, torch.tensor([0.15625, 0.84375, 0.84375, 0.15625]))
    torch.testing.assert_close(down, torch.tensor([0.15625, 0.84375, 1, 1]))
    # overlap 4, blend 2: each tile drops the cell next to its own edge, the middle two are cross-faded
    left, right = tile_blend_weights([(0, 8), (4, 12)], blend=2)
    torch.testing.assert_close(left, torch.tensor([1, 1, 1, 1, 1, 0.84375, 0.15625, 0]))
    torch.testing.assert_close(right, torch.tensor([0, 0.15625, 0.84375, 1, 1, 1, 1, 1]))


# --- decode --------------------------------------------------------------------------------------------------------

def test_decode_one_tile_is_untiled(vae, latents):
    untiled = vae.decode(latents)
    for tile in [(10, 14), (16, 32)]:  # exactly the frame, and larger than it
        assert torch.equal(vae.decode(latents, tile=tile, overlap=3), untiled)
    # ... and both equal the plain decode_step loop.
    mean, inv_std = vae._latent_stats(latents)
    z, cache = latents / inv_std + mean, CausalCache()
    with torch.no_grad():
        steps = torch.cat([vae.decode_step(z[:, :, i:i + 1], cache).clamp(-1, 1) for i in range(3)], 2)
    assert torch.equal(untiled, steps)


@pytest.mark.parametrize("tile, overlap, floor_db", [((6, 6), 2, 20.0), ((6, 8), 2, 21.0), ((9, 12), 3, 25.0)])
def test_decode_tiled(vae, latents, tile, overlap, floor_db):
    untiled = vae.decode(latents)
    out = torch.full_like(untiled, float("nan"))  # every element must be written
    got = vae.decode(latents, tile=tile, overlap=overlap, out=out)
    assert got is out and got.shape == (1, 3, 9, 80, 112)
    assert not got.isnan().any(), "an output pixel no tile wrote"
    assert got.abs().max() <= 1.0
    db = psnr(got, untiled)
    print(f"decode tile={tile} overlap={overlap}: {len(decode_tiles(10, 14, tile, overlap))} tiles, "
          f"PSNR vs untiled {db:.1f} dB")
    assert db > floor_db


def test_decode_into_other_dtype(vae, latents):
    untiled = vae.decode(latents)
    got = vae.decode(latents, tile=(6, 8), overlap=2, out=torch.empty(untiled.shape, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and psnr(got, vae.decode(latents, tile=(6, 8), overlap=2)) > 45


# --- encode --------------------------------------------------------------------------------------------------------

def test_encode_one_tile_is_untiled(vae, video):
    untiled = vae.encode(video)
    assert untiled.shape == (1, CFG.z_dim, 2, 10, 14)
    assert torch.equal(vae.encode(video, tile=(80, 112), overlap=0), untiled)
    assert torch.equal(vae.encode(video, tile=(256, 256), overlap=64), untiled)
    assert torch.equal(vae.encode(video, normalize=False, tile=(80, 112), overlap=24),
                       vae.encode(video, normalize=False))


# Floors measured with the middle block on the whole frame (25.5 and 30.9 dB; tiling it too gave 22.8 and 26.9).
@pytest.mark.parametrize("tile, overlap, floor_db", [((48, 48), 16, 24.0), ((72, 72), 24, 29.0)])
def test_encode_tiled(vae, video, tile, overlap, floor_db):
    untiled = vae.encode(video)
    got = vae.encode(video, tile=tile, overlap=overlap)
    assert got.shape == untiled.shape and not got.isnan().any()
    db = snr(got, untiled)
    print(f"encode tile={tile} px overlap={overlap} px: SNR vs untiled {db:.1f} dB")
    assert db > floor_db


# --- bf16 compute path ---------------------------------------------------------------------------------------------

def test_bf16_compute(vae, latents, video):
    ref = vae.decode(latents)
    got = vae.decode(latents, compute_dtype=torch.bfloat16)
    tiled = vae.decode(latents, tile=(6, 8), overlap=2, compute_dtype=torch.bfloat16)
    assert got.dtype == torch.float32  # output and blending stay in the VAE dtype
    enc_ref = vae.encode(video)
    enc = vae.encode(video, compute_dtype=torch.bfloat16)
    db = psnr(got, ref), psnr(tiled, vae.decode(latents, tile=(6, 8), overlap=2)), snr(enc, enc_ref)
    print(f"bf16 vs fp32: decode PSNR {db[0]:.1f} dB, tiled decode {db[1]:.1f} dB, encode SNR {db[2]:.1f} dB")
    assert min(db) > 30


def test_rmsnorm_bf16_matches_fp32():
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.gamma.copy_(1 + 0.3 * torch.randn_like(norm.gamma))
    x = torch.randn(2, 24, 3, 5, 7)
    want = norm(x)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        got = norm(x.bfloat16().contiguous(memory_format=layout))
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_tiling_validation(vae, latents, video):
    for kwargs in [dict(tile=(6, 6), overlap=4), dict(tile=(0, 6)), dict(tile=(6, 6), overlap=-1),
                   dict(tile=(6,))]:
        with pytest.raises(ValueError, match="tile must be"):
            vae.decode(latents, **kwargs)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video, tile=(60, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(video, tile=(64, 64), overlap=12)
    with pytest.raises(ValueError, match="compute_dtype"):
        vae.decode(latents, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        vae.decode(latents, out=torch.empty(1, 3, 9, 80, 111))


def test_tiled_decode_runs_the_middle_block_once_on_the_whole_frame(vae, latents):
    """The middle block's attention spans the frame, so a tiled decode computes it once per latent frame on the
    whole frame (exactly as the untiled decode does) and tiles only the upsampling stages."""
    seen = []
    hook = vae.decoder.middle.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    try:
        vae.decode(latents)
        untiled, seen[:] = list(seen), []
        vae.decode(latents, tile=(6, 8), overlap=2)
    finally:
        hook.remove()
    assert len(seen) == len(untiled) == latents.shape[2]  # once per latent frame, not once per tile and frame
    for got, want in zip(seen, untiled):
        assert got.shape == want.shape and torch.equal(got, want)


def test_tiled_decode_into_host_memory_matches_the_default_output(vae, latents):
    """`out` (the pipeline passes a pinned host buffer when tiling) receives exactly what decode returns otherwise."""
    want = vae.decode(latents, tile=(6, 8), overlap=2)
    out = torch.full_like(want, float("nan"))
    got = vae.decode(latents, tile=(6, 8), overlap=2, out=out)
    assert got is out and torch.equal(got, want)


def test_tiled_encode_runs_the_middle_block_once_on_the_whole_frame(vae, video):
    """As in decode: only the local downsampling stages are tiled; the middle block sees whole frames."""
    shapes = []
    hook = vae.encoder.middle.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        latents = vae.encode(video, tile=(48, 48), overlap=16)
    finally:
        hook.remove()
    assert shapes == [(1, shapes[0][1], 1, *latents.shape[3:])] * latents.shape[2]
