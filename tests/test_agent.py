import dataclasses

import pytest
import torch

from sad.agent import LMAgent, PrefixStore, common_prefix_length, fit_context, history_start
from sad.environments import load_tasks
from sad.rollout import PlayStats, play_agent


def test_fit_context_keeps_prompt_and_latest_steps():
    prompt = [1, 2]
    steps = [[3, 3, 3], [4, 4], [5, 5, 5]]
    assert fit_context(prompt, steps, budget=100) == [1, 2, 3, 3, 3, 4, 4, 5, 5, 5]
    assert fit_context(prompt, steps, budget=7) == [1, 2, 4, 4, 5, 5, 5]
    assert fit_context([1, 2, 3, 4, 5], steps, budget=3) == [3, 4, 5]


def test_fit_context_never_drops_history_when_the_latest_step_is_long():
    prompt = [1, 2]
    steps = [[3, 3], [4, 4, 4, 4, 4, 4]]
    # the latest step alone is longer than the room: its head is kept, not nothing
    assert fit_context(prompt, steps, budget=4) == [1, 2, 4, 4]
    assert fit_context(prompt, [[5] * 50], budget=10) == [1, 2] + [5] * 8
    assert fit_context(prompt, [], budget=10) == [1, 2]


def test_block_eviction_drops_old_steps_down_to_a_share_of_the_room_then_appends():
    prompt = [1, 2]
    steps = [[3, 3, 3], [4, 4], [5, 5, 5], [6, 6]]
    # room 7: steps 0-1 fit (5 tokens); step 2 makes 8 > 7, so the oldest go until at most 3.5 remain
    assert history_start([3, 2, 3], 7, 0.5) == 2 and history_start([3, 2, 3, 2], 7, 0.5) == 2
    assert fit_context(prompt, steps[:3], budget=9, evict_to=0.5) == [1, 2, 5, 5, 5]
    assert fit_context(prompt, steps, budget=9, evict_to=0.5) == [1, 2, 5, 5, 5, 6, 6]  # appended: the cache is reused
    # evict_to 1.0 drops only what is needed, so every step moves the whole history
    assert fit_context(prompt, steps[:3], budget=9) == [1, 2, 4, 4, 5, 5, 5]
    assert fit_context(prompt, steps, budget=9) == [1, 2, 4, 4, 5, 5, 5, 6, 6]
    assert history_start([3, 2, 3, 2], 7, 1.0) == 1
    # the latest step is always kept (cut to its head when alone it is too long)
    assert history_start([3, 20], 7, 0.5) == 1
    assert fit_context(prompt, [[3, 3, 3], [7] * 20], budget=9, evict_to=0.5) == [1, 2] + [7] * 7


@pytest.fixture(scope="module")
def trained_model(tiny_model_factory, demos, tokenizer):
    """A tiny model briefly trained on the demos, so that it emits ReAct-shaped text."""
    from sad.config import TrainParams
    from sad.segment import segment_episodes
    from sad.training import IMITATION, train_lm

    seg = segment_episodes(demos, tokenizer, 512)
    model = tiny_model_factory(hidden=48, layers=2)
    train_lm(model, seg.windows, IMITATION, TrainParams(epochs=8, batch_size=4, lr=5e-3), tokenizer.pad_token_id, progress=False)
    return model


def test_batched_generation_matches_one_at_a_time(trained_model, tokenizer):
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=24)
    contexts = [tokenizer.encode("[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n"),
                tokenizer.encode("[alfworld] Your task is to: put a hot apple in countertop.\nThought: I need to find an apple.\n"
                                 "Action: go to fridge 1\nObservation: You arrive at fridge 1. The fridge 1 is closed.\n"),
                tokenizer.encode("[alfworld] x\n")]
    batched = [g.text for g in agent.generate(contexts)]
    single = [agent.generate([c])[0].text for c in contexts]
    assert batched == single
    # the growing-cache path with one padded prefill gives the same text as the static cache's row prefill
    growing = LMAgent(trained_model, tokenizer, max_new_tokens=24, static_cache=False, row_prefill=False)
    assert [g.text for g in growing.generate(contexts)] == batched
    # finished rows leaving the batch (both cache kinds) changes nothing for the rows still generating. The tiny
    # model rarely ends a block, so a token it often emits (" 1") serves as the stop token: rows stop at different steps
    long_blocks = contexts + [c + tokenizer.encode("Thought: I need a mug.\nAction: go to") for c in contexts]
    for static in (True, False):
        compact = LMAgent(trained_model, tokenizer, max_new_tokens=48, static_cache=static, row_prefill=static)
        full = LMAgent(trained_model, tokenizer, max_new_tokens=48, static_cache=static, row_prefill=static, compact_rows=False)
        compact.eos_id = full.eos_id = tokenizer.encode(" 1")[-1]
        compacted = compact.generate(long_blocks)
        assert [g.text for g in compacted] == [g.text for g in full.generate(long_blocks)]
        assert compact.rows_dropped > 0 and full.rows_dropped == 0
        assert len({g.n_tokens for g in compacted}) > 1


