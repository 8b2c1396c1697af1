"""umT5-XXL text encoder (encoder only) and its tokenizer (official `wan/modules/t5.py`, `tokenizers.py`).

Parameter names are the keys of the official `models_t5_umt5-xxl-enc-bf16.pth`:
    token_embedding.weight                      [vocab, dim]
    blocks.N.norm1.weight                       [dim]
    blocks.N.attn.{q,k,v}.weight                [dim_attn, dim]
    blocks.N.attn.o.weight                      [dim, dim_attn]
    blocks.N.norm2.weight                       [dim]
    blocks.N.ffn.gate.0.weight                  [dim_ffn, dim]   GELU branch (HF `wi_0`)
    blocks.N.ffn.fc1.weight                     [dim_ffn, dim]   linear branch (HF `wi_1`)
    blocks.N.ffn.fc2.weight                     [dim, dim_ffn]   (HF `wo`)
    blocks.N.pos_embedding.embedding.weight     [num_buckets, num_heads]  per-layer relative position bias
    norm.weight                                 [dim]
`text_from_hf` maps a transformers `UMT5EncoderModel` state dict onto these names.

Block math (pre-norm, as `T5SelfAttention`): x += o(attn(norm1(x))); x += fc2(fc1(h) * gelu_tanh(gate(h))), h = norm2(x).
Attention logits are not scaled (T5); each layer adds its own bidirectional relative position bias, and padded keys
are masked. Numerics: GEMMs, attention and the residual stream run in the weights' dtype; T5 RMSNorms compute in
fp32 and cast back. The official fp16 inf-clamp is not reproduced (it branches on `isinf(x).any()` every block);
run the encoder in bf16 or fp32, as the official checkpoint does.
"""
from __future__ import annotations

import html
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.formats import TEXT_LINEARS, dequantize_block
from .config import TextConfig

BLOCK_KEYS = (
    "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
    "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight",
)


# ------------------------------------------------------------------------------------------------------------- math
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5 LayerNorm (RMS, no mean, no bias) computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.float() * xf).type_as(x)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket of (key - query) for every pair: [length, length] int64 in [0, num_buckets).

    Half the buckets per direction; within a direction, distances below a quarter of `num_buckets` get their own
    bucket and larger ones share log-spaced buckets up to `max_distance` (official `T5RelativeEmbedding`).
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    # clamp only keeps log() finite where the exact branch is taken anyway; op order matches the reference truncation
    large = max_exact + (torch.log(rel.clamp(min=max_exact).float() / max_exact)
                         / math.log(max_distance / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tokenizer mask [B, L] (1 = token, 0 = pad) -> additive key bias [B, 1, 1, L]: 0 or the dtype's minimum."""
    bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)
    return bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(dtype).min)


def text_block(x: torch.Tensor, bias: torch.Tensor, buckets: torch.Tensor, w: dict[str, torch.Tensor],
               eps: float) -> torch.Tensor:
    """One umT5 encoder block.

    x: [B, L, dim] in the weights' dtype. bias: [B, 1, 1, L] key-padding bias from `mask_bias`, in x's dtype.
    buckets: [L, L] int64 from `relative_position_buckets`. w: the block's tensors under `BLOCK_KEYS` (names relative
    to `blocks.N.`); the head count is the width of the position-bias table. A pure function of its inputs, free of
    host syncs, so a streamer can hand in weights it has just moved and the block can be compiled with fullgraph=True.
    """
    b, s, _ = x.shape
    if "attn.q.weight_scale" in w:  # a weight-only quantized block (text_scheme int8 or fp8)
        w = dequantize_block(w, x.dtype, TEXT_LINEARS)
    table = w["pos_embedding.embedding.weight"]  # [num_buckets, H]
    heads = table.shape[1]
    h = rms_norm(x, w["norm1.weight"], eps)
    q = F.linear(h, w["attn.q.weight"]).view(b, s, heads, -1).transpose(1, 2)  # [B, H, L, Dh]
    k = F.linear(h, w["attn.k.weight"]).view(b, s, heads, -1).transpose(1, 2)
    v = F.linear(h, w["attn.v.weight"]).view(b, s, heads, -1).transpose(1, 2)
    pos = F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.to(q.dtype) + bias, scale=1.0)  # T5: unscaled logits
    x = x + F.linear(a.transpose(1, 2).reshape(b, s, -1), w["attn.o.weight"])
    h = rms_norm(x, w["norm2.weight"], eps)
    h = F.linear(h, w["ffn.fc1.weight"]) * F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
    return x + F.linear(h, w["ffn.fc2.weight"])


