"""ALFWorld on its real engine (``alfworld`` + ``textworld``, PDDL games).

Three parts:

* a **generator** writing games in ALFWorld's on-disk layout
  (``<split>/<task_type>-<Obj>-<Mrecep>-<Recep>-<scene>/trial_<id>/{game.tw-pddl,traj_data.json}``):
  kitchens, bedrooms, bathrooms and living rooms built from ALFWorld's own receptacle/object
  tables (``alfworld.gen.constants``), goals from ALFWorld's goal library, all six task types,
  distractors and closed receptacles so that an agent has to search;
* :class:`AlfworldEnv`, the ``reset/step`` interface over textworld's ``PddlEnv`` with ALFWorld's
  name demangler (``apple 1``, ``sinkbasin 1``); success is ``won`` within 50 steps;
* :class:`AlfworldExpert`, which searches the receptacles that can hold what it needs (in the
  order the room lists them) until every object the planner's ``policy_commands`` mention has
  been seen, then follows the planner, and writes a ReAct thought for each action.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sad.envs.base import Observation, Task, content_split, task_location

ENV_NAME = "alfworld"
MAX_STEPS = 50

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

# Receptacle types per room, with (min, max) instance counts.
ROOMS: dict[str, dict[str, tuple[int, int]]] = {
    "kitchen": {
        "CounterTop": (1, 3), "Cabinet": (2, 5), "Drawer": (1, 3), "Fridge": (1, 1),
        "Microwave": (1, 1), "SinkBasin": (1, 1), "StoveBurner": (2, 4), "DiningTable": (0, 1),
        "CoffeeMachine": (1, 1), "Toaster": (0, 1), "GarbageCan": (1, 1), "Shelf": (0, 2),
    },
    "bedroom": {
        "Bed": (1, 1), "Desk": (0, 1), "Drawer": (2, 4), "Dresser": (0, 1), "Shelf": (0, 3),
        "SideTable": (1, 2), "GarbageCan": (1, 1), "LaundryHamper": (0, 1), "Safe": (0, 1),
    },
    "bathroom": {
        "Toilet": (1, 1), "SinkBasin": (1, 2), "BathtubBasin": (0, 1), "Cabinet": (1, 4),
        "CounterTop": (1, 1), "Drawer": (0, 2), "GarbageCan": (1, 1), "HandTowelHolder": (0, 1),
        "TowelHolder": (0, 1), "ToiletPaperHanger": (1, 1), "Shelf": (0, 1),
    },
    "livingroom": {
        "Sofa": (1, 1), "ArmChair": (0, 2), "CoffeeTable": (1, 1), "SideTable": (1, 2),
        "DiningTable": (0, 1), "Drawer": (0, 3), "Shelf": (0, 3), "TVStand": (0, 1),
        "GarbageCan": (1, 1), "Cabinet": (0, 2), "Ottoman": (0, 1), "Safe": (0, 1),
    },
}

# Portable object types that appear in each room.
ROOM_OBJECTS: dict[str, tuple[str, ...]] = {
    "kitchen": (
        "Apple", "Bread", "Egg", "Lettuce", "Potato", "Tomato", "Mug", "Cup", "Bowl", "Plate",
        "Pan", "Pot", "Kettle", "Knife", "ButterKnife", "Fork", "Spoon", "Spatula", "Ladle",
        "DishSponge", "SaltShaker", "PepperShaker", "WineBottle", "SoapBottle",
    ),
    "bedroom": (
        "AlarmClock", "Book", "CD", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Pen",
        "Pencil", "Pillow", "BaseballBat", "BasketBall", "TennisRacket", "Cloth", "Watch", "Mug",
        "Bowl", "Statue", "Vase", "TissueBox",
    ),
    "bathroom": (
        "SoapBar", "SoapBottle", "SprayBottle", "Cloth", "HandTowel", "Towel", "ToiletPaper",
        "Candle", "DishSponge", "TissueBox",
    ),
    "livingroom": (
        "RemoteControl", "Newspaper", "Laptop", "Pillow", "Book", "CreditCard", "KeyChain",
        "Statue", "Vase", "TissueBox", "Watch", "CellPhone", "Candle", "Plate", "Bowl",
    ),
}

LAMP = "DeskLamp"
LAMP_RECEPTACLES = ("Desk", "SideTable", "Dresser")

# The appliance each transform task needs, and where its task type must be played.
TRANSFORM_APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable", "clean"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable", "heat"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable", "cool"),
}
TASK_ROOMS = {
    "pick_and_place_simple": ("kitchen", "bedroom", "bathroom", "livingroom"),
    "pick_two_obj_and_place": ("kitchen", "bedroom", "bathroom", "livingroom"),
    "look_at_obj_in_light": ("bedroom", "livingroom"),
    "pick_clean_then_place_in_recep": ("kitchen", "bathroom"),
    "pick_heat_then_place_in_recep": ("kitchen",),
    "pick_cool_then_place_in_recep": ("kitchen",),
}

_BASIN_IDS = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}


def _constants():
    import alfworld.gen.constants as constants

    return constants


def can_contain(receptacle_type: str, object_type: str) -> bool:
    """ALFWorld's own table of which receptacle type may hold which object type."""
    if object_type == LAMP:
        return receptacle_type in LAMP_RECEPTACLES
    return object_type in _constants().VAL_RECEPTACLE_OBJECTS.get(receptacle_type, ())


