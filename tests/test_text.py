"""umT5 text encoder: parity with transformers' UMT5EncoderModel, key mapping, tiny tokenizer, encode_text."""
import warnings

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from wanrt.testing.tiny_tokenizer import write_tiny_tokenizer
from wanrt.runtime.config import VARIANTS, TextConfig
from wanrt.runtime.text import (BLOCK_KEYS, Tokenizer, UMT5Encoder, clean_prompt, encode_text, mask_bias,
                                relative_position_buckets, text_block, text_from_hf)

CFG = VARIANTS["tiny-t2v"].text
SEQ = 40  # encoder test length: past max_distance (16), so the clamped log buckets are exercised
LENGTHS = (SEQ, 23, 1)  # per-sample true lengths for the padded batch
TEXT_LEN = 16  # tokenizer tests: short, so truncation is easy to reach


def _hf_model(cfg: TextConfig, attn: str = "eager", seed: int = 0) -> UMT5EncoderModel:
    hf_cfg = UMT5Config(
        vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", layer_norm_epsilon=cfg.eps,
        dropout_rate=0.0, attn_implementation=attn)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied shared/embed_tokens appears once
            if p.ndim == 1:  # RMSNorm weights: away from 1 so a swapped or skipped norm shows up
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name:  # bias tables large enough to matter
                p.copy_(torch.randn_like(p))
            else:  # unit-scale activations; unscaled T5 logits stay O(1-10)
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return model


def _ours(state: dict, cfg: TextConfig = CFG) -> UMT5Encoder:
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _batch(padded: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.vocab, (len(LENGTHS), SEQ), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i, n in enumerate(LENGTHS):
            ids[i, n - 1], ids[i, n:], mask[i, n:] = 1, 0, 0  # EOS, then pad id 0, as the tokenizer writes
    return ids, mask


# ----------------------------------------------------------------------------------------------------- encoder parity
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@torch.no_grad()
def test_parity_with_transformers(padded):
    """fp32, same ids and mask. transformers' sdpa path must match tightly; its eager path differs from its own sdpa
    path by fp32 reordering noise (a few 1e-6 here), so ours may differ from eager by at most about that much."""
    hf_sdpa, hf_eager = _hf_model(CFG, "sdpa"), _hf_model(CFG, "eager")
    ours = _ours(text_from_hf(hf_sdpa.state_dict(), CFG))
    ids, mask = _batch(padded)
    ref = hf_sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    ref_eager = hf_eager(input_ids=ids, attention_mask=mask).last_hidden_state
    out = ours(ids, mask)
    assert out.shape == (len(LENGTHS), SEQ, CFG.dim) and out.dtype == torch.float32
    err, err_eager = (out - ref).abs().max().item(), (out - ref_eager).abs().max().item()
    noise = (ref_eager - ref).abs().max().item()
    print(f"[{'padded' if padded else 'full'}] max abs err vs sdpa {err:.2e}, vs eager {err_eager:.2e} "
          f"(transformers eager vs sdpa {noise:.2e}; max |ref| {ref.abs().max().item():.2f})")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert err_eager <= 2 * noise + 1e-6


@torch.no_grad()
def test_padding_is_masked():
    """Valid rows of a padded sample equal the same sample run alone at its true length: pads are never attended."""
    ours = _ours(text_from_hf(_hf_model(CFG).state_dict()))
    ids, mask = _batch(padded=True)
    out = ours(ids, mask)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(out[i, :n], ours(ids[i:i + 1, :n], mask[i:i + 1, :n])[0], rtol=1e-5, atol=1e-6)
    assert (out[1, :LENGTHS[1]] - ours(ids[1:2], torch.ones_like(mask[1:2]))[0, :LENGTHS[1]]).abs().max() > 1e-3


@torch.no_grad()
def test_bf16_runs_in_weight_dtype():
    hf = _hf_model(CFG)
    ours = _ours(text_from_hf(hf.state_dict()))
    ids, mask = _batch(padded=True)
    ref = ours(ids, mask)
    out = ours.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"bf16 vs fp32 max rel err {err:.2e}")
    assert err < 5e-2


def test_block_compiles_fullgraph():
    """The block is a pure, sync-free function of (x, bias, buckets, weights): it traces with fullgraph=True."""
    torch._dynamo.reset()
    ours = _ours(text_from_hf(_hf_model(CFG).state_dict()))
    ids, mask = _batch(padded=True)
    x = ours.embed(ids)
    bias = mask_bias(mask, x.dtype)
    buckets = relative_position_buckets(SEQ, CFG.num_buckets, CFG.max_distance)
    w = {k: v.detach().clone() for k, v in ours.block_weights(0).items()}  # as a streamer would hand them in
    assert tuple(w) == BLOCK_KEYS
    compiled = torch.compile(text_block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, bias, buckets, w, CFG.eps), text_block(x, bias, buckets, w, CFG.eps))


def test_relative_buckets_match_transformers():
    for nb, md, length in [(32, 128, 512), (CFG.num_buckets, CFG.max_distance, 40)]:
        hf_cfg = UMT5Config(d_model=8, d_kv=2, num_heads=4, relative_attention_num_buckets=nb,
                            relative_attention_max_distance=md, is_decoder=False)
        attn = UMT5EncoderModel(hf_cfg).encoder.block[0].layer[0].SelfAttention
        pos = torch.arange(length)
        ref = attn._relative_position_bucket(pos[None, :] - pos[:, None])
        assert torch.equal(relative_position_buckets(length, nb, md), ref)


