"""One training loop for the teacher (imitation of the demos) and every student method.

It runs on accelerate: plain ``python`` is one process (CPU or one GPU); ``accelerate launch``
(configs in ``configs/accelerate/``) spreads it over processes with DDP or FSDP. bf16
autocast on GPU and on CPUs with bf16 instructions (``train.precision: auto``), fp32 elsewhere.

Exactness across process counts: every process draws the same global batch plan (a function
of the seed only) and takes its shard; each loss is normalised by the token counts of the
whole global batch (all shards and accumulation steps), and gradients are summed. One
process with ``batch_size = b·n`` therefore takes the same steps as ``n`` processes with
``batch_size = b``, up to float reduction order.

Checkpoints (``checkpoint_every``) hold the weights (safetensors), the optimizer and
scheduler state (loaded with ``weights_only=True``), the step, the precision it trains in and the
random state (dropout); a rerun with the same fingerprint resumes there, in that precision, and ends
with the same weights as an uninterrupted run (with dropout under several processes, only rank 0's
random state is kept: the others' dropout draws differ).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from sad import losses
from sad.config import CurriculumParams, MethodParams, TrainParams
from sad.io import atomic_dir, write_json_atomic
from sad.logits import check_head_matches_forward, generated_logits, generated_mask
from sad.modeling import cpu_bf16_is_fast

log = logging.getLogger(__name__)

IMITATION = MethodParams(loss="sft", curriculum=False)  # how the teacher learns from the expert's demos
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_WEIGHTS = "model.safetensors"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)
    dev: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    precision: str = "fp32"  # what ran: "bf16" (autocast) or "fp32"
    resumed_tokens: int = 0  # of ``tokens``, those trained before the checkpoint this run resumed from

    @property
    def tokens_per_second(self) -> float:
        """Tokens this run trained on per second (a resumed run's earlier tokens took none of its seconds)."""
        return (self.tokens - self.resumed_tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CachedTeacher:
    """Teacher targets from the top-k cache (:mod:`sad.teacher_cache`)."""

    cache: object  # TopkCache


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def mixed_precision(precision: str, use_gpu: bool, cpu_bf16_fast: bool | None = None) -> str:
    """accelerate's ``mixed_precision`` for a ``train.precision`` setting: "bf16" autocast or "no".

    ``auto`` is bf16 on a GPU and on a CPU where bf16 pays (``cpu_bf16_fast``, decided by
    :func:`sad.modeling.cpu_bf16_is_fast` when None; measured on the 2-core avx512_bf16 EPYC: the default's
    distill@sad 2.14x faster, dev CE 1.31 against 1.36 in fp32), fp32 on any other CPU. ``bf16`` on a CPU
    where it does not pay runs in fp32, with a warning: emulated bf16 is ~28x slower than fp32 without bf16
    instructions, and a training step 0.72x fp32 on an Intel Xeon with avx512_bf16 but no AMX: never what a
    recipe written for speed wants."""
    fast = use_gpu or (cpu_bf16_is_fast() if cpu_bf16_fast is None else cpu_bf16_fast)
    if precision == "bf16" and not fast:
        log.warning("train.precision bf16 asked on a CPU where bf16 is not faster than fp32 (no avx512_bf16/AMX, "
                    "or measured slower): this training runs in fp32; set precision: auto or fp32 to silence this")
        return "no"
    if precision == "bf16" or (precision == "auto" and fast):
        return "bf16"
    return "no"


def fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """True where torch's fused AdamW kernel runs every parameter (floating tensors on the CPU or a CUDA GPU),
    else None (torch's default). On the 2-core CPU the per-tensor loop that is torch's CPU default took 0.18 s a
    step for the 108M-parameter teacher and 0.040 s for the 30M default student, the fused kernel 0.054 / 0.016 s
    (docs/measurements.md): about 2% of a training step."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None


def _accelerator(precision: str, use_gpu: bool):
    """An ``Accelerator`` with this precision ("bf16" or "no"; its ``mixed_precision`` is what runs), also when
    an earlier training in the same process (one Prefect flow runs several stages) used another: accelerate
    keeps one precision per process, so its precision state is reset (the distributed state is kept). In a
    multi-process run every rank takes rank 0's precision: each resolved ``auto`` on its own."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list

    if PartialState(cpu=not use_gpu).num_processes > 1:
        precision = broadcast_object_list([precision], from_process=0)[0]
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=not use_gpu)


def split_dev(windows: pd.DataFrame, dev_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole episodes (a stable hash of the id) as the dev set: (train, dev)."""
    if dev_fraction <= 0:
        return windows, windows.iloc[0:0]
    buckets = windows["episode_id"].map(lambda e: zlib.crc32(f"{seed}:{e}".encode()) % 10_000)
    is_dev = buckets < int(dev_fraction * 10_000)
    if is_dev.all() or not is_dev.any():
        return windows, windows.iloc[0:0]
    return windows[~is_dev], windows[is_dev]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int | str, group: int = 32) -> list[list[int]]:
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


def batch_plan(lengths: list[int], global_batch: int, n_batches: int, seed: int,
               curriculum_order: list[int] | None = None, curriculum: CurriculumParams | None = None) -> list[list[int]]:
    """``n_batches`` global batches of window indices, identical on every process and for any number of
    processes (a batch with fewer windows than processes leaves some shards empty: see :func:`train_lm`).

    Without a curriculum: length-grouped shuffles, epoch after epoch. With one: batches drawn
    from the easiest share of ``curriculum_order`` under the pacing schedule.
    """
    if curriculum_order is not None and curriculum is not None:
        from sad.curriculum import curriculum_batches

        return curriculum_batches(curriculum_order, n_batches, global_batch, seed, curriculum.pacing,
                                  curriculum.start, curriculum.ramp)
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < n_batches:
        # one stream per (seed, epoch): with ``seed + epoch``, seed 1's first epoch was seed 0's second
        plan.extend(length_grouped_batches(lengths, global_batch, f"{seed}:{epoch}"))
        epoch += 1
    return plan[:n_batches]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch."""
    per, extra = divmod(len(batch), world)
    start = rank * per + min(rank, extra)
    return batch[start:start + per + (1 if rank < extra else 0)]


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad windows into tensors: input_ids, attention_mask, reason_mask, act_mask [B, T].

    Models are called without the attention mask: with causal attention, right padding never
    changes the logits of real positions, and pad positions carry no loss; the plain causal
    path of SDPA is faster than an explicit 4-D mask.
    """
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

    ids = pad("input_ids", pad_id)
    attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": attention, "reason_mask": pad("reason_mask", 0), "act_mask": pad("act_mask", 0)}


def loss_token_counts(rows: list[dict]) -> tuple[int, int]:
    """(REASON, ACT) tokens that carry a loss (the first token never does: nothing predicts it)."""
    return (sum(sum(r["reason_mask"][1:]) for r in rows), sum(sum(r["act_mask"][1:]) for r in rows))


# --------------------------------------------------------------------------- objective
def method_loss(
    method: MethodParams,
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective of ``method`` for one batch; returns (loss, logged parts).

    student_logits [B, T, V]; batch tensors [B, T]; ``teacher`` is full teacher logits
    [B, T, V], the teacher's logits at the N generated positions [N, V] (row-major, as
    :func:`sad.logits.generated_logits` gives them) or cached top-k (log-probs [N, k],
    ids [N, k], tail log-mass [N]) for those positions;
    ``counts`` = global (REASON, ACT) token counts to normalise by (default: this batch's).
    """
    logits, targets, reason, act = losses.shift(student_logits, batch["input_ids"], batch["reason_mask"], batch["act_mask"])
    generated = (reason + act) > 0
    sel = logits[generated]  # [N, V]
    r, a = reason[generated], act[generated]  # [N]
    n_r, n_a = counts if counts is not None else (float(r.sum()), float(a.sum()))
    parts: dict[str, float] = {}
    if method.loss == "sft":
        per_token = losses.token_cross_entropy(sel, targets[generated])
        loss = losses.masked_mean(per_token, r + a, n_r + n_a)
        parts["ce"] = float(loss.detach())
    else:
        if teacher is None:
            raise ValueError(f"method {method.loss!r} needs teacher logits (online teacher or the top-k cache)")
        if isinstance(teacher, tuple):
            t_logp, t_ids, t_tail = teacher
            if t_logp.shape[0] != sel.shape[0]:
                raise ValueError(f"cached teacher targets cover {t_logp.shape[0]} positions, the batch has {sel.shape[0]}")
            per_token = losses.topk_divergence(sel, t_logp, t_ids, t_tail, method.divergence, method.temperature,
                                               method.beta, method.alpha)
        else:
            t_sel = teacher if teacher.dim() == 2 else teacher[:, :-1, :][generated]
            if t_sel.shape[0] != sel.shape[0]:
                raise ValueError(f"teacher logits cover {t_sel.shape[0]} positions, the batch has {sel.shape[0]}")
            per_token = losses.logit_divergence(sel, t_sel, method.divergence, method.temperature, method.beta, method.alpha)
        if method.loss == "token_kd":
            loss = losses.token_kd_loss(per_token, r + a, n_r + n_a)
            parts["kd"] = float(loss.detach())
        else:
            loss = losses.sad_loss(per_token, r, a, method.lambda_reason, method.lambda_act, method.normalisation,
                                   counts=(n_r, n_a))
            parts["d_reason"] = float(losses.masked_mean(per_token.detach(), r))
            parts["d_act"] = float(losses.masked_mean(per_token.detach(), a))
    if method.ce_act:
        ce_act = losses.masked_mean(losses.token_cross_entropy(sel, targets[generated]), a, n_a)
        loss = loss + method.ce_act * ce_act
        parts["ce_act"] = float(ce_act.detach())
    return loss, parts


# --------------------------------------------------------------------------- checkpoints
def _trainable_state(model) -> dict[str, torch.Tensor] | None:
    """The trainable parameters when some are frozen (e.g. LoRA adapters), else None (save everything)."""
    params = dict(model.named_parameters())
    trainable = {name: p.detach() for name, p in params.items() if p.requires_grad}
    return trainable if len(trainable) < len(params) else None


def _checked_weights(model, weights: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking that every one has a parameter or buffer of that name and shape
    in ``model`` (so a mismatched checkpoint is refused before any weight is copied); with frozen weights (a
    LoRA adapter) its keys must be exactly the trainable ones."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    own = model.state_dict()
    trainable = _trainable_state(model)
    if trainable is not None and set(state) != set(trainable):
        raise ValueError(f"it holds {len(state)} tensors, the model trains {len(trainable)} others")
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape) if k in own else 'none'})"
             for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensor(s) do not fit the model, e.g. {wrong[0]}")
    if trainable is None:  # every weight of the model, each tied group (one storage, several names) once
        shared: dict[int, list[str]] = {}
        for name, tensor in own.items():
            shared.setdefault(tensor.data_ptr(), []).append(name)
        missing = [names[0] for names in shared.values() if not any(n in state for n in names)]
        if missing:
            raise ValueError(f"{len(missing)} of the model's tensors are not in it, e.g. {missing[0]}")
    return state


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, tokens: int, history: list[dict],
                    fingerprint: str, precision: str = "no") -> None:
    """Weights (safetensors) + optimizer/scheduler state + step + the autocast it trains in ("bf16" or "no"),
    written to a temp dir then renamed.

    With frozen weights (a LoRA adapter over a pretrained model) only the trainable ones are saved.
    """
    from safetensors.torch import save_file, save_model

    from sad.io import atomic_dir

    with atomic_dir(folder) as tmp:
        trainable = _trainable_state(model)
        if trainable is None:
            save_model(model, str(tmp / CHECKPOINT_WEIGHTS))
        else:
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / CHECKPOINT_WEIGHTS))
        rng = {"cpu": torch.get_rng_state()}  # dropout's draws go on where they stopped
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "tokens": tokens, "fingerprint": fingerprint, "history": json.dumps(history),
                    "precision": precision, "rng": rng},
                   tmp / CHECKPOINT_STATE)