@pytest.mark.parametrize("shift_at,tight", [(64, False), (1, False), (64, True)])
def test_streamed_blocks_equal_lockstep_generation_while_rows_join_and_leave(trained_model, tokenizer, monkeypatch,
                                                                            shift_at, tight):
    """Continuous batching (:meth:`LMAgent.stream`): 3 rows for 6 first contexts and their follow-ups, rows
    joining the running batch as others end, with cache shifts left (every step at ``shift_at`` 1), a shift
    right for a context longer than any before, growth of the columns (``tight``: the cache starts one column
    wider than the longest context) and idle rows dropped. Every block equals what :meth:`LMAgent.generate`
    gives for the same context alone."""
    from sad.agent import _StreamBatch

    monkeypatch.setattr(_StreamBatch, "SHIFT_AT", shift_at)
    layouts = []
    relayout, allocate = _StreamBatch._relayout, _StreamBatch._allocate
    monkeypatch.setattr(_StreamBatch, "_relayout", lambda self, delta, columns: (layouts.append((delta, columns - self.columns)),
                                                                              relayout(self, delta, columns)))
    if tight:
        monkeypatch.setattr(_StreamBatch, "_allocate", lambda self, columns: allocate(self, self.longest + 1))
    texts = ["[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n",
             "[alfworld] Your task is to: put a hot apple in countertop.\nThought: I need an apple.\nAction: go to",
             "[webshop] Instruction: find a red shirt.\nThought: I search.\nAction: search[",
             "[alfworld] x\n",
             "[hotpotqa] Question: who wrote it?\nThought: I search.\nAction: search[",
             "[alfworld] Your task is to: put a mug in cabinet.\n" * 6]  # longer than any before: a shift right
    observation = tokenizer.encode("\nObservation: Nothing happens.\n")
    reference = LMAgent(trained_model, tokenizer, max_new_tokens=40, prefix_cache=0)
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=40)
    reference.eos_id = agent.eos_id = tokenizer.encode(".")[-1]  # the tiny model emits "1. 1." or "1 1 1 1.": blocks of 2-10 tokens
    queue = [(i, tokenizer.encode(t)) for i, t in enumerate(texts)]
    first, queue = queue[:3], queue[3:]
    streamed: dict[tuple[int, int], str] = {}
    expected: dict[tuple[int, int], str] = {}
    order = []

    def on_block(key, generation):
        index, step = key
        order.append(key)
        streamed[key] = generation.text
        expected[key] = reference.generate([contexts.pop(key)])[0].text
        following = []
        if step < 2:  # the same episode goes on: its context, the block and an observation
            following.append(((index, step + 1), contexts_seen[key] + tokenizer.encode(generation.text) + observation))
        elif queue:
            index, ctx = queue.pop(0)
            following.append(((index, 0), ctx))
        for k, ctx in following:
            contexts[k] = ctx
            contexts_seen[k] = ctx
        return following

    contexts = {(i, 0): ctx for i, ctx in first}
    contexts_seen = dict(contexts)
    agent.stream(list(contexts.items()), on_block)
    assert sorted(order) == sorted((i, step) for i in range(len(texts)) for step in range(3))
    assert order != sorted(order, key=lambda key: key[1])  # rows did not move in lockstep rounds
    assert streamed == expected
    assert agent.rows_dropped > 0  # the last episodes' rows left the batch
    assert agent.prefill_reused > 0  # each follow-up reused its episode's stored context and block
    assert any(delta > 0 for delta, _ in layouts)  # the longest context came after the batch started
    assert any(delta < 0 for delta, _ in layouts) or shift_at > 1
    assert any(grown > 0 for _, grown in layouts)  # contexts longer than the columns left: the cache grew
    if tight:  # one row from column 0 that outgrows the cache: nothing to shift left, so it grows in place
        single = tokenizer.encode(texts[0])
        reference.eos_id = agent.eos_id = reference.pad_id
        layouts.clear()
        blocks = []
        agent.stream([("alone", single)], lambda key, generation: blocks.append(generation.text) or [])
        assert blocks == [reference.generate([single])[0].text]
        assert layouts and all(delta == 0 and grown > 0 for delta, grown in layouts)