def has_property(object_type: str, prop: str) -> bool:
    """``prop`` is one of ALFWorld's action classes: Heatable, Coolable, Cleanable, ..."""
    return object_type in _constants().VAL_ACTION_OBJECTS.get(prop, ())


def is_openable(receptacle_type: str) -> bool:
    return receptacle_type in _constants().OPENABLE_CLASS_LIST


# --------------------------------------------------------------------------- generator


def _mangle(entity_id: str) -> str:
    """ALFRED's id mangling for PDDL identifiers (``Apple|01`` -> ``Apple_bar_01``)."""
    for char, word in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        entity_id = entity_id.replace(char, word)
    return entity_id


def _receptacle_id(rtype: str, index: int) -> str:
    if rtype in _BASIN_IDS:  # ALFWorld names basins "<Sink>|..|<SinkBasin>" -> "sinkbasin 1"
        return f"{_BASIN_IDS[rtype]}|{index:02d}|{rtype}"
    return f"{rtype}|{index:02d}"


@dataclass(frozen=True)
class GeneratedGame:
    """A generated scene and goal, before it is written to disk."""

    task_type: str
    room: str
    object_target: str
    parent_target: str
    toggle_target: str
    receptacles: tuple[tuple[str, str], ...]  # (receptacle id, type)
    placements: tuple[tuple[str, str, str], ...]  # (object id, type, receptacle id)
    description: str

    def fingerprint(self) -> str:
        payload = json.dumps([self.task_type, self.room, self.receptacles, self.placements, self.description])
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


class GenerationError(RuntimeError):
    pass


def sample_game(rng: random.Random, task_type: str, n_distractors: tuple[int, int] = (3, 8)) -> GeneratedGame:
    """Sample one solvable game of ``task_type``; raises GenerationError when a draw is infeasible."""
    import alfworld.gen.goal_library as goal_library

    room = rng.choice(TASK_ROOMS[task_type])
    receptacles: list[tuple[str, str]] = []
    for rtype, (lo, hi) in ROOMS[room].items():
        for i in range(1, rng.randint(lo, hi) + 1):
            receptacles.append((_receptacle_id(rtype, i), rtype))
    rtypes = sorted({t for _, t in receptacles})
    appliance = TRANSFORM_APPLIANCE.get(task_type)

    # Target object and goal receptacle type.
    candidates = list(ROOM_OBJECTS[room])
    if appliance:
        candidates = [o for o in candidates if has_property(o, appliance[1])]
    rng.shuffle(candidates)
    object_target = parent_target = toggle_target = ""
    for obj in candidates:
        goal_types = [t for t in rtypes if can_contain(t, obj)]
        if appliance:
            goal_types = [t for t in goal_types if t != appliance[0]]
        if task_type == "look_at_obj_in_light":
            goal_types = ["-"]
        sources = [t for t in rtypes if can_contain(t, obj)]
        if goal_types and sources:
            object_target = obj
            parent_target = rng.choice(goal_types)
            break
    if not object_target:
        raise GenerationError(f"no feasible object for {task_type} in {room}")
    if task_type == "look_at_obj_in_light":
        parent_target = ""
        toggle_target = LAMP
        if not any(t in LAMP_RECEPTACLES for t in rtypes):
            raise GenerationError("no receptacle for a lamp")

    placements: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}

    def place(otype: str, forbidden: set[str]) -> None:
        spots = [rid for rid, rt in receptacles if can_contain(rt, otype) and rt not in forbidden]
        if not spots:
            raise GenerationError(f"no place for {otype}")
        counts[otype] = counts.get(otype, 0) + 1
        placements.append((f"{otype}|{counts[otype]:02d}", otype, rng.choice(spots)))

    n_targets = 2 if task_type == "pick_two_obj_and_place" else 1
    for _ in range(n_targets):
        place(object_target, {parent_target})
    if toggle_target:
        place(toggle_target, set())
    others = [o for o in ROOM_OBJECTS[room] if o != object_target]
    for _ in range(rng.randint(*n_distractors)):
        otype = rng.choice(others)
        if any(can_contain(t, otype) for t in rtypes):
            place(otype, set())

    templates = goal_library.gdict[task_type]["templates"]
    description = rng.choice(templates).format(
        obj=object_target.lower(), recep=parent_target.lower(), toggle=toggle_target.lower(), mrecep=""
    )
    return GeneratedGame(
        task_type=task_type,
        room=room,
        object_target=object_target,
        parent_target=parent_target,
        toggle_target=toggle_target,
        receptacles=tuple(receptacles),
        placements=tuple(placements),
        description=description,
    )


