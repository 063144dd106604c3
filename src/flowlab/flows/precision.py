"""Where reduced precision pays: the compute dtype of the coupling networks on a given device.

The coupling networks hold nearly all of a flow's FLOPs. Running them in bfloat16 is a speed-up only
where the hardware multiplies bfloat16 matrices natively: tensor cores on CUDA GPUs that support it,
AMX tiles on recent Xeons (Sapphire Rapids and later). Elsewhere (AVX2/AVX-512 without AMX) oneDNN's
bfloat16 convolutions are slower than float32 ones, so the fast path stays float32 there.
"""

import torch


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products run on dedicated hardware on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(amx and amx() and (avx512_bf16 is None or avx512_bf16()))
    return False


def fast_coupling_dtype(device: torch.device | str) -> torch.dtype | None:
    """The coupling networks' compute dtype on the fast path: bfloat16 where it pays, else None (float32)."""
    return torch.bfloat16 if bf16_is_fast(device) else None
