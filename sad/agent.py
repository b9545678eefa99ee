"""A ReAct agent over any Hugging Face causal LM, generating for many episodes at once.

Contexts are left-padded into one batch; generation runs on the KV cache, one token per
forward for the whole batch, and each row stops at the newline that ends its ``Action:`` line
(or at EOS / the token budget).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from sad.react import ACTION


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    seconds: float  # wall time of the batch this row was generated in


def fit_context(prompt_ids: list[int], step_ids: list[list[int]], budget: int) -> list[int]:
    """The prompt plus the latest steps that fit in ``budget`` tokens; history is never dropped wholesale.

    Older steps go first. When even the latest step alone does not fit, it is kept cut from its end
    (its thought and action stay, the tail of its observation goes), so the agent still sees what it
    just did. Training windows are cut the same way (:func:`sad.segment.episode_windows`).
    A prompt longer than the budget is cut from the left (its end holds the task).
    """
    if len(prompt_ids) >= budget:
        return prompt_ids[-budget:]
    room = budget - len(prompt_ids)
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


class LMAgent:
    """Batched greedy/sampled generation of one ``Thought/Action`` block per context."""

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 static_cache: bool = True, row_prefill: bool = True):
        self.model = model.eval()
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

    def _prefill_rows(self, contexts: list[list[int]], width: int):
        """Prefill each context on its own (no padding, causal attention without a mask: the fast SDPA
        path) and copy its keys/values into one batch cache, left-aligned to ``width``: a preallocated
        static cache [B, heads, width + max_new_tokens, head_dim] or a growing one [B, heads, width, head_dim].

        Returns (cache, last-position logits [B, V]).
        """
        from transformers import DynamicCache, StaticCache

        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        if self.static_cache:
            cache = StaticCache(config=config, max_cache_len=width + self.max_new_tokens)
            cache.early_initialization(len(contexts), heads, head_dim, dtype, self.device)
            targets = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            shape = (len(contexts), heads, width, head_dim)
            targets = [(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
                       for _ in range(config.num_hidden_layers)]
        last_logits = []
        for row, ctx in enumerate(contexts):
            ids = torch.tensor([ctx], dtype=torch.long, device=self.device)
            own, logits = self._forward(DynamicCache(config=config), input_ids=ids)
            for (keys, values), source in zip(targets, own.layers):
                keys[row, :, width - len(ctx):width] = source.keys[0]
                values[row, :, width - len(ctx):width] = source.values[0]
            last_logits.append(logits[0])
        if self.static_cache:
            for layer in cache.layers:
                layer.cumulative_length.fill_(width)
        else:
            cache = DynamicCache(ddp_cache_data=targets, config=config)
        return cache, torch.stack(last_logits)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> next token ids [B]."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1).to(logits.device)

    @torch.inference_mode()
    def score_continuations(self, prefix: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-likelihood of each continuation after ``prefix``: sum over its tokens of log p(token | prefix,
        earlier tokens). The prefix is encoded once; the continuations run as one batch on copies of its
        KV cache ([C, heads, len(prefix), head_dim]), right-padded ([C, longest])."""
        from transformers import DynamicCache

        if not continuations:
            return []
        if not prefix or any(not c for c in continuations):
            raise ValueError("score_continuations needs a non-empty prefix and non-empty continuations")
        config = self.model.config
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        cache, last = self._forward(DynamicCache(config=config), input_ids=ids)
        first = torch.log_softmax(last[0].float(), dim=-1)  # [V]: the first continuation token
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
    def generate(self, contexts: list[list[int]]) -> list[Generation]:
        """One generated block per context (lists of token ids)."""
        if not contexts:
            return []
        start = time.perf_counter()
        batch, width = len(contexts), max(len(c) for c in contexts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            input_ids[i, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            attention[i, width - len(ctx):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        if self.row_prefill and batch > 1:
            past, logits = self._prefill_rows(contexts, width)
        elif self.static_cache:
            past, logits = self._prefill_rows(contexts, width)
        else:
            past, logits = self._forward(None, input_ids=input_ids, attention_mask=attention, position_ids=positions)
        next_pos = positions[:, -1:] + 1

        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for _ in range(self.max_new_tokens):
            tokens = self._pick(logits)
            token_list = tokens.tolist()
            for i, tok in enumerate(token_list):
                if done[i]:
                    continue
                generated[i].append(tok)
                if tok == self.eos_id:
                    done[i] = True
                elif tok in self._newline_ids and ACTION in self.tokenizer.decode(generated[i]):
                    done[i] = True
            if all(done):
                break
            step_ids = torch.tensor([self.pad_id if d else t for d, t in zip(done, token_list)], device=self.device)
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=self.device)], dim=1)
            past, logits = self._forward(past, input_ids=step_ids[:, None], attention_mask=attention, position_ids=next_pos)
            next_pos = next_pos + 1
        seconds = time.perf_counter() - start
        results = []
        for ids in generated:
            if ids and ids[-1] == self.eos_id:
                ids = ids[:-1]
            results.append(Generation(self.tokenizer.decode(ids), len(ids), seconds))
        return results