def pddl_problem(game: GeneratedGame) -> str:
    """The game's PDDL problem for ALFWorld's ``alfred`` domain."""
    import alfworld.gen.goal_library as goal_library

    otypes = sorted({t for _, t, _ in game.placements})
    rtypes = sorted({t for _, t in game.receptacles})
    locations = {rid: f"loc|{i + 1}" for i, (rid, _) in enumerate(game.receptacles)}
    objects = ["agent1 - agent", "loc|0 - location"]
    objects += [f"{loc} - location" for loc in locations.values()]
    objects += [f"{rid} - receptacle" for rid, _ in game.receptacles]
    objects += [f"{oid} - object" for oid, _, _ in game.placements]
    objects += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]

    init = ["(atLocation agent1 loc|0)"]
    for rid, rtype in game.receptacles:
        init.append(f"(receptacleType {rid} {rtype}Type)")
        init.append(f"(receptacleAtLocation {rid} {locations[rid]})")
        if is_openable(rtype):
            init.append(f"(openable {rid})")
    for oid, otype, rid in game.placements:
        init.append(f"(objectType {oid} {otype}Type)")
        init.append(f"(inReceptacle {oid} {rid})")
        init.append(f"(objectAtLocation {oid} {locations[rid]})")
        if otype == LAMP:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        for prop, predicate in (("Heatable", "heatable"), ("Coolable", "coolable"),
                                ("Cleanable", "cleanable"), ("Sliceable", "sliceable")):
            if has_property(otype, prop):
                init.append(f"({predicate} {oid})")
    for rtype in rtypes:
        for otype in otypes:
            if can_contain(rtype, otype):
                init.append(f"(canContain {rtype}Type {otype}Type)")

    goal = goal_library.gdict[game.task_type]["pddl"].format(
        obj=game.object_target, recep=game.parent_target, toggle=game.toggle_target, mrecep=""
    ).replace("#", "-")
    body = "\n".join(
        [f"(define (problem sad_{game.fingerprint()})", "    (:domain alfred)", "    (:objects"]
        + [f"        {_mangle(name)} - {kind}" for name, _, kind in (o.partition(" - ") for o in objects)]
        + ["    )", "    (:init"]
        + [f"        {_mangle(fact)}" for fact in init]
        + ["    )", goal]
    )
    return body


