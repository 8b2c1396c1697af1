"""WanVAE vs diffusers AutoencoderKLWan on the tiny config (random weights, fp32, CPU), plus the key mapping."""
import pytest
import torch
from randomize import randomize_gains_and_biases

from wanrt.runtime.config import VAEConfig, VARIANTS
from wanrt.runtime.vae import CausalCache, WanVAE, vae_from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

CFG = VARIANTS["tiny-t2v"].vae
TOL = 1e-5


def _diffusers_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                            num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample),
                            attn_scales=[], latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    """(ours, diffusers) with identical random weights; RMS gammas randomised too."""
    torch.manual_seed(0)
    ref = randomize_gains_and_biases(_diffusers_vae(CFG).eval())
    ours = WanVAE(CFG).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), CFG), strict=True)
    return ours, ref


def _stats(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1))


@pytest.mark.parametrize("frames", [9, 1])
def test_encode_matches_diffusers(pair, frames):
    ours, ref = pair
    gen = torch.Generator().manual_seed(frames)
    video = torch.rand(2, 3, frames, 32, 48, generator=gen) * 2 - 1
    with torch.no_grad():
        want = ref.encode(video).latent_dist.mean
    mu = ours.encode(video, normalize=False)
    z = ours.encode(video)
    assert mu.shape == (2, CFG.z_dim, (frames - 1) // 4 + 1, 4, 6)
    mean, std = _stats(CFG)
    err_mu, err_z = _rel_err(mu, want), _rel_err(z, (want - mean) / std)
    print(f"encode F={frames}: mu rel err {err_mu:.2e}, normalised rel err {err_z:.2e}")
    assert err_mu <= TOL and err_z <= TOL


def test_decode_matches_diffusers(pair):
    ours, ref = pair
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, CFG.z_dim, 3, 4, 6, generator=gen)
    mean, std = _stats(CFG)
    with torch.no_grad():
        want = ref.decode(z * std + mean).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 9, 32, 48)
    assert (got.abs() < 1).float().mean() > 0.5, "outputs mostly clamped: the comparison would be vacuous"
    err = _rel_err(got, want)
    print(f"decode T=3: rel err {err:.2e}")
    assert err <= TOL


def test_decode_steps_and_cache(pair):
    """decode() equals a manual decode_step loop; every chunk visits the same cache slots."""
    ours, _ = pair
    z = torch.randn(1, CFG.z_dim, 3, 4, 4) * _stats(CFG)[1] + _stats(CFG)[0]
    cache = CausalCache()
    with torch.no_grad():
        steps = [ours.decode_step(z[:, :, i:i + 1], cache) for i in range(3)]
    assert [s.shape[2] for s in steps] == [1, 4, 4]
    assert not cache.first and cache.idx == 0
    assert all(s is None or s.shape[2] <= 2 for s in cache.slots)
    z_norm = (z - _stats(CFG)[0]) / _stats(CFG)[1]
    torch.testing.assert_close(ours.decode(z_norm), torch.cat(steps, 2).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_input_validation(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="4n\\+1"):
        ours.encode(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.randn(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match="latents must be"):
        ours.decode(torch.randn(1, 4, 2, 4, 4))


@pytest.mark.parametrize("cfg", [CFG, VAEConfig()], ids=["tiny", "wan2.1"])
def test_key_mapping(cfg):
    with torch.device("meta"):
        ours = WanVAE(cfg).state_dict()
        ref = _diffusers_vae(cfg).state_dict()
    mapped = vae_from_diffusers(ref, cfg)
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    if cfg == VAEConfig():
        # Independent check of the official names: diffusers' own official -> diffusers converter (it hard-codes
        # the Wan2.1 block layout, so it cannot map the tiny config's extra decoder shortcut).
        assert set(convert_wan_vae_to_diffusers(ours)) == set(ref)
        assert len(ours) == 194 and sum(v.numel() for v in ours.values()) == 126_892_531
        assert ours["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
        assert ours["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)


def test_key_mapping_errors():
    with torch.device("meta"):
        ref = _diffusers_vae(CFG).state_dict()
    with pytest.raises(ValueError, match="encoder.bogus.weight"):
        vae_from_diffusers({**ref, "encoder.bogus.weight": torch.zeros(1)}, CFG)
    missing = dict(ref)
    del missing["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
    with pytest.raises(ValueError, match=r"decoder\.upsamples\.7\.time_conv\.bias"):
        vae_from_diffusers(missing, CFG)
    with pytest.raises(ValueError, match="shape mismatches"):
        vae_from_diffusers({**ref, "quant_conv.bias": torch.zeros(3)}, CFG)
