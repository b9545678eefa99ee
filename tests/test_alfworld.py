"""ALFWorld on the real engine: generated games, the environment, the expert."""

import json
import random
import re
import shutil

import pytest

from sad.environments import load_tasks
from sad.envs import alfworld
from sad.envs.alfworld import AlfworldEnv, AlfworldExpert, parse_item_list


def test_generator_covers_all_task_types_and_splits_are_disjoint():
    games = alfworld.generate_games(seed=3, counts={"train": 18, "dev": 6, "test": 12})
    for split, gs in games.items():
        assert {g.task_type for g in gs} == set(alfworld.TASK_TYPES), split
    prints = [g.fingerprint() for gs in games.values() for g in gs]
    assert len(prints) == len(set(prints))


def _prints(counts):
    return {split: [g.fingerprint() for g in gs] for split, gs in alfworld.generate_games(seed=0, counts=counts).items()}


def test_split_sizes_never_move_a_test_game_into_train():
    """A teacher trained on a large task set (profiles/teacher.yaml: 1,200 train games) must never have seen
    the default's dev or test games: a game's split follows from its fingerprint, each split draws from its
    own stream, and a smaller split is the start of a larger one (before this, one stream served train, dev
    and test in order, and 2 of the default's 20 test games were games the shipped teacher trained on)."""
    small = _prints({"train": 20, "dev": 5, "test": 20})
    large = _prints({"train": 1200, "dev": 30, "test": 50})
    for prints in (small, large):
        every = [f for split in prints.values() for f in split]
        assert len(every) == len(set(every))
        for split, fs in prints.items():
            assert {alfworld.game_split(f) for f in fs} == {split}
    assert not set(small["test"]) & set(large["train"]) and not set(large["test"]) & set(small["train"])
    assert not set(small["dev"]) & set(large["train"]) and not set(large["dev"]) & set(small["train"])
    assert large["test"][:20] == small["test"] and large["dev"][:5] == small["dev"]
    assert large["train"][:20] == small["train"]


def test_generated_games_come_in_train_dev_and_test_only():
    with pytest.raises(ValueError, match="unknown split name"):
        alfworld.generate_games(seed=0, counts={"train": 2, "valid_seen": 1})


def test_generator_is_seeded():
    a = alfworld.generate_games(seed=5, counts={"train": 6})
    b = alfworld.generate_games(seed=5, counts={"train": 6})
    c = alfworld.generate_games(seed=6, counts={"train": 6})
    assert [g.fingerprint() for g in a["train"]] == [g.fingerprint() for g in b["train"]]
    assert [g.fingerprint() for g in a["train"]] != [g.fingerprint() for g in c["train"]]


def test_games_use_alfworld_layout_and_constraints(task_root):
    tasks = load_tasks(task_root, "alfworld", "train")
    for task in tasks:
        folder = task_root / "alfworld" / task.path
        game = json.loads((folder / "game.tw-pddl").read_text())
        traj = json.loads((folder / "traj_data.json").read_text())
        assert set(game) >= {"pddl_domain", "grammar", "pddl_problem", "solvable"}
        assert game["solvable"] is True
        assert traj["task_type"] == task.task_type
        assert folder.parent.name.startswith(task.task_type)


def test_expert_solves_every_generated_task(demos):
    assert len(demos) == 12
    assert all(e.success for e in demos), [e.episode_id for e in demos if not e.success]
    assert {e.task_type for e in demos} == set(alfworld.TASK_TYPES)
    assert all(s.thought and s.valid for e in demos for s in e.steps)
    assert all(e.n_steps <= alfworld.MAX_STEPS for e in demos)


def test_expert_transcript_for_a_fixed_seed_is_stable(tmp_path):
    """Hand-checked: a generated heat task played by the expert, step by step."""
    rng = random.Random(11)
    game = alfworld.sample_game(rng, "pick_heat_then_place_in_recep")
    task = alfworld.write_game(game, tmp_path / "alfworld", "test", 0)
    env, expert = AlfworldEnv(expert_plan=True), AlfworldExpert()
    obs = env.reset(task, tmp_path)
    expert.reset(task, obs)
    assert obs.text.startswith("You are in the middle of a room.")
    assert obs.text.endswith(f"Your task is to: {game.description}.")
    actions = []
    while not obs.done:
        thought, action = expert.act(obs)
        actions.append(action)
        obs = env.step(action)
        assert obs.valid
    assert obs.success
    obj = game.object_target.lower()
    heat = [a for a in actions if a.startswith("heat ")]
    assert len(heat) == 1 and heat[0].startswith(f"heat {obj} ") and heat[0].endswith("with microwave 1")
    assert actions[-1].startswith(f"move {obj} ")
    # the object is taken before it is heated, heated before it is placed
    take = next(i for i, a in enumerate(actions) if a.startswith(f"take {obj}"))
    assert take < actions.index(heat[0]) < len(actions) - 1
    # stable: the same game played again by a fresh engine and expert gives the same transcript
    env, expert = AlfworldEnv(expert_plan=True), AlfworldExpert()
    obs = env.reset(task, tmp_path)
    expert.reset(task, obs)
    again = []
    while not obs.done:
        again.append(expert.act(obs)[1])
        obs = env.step(again[-1])
    assert again == actions