def test_generated_blocks_stay_in_the_prefix_store_as_a_prefill_would_encode_them(trained_model, tokenizer):
    """After a batch, each context extended by its generated block (but the block's last token, whose keys
    were never computed) is in the prefix store with the keys and values a prefill of those tokens gives,
    also for rows that left the batch early, so an episode's next step encodes only what follows the block."""
    contexts = [tokenizer.encode("[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n"),
                tokenizer.encode("[alfworld] Your task is to: put a hot apple in countertop.\nThought: I need an apple.\n"
                                 "Action: go to"),
                tokenizer.encode("[webshop] Instruction: find a red shirt.\nThought: I search.\nAction: search[")]
    fresh = LMAgent(trained_model, tokenizer, max_new_tokens=48, prefix_cache=0)
    observation = tokenizer.encode("\nObservation: Nothing happens.\n")
    for static in (True, False):
        agent = LMAgent(trained_model, tokenizer, max_new_tokens=48, static_cache=static, row_prefill=True)
        agent.eos_id = tokenizer.encode(" 1")[-1]  # a token the tiny model often emits: rows stop at different steps
        generations = agent.generate(contexts)
        assert agent.rows_dropped > 0 and len(agent.prefix_store) == len(contexts)  # the blocks replaced their contexts
        stored_blocks = []
        for ctx, gen in zip(contexts, generations):
            (entry,) = [e for e in agent.prefix_store._entries.values() if e.ids[:len(ctx)].tolist() == ctx]
            block = entry.ids[len(ctx):].tolist()
            # every generated token but the last (whose keys were never computed): a row that stopped on its first
            # token stores its context alone
            assert gen.n_tokens - 1 <= len(block) <= gen.n_tokens and gen.text.startswith(tokenizer.decode(block))
            stored_blocks.append(block)
            expected, _, _ = fresh._encode(entry.ids.tolist())
            for (keys, values), layer in zip(entry.layers, expected.layers):
                torch.testing.assert_close(keys, layer.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(values, layer.values, atol=1e-5, rtol=1e-4)
            before = agent.prefill_computed
            agent._encode(entry.ids.tolist() + observation)
            assert agent.prefill_computed - before == len(observation)
        assert any(stored_blocks)  # at least one block was generated and kept


def test_generation_stops_after_the_action_line(two_way_model, tokenizer):
    """The model learnt one block after the prompt; generation ends at the newline after its action, well
    inside the budget, with nothing of the next line generated."""
    model, prompt = two_way_model
    gen = LMAgent(model, tokenizer, max_new_tokens=64).generate([tokenizer.encode(prompt)])[0]
    assert gen.n_tokens < 64, gen.text
    assert "Action:" in gen.text, gen.text
    tail = gen.text[gen.text.index("Action:"):]
    assert tail in ("Action: go to cabinet 1\n", "Action: go to drawer 1\n"), gen.text


def test_sampling_is_seeded(two_way_model, tokenizer):
    """The same seed gives the same sample; other seeds reach the other block the model learnt."""
    from sad.react import parse_output

    model, prompt = two_way_model
    ctx = [tokenizer.encode(prompt)]

    def sample(seed: int) -> str:
        return LMAgent(model, tokenizer, 32, temperature=1.0, seed=seed).generate(ctx)[0].text

    assert sample(1) == sample(1)
    actions = {parse_output(sample(seed)).action for seed in range(8)}
    assert {"go to cabinet 1", "go to drawer 1"} <= actions, actions  # (T=1 also garbles a sample now and then)


def _capped(tasks, max_steps: int = 8):
    return [dataclasses.replace(t, meta={**t.meta, "max_steps": max_steps}) for t in tasks]


def test_play_agent_batches_give_the_same_episodes_as_one_at_a_time(trained_model, tokenizer, task_root):
    tasks = _capped(load_tasks(task_root, "alfworld", "test")[:4])
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=32)
    stats = PlayStats()
    batched = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=4, stats=stats)
    single = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=1)
    assert [e.task_id for e in batched] == [t.task_id for t in tasks]
    assert [[(s.thought, s.action) for s in e.steps] for e in batched] == [[(s.thought, s.action) for s in e.steps] for e in single]
    assert stats.generated_tokens > 0 and stats.blocks == sum(e.n_steps for e in batched)
    # every step's play-time context is prefilled once: its tokens are computed or reused from the prefix store
    from sad.agent import forced_items

    context_tokens = sum(len(item["context"]) for item in forced_items(tokenizer, batched, 512 - 32, 0))
    assert stats.prefill_computed + stats.prefill_reused == context_tokens
    assert stats.prefill_reused > 0 and stats.prefill_tokens_cut == context_tokens / stats.prefill_computed > 1
    fresh = PlayStats()
    play_agent(tasks, task_root, LMAgent(trained_model, tokenizer, max_new_tokens=32, prefix_cache=0), "m",
               max_tokens=512, batch_size=4, stats=fresh)
    assert fresh.prefill_reused == 0 and fresh.prefill_computed == context_tokens and fresh.prefill_tokens_cut == 1.0
    for e in batched:
        assert 1 <= e.n_steps <= 8
        assert all(s.observation for s in e.steps)


