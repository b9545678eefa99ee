"""Machine peak and model FLOP counts, for model FLOP utilisation (MFU) figures."""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(n: int = 1024, seconds: float = 1.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> float:
    """Achieved FLOP/s of a square ``n x n`` matmul on ``device`` in ``dtype`` (the best of repeated timings).

    This is the practical peak every MFU figure is compared against (same threads, same dtype, same device).
    """
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    for _ in range(3):  # warm-up
        torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / 4)
    return 2.0 * n ** 3 / best


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_token(parameters: int, num_layers: int, hidden_size: int, mean_seq_len: float) -> float:
    """Training FLOPs per token: 6 N for the weights (forward + backward; tied embeddings count once,
    as the output projection) plus attention: QK^T and AV cost 4 d per attended position, a causal
    token attends to S/2 positions on average, x3 for the backward: 6 L d S (S = mean length)."""
    return 6.0 * parameters + 6.0 * num_layers * hidden_size * mean_seq_len


def inference_flops_per_token(parameters: int, num_layers: int, hidden_size: int, context_len: float) -> float:
    """Forward FLOPs per generated token: 2 N plus 4 L d C for attention over ``context_len`` cached tokens."""
    return 2.0 * parameters + 4.0 * num_layers * hidden_size * context_len