def test_invalid_actions_are_counted_not_raised(task_root):
    task = load_tasks(task_root, "alfworld", "test")[0]
    env = AlfworldEnv()
    env.reset(task, task_root)
    for bad in ["fly to the moon", "", "go to " + "x" * 10_000, "'; DROP TABLE tasks; --"]:
        obs = env.step(bad)
        assert not obs.valid and obs.text == "Nothing happens." and not obs.done
    obs = env.step(env._state["admissible_commands"][0])
    assert obs.valid


def test_step_cap_ends_the_episode(task_root):
    task = load_tasks(task_root, "alfworld", "test")[0]
    env = AlfworldEnv()
    env.reset(task, task_root)
    for step in range(1, alfworld.MAX_STEPS + 1):
        obs = env.step("look")
        assert obs.done == (step == alfworld.MAX_STEPS), step
    assert not obs.success


def test_missing_game_file_names_the_task(tmp_path, task_root):
    task = load_tasks(task_root, "alfworld", "test")[0]
    with pytest.raises(FileNotFoundError, match=task.task_id):
        AlfworldEnv().reset(task, tmp_path)


def test_parse_item_list_handles_alfworld_lists():
    assert parse_item_list("a cabinet 2, a apple 1, and a mug 3") == ["cabinet 2", "apple 1", "mug 3"]
    assert parse_item_list("nothing") == []
    assert parse_item_list("a fork 1") == ["fork 1"]


def _official_layout(tmp_path):
    """An ALFWorld data folder in the published layout (train / valid_seen / valid_unseen, each
    <task dir>/<trial dir>/{game.tw-pddl, traj_data.json}), filled with generated games."""
    data = tmp_path / "json_2.1.1"
    games = alfworld.generate_games(seed=11, counts={"train": 3, "dev": 2, "test": 2})
    folders = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
    for split, gs in games.items():
        folder = folders[split]
        for i, g in enumerate(gs):
            alfworld.write_game(g, data, folder, i)
    return data


def test_official_data_folder_goes_through_the_same_code_path(tmp_path):
    from sad.config import parse_params
    from sad.environments import write_tasks
    from sad.rollout import play_expert

    data = _official_layout(tmp_path)
    params = parse_params({"tasks": {"envs": ["alfworld"], "train": 2, "dev": 1, "test": 2,
                                     "alfworld": {"official": str(data)}}})
    root = tmp_path / "tasks"
    write_tasks(params, root)
    tasks = {s: load_tasks(root, "alfworld", s) for s in ("train", "dev", "test")}
    assert [len(tasks[s]) for s in ("train", "dev", "test")] == [2, 1, 2]
    assert all(t.meta["source"].startswith(str(data / "valid_unseen")) for t in tasks["test"])
    assert all(t.meta["source"].startswith(str(data / "valid_seen")) for t in tasks["dev"])
    for t in tasks["train"]:
        assert (root / "alfworld" / t.path / "game.tw-pddl").is_file()
    episodes = play_expert(tasks["test"] + tasks["dev"], root)
    assert all(e.success for e in episodes)