def test_play_stats_of_shards_add_up_and_survive_a_round_trip_through_a_dict():
    """Sharded players send PlayStats as a dict (``asdict``) and the orchestrator sums them (``add``)."""
    first = PlayStats(generation_seconds=2.0, generated_tokens=100, blocks=4, prefill_computed=50, prefill_reused=150,
                      scoring_prefill_computed=5, scoring_prefill_reused=40)
    second = PlayStats(**dataclasses.asdict(first))
    second.add(first)
    assert second == PlayStats(generation_seconds=4.0, generated_tokens=200, blocks=8, prefill_computed=100,
                               prefill_reused=300, scoring_prefill_computed=10, scoring_prefill_reused=80)
    assert second.prefill_tokens_cut == 4.0 and second.prefill_tokens_per_generated_token == 0.5
    assert PlayStats().prefill_tokens_cut is None and PlayStats().prefill_tokens_per_generated_token == 0.0


def test_takeover_play_streamed_gives_the_episodes_of_lockstep_rounds(trained_model, tokenizer, task_root, monkeypatch):
    """DAgger with expert takeover batches continuously (a row whose episode ended takes the next task inside the
    running decode batch) and labels exactly what lockstep rounds of ``generate`` would."""
    import sad.agent
    from sad.agent import stream_in_rounds
    from sad.rollout import play_takeover

    calls = {"joined": 0, "rounds": 0}
    insert, generate = sad.agent._StreamBatch.insert, LMAgent._generate
    monkeypatch.setattr(sad.agent._StreamBatch, "insert",
                        lambda self, *a: (calls.__setitem__("joined", calls["joined"] + 1), insert(self, *a))[1])
    monkeypatch.setattr(LMAgent, "_generate",
                        lambda self, *a, **k: (calls.__setitem__("rounds", calls["rounds"] + 1), generate(self, *a, **k))[1])
    tasks = _capped(load_tasks(task_root, "alfworld", "train")[:5])
    streamed = play_takeover(tasks, task_root, LMAgent(trained_model, tokenizer, max_new_tokens=32), 512, batch_size=2)
    blocks = sum(e.meta["takeover_step"] + 1 if "takeover_step" in e.meta else e.n_steps for e in streamed)
    assert calls == {"joined": blocks, "rounds": 0}  # every block joined the one stream, none ran in a round
    lockstep_agent = LMAgent(trained_model, tokenizer, max_new_tokens=32)
    lockstep_agent.stream = lambda contexts, on_block: stream_in_rounds(lockstep_agent.generate, contexts, on_block)
    lockstep = play_takeover(tasks, task_root, lockstep_agent, max_tokens=512, batch_size=2)
    assert calls["rounds"] >= 3  # 5 tasks, 2 rows: at least three rounds
    assert [e.to_dict() for e in streamed] == [e.to_dict() for e in lockstep]
    assert [e.task_id for e in streamed] == [t.task_id for t in tasks]
    assert all(e.steps for e in streamed)
    assert any("takeover_step" in e.meta for e in streamed)


def test_prefix_store_finds_the_longest_shared_prefix_and_evicts_the_oldest():
    t = lambda *ids: torch.tensor(ids)  # noqa: E731
    assert common_prefix_length(t(1, 2, 3), t(1, 2, 4, 5)) == 2
    assert common_prefix_length(t(1, 2), t(1, 2, 3)) == 2 and common_prefix_length(t(9), t(1)) == 0
    store = PrefixStore(capacity=2)
    store.put(t(1, 2, 3), [])
    store.put(t(1, 5), [])
    key, n = store.longest(t(1, 2, 3, 4))
    assert n == 3 and store.get(key).ids.tolist() == [1, 2, 3]
    store.put(t(1, 2, 3, 4), [], replaces=key)  # the episode's next context replaces its last one
    assert len(store) == 2 and store.longest(t(1, 2, 3, 4, 5))[1] == 4
    store.put(t(7, 7), [])  # over capacity: the least recently used entry ([1, 5]) goes
    assert len(store) == 2 and store.longest(t(1, 5))[1] == 1


