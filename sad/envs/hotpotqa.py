"""HotPotQA-ReAct: multi-hop questions answered with ``search``, ``lookup`` and ``finish``.

The environment reproduces the observation semantics of the ReAct paper's Wikipedia
environment (``wikienv.py``), offline:

* ``search[entity]`` - the page's first five sentences when a page with that title exists,
  else ``Could not find <entity>. Similar: [<up to five titles>].`` (titles ranked by BM25);
* ``lookup[keyword]`` - ``(Result i / n) <sentence>``: the next sentence of the current page
  that holds the keyword, or ``No more results.``;
* ``finish[answer]`` - ends the episode; reward = exact match with HotPotQA's normalisation;
* ``think[thought]`` - ``Nice thought.``: a valid step that changes nothing (as ``wikienv.py``).

Pages come from the ``context`` paragraphs of HotPotQA JSON files (``[[title, [sentences]]]``),
the union over every split file of the task folder, so each question's gold and distractor
paragraphs form a small offline Wikipedia. Task source A is an official HotPotQA file; task
source B (:func:`generate_questions`) writes fictional pages with bridge and comparison
questions in the same JSON format.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sad.envs.base import Observation, Task, task_location
from sad.envs.text import BM25Index
from sad.envs.text import words as _tokens
from sad.io import MissingEntryError

ENV_NAME = "hotpotqa"
MAX_STEPS = 7  # ReAct's HotPotQA runs stop after 7 steps
ECHO_LIMIT = 200  # an invalid action is echoed like the ReAct WikiEnv does, but a huge one is cut
PAGE_SENTENCES = 5  # sentences a search shows (wikienv's get_page_obs)
QUESTION_TYPES: tuple[str, ...] = ("bridge", "comparison")

_ACTION_RE = re.compile(r"^(search|lookup|finish|think)\[(.*)\]$", re.IGNORECASE | re.DOTALL)


# --------------------------------------------------------------------------- metric (HotPotQA's)

def normalize_answer(text: str) -> str:
    """HotPotQA's answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 as in HotPotQA's ``hotpot_evaluate_v1.py`` (yes/no/noanswer must match exactly)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- data files