def traj_data(game: GeneratedGame, task_id: str, split: str) -> dict[str, Any]:
    """The subset of ALFRED's ``traj_data.json`` that ALFWorld reads, plus provenance."""
    return {
        "task_id": task_id,
        "task_type": game.task_type,
        "split": split,
        "scene": {"scene_type": game.room, "floor_plan": f"Generated_{game.room}", "fingerprint": game.fingerprint()},
        "pddl_params": {
            "object_target": game.object_target,
            "parent_target": game.parent_target,
            "toggle_target": game.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "turk_annotations": {"anns": [{"task_desc": game.description, "high_descs": [], "assignment_id": "generated"}]},
        "generator": "sad.envs.alfworld",
    }


def game_file(game: GeneratedGame) -> dict[str, Any]:
    """The content of ``game.tw-pddl``: domain, grammar with the goal text, problem."""
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    grammar = Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", game.description)
    return {
        "pddl_domain": Path(ALFRED_PDDL_PATH).read_text(),
        "grammar": grammar,
        "pddl_problem": pddl_problem(game),
        "solvable": True,
    }


def task_dir_name(game: GeneratedGame) -> str:
    return f"{game.task_type}-{game.object_target or 'None'}-None-{game.parent_target or game.toggle_target or 'None'}-{game.room}"


SPLIT_SHARES = {"test": 0.15, "dev": 0.10}  # of generated games, by fingerprint; the rest is train


def game_split(fingerprint: str) -> str:
    """The split a generated game belongs to, from its fingerprint alone (:func:`content_split`; WebShop's
    instruction texts are split the same way)."""
    return content_split(f"alfworld-split:{fingerprint}", SPLIT_SHARES)


def generate_games(
    seed: int, counts: dict[str, int], task_types: tuple[str, ...] = TASK_TYPES,
    n_distractors: tuple[int, int] = (3, 8),
) -> dict[str, list[GeneratedGame]]:
    """Sample disjoint splits: ``counts`` maps split name (train, dev, test) -> number of games.

    Each split draws from its own seeded stream and keeps only the games :func:`game_split` assigns to it,
    so a split's first ``k`` games are the same whatever the sizes of the others (a profile with more train
    games tests on the default's test games), and splits never share a game. Task types are spread evenly
    (round robin) so every split covers all of them.
    """
    unknown = sorted(set(counts) - {"train", *SPLIT_SHARES})
    if unknown:
        raise ValueError(f"alfworld: unknown split name(s) {unknown}; generated games come in train, dev and test")
    shares = {**SPLIT_SHARES, "train": 1.0 - sum(SPLIT_SHARES.values())}
    out: dict[str, list[GeneratedGame]] = {}
    for split, n in counts.items():
        rng = random.Random(f"alfworld:{seed}:{split}")
        seen: set[str] = set()
        games: list[GeneratedGame] = []
        attempts = 0
        while len(games) < n:
            attempts += 1
            if attempts > (50 * n + 100) / shares[split]:
                raise GenerationError(f"could not draw {n} distinct {split} games")
            task_type = task_types[len(games) % len(task_types)]
            try:
                game = sample_game(rng, task_type, n_distractors)
            except GenerationError:
                continue
            fingerprint = game.fingerprint()
            if fingerprint in seen or game_split(fingerprint) != split:
                continue
            seen.add(fingerprint)
            games.append(game)
        out[split] = games
    return out


def write_game(game: GeneratedGame, root: Path, split: str, index: int, max_steps: int = MAX_STEPS) -> Task:
    """Write one game in ALFWorld's layout under ``root`` and return its manifest entry."""
    rel = Path(split) / task_dir_name(game) / f"trial_{index:05d}_{game.fingerprint()}"
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    task_id = f"{ENV_NAME}/{split}/{index:05d}"
    (folder / "game.tw-pddl").write_text(json.dumps(game_file(game)))
    (folder / "traj_data.json").write_text(json.dumps(traj_data(game, task_id, split), indent=1))
    return Task(
        env=ENV_NAME, split=split, task_id=task_id, path=str(rel), task_type=game.task_type,
        description=game.description,
        meta={"room": game.room, "object": game.object_target, "receptacle": game.parent_target,
              "toggle": game.toggle_target, "max_steps": max_steps},
    )


# --------------------------------------------------------------------------- environment

_TASK_RE = re.compile(r'"rhs": "Your task is to: (.*?)\."')
_GOAL_PLACEHOLDER = "UNKNOWN GOAL"
_LOGIC_CACHE: dict[str, Any] = {}


def _speed_up_textworld() -> None:
    """Memoise textworld's pure grammar parsers and make its context copies shallow.

    textworld re-parses the same rule strings with tatsu and deep-copies derivation contexts
    for every admissible command at every step; both are pure (the parsed templates are copied
    before use, and contexts only gain keys). Measured on 30 expert episodes: 2.8x faster
    stepping with byte-identical transcripts (see tests/test_alfworld.py).
    """
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    if getattr(textgen, "_sad_fast", False):
        return
    parse = textgen._parse_and_convert
    parsed: dict[tuple[str, str], Any] = {}

    def parse_cached(text: str, rule_name: str = "symbols", **kwargs: Any) -> Any:
        key = (text, rule_name)
        if key not in parsed:
            parsed[key] = parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(parsed[key])

    def copy_context(context: dict[str, Any]) -> dict[str, Any]:
        return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
                "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}

    textgen._parse_and_convert = parse_cached
    textgen.copy_context = copy_context
    Rule.parse_conjunctive_query = classmethod(functools.lru_cache(maxsize=None)(Rule.parse_conjunctive_query.__func__))
    textgen._sad_fast = True


def _make_pddl_env(policy_commands: bool):
    """textworld's PddlEnv with a per-process cache of the parsed game logic.

    ALFWorld games share one domain and grammar except for the goal sentence; parsing the
    grammar dominates ``load``, so the sentence is swapped for a placeholder before parsing and
    put back into the intro after reset.
    """
    import textworld
    from textworld.core import GameState
    from textworld.envs.pddl import PddlEnv
    from textworld.envs.pddl import logic as pddl_logic

    _speed_up_textworld()

    class CachedPddlEnv(PddlEnv):
        task_description: str = ""

        def load(self, filename: str) -> None:  # noqa: D102 - textworld API
            with open(filename) as fh:
                data = json.load(fh)
            match = _TASK_RE.search(data["grammar"])
            self.task_description = match.group(1) if match else ""
            grammar = data["grammar"].replace(f"Your task is to: {self.task_description}.", f"Your task is to: {_GOAL_PLACEHOLDER}.")
            key = hashlib.sha1((data["pddl_domain"] + grammar).encode()).hexdigest()
            if key not in _LOGIC_CACHE:
                _LOGIC_CACHE[key] = pddl_logic.GameLogic(domain=data["pddl_domain"], grammar=grammar)
            self._game_file = filename
            self._game_data = data
            self.walkthrough = data.get("walkthrough")
            self._logic = _LOGIC_CACHE[key]
            self._pddl_state = self._new_state()
            self._entity_infos = self._get_entity_infos()
            self._fresh_state = True

        def _new_state(self):
            if policy_commands:
                return pddl_logic.PddlState(self.downward_lib, self._game_data["pddl_problem"], self._logic)
            # No planner needed: PddlState translates the problem twice (play + optimised replan);
            # reuse the first translation for the second. Halves load time for agents.
            original = pddl_logic.fast_downward.pddl2sas
            memo: dict[str, Any] = {}

            def translate_once(domain, problem, verbose=False, optimize=False):
                if "result" not in memo:
                    memo["result"] = original(domain, problem, verbose=verbose)
                return memo["result"]

            pddl_logic.fast_downward.pddl2sas = translate_once
            try:
                return pddl_logic.PddlState(self.downward_lib, self._game_data["pddl_problem"], self._logic)
            finally:
                pddl_logic.fast_downward.pddl2sas = original

        def reset(self):  # noqa: D102 - textworld API
            if not getattr(self, "_fresh_state", False):
                self._pddl_state = self._new_state()
            self._fresh_state = False
            # PddlEnv.reset without its second PDDL translation (load() just built the state).
            self.prev_state = None
            self.state = GameState()
            self._last_action = None
            self._moves = 0
            context = {"state": self._pddl_state, "facts": list(self._pddl_state.facts), "variables": {},
                       "mapping": {}, "entity_infos": self._entity_infos}
            intro = self._logic.grammar.derive("#intro#", context)
            self.state.feedback = intro.replace(_GOAL_PLACEHOLDER, self.task_description)
            self.state.raw = self.state.feedback
            self._gather_infos()
            return self.state

    infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=policy_commands)
    return CachedPddlEnv(infos)