@pytest.mark.parametrize("env", ["alfworld", "hotpotqa", "webshop"])
def test_prefix_reuse_generates_exactly_what_full_prefill_does(trained_model, tokenizer, task_root, env):
    """Greedy episodes are identical with and without the prefix store, also when old steps are dropped
    (a 256-token budget, one step at a time or in blocks), while far fewer context tokens are encoded."""
    tasks = _capped(load_tasks(task_root, env, "test")[:3], max_steps=6)
    for budget, evict_to in ((512, 1.0), (256, 1.0), (256, 0.5)):
        reuse = LMAgent(trained_model, tokenizer, max_new_tokens=32)
        fresh = LMAgent(trained_model, tokenizer, max_new_tokens=32, prefix_cache=0)
        a = play_agent(tasks, task_root, reuse, "m", max_tokens=budget, batch_size=3, evict_to=evict_to)
        b = play_agent(tasks, task_root, fresh, "m", max_tokens=budget, batch_size=3, evict_to=evict_to)
        assert [[(s.thought, s.action) for s in e.steps] for e in a] == [[(s.thought, s.action) for s in e.steps] for e in b]
        assert fresh.prefill_reused == 0 and reuse.prefill_reused > 0
        assert reuse.prefill_computed + reuse.prefill_reused == fresh.prefill_computed
        assert reuse.prefill_computed < fresh.prefill_computed / 2


def test_model_output_without_action_is_a_counted_invalid_step(tiny_model_factory, tokenizer, task_root):
    """An untrained model babbles; the loop must count invalid steps, never crash."""
    tasks = _capped(load_tasks(task_root, "alfworld", "dev")[:2])
    model = tiny_model_factory()
    agent = LMAgent(model, tokenizer, max_new_tokens=8)
    episodes = play_agent(tasks, task_root, agent, "untrained", max_tokens=256, batch_size=2)
    steps = [s for e in episodes for s in e.steps]
    assert steps and not any(e.success for e in episodes)
    assert sum(not s.valid for s in steps) >= 1
    assert torch.is_grad_enabled()  # inference mode did not leak


def test_admissible_scoring_equals_the_likelihood_of_a_full_forward_pass(trained_model, tokenizer):
    """One shared prefill + batched continuations gives each candidate's log-likelihood exactly."""
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=16)
    prefix = tokenizer.encode("[alfworld] Your task is to: put a mug in cabinet.\nThought: I need a mug.\n")
    candidates = [tokenizer.encode(f"Action: {a}\n") for a in ("go to cabinet 1", "look", "take mug 1 from desk 2")]
    scored = agent.score_continuations(prefix, candidates)
    for cand, score in zip(candidates, scored):
        ids = torch.tensor([prefix + cand])
        with torch.no_grad():
            logp = torch.log_softmax(trained_model(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(float(logp[len(prefix) + j - 1, tok]) for j, tok in enumerate(cand))
        assert score == pytest.approx(expected, abs=1e-4)
    assert len({round(s, 4) for s in scored}) == 3  # the candidates are told apart


def test_admissible_and_repair_choices_send_only_valid_actions(trained_model, tokenizer, task_root):
    tasks = _capped(load_tasks(task_root, "alfworld", "test")[:2], max_steps=4)
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=24)
    episodes = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=2, action_choice="admissible")
    steps = [s for e in episodes for s in e.steps]
    assert steps and all(s.valid for s in steps)  # every action was one of the engine's admissible commands
    free = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=2)
    stats = PlayStats()
    repaired = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=2, action_choice="repair",
                          stats=stats)
    assert sum(e.meta["repaired_steps"] for e in repaired) > 0  # the untrained model's actions do get repaired
    # scoring's prefill is counted apart: the generation counters still hold exactly the steps' play-time contexts
    from sad.agent import forced_items

    context_tokens = sum(len(item["context"]) for item in forced_items(tokenizer, repaired, 512 - 24, 0))
    assert stats.prefill_computed + stats.prefill_reused == context_tokens
    assert stats.scoring_prefill_reused > 0 and stats.scored_steps == sum(e.meta["repaired_steps"] for e in repaired)
    for f_ep, r_ep in zip(free, repaired):
        assert all(s.valid for s in r_ep.steps)  # a rejected action was swapped for a listed one
        # and counted: one per step whose rejected action was replaced
        assert r_ep.meta["repaired_steps"] == sum(s.repaired_from is not None for s in r_ep.steps)
        for f_step, r_step in zip(f_ep.steps, r_ep.steps):  # the same thoughts until the first repair
            assert r_step.thought == f_step.thought
            if not f_step.valid:
                break
            assert r_step.action == f_step.action  # a listed action is sent as generated
    assert any(not s.valid for e in free for s in e.steps)  # there was something to repair
    with pytest.raises(ValueError, match="action_choice"):
        play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=2, action_choice="best")