def test_official_trials_alfworld_skips_are_skipped_here_too(tmp_path):
    """As ALFWorld's loader: movable-receptacle and sliced trials, task types not asked for, and games not
    marked solvable are never picked; a trial without annotations is described by its game's goal sentence."""
    from sad.config import parse_params
    from sad.environments import write_tasks

    data = _official_layout(tmp_path)
    train = sorted((data / "train").glob("*/*"))
    skipped = []
    for name in ("pick_and_place_with_movable_recep-Mug-Pan-Desk-1",
                 "pick_clean_then_place_in_recep-AppleSliced-None-Fridge-1"):
        shutil.copytree(train[0].parent, data / "train" / name)  # a copy whose folder name ALFWorld skips
        skipped += sorted((data / "train" / name).glob("*"))
    unsolvable = train[1] / "game.tw-pddl"
    unsolvable.write_text(json.dumps({**json.loads(unsolvable.read_text()), "solvable": False}))
    other_type = json.loads((train[2] / "traj_data.json").read_text())["task_type"]
    types = [t for t in alfworld.TASK_TYPES if t != other_type]
    assert [alfworld.official_skip_reason(t, tuple(types)) for t in [*skipped, train[1], train[2]]] == [
        "movable or sliced", "movable or sliced", "not marked solvable", "another task type"]
    with pytest.raises(ValueError, match=r"train: 1 playable games of 5, but the split asks for 2 \(skipped as "
                                         r"ALFWorld's loader does: 1 another task type, 2 movable or sliced, 1 not "
                                         r"marked solvable"):
        write_tasks(parse_params({"tasks": {"envs": ["alfworld"], "train": 2, "dev": 1, "test": 1, "alfworld": {
            "official": str(data), "task_types": types}}}), tmp_path / "tasks")
    traj = json.loads((train[0] / "traj_data.json").read_text())
    traj.pop("turk_annotations", None)
    (train[0] / "traj_data.json").write_text(json.dumps(traj))
    task = alfworld.copy_official_game(train[0], tmp_path / "out", "train", 0)
    grammar = json.loads((train[0] / "game.tw-pddl").read_text())["grammar"]
    assert task.description and f"Your task is to: {task.description}." in grammar


def test_official_folder_errors_name_the_missing_part(tmp_path):
    from sad.config import parse_params
    from sad.environments import write_tasks

    data = _official_layout(tmp_path)
    params = parse_params({"tasks": {"envs": ["alfworld"], "train": 9, "dev": 1, "test": 1,
                                     "alfworld": {"official": str(data)}}})
    with pytest.raises(ValueError, match=r"json_2.1.1/train: 3 playable games of 3, but the split asks for 9"):
        write_tasks(params, tmp_path / "tasks")
    trial = next((data / "train").glob("*/*"))
    (trial / "traj_data.json").write_text("{not json")
    with pytest.raises(ValueError, match="traj_data.json: unreadable ALFWorld traj_data"):
        alfworld.copy_official_game(trial, tmp_path / "out", "train", 0)


def _expert_transcript(tmp_path, task_type: str, seed: int):
    try:
        game = alfworld.sample_game(random.Random(seed), task_type)
    except alfworld.GenerationError:
        return None, []
    task = alfworld.write_game(game, tmp_path / "alfworld", "test", seed)
    env, expert = AlfworldEnv(expert_plan=True), AlfworldExpert()
    obs = env.reset(task, tmp_path)
    expert.reset(task, obs)
    steps = []
    while not obs.done:
        thought, action = expert.act(obs)
        steps.append((thought, action, obs.text))
        obs = env.step(action)
    assert obs.success
    return game, steps


def test_pick_two_thoughts_say_the_first_object_is_placed_before_the_second_search(tmp_path):
    """The search for the second object is told apart from the first from the latest thought alone."""
    searched_second = 0
    for seed in range(6):
        game, steps = _expert_transcript(tmp_path, "pick_two_obj_and_place", seed)
        if game is None:
            continue
        obj = game.object_target.lower()
        first_move = next(i for i, (_, a, _) in enumerate(steps) if a.startswith("move "))
        placed = steps[first_move][1][len("move "):].split(" to ")
        for thought, _, _ in steps[first_move + 1:]:
            if "Places to check" in thought:
                searched_second += 1
                assert thought.startswith(f"The {placed[0]} is in {placed[1]}. I need to find the second {obj}."), thought
        assert not any("I need to find the second" in thought for thought, _, _ in steps[:first_move])
    assert searched_second > 0


def test_look_at_tasks_note_where_the_lamp_is_when_the_object_is_taken(tmp_path):
    notes = set()
    for seed in range(20):
        game, steps = _expert_transcript(tmp_path, "look_at_obj_in_light", seed)
        if game is None:
            continue
        take = next(i for i, (_, a, _) in enumerate(steps) if a.startswith("take "))
        thought, action, _ = steps[take]
        here = action.split(" from ")[1]
        seen = " ".join(text for _, _, text in steps[1:take + 1])  # what the agent read after the task
        here_too = re.search(r"The (desklamp \d+) is here too\.$", thought)
        saw = re.search(r"I saw the (desklamp \d+) on ([a-z]+ \d+)\.$", thought)
        if here_too:
            assert re.search(rf"On the {here}, you see [^.]*{here_too.group(1)}", seen), (thought, seen)
            notes.add("here")
        elif saw:
            assert re.search(rf"On the {saw.group(2)}, you see [^.]*{saw.group(1)}", seen), (thought, seen)
            notes.add("seen")
        else:
            assert thought.endswith("I have not seen a desklamp yet.") and not re.search(r"desklamp \d+", seen)
            notes.add("unseen")
    assert len(notes) >= 2, notes
