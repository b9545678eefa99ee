"""HotPotQA-ReAct: the offline Wikipedia environment, its metric, the expert, both task sources."""

import json

import pytest

from sad.config import parse_params
from sad.environments import BENCHMARKS, load_tasks, write_tasks
from sad.envs import hotpotqa as h
from sad.rollout import play_expert


def _write(tmp_path, records, split="test"):
    return h.write_split(records, tmp_path / "hotpotqa", split)


def test_answer_normalisation_and_scores_follow_hotpotqa():
    assert h.normalize_answer("The  Beatles!") == "beatles"
    assert h.exact_match("the Beatles", "Beatles") == 1.0
    assert h.exact_match("Beatles band", "Beatles") == 0.0
    assert h.f1_score("Beatles band", "The Beatles") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert h.f1_score("yes", "no") == 0.0 and h.f1_score("no", "no") == 1.0
    assert h.f1_score("yes it is", "yes") == 0.0  # yes/no/noanswer must match exactly


def test_expert_transcript_for_a_fixed_seed(tmp_path):
    """Hand-checked: a two-hop question answered through a fact past the first five sentences."""
    tasks = _write(tmp_path, h.generate_questions(7, 10, distractors=3))
    episode = play_expert(tasks[1:2], tmp_path)[0]
    assert episode.prompt == "[hotpotqa] Question: In which city was the author of The Garden of Telven born?\n"
    assert [s.action for s in episode.steps] == [
        "search[The Garden of Telven]", "search[Junra Lunka]", "lookup[born]", "finish[Fenosport]"]  # "born": a word of the question
    assert episode.steps[0].observation.startswith("The Garden of Telven is a 1967 novel by Junra Lunka.")
    assert episode.steps[0].observation.count(".") == 5  # the page's first five sentences
    assert episode.steps[1].thought == ("The Garden of Telven is a 1967 novel by Junra Lunka. "
                                        "Next I need to search Junra Lunka.")
    assert episode.steps[2].observation == "(Result 1 / 1) She was born in Fenosport, where she grew up."
    assert episode.steps[3].observation == "Episode finished, reward = 1"
    assert episode.success and episode.reward == 1.0 and episode.meta["f1"] == 1.0


def test_search_lookup_and_invalid_actions_follow_the_react_wikienv(tmp_path):
    tasks = _write(tmp_path, h.generate_questions(7, 10, distractors=3))
    env = h.HotpotEnv()
    env.reset(tasks[0], tmp_path)
    miss = env.step("search[Garden of]")
    assert miss.text.startswith("Could not find Garden of. Similar: ['The Garden of")
    assert env.step("lookup[anything]").text == "No more results."  # no page open
    env.step("search[Junra Lunka]")
    first = env.step("lookup[she]")
    assert first.text.startswith("(Result 1 / ")
    assert env.step("lookup[she]").text.startswith("(Result 2 / ")
    bad = env.step("jump[now]")
    assert bad.text == "Invalid action: jump[now]" and bad.valid is False
    assert env.steps == 6
    last = env.step("search[Junra Lunka]")  # the 7th step ends the episode unanswered
    assert last.done and not last.success and last.reward == 0.0


def test_think_is_a_valid_step_that_changes_nothing_as_in_the_react_wikienv(tmp_path):
    """A transcript: ``think[...]`` answers "Nice thought." (wikienv.py), counts a step, keeps the page open."""
    tasks = _write(tmp_path, h.generate_questions(7, 10, distractors=3))
    env = h.HotpotEnv()
    env.reset(tasks[0], tmp_path)
    page = env.step("search[Junra Lunka]")
    thought = env.step("think[Junra Lunka's page should say where she was born.]")
    assert (thought.text, thought.valid, thought.done, env.steps) == ("Nice thought.", True, False, 2)
    assert env.step("lookup[she]").text.startswith("(Result 1 / ")  # the searched page is still open
    assert not page.text.startswith("Could not find")
    assert env.step("Think[]").text == "Nice thought."  # any case, empty thought, as ReAct parses it


def test_wrong_answer_scores_zero_em_with_partial_f1(tmp_path):
    tasks = _write(tmp_path, h.generate_questions(7, 10, distractors=3))
    env = h.HotpotEnv()
    env.reset(tasks[3], tmp_path)  # a comparison question whose answer is a title
    answer = h.load_questions(tmp_path / "hotpotqa" / tasks[3].path)[3]["answer"]
    obs = env.step(f"finish[{answer.split()[-1]}]")
    assert obs.done and not obs.success and obs.reward == 0.0 and 0.0 < obs.info["f1"] < 1.0


def test_generated_questions_use_the_official_json_format():
    records = h.generate_questions(0, 20)
    assert {r["type"] for r in records} == {"bridge", "comparison"}
    for r in records:
        titles = [t for t, _ in r["context"]]
        assert len(titles) == 2 + 8 or (r["type"] == "comparison" and len(titles) == 10)
        for title, idx in r["supporting_facts"]:
            assert title in titles and isinstance(idx, int)
    assert len({r["_id"] for r in records}) == 20