def test_step_accuracy_by_hand(trained_model, tokenizer, demos):
    """Step accuracy equals, step by step, generating from the play-time context built by hand."""
    from sad.evaluation import action_kind, step_accuracy
    from sad.metrics import normalize_action
    from sad.react import parse_output, step_pieces

    episodes = demos[:2]
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=32)
    result = step_accuracy(agent, episodes, max_tokens=512, history_steps=2, batch_size=8)
    expected, kinds = [], {}
    for ep in episodes:
        for i, step in enumerate(ep.steps):
            history = [tokenizer.encode("".join(t for _, t in step_pieces(s))) for s in ep.steps[:i]][-2:]
            context = fit_context(tokenizer.encode(ep.prompt), history, 512 - 32)
            parsed = parse_output(agent.generate([context])[0].text)
            ok = parsed.has_action and normalize_action(parsed.action) == normalize_action(step.action)
            expected.append(ok)
            kinds.setdefault(action_kind(step.action), []).append(ok)
    assert result["steps"] == len(expected) == sum(e.n_steps for e in episodes)
    assert result["step_accuracy"] == pytest.approx(sum(expected) / len(expected))
    by_kind = result["envs"]["alfworld"]["by_kind"]
    assert set(by_kind) == set(kinds)
    for kind, oks in kinds.items():
        assert by_kind[kind]["step_accuracy"] == pytest.approx(sum(oks) / len(oks))
    assert action_kind("go to desk 1") == "go" and action_kind("search[Raul Elquin]") == "search"


@pytest.fixture(scope="module")
def two_way_model(tiny_model_factory, tokenizer):
    """A tiny model that learnt one context followed by either of two blocks (``go to cabinet 1`` or
    ``go to drawer 1``): greedy gives one of them, sampling sometimes the other."""
    from sad.config import TrainParams
    from sad.react import Episode, Step
    from sad.segment import segment_episodes
    from sad.training import IMITATION, train_lm

    prompt = "[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n"
    episodes = [Episode(episode_id=f"e{i}", env="alfworld", split="train", task_id=f"t{i}", task_type="x", agent="expert",
                        prompt=prompt, steps=[Step(thought=f"I will check {place}.", action=f"go to {place}",
                                                   observation="Nothing happens.")])
                for i, place in enumerate(["cabinet 1", "drawer 1"] * 4)]
    model = tiny_model_factory(hidden=48, layers=2)
    train_lm(model, segment_episodes(episodes, tokenizer, 512).windows, IMITATION,
             TrainParams(epochs=200, batch_size=8, lr=3e-3), tokenizer.pad_token_id, progress=False)
    return model.eval(), prompt


def test_the_loop_guard_redraws_a_block_that_would_repeat_a_failure(two_way_model, tokenizer):
    """A greedy agent whose action just failed would send it again from the same context: the guard samples
    that row again until the action differs (or its draws run out); other rows stay as generated."""
    from sad.react import Step, parse_output
    from sad.rollout import needs_redraw, redraw_failures

    model, prompt = two_way_model
    agent = LMAgent(model, tokenizer, max_new_tokens=32, seed=0)
    contexts = [tokenizer.encode(prompt)] * 2
    greedy = agent.generate(contexts)
    action = parse_output(greedy[0].text).action
    assert action in ("go to cabinet 1", "go to drawer 1"), greedy[0].text
    failed = [Step(thought="", action=action, observation="Nothing happens.")]
    succeeded = [Step(thought="", action=action, observation="You arrive at cabinet 1.")]
    assert needs_redraw(failed, parse_output(greedy[0].text)) and not needs_redraw(succeeded, parse_output(greedy[1].text))

    final, draws = redraw_failures(agent, contexts, [failed, succeeded], greedy, draws=4, temperature=1.0)
    assert final[1] is greedy[1] and draws[1] == 0  # nothing failed: untouched
    redrawn = parse_output(final[0].text)
    assert 1 <= draws[0] <= 4 and not needs_redraw(failed, redrawn) and redrawn.action.lower() != action.lower()
    assert final[0].n_tokens > greedy[0].n_tokens  # the step's cost counts every draw
    # the same seed reproduces the same redraws
    again = LMAgent(model, tokenizer, max_new_tokens=32, seed=0)
    assert [g.text for g in redraw_failures(again, contexts, [failed, succeeded], greedy, 4, 1.0)[0]] == [g.text for g in final]


