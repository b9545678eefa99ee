"""One training loop for the teacher (imitation of the demos) and every student method.

It runs on accelerate: ``python -m …`` uses one process (CPU or one GPU), ``accelerate launch``
spreads it over processes (DDP; configs in ``configs/accelerate/``). bf16 autocast on GPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from sad import losses
from sad.config import MethodParams, TrainParams

log = logging.getLogger(__name__)

IMITATION = MethodParams(loss="sft")  # how the teacher learns from the expert's demos


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 32) -> list[list[int]]:
    """Shuffle, sort within groups of ``group`` batches by length, shuffle the batches (less padding)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad windows into tensors: input_ids, attention_mask, reason_mask, act_mask [B, T]."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

    ids = pad("input_ids", pad_id)
    attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": attention, "reason_mask": pad("reason_mask", 0), "act_mask": pad("act_mask", 0)}


def method_loss(
    method: MethodParams,
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective of ``method`` for one batch; returns (loss, logged parts)."""
    logits, targets, reason, act = losses.shift(student_logits, batch["input_ids"], batch["reason_mask"], batch["act_mask"])
    generated = (reason + act).clamp(max=1)
    if method.loss == "sft":
        loss = losses.sft_loss(logits, targets, generated)
        return loss, {"ce": float(loss.detach())}
    if teacher_logits is None:
        raise ValueError(f"method {method.loss!r} needs teacher logits")
    per_token = losses.forward_kl(logits, teacher_logits[:, :-1, :], method.temperature)
    if method.loss == "token_kd":
        loss = losses.token_kd_loss(per_token, generated)
        return loss, {"kl": float(loss.detach())}
    loss = losses.sad_loss(per_token, reason, act, method.lambda_reason, method.lambda_act, method.normalisation)
    parts = {
        "kl_reason": float(losses.masked_mean(per_token.detach(), reason)),
        "kl_act": float(losses.masked_mean(per_token.detach(), act)),
    }
    return loss, parts


def train_lm(
    model,
    windows: pd.DataFrame,
    method: MethodParams,
    train: TrainParams,
    pad_id: int,
    teacher=None,
    on_log: Callable[[int, dict], None] | None = None,
    log_every: int = 10,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on the window table with ``method``'s objective."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    use_gpu = torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=train.grad_accum,
        mixed_precision="bf16" if use_gpu else "no",
        cpu=not use_gpu,
    )
    set_seed(train.seed)
    rows = windows[["input_ids", "reason_mask", "act_mask"]].to_dict("records")
    if not rows:
        raise ValueError(f"{desc}: no training windows")
    lengths = [len(r["input_ids"]) for r in rows]
    per_step = train.batch_size * train.grad_accum * accelerator.num_processes
    total_steps = max(1, math.ceil(train.epochs * len(rows) / per_step))

    def batches_forever():
        epoch = 0
        while True:
            for batch in length_grouped_batches(lengths, train.batch_size, train.seed + epoch):
                yield batch
            epoch += 1

    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.train()

    stream = batches_forever()
    rank, world = accelerator.process_index, accelerator.num_processes
    history: list[dict] = []
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(range(total_steps), desc=desc, disable=not (progress and accelerator.is_main_process), unit="step")
    last_loss = float("nan")
    for step in bar:
        for _ in range(train.grad_accum):
            # Every process draws the same global batch sequence and takes its own shard.
            global_batch = [next(stream) for _ in range(world)]
            batch = collate([rows[i] for i in global_batch[rank]], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model), accelerator.autocast():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                teacher_logits = None
                if teacher is not None and method.loss != "sft":
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, parts = method_loss(method, out.logits, batch, teacher_logits)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum()) * world
        last_loss = float(loss.detach())
        if step % log_every == 0 or step == total_steps - 1:
            record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], **parts,
                      "tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9)}
            history.append(record)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if on_log and accelerator.is_main_process:
                on_log(step, record)
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    return TrainResult(steps=total_steps, tokens=tokens, seconds=seconds, final_loss=last_loss, history=history)