def load_questions(path: Path) -> list[dict[str, Any]]:
    """Read and check one HotPotQA JSON file (a list of question records)."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable HotPotQA JSON file ({exc})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(records).__name__}")
    for i, rec in enumerate(records):
        missing = [k for k in ("_id", "question", "answer", "supporting_facts", "context") if k not in rec]
        if missing:
            raise ValueError(f"{path}: question #{i} lacks field(s) {missing}")
        for j, para in enumerate(rec["context"]):
            if not (isinstance(para, list) and len(para) == 2 and isinstance(para[1], list)):
                raise ValueError(f"{path}: question #{i} ({rec['_id']}): context[{j}] is not [title, [sentences]]")
    return records


@dataclass(frozen=True)
class Corpus:
    """Offline pages: title -> sentences, with a BM25 index over titles for 'Similar:' lists."""

    pages: dict[str, list[str]]
    by_key: dict[str, str]  # normalised title -> title

    @staticmethod
    def key(title: str) -> str:
        return " ".join(title.lower().replace("_", " ").split())

    def find(self, entity: str) -> list[str] | None:
        title = self.by_key.get(self.key(entity))
        return None if title is None else self.pages[title]

    def similar(self, entity: str, k: int = 5) -> list[str]:
        titles, index = _title_index(self)
        return [titles[i] for i in index.search(entity, k)]


_INDEX: dict[int, tuple[list[str], BM25Index]] = {}


def _title_index(corpus: Corpus) -> tuple[list[str], BM25Index]:
    if id(corpus) not in _INDEX:
        titles = sorted(corpus.pages)
        _INDEX[id(corpus)] = (titles, BM25Index(titles))
    return _INDEX[id(corpus)]


@lru_cache(maxsize=8)
def load_corpus(folder: str) -> Corpus:
    """Union of the context paragraphs of every ``*.json`` question file in ``folder``."""
    pages: dict[str, list[str]] = {}
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no HotPotQA JSON files")
    for file in files:
        for rec in load_questions(file):
            for title, sentences in rec["context"]:
                pages.setdefault(title, [s.strip() for s in sentences if s.strip()])
    return Corpus(pages=pages, by_key={Corpus.key(t): t for t in pages})


@lru_cache(maxsize=8)
def _questions_by_id(file: str) -> dict[str, dict[str, Any]]:
    return {rec["_id"]: rec for rec in load_questions(Path(file))}


# --------------------------------------------------------------------------- environment

class HotpotEnv:
    """One question at a time against the offline corpus of its task folder."""

    name = ENV_NAME
    max_steps = MAX_STEPS

    def __init__(self, expert_plan: bool = False):
        self.expert_plan = expert_plan
        self._question: dict[str, Any] | None = None
        self._corpus: Corpus | None = None
        self._page: list[str] | None = None
        self._lookup_keyword: str | None = None
        self._lookup_list: list[str] = []
        self._lookup_cnt = 0
        self.steps = 0

    def reset(self, task: Task, tasks_root: Path) -> Observation:
        file = task_location(tasks_root, task)
        if not file.is_file():
            raise FileNotFoundError(f"{task.task_id}: question file not found: {file}")
        qid = task.meta.get("qid")
        question = _questions_by_id(str(file)).get(qid)
        if question is None:
            raise MissingEntryError(f"{task.task_id}: question {qid!r} not in {file}")
        self._question = question
        self._corpus = load_corpus(str(file.parent))
        self._page, self._lookup_keyword, self._lookup_list, self._lookup_cnt = None, None, [], 0
        self.steps = 0
        self.max_steps = int(task.meta.get("max_steps", MAX_STEPS))
        return Observation(text=f"Question: {question['question']}", info=self._info())

    def _info(self, **extra: Any) -> dict[str, Any]:
        info: dict[str, Any] = dict(extra)
        if self.expert_plan and self._question is not None and self._corpus is not None:
            titles = {t for t, _ in self._question["supporting_facts"]}
            info["gold"] = {"question": self._question,
                            "pages": {t: self._corpus.pages[t] for t in titles if t in self._corpus.pages}}
        return info

    def step(self, action: str) -> Observation:
        action = str(action)
        if self._question is None or self._corpus is None:
            raise RuntimeError("step() before reset()")
        self.steps += 1
        match = _ACTION_RE.match(" ".join(str(action).split()))
        if match is None:
            shown = action if len(action) <= ECHO_LIMIT else action[:ECHO_LIMIT] + "..."
            return self._obs(f"Invalid action: {shown}", valid=False)
        verb, arg = match.group(1).lower(), match.group(2).strip()
        if verb == "finish":
            em = exact_match(arg, self._question["answer"])
            f1 = f1_score(arg, self._question["answer"])
            return Observation(text=f"Episode finished, reward = {int(em)}", done=True, success=em == 1.0,
                               reward=em, info=self._info(em=em, f1=f1, answer=arg))
        if verb == "search":
            return self._obs(self._search(arg))
        if verb == "think":  # as ReAct's Wikipedia environment: a valid step that changes nothing
            return self._obs("Nice thought.")
        return self._obs(self._lookup(arg))

    def _obs(self, text: str, valid: bool = True) -> Observation:
        done = self.steps >= self.max_steps
        info = self._info(em=0.0, f1=0.0, answer=None) if done else self._info()
        return Observation(text=text, done=done, valid=valid, info=info)

    def _search(self, entity: str) -> str:
        assert self._corpus is not None
        page = self._corpus.find(entity)
        if page is None:
            self._page = None
            return f"Could not find {entity}. Similar: {self._corpus.similar(entity)}."
        self._page, self._lookup_keyword, self._lookup_list, self._lookup_cnt = page, None, [], 0
        return " ".join(page[:PAGE_SENTENCES])

    def _lookup(self, keyword: str) -> str:
        if self._page is None:
            return "No more results."
        if self._lookup_keyword != keyword:
            self._lookup_keyword = keyword
            self._lookup_list = [s for s in self._page if keyword.lower() in s.lower()]
            self._lookup_cnt = 0
        if self._lookup_cnt >= len(self._lookup_list):
            return "No more results."
        self._lookup_cnt += 1
        return f"(Result {self._lookup_cnt} / {len(self._lookup_list)}) {self._lookup_list[self._lookup_cnt - 1]}"


# --------------------------------------------------------------------------- expert

_STOPWORDS = frozenset("a an the of in on at to is was were are and or by for from with which what who where when "
                       "how did does do it its this that first".split())


def lookup_keyword(page: list[str], index: int, question: str = "", answer: str = "") -> str:
    """A word of sentence ``index`` that no earlier sentence holds (so one lookup finds it),
    preferring words of the question and never a word of the answer."""
    earlier = " ".join(page[:index]).lower()
    banned = set(_tokens(answer))
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z-]{2,}", page[index])
             if w.lower() not in _STOPWORDS and w.lower() not in banned and w.lower() not in earlier]
    asked = set(_tokens(question))
    words.sort(key=lambda w: w.lower() not in asked)  # stable: question words first
    if words:
        return words[0]
    return next((w for w in page[index].split() if w.lower() not in banned), page[index].split()[0])


class HotpotExpert:
    """Follows the supporting facts: search each gold page, look up facts beyond the first five
    sentences, then finish with the gold answer; thoughts quote the evidence found."""

    def reset(self, task: Task, first: Observation) -> None:
        """Plan the episode from the supporting facts the environment shares with its expert."""
        gold = first.info.get("gold")
        if gold is None:
            raise ValueError(f"{task.task_id}: the expert needs an environment made with expert_plan=True")
        self.question: dict[str, Any] = gold["question"]
        pages: dict[str, list[str]] = gold["pages"]
        self._evidence: list[str] = []
        self._last_target: str | None = None
        self._proposed: tuple[str, str] | None = None  # the plan step the last act() proposed
        plan: list[tuple[str, str]] = []
        titles: list[str] = []
        for title, _ in self.question["supporting_facts"]:
            if title not in titles:
                titles.append(title)
        for title in titles:
            plan.append(("search", title))
            page = pages.get(title, [])
            for t, idx in self.question["supporting_facts"]:
                if t == title and PAGE_SENTENCES <= idx < len(page):
                    plan.append(("lookup", lookup_keyword(page, idx, self.question["question"],
                                                          self.question["answer"])))
        self._plan = plan

    def act(self, obs: Observation) -> tuple[str, str]:
        missed = re.match(r"Could not find (.*?)\. Similar: ", obs.text)
        if missed and self._last_target is not None:  # a mistyped search (injected mistake): search the exact title
            target = self._last_target
            self._proposed = ("search", target)
            return (f"There is no page named {missed.group(1)}. I need to search the exact title {target}.",
                    f"search[{target}]")
        if missed and self._plan and self._plan[0][0] == "search":  # another's mistyped search (overruled)
            self._proposed = self._plan.pop(0)
            self._last_target = self._proposed[1]
            return (f"There is no page named {missed.group(1)}. I need to search the exact title {self._last_target}.",
                    f"search[{self._last_target}]")
        if self._last_target is not None and obs.valid:
            self._evidence.append(_evidence_sentence(obs.text, self.question))
        if not self._plan:
            answer = self.question["answer"]
            comparison = self.question.get("type") == "comparison"
            facts = " ".join(self._evidence if comparison else self._evidence[-1:])
            thought = f"{facts} So the answer is {answer}." if facts else f"The answer is {answer}."
            self._last_target, self._proposed = None, None
            return thought, f"finish[{answer}]"
        verb, arg = self._plan.pop(0)
        self._proposed = (verb, arg)
        if verb == "search":
            if not self._evidence:
                thought = f"I need to search {arg} to answer the question."
            else:
                thought = f"{self._evidence[-1]} Next I need to search {arg}."
        else:
            thought = f"The first sentences of this page do not say it. I need to look up {arg}."
        self._last_target = arg
        return thought, f"{verb}[{arg}]"

    def overruled(self) -> None:
        """The action the last :meth:`act` proposed did not run; another's did (a student's, in takeover and
        DAgger labels): its plan step is still to do, and the next observation is no evidence for it."""
        if self._proposed is not None:
            self._plan.insert(0, self._proposed)
        self._proposed, self._last_target = None, None


def _evidence_sentence(observation: str, question: dict[str, Any]) -> str:
    """The sentence of an observation that shares most words with the question and answer."""
    text = re.sub(r"^\(Result \d+ / \d+\) ", "", observation)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    asked = set(_tokens(question["question"])) - _STOPWORDS
    answer = set(_tokens(question["answer"])) - _STOPWORDS

    def score(i: int) -> tuple[int, int, int]:
        words = set(_tokens(sentences[i]))
        return (len(words & answer), len(words & asked), -i)

    best = sentences[max(range(len(sentences)), key=score)]
    return best.strip()


# --------------------------------------------------------------------------- task source B

_SYLLABLES = ("ka", "ren", "dor", "mi", "lo", "vas", "tel", "ori", "an", "bel", "cor", "da", "fen", "gal",
              "har", "is", "jun", "kel", "lun", "mar", "nor", "pel", "quin", "ros", "sal", "tor", "ul",
              "ven", "wil", "zan", "bra", "ce", "th", "el", "ia", "os", "ut", "ra")
_NATIONALITIES = ("Norwegian", "Chilean", "Portuguese", "Canadian", "Kenyan", "Japanese", "Austrian",
                  "Mexican", "Irish", "Polish", "Egyptian", "Danish", "Brazilian", "Korean", "Greek")
_COUNTRIES = ("Norway", "Chile", "Portugal", "Canada", "Kenya", "Japan", "Austria", "Mexico", "Ireland",
              "Poland", "Egypt", "Denmark", "Brazil", "Korea", "Greece")
_GENRES = ("drama", "comedy", "thriller", "documentary", "western", "musical", "science fiction")
_PROFESSIONS = ("film director", "screenwriter", "novelist", "painter", "composer", "architect")
_NOUNS = ("River", "Garden", "Winter", "Lantern", "Harbor", "Mirror", "Orchard", "Signal", "Compass",
          "Meadow", "Tide", "Ember", "Falcon", "Archive", "Summit", "Canyon", "Violin", "Atlas")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


@dataclass
class _World:
    """Fictional entities whose pages make the corpus; every title is unique."""

    rng: random.Random
    titles: set[str]

    def unique(self, make: Any) -> str:
        for _ in range(1000):
            title = make()
            if title not in self.titles:
                self.titles.add(title)
                return title
        raise RuntimeError("could not draw a unique title")

    def city(self) -> tuple[str, list[str], dict[str, Any]]:
        r = self.rng
        name = self.unique(lambda: _name(r, 2) + r.choice(("ville", "burg", "port", "stad", "ford", "")))
        country = r.choice(_COUNTRIES)
        pop = r.randint(20, 900) * 1000
        sentences = [
            f"{name} is a city in {country}.",
            f"It lies on the {_name(r, 2)} River.",
            f"The city was founded in {r.randint(1100, 1850)}.",
            f"{name} is known for its {r.choice(('markets', 'bridges', 'museums', 'festivals'))}.",
            f"Its economy is based on {r.choice(('fishing', 'trade', 'tourism', 'textiles'))}.",
            f"As of the last census, {name} has a population of {pop:,}.",
        ]
        return name, sentences, {"country": country, "population": pop}

    def person(self, profession: str, cities: list[str]) -> tuple[str, list[str], dict[str, Any]]:
        r = self.rng
        name = self.unique(lambda: f"{_name(r, 2)} {_name(r, r.randint(2, 3))}")
        nationality, year, birthplace = r.choice(_NATIONALITIES), r.randint(1900, 1990), r.choice(cities)
        pronoun = r.choice(("He", "She"))
        sentences = [
            f"{name} ({year}) is {_article(nationality)} {nationality} {profession}.",  # "born" only where the birthplace is
            f"{pronoun} studied at the {r.choice(_NOUNS)} Academy.",
            f"{pronoun} began working in {r.randint(year + 18, year + 30)}.",
            f"{pronoun} has received several awards for {pronoun.lower() == 'he' and 'his' or 'her'} work.",
            f"Critics have praised {pronoun.lower() == 'he' and 'his' or 'her'} {r.choice(('style', 'humour', 'precision'))}.",
            f"{pronoun} lives with {r.choice(('a cat', 'two dogs', 'family', 'friends'))} near the coast.",
            f"{pronoun} was born in {birthplace}, where {pronoun.lower()} grew up.",
        ]
        return name, sentences, {"nationality": nationality, "year": year, "birthplace": birthplace}

    def work(self, kind: str, creator: str, cities: list[str]) -> tuple[str, list[str], dict[str, Any]]:
        r = self.rng
        title = self.unique(lambda: f"The {r.choice(_NOUNS)} of {_name(r, 2)}")
        year, city = r.randint(1950, 2020), r.choice(cities)
        if kind == "film":
            sentences = [
                f"{title} is a {year} {r.choice(_GENRES)} film directed by {creator}.",
                f"It follows a {r.choice(('sailor', 'teacher', 'detective', 'family'))} in a small town.",
                f"The film premiered at the {r.choice(_NOUNS)} Film Festival.",
                f"It received {r.choice(('mixed', 'warm', 'strong'))} reviews from critics.",
                f"The running time is {r.randint(80, 160)} minutes.",
                f"The score was written by {_name(r, 2)} {_name(r, 2)}.",
                f"The film was shot on location in {city}.",
            ]
        else:
            sentences = [
                f"{title} is a {year} novel by {creator}.",
                f"It is told from the point of view of a {r.choice(('child', 'soldier', 'painter', 'ghost'))}.",
                f"The book was a {r.choice(('modest', 'surprise', 'major'))} success.",
                f"It was translated into {r.randint(3, 30)} languages.",
                f"A sequel was announced in {year + r.randint(1, 5)}.",
                f"The cover shows a {r.choice(_NOUNS).lower()}.",
                f"The story is set in {city}.",
            ]
        return title, sentences, {"year": year, "creator": creator, "city": city}


MAX_QUESTION_DRAWS = 1000


def generate_questions(seed: int, n: int, distractors: int = 8, id_prefix: str = "gen") -> list[dict[str, Any]]:
    """``n`` bridge and comparison questions in HotPotQA's JSON format over fictional pages.

    Each record holds its gold paragraphs plus ``distractors`` other pages (the distractor
    setting). Bridge questions need two hops, some through a fact past the first five
    sentences (found with ``lookup``); comparison questions compare two pages.
    """
    rng = random.Random(f"hotpotqa:{seed}")
    world = _World(rng, set())
    pages: dict[str, list[str]] = {}
    facts: dict[str, dict[str, Any]] = {}

    def add(entry: tuple[str, list[str], dict[str, Any]]) -> str:
        title, sentences, f = entry
        pages[title], facts[title] = sentences, f
        return title

    cities = [add(world.city()) for _ in range(max(8, n // 4))]
    directors = [add(world.person("film director", cities)) for _ in range(max(6, n // 5))]
    novelists = [add(world.person("novelist", cities)) for _ in range(max(6, n // 5))]
    films = [add(world.work("film", rng.choice(directors), cities)) for _ in range(max(6, n // 2))]
    novels = [add(world.work("novel", rng.choice(novelists), cities)) for _ in range(max(6, n // 2))]

    def sentence_of(title: str, needle: str) -> int:
        return next(i for i, s in enumerate(pages[title]) if needle in s)

    records: list[dict[str, Any]] = []
    asked: set[tuple[str, frozenset[str]]] = set()  # (kind, entities): a question is asked once
    kinds = ("nationality_of_director", "birthplace_of_author", "country_of_location", "earlier_work",
             "same_nationality")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(MAX_QUESTION_DRAWS):
            if kind == "nationality_of_director":
                film = rng.choice(films)
                person = facts[film]["creator"]
                question = f"What is the nationality of the director of {film}?"
                answer, qtype = facts[person]["nationality"], "bridge"
                support = [[film, 0], [person, 0]]
            elif kind == "birthplace_of_author":
                novel = rng.choice(novels)
                person = facts[novel]["creator"]
                question = f"In which city was the author of {novel} born?"
                answer, qtype = facts[person]["birthplace"], "bridge"
                support = [[novel, 0], [person, sentence_of(person, "was born in")]]
            elif kind == "country_of_location":
                film = rng.choice(films)
                city = facts[film]["city"]
                question = f"In which country was {film} shot?"
                answer, qtype = facts[city]["country"], "bridge"
                support = [[film, sentence_of(film, "shot on location")], [city, 0]]
            elif kind == "earlier_work":
                a, b = rng.sample(films + novels, 2)
                while facts[a]["year"] == facts[b]["year"]:
                    a, b = rng.sample(films + novels, 2)
                question = f"Which came out first, {a} or {b}?"
                answer, qtype = (a if facts[a]["year"] < facts[b]["year"] else b), "comparison"
                support = [[a, 0], [b, 0]]
            else:
                a, b = rng.sample(directors + novelists, 2)
                question = f"Are {a} and {b} of the same nationality?"
                answer = "yes" if facts[a]["nationality"] == facts[b]["nationality"] else "no"
                qtype, support = "comparison", [[a, 0], [b, 0]]
            key = (kind, frozenset(title for title, _ in support))
            if key not in asked:
                break
        else:
            raise RuntimeError(f"hotpotqa: could not draw a new {kind} question after {MAX_QUESTION_DRAWS} tries "
                               f"(n={n} is too many for the generated world)")
        asked.add(key)
        gold = list(dict.fromkeys(t for t, _ in support))
        others = rng.sample(sorted(set(pages) - set(gold)), min(distractors, len(pages) - len(gold)))
        context = [[t, [(" " if j else "") + s for j, s in enumerate(pages[t])]] for t in gold + others]
        rng.shuffle(context)
        records.append({"_id": f"{id_prefix}-{i:05d}", "question": question, "answer": answer, "type": qtype,
                        "level": "medium", "supporting_facts": support, "context": context})
    return records


def write_split(records: list[dict[str, Any]], root: Path, split: str, max_steps: int = MAX_STEPS) -> list[Task]:
    """Write one split as a HotPotQA JSON file under ``root`` and return its manifest entries."""
    from sad.io import write_text_atomic

    rel = Path("data") / f"hotpot_{split}.json"
    write_text_atomic(root / rel, json.dumps(records, indent=1))
    return [
        Task(env=ENV_NAME, split=split, task_id=f"{ENV_NAME}/{split}/{i:05d}", path=str(rel),
             task_type=rec.get("type", "bridge"), description=rec["question"],
             meta={"qid": rec["_id"], "max_steps": max_steps})
        for i, rec in enumerate(records)
    ]


def official_splits(file: Path, seed: int, counts: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Disjoint seeded train/dev/test draws from one official HotPotQA file: in one seeded order, test from
    its front, then dev, and train from its back (as WebShop's official goals), so a larger train split of
    another profile never takes this profile's test questions while both fit in the file."""
    records = load_questions(file)
    need = sum(counts.values())
    if need > len(records):
        raise ValueError(f"{file}: {len(records)} questions, but the splits ask for {need} ({counts})")
    order = list(range(len(records)))
    random.Random(f"hotpotqa-official:{seed}").shuffle(order)
    k_test, k_dev, k_train = counts.get("test", 0), counts.get("dev", 0), counts.get("train", 0)
    picks = {"test": order[:k_test], "dev": order[k_test:k_test + k_dev],
             "train": order[::-1][:k_train]}
    return {split: [records[i] for i in picks[split]] for split in counts}