def test_play_agent_with_the_loop_guard_counts_redrawn_steps(trained_model, tokenizer, task_root):
    from sad.metrics import summarize

    tasks = _capped(load_tasks(task_root, "alfworld", "test")[:3], max_steps=6)
    agent = LMAgent(trained_model, tokenizer, max_new_tokens=32)
    stats = PlayStats()
    episodes = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=3, redraws=2, stats=stats)
    assert all("redrawn_steps" in e.meta and 0 <= e.meta["redrawn_steps"] <= e.n_steps for e in episodes)
    assert sum(e.meta["redrawn_steps"] for e in episodes) > 0  # the guard fired (the untrained model repeats failures)
    summary = summarize(episodes, tokenizer)
    assert summary["redrawn_step_rate"] == sum(e.meta["redrawn_steps"] for e in episodes) / sum(e.n_steps for e in episodes)
    assert stats.generated_tokens == sum(s.generated_tokens for e in episodes for s in e.steps)
    # off (the default): no count, no rate
    plain = play_agent(tasks, task_root, agent, "m", max_tokens=512, batch_size=3)
    assert not any("redrawn_steps" in e.meta for e in plain) and "redrawn_step_rate" not in summarize(plain, tokenizer)


@pytest.mark.parametrize("precision,native,expected", [
    ("fp32", True, torch.float32), ("bf16", True, torch.bfloat16), ("bf16", False, torch.float32),
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32)])
def test_agents_play_in_bf16_only_where_it_runs_natively(precision, native, expected, caplog):
    from sad.modeling import play_dtype

    assert play_dtype(precision, bf16_ok=native) == expected
    asked_in_vain = precision == "bf16" and not native
    assert ("runs in fp32" in caplog.text) == asked_in_vain


def test_play_needs_bf16_instructions_and_compute_bound_work_also_faster_bf16_matmuls(monkeypatch):
    """Decoding is bound by memory reads, so bf16 instructions suffice for play (a Xeon whose bf16 matmuls run at
    0.6x fp32 played as fast in bf16); the top-k cache's forward is bound by matmuls and needs them faster."""
    import sad.modeling as modeling

    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(modeling, "cpu_bf16_is_fast", lambda: False)
    assert modeling.play_dtype("auto") == torch.bfloat16
    assert modeling.play_dtype("auto", compute_bound=True) == torch.float32
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: False)
    assert modeling.play_dtype("bf16") == torch.float32


def test_a_bf16_agent_loads_bf16_weights_decodes_into_a_bf16_cache_and_plays(trained_model, tokenizer, task_root,
                                                                            tmp_path, monkeypatch):
    """agent.precision bf16 (bf16 instructions assumed: a tiny model is fast even where they are emulated):
    the weights and the KV cache are bfloat16, episodes play through, and the evaluation metrics say so."""
    from sad.config import parse_params
    from sad.evaluation import evaluate_agent, load_agent
    from sad.modeling import save_model

    monkeypatch.setattr("sad.modeling.cpu_has_native_bf16", lambda: True)
    save_model(trained_model, tokenizer, tmp_path / "agent")
    p = parse_params({"tasks": {"envs": ["alfworld"], "alfworld": {"max_steps": 3}}, "agent": {"precision": "bf16"},
                      "context": {"max_tokens": 512, "max_new_tokens": 24}})
    agent = load_agent(tmp_path / "agent", p)
    assert {q.dtype for q in agent.model.parameters()} == {torch.bfloat16}
    context = tokenizer.encode("[alfworld] Your task is to: put a mug in cabinet.\n")
    cache, _, _ = agent._prefill_rows([context], width=len(context))
    assert cache.layers[0].keys.dtype == torch.bfloat16
    metrics, episodes = evaluate_agent(tmp_path / "agent", "bf16-agent", p, task_root, progress=False, agent=agent)
    assert metrics["dtype"] == "bfloat16"
    assert episodes["dev"] and all(ep.n_steps >= 1 for split in ("dev", "test") for ep in episodes[split])