def resume_precision(folder: Path, fingerprint: str, resolved: str, use_gpu: bool) -> str:
    """The autocast a run resumed from ``folder`` trains in: the one its checkpoint was trained in, so a stopped
    run ends as an uninterrupted one would even where this machine alone would resolve ``precision: auto``
    otherwise (``resolved``: "bf16" or "no"; the bf16 speed test is a timing and can land either side). The
    exception: a bf16 checkpoint on a CPU without bf16 instructions (emulated bf16 is ~28x slower) goes on in
    ``resolved``, with a warning. No checkpoint (state and weights), another fingerprint or an unreadable state:
    ``resolved``."""
    from sad.modeling import cpu_has_native_bf16

    state_file = folder / CHECKPOINT_STATE
    if not (state_file.is_file() and (folder / CHECKPOINT_WEIGHTS).is_file()):
        return resolved
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_checkpoint reports it and starts over
        return resolved
    stored = state.get("precision")
    if state.get("fingerprint") != fingerprint or stored not in ("bf16", "no") or stored == resolved:
        return resolved
    if stored == "bf16" and not (use_gpu or cpu_has_native_bf16()):
        log.warning("checkpoint %s was trained under bf16 autocast, which this CPU can only emulate: the run goes on "
                    "in fp32 (its weights will differ slightly from an uninterrupted run's)", folder)
        return resolved
    log.info("checkpoint %s was trained in %s: the run goes on in it, as it began (this machine alone would choose %s)",
             folder, "bf16" if stored == "bf16" else "fp32", "bf16" if resolved == "bf16" else "fp32")
    return stored


