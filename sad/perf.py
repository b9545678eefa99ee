"""Machine peak and model FLOP counts, for model FLOP utilisation (MFU) figures."""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(n: int = 1024, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of a square ``n x n`` matmul on this machine (the best of repeated timings).

    This is the practical peak the training figures are compared against (same threads, same dtype).
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):  # warm-up
        torch.mm(a, b, out=out)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - started) / 4)
    return 2.0 * n ** 3 / best


def train_flops_per_token(parameters: int, num_layers: int, hidden_size: int, mean_seq_len: float) -> float:
    """Training FLOPs per token: 6 N for the weights (forward + backward; tied embeddings count once,
    as the output projection) plus attention: QK^T and AV cost 4 d per attended position, a causal
    token attends to S/2 positions on average, x3 for the backward: 6 L d S (S = mean length)."""
    return 6.0 * parameters + 6.0 * num_layers * hidden_size * mean_seq_len


def inference_flops_per_token(parameters: int, num_layers: int, hidden_size: int, context_len: float) -> float:
    """Forward FLOPs per generated token: 2 N plus 4 L d C for attention over ``context_len`` cached tokens."""
    return 2.0 * parameters + 4.0 * num_layers * hidden_size * context_len