def test_official_file_goes_through_the_same_code_path(tmp_path):
    """A small file in HotPotQA's published format (distractor setting), written by hand."""
    official = [
        {"_id": "5a8b57f25542995d1e6f1371", "answer": "yes", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
         "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]], "type": "comparison", "level": "hard",
         "context": [["Ed Wood", ["Edward Davis Wood Jr. (October 10, 1924 – December 10, 1978) was an American filmmaker, actor, writer, producer, and director."]],
                     ["Scott Derrickson", ["Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer.", " He lives in Los Angeles, California."]],
                     ["Doctor Strange (2016 film)", ["Doctor Strange is a 2016 American superhero film.", " It was directed by Scott Derrickson."]]]},
        {"_id": "5a8c7595554299585d9e36b6", "answer": "Chief of Protocol", "question": "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and Tell?",
         "supporting_facts": [["Kiss and Tell (1945 film)", 0], ["Shirley Temple", 0], ["Shirley Temple", 1]], "type": "bridge", "level": "hard",
         "context": [["Kiss and Tell (1945 film)", ["Kiss and Tell is a 1945 American comedy film starring then 17-year-old Shirley Temple as Corliss Archer."]],
                     ["Shirley Temple", ["Shirley Temple Black (April 23, 1928 – February 10, 2014) was an American actress, singer, dancer, businesswoman, and diplomat.", " As an adult, she was named United States ambassador to Ghana and to Czechoslovakia and also served as Chief of Protocol of the United States."]]]},
        {"_id": "x3", "answer": "1966", "question": "When was Scott Derrickson born?", "type": "bridge", "level": "easy",
         "supporting_facts": [["Scott Derrickson", 0]], "context": [["Scott Derrickson", ["Scott Derrickson (born July 16, 1966) is an American director."]]]},
    ]
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(official))
    params = parse_params({"tasks": {"envs": ["hotpotqa"], "train": 1, "dev": 1, "test": 1,
                                     "hotpotqa": {"official": str(path)}}})
    root = tmp_path / "tasks"
    write_tasks(params, root)
    tasks = [t for s in ("train", "dev", "test") for t in load_tasks(root, "hotpotqa", s)]
    assert sorted(t.meta["qid"] for t in tasks) == sorted(r["_id"] for r in official)
    episodes = play_expert(tasks, root)
    assert all(e.success for e in episodes)
    bridge = next(e for e in episodes if e.task_type == "bridge" and e.n_steps == 3)
    assert [s.action.split("[")[0] for s in bridge.steps] == ["search", "search", "finish"]
    env = BENCHMARKS["hotpotqa"].make_env(False)
    env.reset(tasks[0], root)
    assert env.step("search[ed wood]").text.startswith("Edward Davis Wood Jr.")  # case-insensitive titles


def test_bad_official_file_names_the_question(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"_id": "q1", "question": "?", "answer": "a", "supporting_facts": [],
                                 "context": [["Title only"]]}]))
    with pytest.raises(ValueError, match=r"broken.json: question #0 \(q1\): context\[0\]"):
        h.load_questions(path)


def test_no_question_is_asked_twice():
    """A question asked in train and again in test would be answered from memory: the generator draws
    each (kind, entities) once, so a 1,280-question set (profiles/teacher.yaml) has no repeated question."""
    records = h.generate_questions(0, 1280, distractors=1)
    questions = [r["question"] for r in records]
    assert len(questions) == len(set(questions)) == 1280
    pairs = [frozenset(t for t, _ in r["supporting_facts"]) for r in records if r["type"] == "comparison"]
    assert len(pairs) == len(set(pairs))  # "A or B?" and "B or A?" count as one question


def test_official_splits_never_give_a_test_question_to_a_larger_train_split(tmp_path):
    """Test questions come from the front of one seeded order and train from its back: the default's test
    questions are in no train split of a larger profile on the same file."""
    path = tmp_path / "hotpot_dev_distractor.json"
    path.write_text(json.dumps(h.generate_questions(3, 300, distractors=2)))
    small = h.official_splits(path, 0, {"train": 20, "dev": 5, "test": 20})
    large = h.official_splits(path, 0, {"train": 250, "dev": 10, "test": 40})
    ids = {name: {split: {r["_id"] for r in rs} for split, rs in splits.items()}
           for name, splits in (("small", small), ("large", large))}
    for splits in ids.values():
        assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["dev"])
        assert not (splits["dev"] & splits["test"])
    assert [len(ids["small"][s]) for s in ("train", "dev", "test")] == [20, 5, 20]
    assert not ids["small"]["test"] & ids["large"]["train"] and ids["small"]["test"] <= ids["large"]["test"]