# --------------------------------------------------------------------------------------------------------- key mapping
def test_official_key_set_full_size():
    """Full umT5-XXL on meta: 242 tensors, 5,680,910,336 parameters, official names (fact sheet section 4)."""
    with torch.device("meta"):
        model = UMT5Encoder(TextConfig())
    sd = model.state_dict()
    assert len(sd) == 242 and sum(t.numel() for t in sd.values()) == 5_680_910_336
    assert list(sd)[:11] == ["token_embedding.weight"] + [f"blocks.0.{k}" for k in BLOCK_KEYS]
    assert list(sd)[-1] == "norm.weight"
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)


def test_text_from_hf_wi0_is_gate_and_tied_embedding():
    sd = _hf_model(CFG).state_dict()
    out = text_from_hf(sd)
    assert out["blocks.1.ffn.gate.0.weight"] is sd["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    assert out["blocks.1.ffn.fc1.weight"] is sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    only_shared = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    assert text_from_hf(only_shared)["token_embedding.weight"] is sd["shared.weight"]


def test_text_from_hf_errors():
    sd = _hf_model(CFG).state_dict()
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        text_from_hf({k: v for k, v in sd.items() if "block.0.layer.1.DenseReluDense.wi_1" not in k})
    with pytest.raises(ValueError, match=r"decoder\.block\.0\.foo"):
        text_from_hf({**sd, "decoder.block.0.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"encoder\.final_layer_norm\.weight"):
        text_from_hf({k: v for k, v in sd.items() if k != "encoder.final_layer_norm.weight"})
    last = f"encoder.block.{CFG.num_layers - 1}."
    with pytest.raises(ValueError, match=rf"missing keys \['{last}"):  # a whole last block is only caught with cfg
        text_from_hf({k: v for k, v in sd.items() if not k.startswith(last)}, CFG)
    with pytest.raises(ValueError, match="shape mismatches"):
        text_from_hf(sd, TextConfig(**{**CFG.__dict__, "dim_ffn": CFG.dim_ffn * 2}))


# ----------------------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), CFG.vocab)


def test_tiny_tokenizer_folder(tok_dir, tmp_path):
    import sentencepiece as spm

    assert {p.name for p in tok_dir.iterdir()} == {"spiece.model", "tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    again = write_tiny_tokenizer(tmp_path / "again", CFG.vocab)
    for p in tok_dir.iterdir():  # deterministic
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name
    tok = Tokenizer(tok_dir, TEXT_LEN).tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and len(tok) == CFG.vocab
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    for text in ["a red circle moves right on a blue background", "Two SHINY cubes, 3 stars & a ring!"]:
        assert tok(text)["input_ids"] == sp.encode(text) + [1]  # fast tokenizer == sentencepiece, plus EOS


def test_tokenizer_pads_and_appends_eos(tok_dir):
    tokenizer = Tokenizer(tok_dir, TEXT_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is long enough to truncate
        ids, mask = tokenizer(["a red circle moves right", "blue", ""])
    assert ids.shape == mask.shape == (3, TEXT_LEN) and ids.dtype == torch.int64
    assert (ids < CFG.vocab).all() and (ids >= 0).all()
    n = mask.sum(1)
    assert n[2] == 1 and n[1] < n[0] < TEXT_LEN  # an empty prompt is just EOS
    for i in range(3):
        assert mask[i, : n[i]].all() and not mask[i, n[i]:].any()
        assert ids[i, n[i] - 1] == 1 and (ids[i, n[i]:] == 0).all() and (ids[i, : n[i] - 1] > 2).all()


def test_tokenizer_cleans_like_official(tok_dir):
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake
    tokenizer = Tokenizer(tok_dir, TEXT_LEN)
    a, _ = tokenizer("  a   red\n circle ")
    b, _ = tokenizer(["a red circle"])
    assert torch.equal(a, b)


def test_tokenizer_truncates_with_warning(tok_dir):
    tokenizer = Tokenizer(tok_dir, TEXT_LEN)
    long = " ".join(["a red circle moves right"] * 6)
    full = len(tokenizer.tokenizer(long)["input_ids"])
    assert full > TEXT_LEN
    with pytest.warns(UserWarning, match=rf"prompt 1 is {full} tokens .*; {full - TEXT_LEN} tokens .* dropped"):
        ids, mask = tokenizer(["short", long])
    assert mask[1].all() and ids[1, -1] == 1  # keeps the first text_len - 1 tokens and the EOS
    assert torch.equal(ids[1, :-1], torch.tensor(tokenizer.tokenizer(long)["input_ids"][: TEXT_LEN - 1]))


def test_tokenizer_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="tokenizer folder"):
        Tokenizer(tmp_path, TEXT_LEN)


@torch.no_grad()
def test_encode_text_trims_to_true_length(tok_dir):
    hf = _hf_model(CFG)
    ours = _ours(text_from_hf(hf.state_dict()))
    tokenizer = Tokenizer(tok_dir, TEXT_LEN)
    prompts = ["a red circle moves right on a blue background", "a star"]
    out = encode_text(ours, tokenizer, prompts)
    ids, mask = tokenizer(prompts)
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(out) == 2
    for o, r, n in zip(out, ref, mask.sum(1).tolist()):
        assert o.shape == (n, CFG.dim)
        torch.testing.assert_close(o, r[:n], rtol=1e-5, atol=1e-6)
