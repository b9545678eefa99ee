"""A ReAct agent over any Hugging Face causal LM, generating for many episodes at once.

Each context is prefilled on its own, reusing the KV cache of the longest prefix it shares with a
recently encoded context (:class:`PrefixStore`: within an episode the prompt and the unchanged history
are encoded once), then the rows are left-aligned into one batch cache; generation runs on it, one
token per forward for the whole batch, and each row stops at the newline that ends its ``Action:``
line (or at EOS / the token budget). :meth:`LMAgent.generate` runs one block per context in lockstep;
:meth:`LMAgent.stream` (what play uses) batches continuously: a row whose block ended takes its next
context at once and joins the running batch.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sad.react import ACTION, Episode


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    seconds: float  # wall time of the batch this row was generated in


def history_start(step_lengths: list[int], room: int, evict_to: float = 1.0) -> int:
    """Index of the oldest step an agent still sees after playing every step of ``step_lengths``
    (token counts) with ``room`` tokens for history after the prompt.

    The history grows by appending; when the next step no longer fits, the oldest steps go until the
    history fills at most ``evict_to`` of the room (1.0: only as many as needed, so a full context
    slides, and re-encodes, at every step; 0.5: down to half, so the next steps append to a context
    whose KV cache is reused). Always keeps the latest step. Computed from the episode's start, so play
    and the step-accuracy contexts of the same step agree (training windows keep as many steps as fit).
    """
    start, total = 0, 0
    for i, n in enumerate(step_lengths):
        total += n
        if total > room:
            limit = room * evict_to
            while start < i and total > limit:
                total -= step_lengths[start]
                start += 1
    return start


def fit_context(prompt_ids: list[int], step_ids: list[list[int]], budget: int, evict_to: float = 1.0) -> list[int]:
    """The prompt plus the latest steps that fit in ``budget`` tokens; history is never dropped wholesale.

    Older steps go first (``evict_to`` < 1 drops them in blocks, see :func:`history_start`). When even
    the latest step alone does not fit, it is kept cut from its end (its thought and action stay, the
    tail of its observation goes), so the agent still sees what it just did. Training windows keep
    history the same way (:func:`sad.segment.episode_windows`; packed, so a step's history there is close
    to this one, not always equal: see that module).
    A prompt longer than the budget is cut from the left (its end holds the task).
    """
    if len(prompt_ids) >= budget:
        return prompt_ids[-budget:]
    room = budget - len(prompt_ids)
    if evict_to < 1.0:
        step_ids = step_ids[history_start([len(ids) for ids in step_ids], room, evict_to):]
    kept: list[list[int]] = []
    for ids in reversed(step_ids):
        if len(ids) > room:
            if not kept:  # the latest step: keep its head rather than no history at all
                kept.append(ids[:room])
            break
        kept.append(ids)
        room -= len(ids)
    out = list(prompt_ids)
    for ids in reversed(kept):
        out.extend(ids)
    return out


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading positions where the 1-D token tensors ``a`` and ``b`` agree."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


@dataclass
class _Encoded:
    ids: torch.Tensor                            # [T] token ids
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [1, heads, T, head_dim]


class PrefixStore:
    """KV caches of the most recently encoded contexts (LRU, ``capacity`` entries).

    A new context reuses the longest prefix it shares with any entry: after a generation the store
    holds each context with its generated block (:meth:`LMAgent.generate`), and the episode's next
    context extends it (append-only while the history fits), so only the observation is encoded;
    when old steps are dropped only the part whose positions moved is.
    Entries are never modified (a reuse slices them; the forward pass concatenates new tensors).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[int, _Encoded] = OrderedDict()
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, ids: torch.Tensor) -> tuple[int | None, int]:
        """(key, length) of the entry sharing the longest prefix with ``ids`` ((None, 0) if none)."""
        best_key, best = None, 0
        for key, entry in self._entries.items():
            n = common_prefix_length(entry.ids, ids)
            if n > best:
                best_key, best = key, n
        return best_key, best

    def get(self, key: int) -> _Encoded:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, ids: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], replaces: int | None = None) -> int:
        """Store ``ids``' cache and return its key; ``replaces`` drops an entry it extends (the same
        episode's last context)."""
        if replaces is not None:
            self._entries.pop(replaces, None)
        key = self._next_key
        self._entries[key] = _Encoded(ids, layers)
        self._next_key += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return key