def clean_text(text: str) -> str:
    """One line, no TextWorld banner: how observations enter the ReAct transcript."""
    text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "")
    return " ".join(text.split())


class AlfworldEnv:
    """ALFWorld through textworld's PDDL engine; one task at a time.

    ``expert_plan=True`` asks the planner for ``policy_commands`` after every step (used by the
    expert; it costs a planner call per step).
    """

    name = ENV_NAME
    max_steps = MAX_STEPS

    def __init__(self, expert_plan: bool = False):
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

        self._pddl = _make_pddl_env(policy_commands=expert_plan)
        self._env = AlfredDemangler(self._pddl)
        self.expert_plan = expert_plan
        self._state = None
        self.steps = 0

    def reset(self, task: Task, tasks_root: Path) -> Observation:
        game = task_location(tasks_root, task) / "game.tw-pddl"
        if not game.is_file():
            raise FileNotFoundError(f"{task.task_id}: game file not found: {game}")
        self._env.load(str(game))
        self._state = self._env.reset()
        self.steps = 0
        self.max_steps = int(task.meta.get("max_steps", MAX_STEPS))
        return self._observation(self._state.feedback, valid=True)

    def step(self, action: str) -> Observation:
        if self._state is None:
            raise RuntimeError("step() before reset()")
        action = " ".join(str(action).split())
        valid = action in self._state["admissible_commands"]
        self._state, _, _ = self._env.step(action)
        self.steps += 1
        return self._observation(self._state.feedback, valid=valid)

    def _observation(self, feedback: str, valid: bool) -> Observation:
        won = bool(self._state["won"])
        info: dict[str, Any] = {}
        if self.expert_plan:
            info["expert_plan"] = list(self._state.get("policy_commands") or [])
        return Observation(
            text=clean_text(feedback),
            done=won or self.steps >= self.max_steps,
            success=won,
            reward=1.0 if won else 0.0,
            valid=valid,
            admissible=list(self._state["admissible_commands"]),
            info=info,
        )