# ----------------------------------------------------------------------------------------------------------- module
class _Params(nn.Module):
    """A container that only names parameters; the computation lives in the functions above."""

    def __init__(self, **children: nn.Module | nn.Parameter):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def _linear(n_in: int, n_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(layer.weight, std=std)
    return layer


def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=std)
    return table


def _block_params(cfg: TextConfig) -> nn.Module:
    """Block parameters in the official order, initialised as the official `init_weights`."""
    d, da, df, nh, nb = cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_buckets
    return _Params(
        norm1=_Params(weight=nn.Parameter(torch.ones(d))),
        attn=_Params(q=_linear(d, da, (d * da) ** -0.5), k=_linear(d, da, d ** -0.5), v=_linear(d, da, d ** -0.5),
                     o=_linear(da, d, (nh * da) ** -0.5)),
        norm2=_Params(weight=nn.Parameter(torch.ones(d))),
        ffn=_Params(gate=nn.Sequential(_linear(d, df, d ** -0.5)), fc1=_linear(d, df, d ** -0.5),
                    fc2=_linear(df, d, df ** -0.5)),
        pos_embedding=_Params(embedding=_embedding(nb, nh, (2 * nb * nh) ** -0.5)))


class UMT5Encoder(nn.Module):
    """umT5 encoder with official parameter names. Build on the meta device and load with `assign=True`.

    forward(ids [B, L] int64, mask [B, L] (1 = token, 0 = pad)) -> [B, L, dim] in the weights' dtype. Every row is
    returned, pads included; `encode_text` trims. Holds no buffers, so a meta build plus a loaded state dict is complete.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.dim_attn % cfg.num_heads:
            raise ValueError(f"dim_attn {cfg.dim_attn} is not divisible by num_heads {cfg.num_heads}")
        if cfg.num_buckets < 4 or cfg.num_buckets % 2 or cfg.max_distance <= cfg.num_buckets // 4:
            raise ValueError(f"num_buckets must be even and >= 4, and max_distance > num_buckets // 4; got "
                             f"num_buckets={cfg.num_buckets}, max_distance={cfg.max_distance}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)  # official init: N(0, 1), as nn.Embedding's
        self.blocks = nn.ModuleList(_block_params(cfg) for _ in range(cfg.num_layers))
        self.norm = _Params(weight=nn.Parameter(torch.ones(cfg.dim)))

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors keyed by `BLOCK_KEYS`, the input `text_block` expects."""
        return dict(self.blocks[i].named_parameters())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embedding as a plain row gather: [B, L] -> [B, L, dim] on ids' device. The 256k-row table may stay
        in host RAM: only the prompt's rows are gathered and moved."""
        table = self.token_embedding.weight
        return F.embedding(ids.to(table.device), table).to(ids.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, weights=None) -> torch.Tensor:
        """`weights(i)` supplies block i's tensors (default: this module's own; a streamer passes its GPU slots)."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"expected ids and mask of one shape [B, L], got {list(ids.shape)} and {list(mask.shape)}")
        cfg = self.cfg
        weights = weights or self.block_weights
        x = self.embed(ids)
        bias = mask_bias(mask, x.dtype)  # once per forward, shared by all blocks
        buckets = relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance, ids.device)
        for i in range(len(self.blocks)):
            x = text_block(x, bias, buckets, weights(i), cfg.eps)
        return rms_norm(x, self.norm.weight, cfg.eps)


# ------------------------------------------------------------------------------------------------- HF key mapping
_HF_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    # HF: act(wi_0(h)) * wi_1(h); official: fc1(h) * gate(h) with gate = Linear + GELU. So wi_0 is the gate.
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_HF_BLOCK_RE = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def text_from_hf(state_dict: dict[str, torch.Tensor], cfg: TextConfig | None = None) -> dict[str, torch.Tensor]:
    """transformers `UMT5EncoderModel` state dict -> `UMT5Encoder` state dict (tensors shared, not copied).

    The embedding may come as `shared.weight`, `encoder.embed_tokens.weight` or both (tied; the encoder's copy is
    taken). Without cfg the layer count is read from the keys; with cfg the layer count and every shape are checked too.
    Raises ValueError naming unknown keys, missing keys (transformers names) and shape mismatches.
    """
    out, source, unknown = {}, {}, []  # source: our key -> the transformers key it came from
    for key, t in state_dict.items():
        m = _HF_BLOCK_RE.fullmatch(key)
        if m and m.group(2) in _HF_BLOCK:
            ours = f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
        elif key == "encoder.embed_tokens.weight" or (key == "shared.weight" and "token_embedding.weight" not in out):
            ours = "token_embedding.weight"
        elif key == "shared.weight":
            continue
        elif key == "encoder.final_layer_norm.weight":
            ours = "norm.weight"
        else:
            unknown.append(key)
            continue
        out[ours], source[ours] = t, key
    num_layers = cfg.num_layers if cfg is not None else 1 + max(
        (int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1)
    expected = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
    expected.update({f"blocks.{n}.{ours}": f"encoder.block.{n}.{hf}"
                     for n in range(num_layers) for hf, ours in _HF_BLOCK.items()})
    unknown += [source[k] for k in out if k not in expected]  # blocks beyond cfg.num_layers
    missing = [hf for ours, hf in expected.items() if ours not in out]
    bad = []
    if cfg is not None:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in UMT5Encoder(cfg).state_dict().items()}
        bad = [f"{source[k]} {tuple(t.shape)} != {tuple(shapes[k])}" for k, t in out.items()
               if k in shapes and t.shape != shapes[k]]
    if unknown or missing or bad or num_layers == 0:
        raise ValueError(f"transformers UMT5EncoderModel state dict does not match the umT5 encoder"
                         f"{'' if cfg is None else f' {cfg}'}: unknown keys {sorted(unknown)}, missing keys {missing}, "
                         f"shape mismatches {bad}" + (", no encoder blocks" if num_layers == 0 else ""))
    return out


# ------------------------------------------------------------------------------------------------------- tokenizer
def clean_prompt(text: str) -> str:
    """Official cleaning (`HuggingfaceTokenizer(clean='whitespace')`): ftfy, html-unescape twice, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """google/umt5-xxl style tokenizer folder (spiece.model and/or tokenizer.json + tokenizer_config.json).

    __call__(prompts) -> (ids [B, text_len] int64, mask [B, text_len] int64): cleaned, EOS appended, right-padded with
    pad id 0 to text_len. A prompt longer than text_len tokens (EOS included) keeps its first text_len - 1 tokens and
    the EOS, with a warning naming how many tokens were dropped.
    """

    def __init__(self, folder: str | Path, text_len: int = 512):
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
            raise ValueError(f"{folder} is not a tokenizer folder: expected tokenizer.json or spiece.model "
                             f"(google/umt5-xxl layout)")
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.text_len = text_len

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [clean_prompt(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.text_len:
                warnings.warn(f"prompt {i} is {len(ids)} tokens long (EOS included); {len(ids) - self.text_len} "
                              f"tokens beyond text_len={self.text_len} were dropped", stacklevel=2)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def encode_text(encoder: UMT5Encoder, tokenizer: Tokenizer, prompts: str | Sequence[str],
                device: torch.device | str | None = None, weights=None) -> list[torch.Tensor]:
    """Tokenize and encode; returns one [L_i, dim] tensor per prompt, trimmed to its true length (EOS included).

    device defaults to the embedding's. The trim lengths are read once on the host, after the whole forward.
    """
    ids, mask = tokenizer(prompts)
    device = encoder.token_embedding.weight.device if device is None else device
    ids, mask = ids.to(device), mask.to(device)
    out = encoder(ids, mask, weights)
    return [o[:n] for o, n in zip(out, mask.sum(dim=1).tolist())]