def load_checkpoint(folder: Path, model, optimizer, scheduler, fingerprint: str) -> tuple[int, int, list[dict]] | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None if absent or for other settings.

    A checkpoint that cannot be read is reported and ignored (training starts over), never half-used.
    """

    state_file, weights = folder / CHECKPOINT_STATE, folder / CHECKPOINT_WEIGHTS
    if not (state_file.is_file() and weights.is_file()):
        return None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: start over
        log.warning("checkpoint %s is unreadable (%s): starting from scratch", folder, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s was made with other settings or data: starting from scratch", folder)
        return None
    try:  # checked before anything is copied: a refused checkpoint leaves the model as it was
        tensors = _checked_weights(model, weights)
    except Exception as exc:  # noqa: BLE001
        log.warning("checkpoint weights %s are unreadable or do not fit (%s): starting from scratch", weights, exc)
        return None
    kernels = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, fused in zip(optimizer.param_groups, kernels):  # the kernel it was built with (a checkpoint from
        group["fused"] = fused                                    # before fused AdamW would switch it off)
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or {}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    # every tensor was checked (a tied group may be stored under one of its names: loading it fills the group)
    model.load_state_dict(tensors, strict=False)
    return int(state["step"]), int(state["tokens"]), json.loads(state["history"])


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_dev(model, rows: list[dict], method: MethodParams, pad_id: int, device, teacher=None,
                 batch_size: int = 16) -> dict[str, float]:
    """Dev-set objective, CE of the teacher's tokens and next-token accuracy on ACT tokens."""
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "ce": 0.0, "act_accuracy": 0.0}
    n_r, n_a = loss_token_counts(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"]).logits
        t_logits = None
        if method.needs_teacher and teacher is not None:
            generated = generated_mask(batch)
            t_logits = generated_logits(teacher, batch["input_ids"], generated)  # [N, V], as in training
        if t_logits is not None or not method.needs_teacher:
            loss, _ = method_loss(method, logits, batch, t_logits, counts=(n_r, n_a))
            totals["loss"] += float(loss)
        shifted, targets, reason, act = losses.shift(logits, batch["input_ids"], batch["reason_mask"], batch["act_mask"])
        ce = losses.token_cross_entropy(shifted, targets)
        totals["ce"] += float(losses.masked_mean(ce, (reason + act).clamp(max=1), n_r + n_a))
        correct = (shifted.argmax(-1) == targets).float()
        totals["act_accuracy"] += float(losses.masked_mean(correct, act, n_a))
    model.train(was_training)
    if method.needs_teacher and teacher is None:
        totals.pop("loss")
    return totals


# --------------------------------------------------------------------------- loop
def save_phase(folder: Path, model, result, key: str) -> None:
    """A finished phase: the trained weights (only the trainable ones under LoRA), its result and key."""
    from safetensors.torch import save_file, save_model

    with atomic_dir(folder) as tmp:
        trainable = _trainable_state(model)
        if trainable is None:
            save_model(model, str(tmp / "weights.safetensors"))  # handles tied embeddings
        else:
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "weights.safetensors"))
        write_json_atomic(tmp / "result.json", {**asdict(result), "key": key})