SLICED_SDPA = "sad_sliced_sdpa"


def _sliced_sdpa(module, query, key, value, attention_mask, kv_length: int | None = None, **kwargs):
    """transformers' SDPA attention over only the first ``kv_length`` key/value positions [B, heads, kv_length,
    head_dim]. A static KV cache is preallocated for the context and the whole generation budget; the tail not
    yet written is masked out, but plain SDPA would still read it at every decoded token (decoding is bound by
    those reads on CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kv_length is not None and key.shape[2] > kv_length:
        key, value = key[:, :, :kv_length], value[:, :, :kv_length]
        if attention_mask is not None:
            attention_mask = attention_mask[..., :kv_length]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_sliced_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLICED_SDPA, _sliced_sdpa)
    AttentionMaskInterface.register(SLICED_SDPA, sdpa_mask)


def _select_rows(cache, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` [R] of a static or growing KV cache, in place."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
        if hasattr(layer, "batch_size"):
            layer.batch_size = len(index)


def stream_in_rounds(generate: Callable[[list[list[int]]], list[Generation]], contexts: list[tuple[Any, list[int]]],
                     on_block: Callable[[Any, Generation], list[tuple[Any, list[int]]]]) -> None:
    """:meth:`LMAgent.stream`'s contract in lockstep rounds: ``generate`` one block per pending context, hand
    each to ``on_block`` in order, then generate what they returned, until nothing is pending."""
    pending = list(contexts)
    while pending:
        generations = generate([context for _, context in pending])
        pending = [following for (key, _), gen in zip(pending, generations) for following in on_block(key, gen)]


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(key/value heads, head dimension) of a causal LM's config: the shape of one row of its KV cache."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LMAgent:
    """Batched greedy/sampled generation of one ``Thought/Action`` block per context."""

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 static_cache: bool = True, row_prefill: bool = True, prefix_cache: int = 64,
                 compact_rows: bool = True, keep_blocks: bool = True, sliced_attention: bool = True):
        """``prefix_cache``: contexts whose KV caches are kept for reuse by later contexts sharing a prefix
        (0 = encode every context from scratch); about 35 MB each for SmolLM2-135M at 768 tokens.
        ``compact_rows``: rows whose block is finished leave the batch (once a quarter of it is idle), so
        a decode forward computes only the rows still generating. ``keep_blocks``: the prefix store also keeps
        each context with its generated block (decoded keys/values), so the next step encodes only its observation.
        ``sliced_attention``: with the static cache, each decoded token attends over the cache positions written
        so far only, not the preallocated tail (a model using transformers' ``sdpa`` attention)."""
        self.model = model.eval()
        self.sliced_attention = sliced_attention
        self.compact_rows = compact_rows
        self.keep_blocks = keep_blocks
        self.rows_dropped = 0      # finished rows removed from a decode batch early
        self.prefix_store = PrefixStore(prefix_cache) if prefix_cache > 0 else None
        self.prefill_computed = 0  # context tokens run through the model at prefill
        self.prefill_reused = 0    # context tokens whose keys/values came from the prefix store
        # A preallocated KV cache written in place: a growing cache re-copies every layer's keys and
        # values at each generated token (O(context) bytes per token, the decode loop's main cost on CPU).
        self.static_cache = static_cache
        self.row_prefill = row_prefill
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = next(model.parameters()).device
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        vocab = tokenizer.get_vocab()
        self._newline_ids = {i for tok, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([tok])}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        # transformers 5 renamed the KV-cache argument and output field (past_key_values -> cache).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, cache, **inputs):
        """One forward pass computing only the last position's logits: returns (cache, logits [B, V])."""
        out = self.model(**inputs, **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1)
        new_cache = getattr(out, "cache", None) if self._cache_arg == "cache" else out.past_key_values
        return new_cache, out.logits[:, -1, :]

    def _encode(self, ctx: list[int]):
        """KV cache of one context (a DynamicCache [1, heads, len(ctx), head_dim]), its last logits [V] and
        its key in the prefix store (None without one), reusing the longest prefix in the store (at least
        the last token is always encoded)."""
        from transformers import DynamicCache

        config = self.model.config
        ids = torch.tensor(ctx, dtype=torch.long)
        key, reuse = self.prefix_store.longest(ids) if self.prefix_store is not None else (None, 0)
        reuse = min(reuse, len(ctx) - 1)
        if reuse > 0:
            entry = self.prefix_store.get(key)
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :reuse], v[:, :, :reuse]) for k, v in entry.layers], config=config)
        else:
            cache = DynamicCache(config=config)
        cache, logits = self._forward(cache, input_ids=ids[None, reuse:].to(self.device))
        self.prefill_computed += len(ctx) - reuse
        self.prefill_reused += reuse
        stored = None
        if self.prefix_store is not None:
            extends = key is not None and reuse == len(self.prefix_store.get(key).ids)
            stored = self.prefix_store.put(ids, [(layer.keys, layer.values) for layer in cache.layers],
                                           replaces=key if extends else None)
        return cache, logits[0], stored

    def _store_generated(self, cache, row: int, ctx: list[int], generated: list[int], width: int,
                         replaces: int | None) -> None:
        """Keep batch row ``row`` of a decode cache (left-aligned to ``width``) in the prefix store: the
        context and the generated block but its last token (fed as padding once the row finished, so its
        keys/values were never computed). The episode's next context starts with this block, so only the
        observation after it is encoded then. ``replaces``: the context's own entry, which this extends."""
        keep = len(generated) - 1
        if self.prefix_store is None or keep <= 0:
            return
        start, end = width - len(ctx), width + keep
        layers = [(layer.keys[row:row + 1, :, start:end].clone(), layer.values[row:row + 1, :, start:end].clone())
                  for layer in cache.layers]
        self.prefix_store.put(torch.tensor(ctx + generated[:keep], dtype=torch.long), layers, replaces=replaces)

    def _prefill_rows(self, contexts: list[list[int]], width: int):
        """Prefill each context on its own (no padding, causal attention without a mask: the fast SDPA
        path) and copy its keys/values into one batch cache, left-aligned to ``width``: a preallocated
        static cache [B, heads, width + max_new_tokens, head_dim] or a growing one [B, heads, width, head_dim].

        Returns (cache, last-position logits [B, V], each context's key in the prefix store or None).
        """
        from transformers import DynamicCache, StaticCache

        config = self.model.config
        heads, head_dim = kv_heads_and_dim(config)
        dtype = next(self.model.parameters()).dtype
        if self.static_cache:
            cache = StaticCache(config=config, max_cache_len=width + self.max_new_tokens)
            cache.early_initialization(len(contexts), heads, head_dim, dtype, self.device)
            targets = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            shape = (len(contexts), heads, width, head_dim)
            targets = [(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
                       for _ in range(config.num_hidden_layers)]
        last_logits, keys_stored = [], []
        for row, ctx in enumerate(contexts):
            own, logits, stored = self._encode(ctx)
            keys_stored.append(stored)
            for (keys, values), source in zip(targets, own.layers):
                keys[row, :, width - len(ctx):width] = source.keys[0]
                values[row, :, width - len(ctx):width] = source.values[0]
            last_logits.append(logits)
        if self.static_cache:
            for layer in cache.layers:
                layer.cumulative_length.fill_(width)
        else:
            cache = DynamicCache(ddp_cache_data=targets, config=config)
        return cache, torch.stack(last_logits), keys_stored

    def _pick(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """logits [B, V] -> next token ids [B] (greedy at ``temperature`` 0)."""
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1).to(logits.device)

    @torch.inference_mode()
    def score_continuations(self, prefix: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-likelihood of each continuation after ``prefix``: sum over its tokens of log p(token | prefix,
        earlier tokens). The prefix is encoded once; the continuations run as one batch on copies of its
        KV cache ([C, heads, len(prefix), head_dim]), right-padded ([C, longest]). The prefix reuses the
        prefix store: after a generation, only the generated thought is new."""
        if not continuations:
            return []
        if not prefix or any(not c for c in continuations):
            raise ValueError("score_continuations needs a non-empty prefix and non-empty continuations")
        cache, last, _ = self._encode(prefix)
        first = torch.log_softmax(last.float(), dim=-1)  # [V]: the first continuation token
        n, width = len(continuations), max(len(c) for c in continuations)
        cache.batch_repeat_interleave(n)
        batch = torch.full((n, width), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((n, width), dtype=torch.bool, device=self.device)
        for i, c in enumerate(continuations):
            batch[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            valid[i, :len(c)] = True
        attention = torch.cat([torch.ones((n, len(prefix)), dtype=torch.long, device=self.device), valid.long()], dim=1)
        positions = torch.arange(len(prefix), len(prefix) + width, device=self.device).expand(n, width)
        logits = self.model(input_ids=batch, attention_mask=attention, position_ids=positions,
                            **{self._cache_arg: cache}, use_cache=True).logits.float()  # [C, width, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch[:, 1:, None]).squeeze(-1)  # [C, width-1]
        total = first[batch[:, 0]] + (logp * valid[:, 1:]).sum(-1)
        return total.tolist()

    @torch.inference_mode()
    def generate(self, contexts: list[list[int]], temperature: float | None = None) -> list[Generation]:
        """One generated block per context (lists of token ids), at the agent's temperature unless given."""
        temperature = self.temperature if temperature is None else temperature
        if not contexts:
            return []
        if not self._sliced_ready():
            return self._generate(contexts, temperature, sliced=False)
        with self._sliced_attention():
            return self._generate(contexts, temperature, sliced=True)

    def _sliced_ready(self) -> bool:
        """Whether decoding can attend over the written cache positions only (static cache, ``sdpa``)."""
        return self.static_cache and self.sliced_attention and \
            self.model.config._attn_implementation in ("sdpa", SLICED_SDPA)

    @contextmanager
    def _sliced_attention(self):
        """The model attends with :func:`_sliced_sdpa` inside the block only (a model in training keeps
        plain sdpa); a nested call (a redraw inside :meth:`stream`) leaves the outer call's setting."""
        _register_sliced_sdpa()
        config = self.model.config
        previous, config._attn_implementation = config._attn_implementation, SLICED_SDPA
        try:
            yield
        finally:
            config._attn_implementation = previous

    def _block_done(self, generated: list[int]) -> bool:
        """Whether a block ends with its latest token: EOS, the newline after its ``Action:`` line, or the budget."""
        token = generated[-1]
        if token == self.eos_id or len(generated) >= self.max_new_tokens:
            return True
        return token in self._newline_ids and ACTION in self.tokenizer.decode(generated)

    def _finished(self, ids: list[int], seconds: float) -> Generation:
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return Generation(self.tokenizer.decode(ids), len(ids), seconds)

    @torch.inference_mode()
    def stream(self, contexts: list[tuple[Any, list[int]]],
               on_block: Callable[[Any, Generation], list[tuple[Any, list[int]]]],
               temperature: float | None = None) -> None:
        """Continuous batching at the token level: one block per ``(key, context)``, up to ``len(contexts)``
        rows in one decode batch. When a row's block ends, ``on_block(key, generation)`` runs at once (the
        caller plays that step) and returns the contexts to generate for next (the episode's next step, a
        new episode's first, or none); they take the freed rows and join the running batch, so no row waits,
        padded, for the longest block of a round as in :meth:`generate`. ``generation.seconds`` is the row's
        own time in the batch, from joining it to its block's end.

        Greedy blocks equal :meth:`generate`'s on the same contexts (tested). A model without the sliced
        static cache (not ``sdpa``) runs rounds of :meth:`generate` instead: the same blocks, in lockstep.
        """
        temperature = self.temperature if temperature is None else temperature
        if not contexts:
            return
        if not self._sliced_ready():
            stream_in_rounds(lambda batch: self._generate(batch, temperature, sliced=False), contexts, on_block)
            return
        with self._sliced_attention():
            _StreamBatch(self, len(contexts)).run(contexts, on_block, temperature)

    def _generate(self, contexts: list[list[int]], temperature: float, sliced: bool) -> list[Generation]:
        start = time.perf_counter()
        batch, width = len(contexts), max(len(c) for c in contexts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            input_ids[i, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            attention[i, width - len(ctx):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        stored: list[int | None] | None = None  # each context's prefix-store key, when rows were prefilled one by one
        if (self.row_prefill and batch > 1) or self.static_cache:
            past, logits, stored = self._prefill_rows(contexts, width)
        else:  # one padded forward over every context, no prefix store
            past, logits = self._forward(None, input_ids=input_ids, attention_mask=attention, position_ids=positions)
            self.prefill_computed += sum(len(c) for c in contexts)
        keep_blocks = self.keep_blocks and stored is not None and self.prefix_store is not None
        next_pos = positions[:, -1:] + 1

        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        rows = list(range(batch))  # the context each batch row generates for; finished rows leave the batch
        for _ in range(self.max_new_tokens):
            token_list = self._pick(logits, temperature).tolist()
            for i, tok in zip(rows, token_list):
                if done[i]:
                    continue
                generated[i].append(tok)
                done[i] = self._block_done(generated[i])
            if all(done):
                break
            finished = sum(done[i] for i in rows)
            if self.compact_rows and finished * 4 >= len(rows):  # a quarter of the rows idle: drop them
                if keep_blocks:
                    for j, i in enumerate(rows):
                        if done[i]:
                            self._store_generated(past, j, contexts[i], generated[i], width, stored[i])
                keep = [j for j, i in enumerate(rows) if not done[i]]
                self.rows_dropped += len(rows) - len(keep)
                index = torch.tensor(keep, device=self.device)
                _select_rows(past, index)
                attention, next_pos = attention[index], next_pos[index]
                rows, token_list = [rows[j] for j in keep], [token_list[j] for j in keep]
            step_ids = torch.tensor([self.pad_id if done[i] else t for i, t in zip(rows, token_list)], device=self.device)
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=attention.dtype, device=self.device)], dim=1)
            past, logits = self._forward(past, input_ids=step_ids[:, None], attention_mask=attention, position_ids=next_pos,
                                         **({"kv_length": attention.shape[1]} if sliced else {}))
            next_pos = next_pos + 1
        if keep_blocks:
            for j, i in enumerate(rows):
                self._store_generated(past, j, contexts[i], generated[i], width, stored[i])
        seconds = time.perf_counter() - start
        return [self._finished(ids, seconds) for ids in generated]


@dataclass
class _StreamRow:
    """One row of a streaming decode batch: the context it generates for and where it lies in the cache."""
    key: Any
    context: list[int]
    start: int                  # cache column of the context's first token
    stored: int | None          # the context's key in the prefix store
    started: float              # perf_counter when the row joined the batch
    generated: list[int] = field(default_factory=list)


class _StreamBatch:
    """The decode batch of :meth:`LMAgent.stream`: a static KV cache [rows, heads, columns, head_dim] whose
    every row writes its next token at the shared column ``cur``. A row's context lies right before the
    column where it joined (``[start, start + len(context))``), so rows joining at different times share
    one forward; columns before a row's ``start`` are masked but still read by every decode forward (its
    cost grows with rows x ``cur``). The occupied span slides right as tokens are written: once every row
    starts at least ``SHIFT_AT`` columns in (or the columns run out), the cache is shifted left; a context
    longer than ``cur`` shifts it right; a cache whose columns run out with a row at column 0 grows.
    On the default's rollout tasks (2026-12-07, AMD EPYC, bf16, 24 episodes): ``SHIFT_AT`` 16 read 508
    columns per decode forward on average, against 603 when shifts kept ``cur`` at the longest context seen
    (lockstep :meth:`LMAgent.generate`: 523); each shift copies the cache once (39 shifts, 0.8 s of 128 s)."""

    SHIFT_AT = 16

    def __init__(self, agent: LMAgent, rows: int):
        self.agent = agent
        self.rows: list[_StreamRow | None] = [None] * rows
        self.cache = None
        self.attention: torch.Tensor | None = None  # [rows, columns] 1 where a row attends
        self.positions = torch.zeros(rows, dtype=torch.long, device=agent.device)  # next position id per row
        self.logits: torch.Tensor | None = None     # [rows, V] next-token logits per row
        self.cur = 0
        self.longest = 0

    def _allocate(self, columns: int) -> None:
        from transformers import StaticCache

        model, config = self.agent.model, self.agent.model.config
        heads, head_dim = kv_heads_and_dim(config)
        self.cache = StaticCache(config=config, max_cache_len=columns)
        self.cache.early_initialization(len(self.rows), heads, head_dim, next(model.parameters()).dtype, self.agent.device)
        self.attention = torch.zeros((len(self.rows), columns), dtype=torch.long, device=self.agent.device)

    @property
    def columns(self) -> int:
        return self.attention.shape[1]

    def _relayout(self, delta: int, columns: int) -> None:
        """Move every row's written columns ``[0, cur)`` by ``delta`` into a cache of ``columns`` columns."""
        keep = self.cur if delta >= 0 else self.cur + delta
        source = slice(0, keep) if delta >= 0 else slice(-delta, self.cur)
        target = slice(max(delta, 0), max(delta, 0) + keep)
        tensors = [(layer, name) for layer in self.cache.layers for name in ("keys", "values")]
        for layer, name in tensors:
            old = getattr(layer, name)
            new = old.new_zeros(old.shape[:2] + (columns,) + old.shape[3:])
            new[:, :, target] = old[:, :, source]
            setattr(layer, name, new)
        for layer in self.cache.layers:
            layer.max_cache_len = columns
        attention = self.attention.new_zeros((len(self.rows), columns))
        attention[:, target] = self.attention[:, source]
        self.attention = attention
        for row in self.rows:
            if row is not None:
                row.start += delta
        self.cur += delta

    def insert(self, slot: int, key: Any, context: list[int]) -> None:
        """Row ``slot`` takes ``context`` (prefilled on its own, reusing the prefix store) at column ``cur``."""
        n = len(context)
        self.longest = max(self.longest, n)
        if self.cache is None:
            self.cur = self.longest
            self._allocate(2 * (self.longest + self.agent.max_new_tokens))
        elif n > self.cur:
            self._relayout(n - self.cur, max(self.columns, n + 2 * self.agent.max_new_tokens))
        own, last, stored = self.agent._encode(context)
        start = self.cur - n
        for layer, source in zip(self.cache.layers, own.layers):
            layer.keys[slot, :, start:self.cur] = source.keys[0]
            layer.values[slot, :, start:self.cur] = source.values[0]
        self.attention[slot].zero_()
        self.attention[slot, start:self.cur] = 1
        self.positions[slot] = n
        if self.logits is None:
            self.logits = last.new_zeros((len(self.rows), last.shape[-1]))
        self.logits[slot] = last
        self.rows[slot] = _StreamRow(key, context, start, stored, time.perf_counter())

    def free_slot(self) -> int:
        """An idle row, or a new one appended to the batch."""
        for slot, row in enumerate(self.rows):
            if row is None:
                return slot
        self._select(torch.tensor(list(range(len(self.rows))) + [0], device=self.agent.device))
        self.rows.append(None)
        return len(self.rows) - 1

    def _select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` [R'] (repeats allowed) of every per-row tensor."""
        _select_rows(self.cache, index)
        self.attention, self.positions = self.attention[index], self.positions[index]
        self.logits = self.logits[index]

    def finish(self, slot: int) -> Generation:
        """End row ``slot``'s block: keep its context and block in the prefix store (all but the last
        token, whose keys were never computed: the next context starts with it), free the row."""
        row, agent = self.rows[slot], self.agent
        agent._store_generated(self.cache, slot, row.context, row.generated, row.start + len(row.context), row.stored)
        self.rows[slot] = None
        return agent._finished(row.generated, time.perf_counter() - row.started)

    def _make_room(self) -> None:
        """Before a forward: drop idle rows once a quarter of the batch is idle; shift the cache left when
        the columns run out or every row starts ``SHIFT_AT`` columns in; grow it when a shift frees nothing."""
        live = [slot for slot, row in enumerate(self.rows) if row is not None]
        if (len(self.rows) - len(live)) * 4 >= len(self.rows):
            self._select(torch.tensor(live, device=self.agent.device))
            self.agent.rows_dropped += len(self.rows) - len(live)
            self.rows = [self.rows[slot] for slot in live]
        shift = min(row.start for row in self.rows if row is not None)
        if shift >= self.SHIFT_AT or (self.cur >= self.columns and shift > 0):
            self._relayout(-shift, self.columns)
        if self.cur >= self.columns:
            self._relayout(0, 2 * self.columns)

    def run(self, contexts: list[tuple[Any, list[int]]], on_block: Callable[[Any, Generation], list[tuple[Any, list[int]]]],
            temperature: float) -> None:
        agent = self.agent
        self.longest = max(len(context) for _, context in contexts)
        for slot, (key, context) in enumerate(contexts):
            self.insert(slot, key, context)
        to_pick = list(range(len(contexts)))
        while True:
            while to_pick:  # rows whose next token comes from their current logits
                tokens = agent._pick(self.logits[torch.tensor(to_pick, device=agent.device)], temperature).tolist()
                ended = []
                for slot, token in zip(to_pick, tokens):
                    self.rows[slot].generated.append(token)
                    if agent._block_done(self.rows[slot].generated):
                        ended.append(slot)
                to_pick = []
                for slot in ended:
                    key = self.rows[slot].key
                    for following in on_block(key, self.finish(slot)):
                        new_slot = slot if self.rows[slot] is None else self.free_slot()
                        self.insert(new_slot, *following)
                        to_pick.append(new_slot)
            if all(row is None for row in self.rows):
                return
            self._make_room()
            step = torch.tensor([row.generated[-1] if row is not None else agent.pad_id for row in self.rows],
                                device=agent.device)
            self.attention[:, self.cur] = 1
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.cur)
            self.cache, logits = agent._forward(self.cache, input_ids=step[:, None], attention_mask=self.attention[:, :self.cur + 1],
                                                position_ids=self.positions[:, None], kv_length=self.cur + 1)
            self.logits = logits
            self.positions += 1
            self.cur += 1
            to_pick = [slot for slot, row in enumerate(self.rows) if row is not None]


def forced_items(tokenizer, episodes: list[Episode], budget: int, history_steps: int,
                 imitated_only: bool = False, evict_to: float = 1.0) -> list[dict[str, Any]]:
    """One item per step of ``episodes``: the context an agent sees at play time before that step
    (prompt + latest ``history_steps`` steps, fitted to ``budget`` tokens by :func:`sad.agent.fit_context`)
    and the step's thought and action. ``imitated_only`` skips injected mistakes as targets (they
    stay in later steps' context)."""
    from sad.react import step_pieces

    items = []
    for ep in episodes:
        prompt_ids = tokenizer.encode(ep.prompt, add_special_tokens=False)
        step_ids: list[list[int]] = []
        for i, step in enumerate(ep.steps):
            if step.imitate or not imitated_only:
                history = step_ids[-history_steps:] if history_steps else step_ids
                items.append({"env": ep.env, "episode_id": ep.episode_id, "task_id": ep.task_id, "step": i,
                              "thought": step.thought, "action": step.action,
                              "context": fit_context(prompt_ids, history, budget, evict_to)})
            step_ids.append(tokenizer.encode("".join(text for _, text in step_pieces(step)), add_special_tokens=False))
    return items