def test_evaluation_plays_every_split_in_one_queue_and_files_each_episode_under_its_split(trained_model, tokenizer,
                                                                                           task_root, tmp_path):
    """Dev and test share one play queue (one call of the player, dev first), and each split's metrics and
    episodes hold exactly its own tasks, in task order."""
    from sad.config import parse_params
    from sad.evaluation import evaluate_agent, load_agent, play_model
    from sad.modeling import save_model

    save_model(trained_model, tokenizer, tmp_path / "agent")
    p = parse_params({"tasks": {"envs": ["alfworld"], "alfworld": {"max_steps": 2}},
                      "context": {"max_tokens": 512, "max_new_tokens": 16}})
    agent = load_agent(tmp_path / "agent", p)
    calls: list[list[str]] = []

    def player(tasks, name):
        calls.append([t.task_id for t in tasks])
        return play_model(tmp_path / "agent", p, task_root, tasks, name, batch_size=8, agent=agent)

    metrics, episodes = evaluate_agent(tmp_path / "agent", "one-queue", p, task_root, progress=False, agent=agent,
                                       player=player)
    expected = {split: [t.task_id for t in load_tasks(task_root, "alfworld", split)] for split in ("dev", "test")}
    assert calls == [expected["dev"] + expected["test"]]
    for split in ("dev", "test"):
        assert [e.task_id for e in episodes[split]] == expected[split]
        assert {e.split for e in episodes[split]} == {split}
        assert len(metrics["splits"][split]["per_task"]["alfworld"]) == len(expected[split])
        assert metrics["splits"][split]["overall"]["prefill_tokens_cut"] > 1  # the whole queue's, as tokens/s

    def losing_player(tasks, name):  # a player that drops an episode must not shift one split's tasks into another
        played, stats = player(tasks, name)
        return played[1:], stats

    with pytest.raises(RuntimeError, match="one-queue: the player returned"):
        evaluate_agent(tmp_path / "agent", "one-queue", p, task_root, progress=False, agent=agent, player=losing_player)


def test_sliced_attention_reads_only_the_written_cache_and_generates_the_same_tokens(trained_model, tokenizer,
                                                                                     monkeypatch):
    """Decoding into the preallocated static cache attends over the positions written so far only, with
    exactly the tokens of attention over the whole (masked) cache; the model keeps plain sdpa afterwards."""
    import sad.agent as agent_module

    contexts = [tokenizer.encode("[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n"),
                tokenizer.encode("[alfworld] Your task is to: heat some egg.\nThought: I need an egg.\nAction: go to fridge 1\n"
                                 "Observation: The fridge 1 is closed.\n")]
    plain = LMAgent(trained_model, tokenizer, max_new_tokens=24, sliced_attention=False).generate(contexts)
    seen: list[tuple[int, int]] = []
    real = agent_module._sliced_sdpa

    def spy(module, query, key, value, attention_mask, kv_length=None, **kwargs):
        if kv_length is not None:
            seen.append((kv_length, key.shape[2]))
        return real(module, query, key, value, attention_mask, kv_length=kv_length, **kwargs)

    monkeypatch.setattr(agent_module, "_sliced_sdpa", spy)
    sliced = LMAgent(trained_model, tokenizer, max_new_tokens=24).generate(contexts)
    assert [g.text for g in sliced] == [g.text for g in plain]
    width = max(len(c) for c in contexts)
    assert seen and all(width < n <= full == width + 24 for n, full in seen) and seen[0][0] == width + 1
    assert trained_model.config._attn_implementation == "sdpa"


def test_play_contexts_carry_no_special_tokens_a_tokenizer_would_add(tokenizer, demos):
    """A tokenizer that adds BOS on encode (as Llama's do) must not put one before the prompt and every step at
    play: training windows (sad.segment) have none, so play contexts equal the windows' tokens."""
    from sad.agent import forced_items

    class AddsBos:
        def __init__(self, inner):
            self.inner = inner

        def encode(self, text, add_special_tokens=True):
            ids = self.inner.encode(text, add_special_tokens=False)
            return ([self.inner.eos_token_id] if add_special_tokens else []) + ids

    plain = forced_items(tokenizer, demos[:2], 4096, 0)
    bos = forced_items(AddsBos(tokenizer), demos[:2], 4096, 0)
    assert [i["context"] for i in bos] == [i["context"] for i in plain]