def load_phase(folder: Path, model, key: str):
    """The result of a finished phase with this ``key`` (its weights loaded into ``model``), else None."""
    from safetensors.torch import load_file, load_model

    try:
        saved = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.pop("key", None) != key:
        return None
    if _trainable_state(model) is None:
        load_model(model, str(folder / "weights.safetensors"))
    else:
        model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=False)
    return TrainResult(**saved)


# Logged parts normalised by the global batch's token counts (they add up over micro-batches and processes);
# the others, a micro-batch's mean divergence over one span kind, are averaged weighted by its tokens of that kind.
GLOBAL_PARTS = frozenset({"ce", "kd", "ce_act"})
SPAN_PARTS = {"d_reason": 0, "d_act": 1}  # part -> index into loss_token_counts


def _global_parts(part_sums: dict[str, float], span_tokens: tuple[float, float], accelerator) -> dict[str, float]:
    """One optimizer step's logged parts over every micro-batch and process (a collective: every rank calls it).
    ``part_sums`` holds this process's sums over its micro-batches (a span part weighted by its tokens there),
    ``span_tokens`` this process's (REASON, ACT) loss tokens."""
    def total(value: float) -> float:
        return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum"))

    tokens = (total(span_tokens[0]), total(span_tokens[1]))
    return {key: total(part_sums[key]) / (max(tokens[SPAN_PARTS[key]], 1.0) if key in SPAN_PARTS else 1.0)
            for key in sorted(part_sums)}