# --------------------------------------------------------------------------- expert

_LIST_RE = re.compile(r"you see (.*?)\.(?: |$)")
_ARRIVE_RE = re.compile(r"^You arrive at (.+?)\. ")
_OPEN_RE = re.compile(r"^You open the (.+?)\. ")
_PICK_RE = re.compile(r"^You pick up the (.+?) from the (.+?)\.")
_MOVE_RE = re.compile(r"^You move the (.+?) to the (.+?)\.")


def parse_item_list(text: str) -> list[str]:
    """``"a cabinet 2, a apple 1, and a mug 3"`` -> ``["cabinet 2", "apple 1", "mug 3"]``."""
    text = text.strip()
    if not text or text == "nothing":
        return []
    items = []
    for part in re.split(r", and |, | and ", text):
        part = part.strip()
        for article in ("a ", "an ", "the "):
            if part.startswith(article):
                part = part[len(article):]
        if part:
            items.append(part)
    return items


def entity_type(name: str) -> str:
    """``"sinkbasin 2"`` -> ``"sinkbasin"``."""
    head, _, tail = name.rpartition(" ")
    return head if tail.isdigit() else name


def command_objects(command: str) -> list[str]:
    """The portable objects a command manipulates (receptacles excluded)."""
    for pattern in (r"^take (.+) from ", r"^move (.+) to ", r"^(?:heat|cool|clean) (.+) with ", r"^use (.+)$"):
        m = re.match(pattern, command)
        if m:
            return [m.group(1)]
    return []


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class AlfworldExpert:
    """Search, then follow the planner; every action comes with a thought.

    Thoughts carry the search state ("Places to check: ..."), so the latest steps of the
    transcript are enough to know what to do next.
    """

    def __init__(self) -> None:
        self._types = {t.lower(): t for rt in ROOMS.values() for t in rt}
        self._types.update({o.lower(): o for objs in ROOM_OBJECTS.values() for o in objs})
        self._types[LAMP.lower()] = LAMP

    def reset(self, task: Task, first: Observation) -> None:
        self.task = task
        m = re.search(r"you see (.*?)\. Your task is to", first.text)
        self.receptacles = parse_item_list(m.group(1)) if m else []
        self.known: dict[str, str] = {}  # object -> receptacle where it was last seen
        self.checked: set[str] = set()
        self.location: str | None = None
        self.holding: str | None = None
        self.placed: list[tuple[str, str]] = []  # (object, receptacle) of every move so far
        self.first_thought = True

    # -- knowledge --------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        text = obs.text
        if m := _ARRIVE_RE.match(text):
            self.location = m.group(1)
        if m := _OPEN_RE.match(text):
            self.location = m.group(1)
        if (m := _ARRIVE_RE.match(text) or _OPEN_RE.match(text)) and "is closed" not in text:
            receptacle = m.group(1)
            self.checked.add(receptacle)
            lm = _LIST_RE.search(text)
            if lm:
                for item in parse_item_list(lm.group(1)):
                    self.known[item] = receptacle
        if m := _PICK_RE.match(text):
            self.holding = m.group(1)
            self.known.pop(m.group(1), None)
        if m := _MOVE_RE.match(text):
            self.holding = None
            self.known[m.group(1)] = m.group(2)
            self.placed.append((m.group(1), m.group(2)))

    def _is_known(self, obj: str) -> bool:
        return obj in self.known or obj == self.holding

    def _search_candidates(self, target_type: str) -> list[str]:
        """Unchecked receptacles that can hold the target, in the order the room lists them.

        The order is the intro's, so an agent can copy it; when none can hold the target
        (it was moved somewhere unusual), every unchecked receptacle is a candidate.
        """
        otype = self._types.get(target_type, target_type)
        unchecked = [r for r in self.receptacles if r not in self.checked]
        likely = [r for r in unchecked if can_contain(self._types.get(entity_type(r), ""), otype)]
        return likely or unchecked

    # -- acting -----------------------------------------------------------------------
    def act(self, obs: Observation) -> tuple[str, str]:
        """Return (thought, action) for the current state."""
        self.observe(obs)
        plan = list(obs.info.get("expert_plan") or [])
        if not plan:
            return self._thought("I have nothing left to do. I will look around."), "look"
        first_unknown = next(
            (i for i, cmd in enumerate(plan) if any(not self._is_known(o) for o in command_objects(cmd))), None
        )
        navigation_only = first_unknown is not None and all(
            cmd.startswith(("go to ", "open ")) for cmd in plan[:first_unknown]
        )
        if first_unknown is not None and navigation_only:
            target = next(o for o in command_objects(plan[first_unknown]) if not self._is_known(o))
            return self._explore(entity_type(target))
        return self._follow(plan)

    def _explore(self, target_type: str) -> tuple[str, str]:
        candidates = self._search_candidates(target_type)
        if not candidates:
            return self._thought(f"I have checked every place and found no {target_type}. I will look around."), "look"
        here = self.location
        if here is not None and here == candidates[0]:
            # Arrived at a closed receptacle on the list: open it.
            return self._thought(f"The {here} is closed. I will open it to look for {_article(target_type)} {target_type}."), f"open {here}"
        places = ", ".join(candidates)
        thought = f"{self._wanted(target_type)} Places to check: {places}. I will check {candidates[0]}."
        return self._thought(thought), f"go to {candidates[0]}"

    def _wanted(self, target_type: str) -> str:
        """What the search is for. In ``pick_two_obj_and_place``, once the first object is placed, the thought
        says so (``"The newspaper 2 is in armchair 1. I need to find the second newspaper."``): the search
        for the second one is told apart from the first from the latest thought alone."""
        done = [(obj, where) for obj, where in self.placed if entity_type(obj) == target_type]
        if self.task.task_type == "pick_two_obj_and_place" and done:
            return f"The {done[-1][0]} is in {done[-1][1]}. I need to find the second {target_type}."
        return f"I need to find {_article(target_type)} {target_type}."

    def _lamp_note(self, here: str) -> str:
        """In ``look_at_obj_in_light``, where the lamp is as far as seen, said when the object is taken (the
        next step goes to it, uses it, or searches for it): ``" The desklamp 1 is here too."``, ``" I saw the
        desklamp 1 on sidetable 1."`` or ``" I have not seen a desklamp yet."``."""
        if self.task.task_type != "look_at_obj_in_light":
            return ""
        lamp_type = str(self.task.meta.get("toggle", "")).lower()
        seen = [(obj, where) for obj, where in self.known.items() if entity_type(obj) == lamp_type]
        if not seen:
            return f" I have not seen {_article(lamp_type)} {lamp_type} yet."
        lamp, where = seen[0]
        return f" The {lamp} is here too." if where == here else f" I saw the {lamp} on {where}."

    def _follow(self, plan: list[str]) -> tuple[str, str]:
        cmd = plan[0]
        nxt = plan[1] if len(plan) > 1 else ""
        if cmd.startswith("go to "):
            place = cmd[len("go to "):]
            if m := re.match(r"^take (.+) from ", nxt):
                thought = f"The {m.group(1)} is in {place}. I will go to {place} to take it."
            elif m := re.match(r"^(heat|cool|clean) (.+) with ", nxt):
                thought = f"Now I need to {m.group(1)} the {m.group(2)}. I will go to {place}."
            elif m := re.match(r"^move (.+) to ", nxt):
                thought = f"Now I need to put the {m.group(1)} in {place}. I will go to {place}."
            elif m := re.match(r"^use (.+)$", nxt):
                thought = f"Now I need to use the {m.group(1)}. I will go to {place}."
            else:
                thought = f"I will go to {place}."
        elif cmd.startswith("open "):
            thought = f"The {cmd[len('open '):]} is closed. I will open it."
        elif m := re.match(r"^take (.+) from (.+)$", cmd):
            thought = f"Now I find the {m.group(1)}. I will take it from {m.group(2)}.{self._lamp_note(m.group(2))}"
        elif m := re.match(r"^(heat|cool|clean) (.+) with (.+)$", cmd):
            thought = f"I will {m.group(1)} the {m.group(2)} with the {m.group(3)}."
        elif m := re.match(r"^move (.+) to (.+)$", cmd):
            thought = f"I will put the {m.group(1)} in the {m.group(2)}."
        elif m := re.match(r"^use (.+)$", cmd):
            held = self.holding or "object"
            thought = f"I will turn on the {m.group(1)} to look at the {held}."
        else:
            thought = f"I will {cmd}."
        return self._thought(thought), cmd

    def _goal_summary(self) -> str:
        meta = self.task.meta
        obj = str(meta.get("object", "")).lower()
        recep = str(meta.get("receptacle", "")).lower()
        a = _article(obj)
        tt = self.task.task_type
        if tt in TRANSFORM_APPLIANCE:
            appliance, _, verb = TRANSFORM_APPLIANCE[tt]
            return f"To solve the task, I need to find and take {a} {obj}, then {verb} it with {appliance.lower()}, then put it in {recep}."
        if tt == "pick_two_obj_and_place":
            return (f"To solve the task, I need to find and take the first {obj}, put it in {recep}, "
                    f"then find and take the second {obj}, put it in {recep}.")
        if tt == "look_at_obj_in_light":
            lamp = str(meta.get("toggle", "")).lower()
            return f"To solve the task, I need to find and take {a} {obj}, then find and use {_article(lamp)} {lamp}."
        return f"To solve the task, I need to find and take {a} {obj}, then put it in {recep}."

    def _thought(self, text: str) -> str:
        if self.first_thought:
            self.first_thought = False
            return f"{self._goal_summary()} {text}"
        return text


