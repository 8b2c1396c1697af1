"""Quantization schemes for the DiT block linears: what each stores, what it does to activations, where it runs.

  scheme  weight storage                          activations                               GEMM        min GPU
  bf16    as given (bf16)                         as given                                  cuBLAS      any
  fp8     float8_e4m3fn [N, K] + fp32 scale [N]   dynamic per-token fp8 e4m3 (fp32 scale)   fp8 MMA     sm_89
  int8    int8 [N, K] + fp32 scale [N]            dynamic per-token int8 (fp32 scale)       int8 MMA    sm_80
  w8a16   int8 [N, K] + fp32 scale [N]            none: bf16 in, B upcast in the kernel     bf16 MMA    sm_80
  nf4     uint8 [N, K/2] + fp32 absmax [N, K/64]  none: bf16 in, weight dequantized first   cuBLAS      any (bitsandbytes)

Weight scales are per output channel (symmetric, absmax / qmax), so they factor out of the K sum and are applied in
the GEMM epilogue (nf4: quant/nf4.py). int8 and w8a16 store identical weights: only the activation handling differs. A quantized block
weight dict carries f"{name}.weight" (the 8-bit tensor) and f"{name}.weight_scale" for each name in
QUANTIZED_LINEARS; modulation, norms and biases stay as they are.

On the CPU every scheme runs, through the plain-PyTorch references (slow, for tests). On a GPU without what a scheme
needs, `resolve_scheme` picks the nearest one that runs and says so with a warning, never an error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from wanrt.kernels.dispatch import ADA, AMPERE, has_triton
from wanrt.kernels.quantize import quantize_weight

from . import nf4


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_dtype: torch.dtype  # storage dtype of the quantized linears' weights
    activation_dtype: torch.dtype | None  # dynamic per-token quantization target; None: activations stay bf16
    min_capability: tuple[int, int] | None  # None: runs anywhere
    summary: str


SCHEMES = ("bf16", "fp8", "int8", "w8a16", "nf4")
SCHEME_INFO = {
    "bf16": Scheme("bf16", torch.bfloat16, None, None, "unquantized bf16 weights and cuBLAS GEMMs"),
    "fp8": Scheme("fp8", torch.float8_e4m3fn, torch.float8_e4m3fn, ADA,
                  "fp8 e4m3 weights (per-channel scales) and per-token fp8 activations on fp8 tensor cores"),
    "int8": Scheme("int8", torch.int8, torch.int8, AMPERE,
                   "int8 weights (per-channel scales) and per-token int8 activations on int8 tensor cores"),
    "w8a16": Scheme("w8a16", torch.int8, None, AMPERE,
                    "int8 weights (per-channel scales) upcast to bf16 in the GEMM; bf16 activations"),
    "nf4": Scheme("nf4", torch.uint8, None, None,
                  "4-bit NormalFloat weights in blocks of 64 (bitsandbytes), dequantized for a bf16 GEMM"),
}
# Where a scheme goes when the GPU cannot run it: w8a16 first, because it never loses accuracy against the scheme
# asked for (weight-only, int8 per channel); int8 w8a8 is faster on sm_80 but quantizes activations, so it is only
# used when asked for by name.
FALLBACKS = {"fp8": ("w8a16", "bf16"), "int8": ("w8a16", "bf16"), "w8a16": ("bf16",), "nf4": (), "bf16": ()}

# The block linears that get quantized (official WanModel names); the I2V-only k_img/v_img are skipped when absent.
QUANTIZED_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)


# umT5: weight-only, per output channel, stored in the weight formats of the DiT schemes below; the text encoder runs
# once per video, so its blocks are simply dequantized to the compute dtype as they are used (runtime/text.py).
TEXT_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")
TEXT_STORAGE = {"bf16": "bf16", "int8": "w8a16", "fp8": "fp8"}


def quantize_text_block(w: dict[str, torch.Tensor], text_scheme: str) -> dict[str, torch.Tensor]:
    if text_scheme not in TEXT_STORAGE:
        raise ValueError(f"text_scheme must be one of {tuple(TEXT_STORAGE)}, got {text_scheme!r}")
    return quantize_block(w, TEXT_STORAGE[text_scheme], TEXT_LINEARS)


def is_quantized(name: str, t: torch.Tensor) -> bool:
    """A quantized weight or its scale: kept in its stored dtype wherever blocks are held."""
    return t.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8) or name.endswith("weight_scale")


def same_storage(a: str, b: str) -> bool:
    """Whether two schemes store the same quantized weights (int8 and w8a16), so blocks need no conversion."""
    return a == b or (a != "bf16" and b != "bf16" and SCHEME_INFO[a].weight_dtype == SCHEME_INFO[b].weight_dtype)


def _info(scheme: str) -> Scheme:
    if scheme not in SCHEME_INFO:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    return SCHEME_INFO[scheme]


def quantize_linear_weight(weight: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """An nn.Linear weight [N, K] -> {"weight": q, "weight_scale": fp32 [N]} (bf16: {"weight": weight} as is; nf4:
    quant/nf4.py's packing and block scales)."""
    info = _info(scheme)
    if scheme == "bf16":
        return {"weight": weight}
    if scheme == "nf4":
        return nf4.quantize(weight)
    q, scale = quantize_weight(weight, info.weight_dtype)
    return {"weight": q, "weight_scale": scale}


def quantize_block(w: dict[str, torch.Tensor], scheme: str,
                   names: tuple[str, ...] = QUANTIZED_LINEARS) -> dict[str, torch.Tensor]:
    """A new flat dict of one block's weights with the linears `names` (default: the DiT's) quantized; every other
    tensor (modulation, norms, biases) is the same object as in `w`."""
    _info(scheme)
    out = dict(w)
    if scheme == "bf16":
        return out
    for name in names:
        key = f"{name}.weight"
        if key not in w:
            continue
        if f"{name}.weight_scale" in w:
            raise ValueError(f"{key} is already quantized")
        q = quantize_linear_weight(w[key], scheme)
        out[key], out[f"{name}.weight_scale"] = q["weight"], q["weight_scale"]
    return out


def dequantize_block(w: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                     names: tuple[str, ...] = QUANTIZED_LINEARS) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_block` up to rounding: q * scale in `dtype`, scales dropped. With `quantize_block`
    this moves a checkpoint quantized for one scheme to its fallback (fp8 -> int8 weights for w8a16 on sm_80); the
    umT5 encoder runs its weight-only blocks through it."""
    out = dict(w)
    for name in names:
        scale = out.pop(f"{name}.weight_scale", None)
        if scale is not None:
            out[f"{name}.weight"] = dequantize_linear_weight(w[f"{name}.weight"], scale, dtype)
    return out


def dequantize_linear_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored quantized weight back to [N, K] in `dtype` (its storage dtype says which scheme wrote it)."""
    if q.dtype == torch.uint8:
        return nf4.dequantize(q, scale, dtype)
    return (q.float() * scale.float()[:, None]).to(dtype)


def scheme_supported(scheme: str, capability: tuple[int, int] | None) -> tuple[bool, str]:
    """Whether `scheme` runs on a device of this compute capability (None: the CPU), and why (not)."""
    info = _info(scheme)
    if capability is None:
        return True, "on the CPU every scheme runs through the PyTorch reference"
    cap = f"sm_{capability[0]}{capability[1]}"
    if info.min_capability is None:
        return True, f"{scheme} runs on any GPU"
    need = f"sm_{info.min_capability[0]}{info.min_capability[1]}"
    if tuple(capability) < info.min_capability:
        what = "fp8 tensor cores" if scheme == "fp8" else "int8 tensor cores and Triton's int8/bf16 MMA"
        return False, f"{scheme} needs {what} (compute capability >= {need}); this GPU is {cap}"
    if not has_triton():
        return False, f"{scheme} needs Triton for its GEMM kernels, and Triton does not import"
    return True, f"{scheme} runs on {cap} (needs {need})"


def resolve_scheme(scheme: str, device: torch.device | str) -> str:
    """`scheme` if it runs on `device`, else the first of FALLBACKS[scheme] that does, with a warning that names
    both and the reason. Never raises for a known scheme."""
    _info(scheme)
    device = torch.device(device)
    if device.type != "cuda":
        return scheme
    cap = torch.cuda.get_device_capability(device)
    ok, reason = scheme_supported(scheme, cap)
    if ok:
        return scheme
    for fallback in FALLBACKS[scheme]:
        if scheme_supported(fallback, cap)[0]:
            also = (" Ask for 'int8' by name to run on the int8 tensor cores: faster than w8a16, but the "
                    "activations are quantized too." if scheme == "fp8" and fallback == "w8a16"
                    and scheme_supported("int8", cap)[0] else "")
            warnings.warn(f"quantization scheme {scheme!r} cannot run here: {reason}. Falling back to {fallback!r} "
                          f"({SCHEME_INFO[fallback].summary}).{also}", RuntimeWarning, stacklevel=2)
            return fallback
    return "bf16"  # unreachable: bf16 runs everywhere