def train_lm(
    model,
    windows: pd.DataFrame,
    method: MethodParams,
    train: TrainParams,
    pad_id: int,
    teacher=None,
    cached: CachedTeacher | None = None,
    dev_windows: pd.DataFrame | None = None,
    curriculum_order: list[int] | None = None,
    curriculum: CurriculumParams | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    on_log: Callable[[int, dict], None] | None = None,
    log_every: int = 10,
    progress: bool = True,
    desc: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on the window table with ``method``'s objective.

    Teacher targets come from ``teacher`` (online: a forward pass per batch, no grad) or
    ``cached`` (top-k cache rows addressed by the windows' ``cache_row`` column).
    ``curriculum_order`` (positions into ``windows``, easy → hard) switches the curriculum on.
    ``stop_after`` ends after that many steps (as a crash would; for resume tests).
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    use_gpu = torch.cuda.is_available()
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    autocast = mixed_precision(train.precision, use_gpu)
    if ckpt is not None:
        autocast = resume_precision(ckpt, fingerprint, autocast, use_gpu)
    accelerator = _accelerator(autocast, use_gpu)
    autocast = accelerator.mixed_precision  # rank 0's in a multi-process run
    set_seed(train.seed)
    columns = ["input_ids", "reason_mask", "act_mask"] + (["cache_row"] if "cache_row" in windows else [])
    rows = windows[columns].to_dict("records")
    if not rows:
        raise ValueError(f"{desc}: no training windows")
    if method.needs_teacher and teacher is None and cached is None:
        raise ValueError(f"{desc}: method {method.loss!r} needs a teacher (online) or the top-k cache")
    if cached is not None and "cache_row" not in windows:
        raise ValueError(f"{desc}: cached teacher targets need a 'cache_row' column in the windows")
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = train.batch_size * world
    total_steps = max(1, math.ceil(train.epochs * len(rows) / (global_batch * train.grad_accum)))
    plan = batch_plan([len(r["input_ids"]) for r in rows], global_batch, total_steps * train.grad_accum, train.seed,
                      curriculum_order, curriculum)

    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=(0.9, 0.95), fused=fused_adamw(decay + no_decay),
    )
    # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)
    start_step, tokens, history = 0, 0, []
    if ckpt is not None:
        restored = load_checkpoint(ckpt, model, optimizer, scheduler, fingerprint)
        if restored:
            start_step, tokens, history = restored
            log.info("%s: resuming from the checkpoint at step %d of %d", desc, start_step, total_steps)
    resumed_tokens = tokens
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if method.needs_teacher:  # its targets come from the fp32 head: the same logits as its own forward?
            first = collate(rows[:1], pad_id)
            with accelerator.autocast():
                check_head_matches_forward(teacher, first["input_ids"].to(accelerator.device),
                                           generated_mask(first).to(accelerator.device))
    model.train()

    dev_rows = dev_windows[["input_ids", "reason_mask", "act_mask"]].to_dict("records") if dev_windows is not None else []
    dev_metrics: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(range(start_step, total_steps), desc=desc, disable=not (progress and accelerator.is_main_process),
               unit="step", initial=start_step, total=total_steps)
    last_loss = float("nan")
    for step in bar:
        micro = plan[step * train.grad_accum:(step + 1) * train.grad_accum]
        counts = loss_token_counts([rows[i] for b in micro for i in b])
        counts = (float(counts[0]), float(counts[1]))
        step_loss = torch.zeros((), device=accelerator.device)
        part_sums: dict[str, float] = {}
        span_tokens = [0.0, 0.0]
        for m, global_indices in enumerate(micro):
            mine_indices = shard(global_indices, rank, world)
            # a batch with fewer windows than processes: an empty shard runs one window with no weight, so that
            # every process takes part in the gradient sync and the plan stays that of one process
            weight = 1.0 if mine_indices else 0.0
            mine = [rows[i] for i in (mine_indices or global_indices[:1])]
            batch = {k: v.to(accelerator.device) for k, v in collate(mine, pad_id).items()}
            sync = m == len(micro) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                out = model(input_ids=batch["input_ids"])
                targets = None
                if method.needs_teacher:
                    if cached is not None:
                        targets = cached.cache.batch_targets([int(r["cache_row"]) for r in mine], method.temperature)
                        targets = tuple(t.to(accelerator.device) for t in targets)
                    else:
                                    # fp32 targets at the generated positions only, as the cache holds them (under bf16
                        # autocast the full forward's logits were bf16 and [B, T, V])
                        generated = generated_mask(batch)
                        with torch.no_grad():
                            targets = generated_logits(teacher, batch["input_ids"], generated)
                loss, parts = method_loss(method, out.logits, batch, targets, counts=counts)
                # DDP averages gradients over processes: scale so that they sum instead.
                accelerator.backward(loss * (world * weight))
            step_loss += loss.detach() * (world * weight)
            mine_counts = loss_token_counts(mine)
            for kind in (0, 1):
                span_tokens[kind] += weight * mine_counts[kind]
            for key, value in parts.items():
                share = mine_counts[SPAN_PARTS[key]] if key in SPAN_PARTS else 1.0
                part_sums[key] = part_sums.get(key, 0.0) + value * weight * share
            tokens += sum(len(rows[i]["input_ids"]) for i in global_indices)
        accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if step % log_every == 0 or done == total_steps:
            last_loss = float(accelerator.reduce(step_loss, "mean"))
            record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                      **_global_parts(part_sums, (span_tokens[0], span_tokens[1]), accelerator),
                      "tokens_per_s": (tokens - resumed_tokens) / max(time.perf_counter() - started, 1e-9)}
            history.append(record)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if on_log and accelerator.is_main_process:
                on_log(step, record)
        if dev_rows and train.eval_every and done % train.eval_every == 0 and done < total_steps:
            dev_metrics = evaluate_dev(model, dev_rows, method, pad_id, accelerator.device, teacher)
            if on_log and accelerator.is_main_process:
                on_log(step, {f"dev_{k}": v for k, v in dev_metrics.items()})
        if ckpt is not None and train.checkpoint_every and done % train.checkpoint_every == 0 and done < total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, done, tokens, history,
                                fingerprint, autocast)
        if stop_after is not None and done >= stop_after and done < total_steps:
            break
    seconds = time.perf_counter() - started
    if dev_rows:
        dev_metrics = evaluate_dev(model, dev_rows, method, pad_id, accelerator.device, teacher)
        if on_log and accelerator.is_main_process:
            on_log(total_steps, {f"dev_{k}": v for k, v in dev_metrics.items()})
    accelerator.wait_for_everyone()
    # keep_fp32_wrapper=False: the trained model leaves without accelerate's autocast hook (plays in fp32)
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.eval()
    finished = stop_after is None or stop_after >= total_steps
    if ckpt is not None and finished and accelerator.is_main_process and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)  # the finished model supersedes it
    return TrainResult(steps=total_steps, tokens=tokens, seconds=seconds, final_loss=last_loss, history=history,
                       dev=dev_metrics, resumed_from=start_step, precision="bf16" if autocast == "bf16" else "fp32",
                       resumed_tokens=resumed_tokens)