# --------------------------------------------------------------------------- task source A

OFFICIAL_SPLITS: dict[str, str] = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}


def official_games(data_dir: Path, folder: str) -> list[Path]:
    """Trial folders (holding ``game.tw-pddl`` and ``traj_data.json``) of one official split."""
    split_dir = Path(data_dir) / folder
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: ALFWorld split folder not found (expected {sorted(OFFICIAL_SPLITS.values())})")
    return sorted(p.parent for p in split_dir.glob("*/*/game.tw-pddl"))


def _read_traj(trial: Path) -> dict[str, Any]:
    traj_file = trial / "traj_data.json"
    try:
        traj = json.loads(traj_file.read_text())
        traj["task_type"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{traj_file}: unreadable ALFWorld traj_data ({exc!r})") from None
    return traj


def official_skip_reason(trial: Path, task_types: tuple[str, ...] = TASK_TYPES) -> str | None:
    """Why ALFWorld's own loader (``AlfredTWEnv.collect_game_files``) would not play this trial, or None:
    a movable-receptacle or sliced-object trial, a task type not asked for, or a game not marked solvable."""
    if "movable" in str(trial) or "Sliced" in str(trial):
        return "movable or sliced"
    if _read_traj(trial)["task_type"] not in task_types:
        return "another task type"
    game_file = trial / "game.tw-pddl"
    try:
        solvable = json.loads(game_file.read_text()).get("solvable")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{game_file}: unreadable ALFWorld game ({exc!r})") from None
    return None if solvable is True else "not marked solvable"


def pick_official_games(trials: list[Path], k: int, seed: str, where: str,
                        task_types: tuple[str, ...] = TASK_TYPES) -> list[Path]:
    """``k`` trials in a seeded order, skipping those ALFWorld's loader skips (:func:`official_skip_reason`);
    only as many files are read as it takes to find them."""
    order = list(trials)
    random.Random(seed).shuffle(order)
    picked: list[Path] = []
    skipped: dict[str, int] = {}
    for trial in order:
        if len(picked) == k:
            return picked
        reason = official_skip_reason(trial, task_types)
        if reason is None:
            picked.append(trial)
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    if len(picked) < k:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none skipped"
        raise ValueError(f"{where}: {len(picked)} playable games of {len(trials)}, but the split asks for {k} "
                         f"(skipped as ALFWorld's loader does: {why}; task types asked for: {', '.join(task_types)})")
    return picked


def copy_official_game(trial: Path, root: Path, split: str, index: int, max_steps: int = MAX_STEPS) -> Task:
    """Copy one official trial into the tasks root (same layout) and return its manifest entry."""
    import shutil

    traj = _read_traj(trial)
    task_type = traj["task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"{trial / 'traj_data.json'}: unknown task_type {task_type!r}")
    anns = traj.get("turk_annotations", {}).get("anns", [])
    description = anns[0]["task_desc"] if anns else ""
    if not description:  # the goal sentence of the game's grammar (a JSON string inside the JSON file)
        grammar = json.loads((trial / "game.tw-pddl").read_text()).get("grammar", "")
        match = _TASK_RE.search(grammar)
        description = match.group(1) if match else task_type
    rel = Path(split) / trial.parent.name / trial.name
    dest = root / rel
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("game.tw-pddl", "traj_data.json"):
        shutil.copyfile(trial / name, dest / name)
    params = traj.get("pddl_params", {})
    return Task(env=ENV_NAME, split=split, task_id=f"{ENV_NAME}/{split}/{index:05d}", path=str(rel),
                task_type=task_type, description=description.strip().rstrip("."),
                meta={"object": params.get("object_target", ""), "receptacle": params.get("parent_target", ""),
                      "toggle": params.get("toggle_target", ""), "max_steps": max_steps,
                      "source": str(trial)})
