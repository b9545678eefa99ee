"""WebShop in text mode: search a catalogue, open items, choose options, buy.

Pages follow WebShop's text observation mode (``web_agent_text_env``), one page per
observation with `` [SEP] `` between elements and clickables in brackets:

* start: ``WebShop [SEP] Instruction: [SEP] <goal> [SEP] [Search]``
* results: ``[Back to Search] [SEP] Page 1 (Total results: 50) [SEP] [Next >] [SEP] [B0...] [SEP] <title> [SEP] $12.99 …``
* item: ``[Back to Search] [SEP] [< Prev] [SEP] size [SEP] [small] [SEP] [large] … [SEP] <title> [SEP] Price: $12.99``
  ``[SEP] Rating: N.A. [SEP] [Description] [SEP] [Features] [SEP] [Reviews] [SEP] [Buy Now]``

Actions are ``search[query]`` (on the start page) and ``click[<clickable>]``. The reward on
``click[Buy Now]`` is WebShop's ``get_reward``: (matched attributes + matched options + price
within budget) / (attributes + options + 1), times the product-type score; success = 1.0.

Task source A: WebShop's product file (``items_shuffle*.json``) with its human instruction
file (``items_human_ins*.json``). Task source B (:func:`generate_catalogue`) writes the same two
files for a generated catalogue. Search is BM25 (``rank_bm25``) over each product's text, as
WebShop's own Lucene BM25 index, top 50 results, 10 per page.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sad.envs.base import ExpertGaveUp, Observation, Task, content_split, task_location
from sad.envs.text import BM25Index
from sad.envs.text import words as _tokens
from sad.io import MissingEntryError

ENV_NAME = "webshop"
MAX_STEPS = 15
RESULTS_PER_PAGE = 10
TOP_K = 50
SEP = " [SEP] "
PRODUCTS_FILE = "items_shuffle.json"
INSTRUCTIONS_FILE = "items_human_ins.json"

_ACTION_RE = re.compile(r"^(search|click)\[(.*)\]$", re.IGNORECASE | re.DOTALL)
_STOPWORDS = frozenset("a an the and or of for with to in on i need want am looking is that it my be "
                       "price lower than dollars".split())


def _price(text: str | float | int) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    found = re.findall(r"\d+(?:\.\d+)?", str(text).replace(",", ""))
    if not found:
        raise ValueError(f"no price in {text!r}")
    return float(found[0])


# --------------------------------------------------------------------------- catalogue

@dataclass(frozen=True)
class Product:
    asin: str
    name: str
    query: str
    category: str
    product_category: str
    price: float
    description: str
    bullet_points: tuple[str, ...]
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]

    @property
    def search_text(self) -> str:
        opts = " ".join(v for vals in self.options.values() for v in vals)
        return " ".join([self.name, self.query, self.product_category, " ".join(self.bullet_points),
                         " ".join(self.attributes), opts])


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction: str
    attributes: tuple[str, ...]
    options: tuple[str, ...]
    price_upper: float


@dataclass
class Catalogue:
    products: dict[str, Product]
    goals: dict[str, list[Goal]]  # asin -> goals whose target it is
    _index: BM25Index | None = None
    _order: list[str] = field(default_factory=list)

    def search(self, query: str, k: int = TOP_K) -> list[str]:
        """Top ``k`` asins for ``query`` (BM25 over each product's text)."""
        if self._index is None:
            self._order = sorted(self.products)
            self._index = BM25Index([self.products[a].search_text for a in self._order])
        return [self._order[i] for i in self._index.search(query, k)]


DEFAULT_PRICE = 100.0  # WebShop's load_products: a product without a price costs $100


def _product_from_record(rec: dict[str, Any], where: str) -> Product:
    """One product as WebShop's ``load_products`` reads it: no price is $100, an option without values is
    left out, a lone bullet-point string is one bullet point."""
    missing = [k for k in ("asin", "name") if k not in rec]
    if missing:
        raise ValueError(f"{where}: product lacks field(s) {missing}")
    options = {str(name).lower(): tuple(str(v["value"] if isinstance(v, dict) else v).lower() for v in values)
               for name, values in (rec.get("customization_options") or {}).items() if values is not None}
    pricing = rec.get("pricing")
    try:
        price = _price(pricing[0] if isinstance(pricing, list) else pricing) if pricing else DEFAULT_PRICE
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    bullets = rec.get("small_description") or []
    return Product(
        asin=str(rec["asin"]), name=str(rec["name"]), query=str(rec.get("query", "")),
        category=str(rec.get("category", "")), product_category=str(rec.get("product_category", "")),
        price=price, description=str(rec.get("full_description", "")),
        bullet_points=tuple(str(b) for b in (bullets if isinstance(bullets, list) else [bullets])),
        attributes=tuple(str(a).lower() for a in rec.get("attributes", []) or []), options=options,
    )


def load_catalogue(folder: str) -> Catalogue:
    """Read WebShop's product and human-instruction files from ``folder``; kept in memory while the
    files are unchanged (keyed by their absolute path, size and modification time, so a rewritten
    catalogue or another working directory's is read afresh)."""
    root = Path(folder).resolve()
    products_file, ins_file = root / PRODUCTS_FILE, root / INSTRUCTIONS_FILE
    for f in (products_file, ins_file):
        if not f.is_file():
            raise FileNotFoundError(f"{Path(folder) / f.name}: WebShop file not found")
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in (products_file, ins_file))
    return _read_catalogue(str(root), stamp)


@lru_cache(maxsize=8)
def _read_catalogue(folder: str, stamp: tuple) -> Catalogue:
    """The catalogue in ``folder`` (an absolute path) as its files were when they had ``stamp``."""
    root = Path(folder)
    products_file, ins_file = root / PRODUCTS_FILE, root / INSTRUCTIONS_FILE
    try:
        records = json.loads(products_file.read_text())
        instructions = json.loads(ins_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{root}: malformed WebShop JSON ({exc})") from None
    if not isinstance(records, list) or not isinstance(instructions, dict):
        raise ValueError(f"{root}: expected a list of products and a dict asin -> instructions")
    products = {}
    for i, rec in enumerate(records):
        p = _product_from_record(rec, f"{products_file} product #{i}")
        products.setdefault(p.asin, p)  # as WebShop: a repeated asin keeps its first record
    goals: dict[str, list[Goal]] = {}
    for asin, entries in instructions.items():
        if asin not in products:
            raise ValueError(f"{ins_file}: instruction for unknown product {asin!r}")
        for j, e in enumerate(entries):
            if "instruction" not in e:
                raise ValueError(f"{ins_file}: {asin} instruction #{j} lacks 'instruction'")
            instruction, upper = str(e["instruction"]), e.get("price_upper")
            if upper is None:  # WebShop's human goals: a price bound drawn above the product's price
                instruction, upper = _price_bound(instruction, products[asin].price, random.Random(f"{asin}:{j}"))
            goals.setdefault(asin, []).append(Goal(
                asin=asin, instruction=instruction,
                attributes=tuple(str(a).lower() for a in e.get("instruction_attributes", [])),
                options=tuple(str(o).lower() for o in e.get("instruction_options", [])),
                price_upper=float(upper),
            ))
    return Catalogue(products=products, goals=goals)


def catalogue_texts(folder: str | Path) -> Iterator[str]:
    """What the site can show of each product whatever the task: ASIN, name, category, price, bullet
    points, description, attributes and options (one string per product); for a domain vocabulary."""
    for p in load_catalogue(str(folder)).products.values():
        options = [f"{name}: {', '.join(values)}" for name, values in p.options.items()]
        yield "\n".join([p.asin, p.name, p.category, p.product_category, f"${p.price:.2f}", *p.bullet_points,
                         p.description, *p.attributes, *options])


PRICE_RANGE: tuple[float, ...] = tuple(10.0 * i for i in range(1, 100))


def _price_bound(instruction: str, price: float, rng: random.Random) -> tuple[str, float]:
    """WebShop's ``get_human_goals`` rule: an upper bound drawn from the next price steps."""
    steps = [p for p in PRICE_RANGE if p > price][:4]
    if len(steps) < 2:
        return instruction.strip("."), 1_000_000.0
    upper = sorted(rng.sample(steps, 2))[1]
    return f"{instruction.strip('.')}, and price lower than {upper:.2f} dollars", upper


# --------------------------------------------------------------------------- reward (WebShop's)

def _fuzzy(a: str, b: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.token_set_ratio(a, b)


def _type_words(text: str) -> set[str]:
    return {w for w in _tokens(text) if w not in _STOPWORDS and not w.isdigit()}


def type_reward(bought: Product, target: Product) -> float:
    """WebShop's r_type: query or category match, or overlap of the product-name words.

    WebShop compares spaCy nouns of the two names; offline we use content words (no model).
    """
    query_match = bought.query == target.query
    cat_a = {c.strip() for c in bought.product_category.split("›")}
    cat_b = {c.strip() for c in target.product_category.split("›")}
    category_match = len(cat_a & cat_b) >= 2
    desired, bought_words = _type_words(target.name), _type_words(bought.name)
    title_score = len(desired & bought_words) / len(desired) if desired else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


def reward(bought: Product, chosen: dict[str, str], price: float, goal: Goal, target: Product) -> dict[str, float]:
    """WebShop's ``get_reward`` for buying ``bought`` with ``chosen`` options."""
    text = " ".join([bought.name, " ".join(bought.bullet_points), bought.description]).lower()
    attr_matches = 0
    for g in goal.attributes:
        if any(_fuzzy(p, g) > 85 for p in bought.attributes) or g in text:
            attr_matches += 1
    option_matches = sum(1 for g in goal.options if any(_fuzzy(p, g) > 85 for p in chosen.values()))
    r_price = float(price <= goal.price_upper) if goal.price_upper > 0 else 0.0
    r_type = type_reward(bought, target)
    total = (attr_matches + option_matches + r_price) / (len(goal.attributes) + len(goal.options) + 1) * r_type
    return {"reward": round(total, 6), "r_type": r_type, "r_price": r_price,
            "r_att": attr_matches / len(goal.attributes) if goal.attributes else 1.0,
            "r_option": option_matches / len(goal.options) if goal.options else 1.0}


# --------------------------------------------------------------------------- environment

@dataclass
class _Page:
    kind: str  # start | results | item | detail
    query: str = ""
    page: int = 1
    asin: str = ""
    detail: str = ""


class WebShopEnv:
    """WebShop's text-mode site over a catalogue folder; one instruction at a time."""

    name = ENV_NAME
    max_steps = MAX_STEPS

    def __init__(self, expert_plan: bool = False):
        self.expert_plan = expert_plan
        self.catalogue: Catalogue | None = None
        self.goal: Goal | None = None
        self.steps = 0

    def reset(self, task: Task, tasks_root: Path) -> Observation:
        folder = task_location(tasks_root, task)
        self.catalogue = load_catalogue(str(folder))
        asin, index = task.meta.get("asin"), int(task.meta.get("goal_index", 0))
        goals = self.catalogue.goals.get(asin, [])
        if index >= len(goals):
            raise MissingEntryError(f"{task.task_id}: no instruction #{index} for product {asin!r} in {folder}")
        self.goal = goals[index]
        self.steps = 0
        self.max_steps = int(task.meta.get("max_steps", MAX_STEPS))
        self.chosen: dict[str, str] = {}
        self.history: list[_Page] = [_Page("start")]
        self._results: dict[str, list[str]] = {}
        return self._render()

    @property
    def page(self) -> _Page:
        return self.history[-1]

    def clickables(self) -> list[str]:
        """The lower-cased clickables of the current page (WebShop's ``available_actions``)."""
        p = self.page
        if p.kind == "start":
            return []
        if p.kind == "results":
            hits = self._results[p.query]
            out = ["back to search"]
            if p.page > 1:
                out.append("< prev")
            if p.page * RESULTS_PER_PAGE < len(hits):
                out.append("next >")
            return out + [a.lower() for a in self._page_hits(p)]
        out = ["back to search", "< prev"]
        if p.kind == "item":
            product = self._product(p.asin)
            out += [v for vals in product.options.values() for v in vals]
            out += ["description", "features", "reviews", "buy now"]
        return out

    def _product(self, asin: str) -> Product:
        assert self.catalogue is not None
        return self.catalogue.products[asin]

    def _page_hits(self, p: _Page) -> list[str]:
        hits = self._results[p.query]
        return hits[(p.page - 1) * RESULTS_PER_PAGE: p.page * RESULTS_PER_PAGE]

    def step(self, action: str) -> Observation:
        if self.goal is None or self.catalogue is None:
            raise RuntimeError("step() before reset()")
        self.steps += 1
        match = _ACTION_RE.match(" ".join(str(action).split()))
        if match is None:
            return self._render(valid=False)
        verb, arg = match.group(1).lower(), match.group(2).strip()
        p = self.page
        if verb == "search":
            if p.kind != "start" or not arg:
                return self._render(valid=False)
            if arg not in self._results:
                self._results[arg] = self.catalogue.search(arg)
            self.history.append(_Page("results", query=arg, page=1))
            return self._render()
        target = arg.lower()
        if target not in self.clickables():
            return self._render(valid=False)
        if target == "back to search":
            self.history = [_Page("start")]
            self.chosen = {}
        elif target == "< prev":
            if p.kind == "results" and p.page > 1:
                self.history.append(_Page("results", query=p.query, page=p.page - 1))
            else:
                self.history.pop()
                if self.page.kind != "item":
                    self.chosen = {}
        elif target == "next >":
            self.history.append(_Page("results", query=p.query, page=p.page + 1))
        elif p.kind == "results":
            asin = next(a for a in self._page_hits(p) if a.lower() == target)
            self.history.append(_Page("item", query=p.query, asin=asin))
            self.chosen = {}
        elif target in ("description", "features", "reviews"):
            self.history.append(_Page("detail", query=p.query, asin=p.asin, detail=target))
        elif target == "buy now":
            return self._buy()
        else:  # an option value
            product = self._product(p.asin)
            name = next(n for n, vals in product.options.items() if target in vals)
            self.chosen[name] = target
        return self._render()

    def _buy(self) -> Observation:
        assert self.goal is not None
        bought = self._product(self.page.asin)
        scores = reward(bought, self.chosen, bought.price, self.goal, self._product(self.goal.asin))
        r = scores["reward"]
        text = f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {r:.2f}"
        return Observation(text=text, done=True, success=r >= 1.0, reward=r, admissible=[],
                           info={**scores, "bought": bought.asin, "options": dict(self.chosen), **self._plan_info()})

    def _plan_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"page": self.page.kind, "asin": self.page.asin, "page_number": self.page.page,
                                "query": self.page.query}
        if self.page.kind == "results":
            info["hits"] = list(self._page_hits(self.page))
        if self.expert_plan and self.goal is not None:
            target = self._product(self.goal.asin)
            shown = self._product(self.page.asin) if self.page.asin else target
            info["goal"] = {"asin": self.goal.asin, "instruction": self.goal.instruction, "name": target.name, "query": target.query,
                            "attributes": list(self.goal.attributes), "options": list(self.goal.options),
                            "price_upper": self.goal.price_upper, "chosen": dict(self.chosen),
                            "option_names": {v: n for n, vals in shown.options.items() for v in vals}}
        return info

    def _render(self, valid: bool = True) -> Observation:
        text = self._page_text()
        if not valid:
            text = "Invalid action! " + text
        done = self.steps >= self.max_steps
        return Observation(text=text, done=done, valid=valid, admissible=self.shown_actions() or None,
                           info=self._plan_info())

    def _page_text(self) -> str:
        assert self.goal is not None
        p = self.page
        if p.kind == "start":
            parts = ["WebShop", "Instruction:", self.goal.instruction, "[Search]"]
        elif p.kind == "results":
            hits = self._results[p.query]
            parts = ["[Back to Search]", f"Page {p.page} (Total results: {len(hits)})"]
            if p.page > 1:
                parts.append("[< Prev]")
            if p.page * RESULTS_PER_PAGE < len(hits):
                parts.append("[Next >]")
            for asin in self._page_hits(p):
                product = self._product(asin)
                parts += [f"[{asin}]", product.name, f"${product.price:.2f}"]
        elif p.kind == "item":
            product = self._product(p.asin)
            parts = ["[Back to Search]", "[< Prev]"]
            for name, values in product.options.items():
                parts.append(name)
                parts += [f"[{v}]" for v in values]
            parts += [product.name, f"Price: ${product.price:.2f}", "Rating: N.A.", "[Description]",
                      "[Features]", "[Reviews]", "[Buy Now]"]
        else:
            product = self._product(p.asin)
            body = {"description": product.description, "features": " ".join(product.bullet_points),
                    "reviews": "No reviews yet."}[p.detail] or "N.A."
            parts = ["[Back to Search]", "[< Prev]", body]
        if p.kind == "item" and self.chosen:
            parts.insert(2, "Selected: " + ", ".join(self.chosen[n] for n in sorted(self.chosen)))
        return SEP.join(parts)

    def shown_actions(self) -> list[str]:
        """The page's valid ``click[...]`` actions, each clickable written as the page shows it
        (``click[B09ABC1234]``, ``click[Buy Now]``), so that an agent copies what it reads."""
        shown = {name.lower(): name for name in re.findall(r"\[([^\[\]]+)\]", self._page_text())}
        return [f"click[{shown.get(c, c)}]" for c in self.clickables()]


# --------------------------------------------------------------------------- expert

_HIT_RE = re.compile(r"\[(B[0-9A-Z]{9})\] \[SEP\] (.*?) \[SEP\] \$(\d+(?:\.\d+)?)")


_ITEM_RE = re.compile(r"([^\[\]]+?) \[SEP\] Price: \$(\d+(?:\.\d+)?)")
_SELECTED_RE = re.compile(r"\[SEP\] Selected: (.*?) \[SEP\]")


def parse_results(page_text: str) -> list[tuple[str, str, float]]:
    """``(asin, title, price)`` for each item listed on a results page."""
    return [(m.group(1), m.group(2), float(m.group(3))) for m in _HIT_RE.finditer(page_text)]


def _fold(word: str) -> str:
    """A word as matching sees it, plural folded: ``shirts`` -> ``shirt``, ``boxes`` -> ``box``,
    ``berries`` -> ``berry`` (``glass``, ``citrus`` stay)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def match_words(text: str) -> set[str]:
    """Content words of ``text`` folded for matching, as WebShop's reward compares text loosely: lower
    case, possessives dropped (``men's`` -> ``men``), plurals folded, stopwords out."""
    text = re.sub(r"['’]s\b", " ", text.lower())
    return {_fold(w) for w in _tokens(text) if w not in _STOPWORDS and w != "s"}


def coverage(wanted: set[str], words: set[str]) -> float:
    """Share of ``wanted`` found in ``words``, exactly or as a near spelling (rapidfuzz ratio >= 85, as the
    reward's option matching; ``tshirt`` and ``t shirt`` count as the same)."""
    from rapidfuzz import fuzz

    if not wanted:
        return 1.0
    joined = {a + b for a in words for b in words if a != b}
    found = sum(1 for w in wanted if w in words or w in joined or any(fuzz.ratio(w, x) >= 85 for x in words if len(x) > 3))
    return found / len(wanted)


class WebShopExpert:
    """Shops like a careful person from what the pages show, robust to real titles.

    Searches the instruction's attributes and type; ranks the in-budget items of a results page by how
    well their titles match (normalised words: plurals, possessives, near spellings; every asked word
    first, then the whole type, then most of it); opens the best, reads its Features when the title does
    not show an asked attribute (WebShop keeps most attributes off the page: then the search's ranking,
    which indexes them, is the best evidence), chooses the asked options and buys. An item that lacks an
    asked option is rejected and the next one opened; a fitting item seen before a wrong click is gone
    back to. It never sends a search that already failed: later searches use other words (type and
    options, type alone, the instruction's words); when none is left it gives up
    (:class:`~sad.envs.base.ExpertGaveUp`) with the reason, instead of looping to the step cap.
    """

    DETAILS = ("features",)

    def reset(self, task: Task, first: Observation) -> None:
        if "goal" not in first.info:
            raise ValueError(f"{task.task_id}: the expert needs an environment made with expert_plan=True")
        goal = first.info["goal"]
        self.searches: list[str] = []
        self.rejected: set[str] = set()
        self.upper = float(goal["price_upper"])
        self.opened: str | None = None
        self.seen_words: dict[str, set[str]] = {}  # asin -> words of its title and the detail pages read
        self.read: dict[str, set[str]] = {}  # asin -> detail pages read
        self.reading: str | None = None
        self.fitting: dict[str, tuple[str, int]] = {}  # asin -> (query, page) of items whose title fits fully

    # ---------------------------------------------------------------- matching

    def _queries(self, goal: dict[str, Any]) -> list[str]:
        """Searches in the order tried, without repeats."""
        asked = goal["instruction"].split(", and price lower than")[0]
        words = [w for w in _tokens(asked) if w not in _STOPWORDS]
        out: list[str] = []
        for q in (search_query(goal), " ".join([goal["query"], *goal["options"]]), goal["query"], " ".join(words)):
            q = " ".join(q.lower().split())
            if q and q not in out:
                out.append(q)
        return out

    @staticmethod
    def _missing_attributes(goal: dict[str, Any], words: set[str]) -> list[str]:
        return [a for a in goal["attributes"] if coverage(match_words(a), words) < 1.0]

    def _rank(self, goal: dict[str, Any], hits: list[tuple[str, str, float]]) -> list[tuple[int, str, str, float]]:
        """``(tier, asin, title, price)`` of the in-budget, unrejected items worth opening, best first. Tier 0:
        the title has the type and every asked attribute; 1: the whole type (most instruction words first);
        2: at least half the type's words (best match first)."""
        type_words = match_words(goal["query"])
        asked = match_words(goal["instruction"])
        ranked = []
        for position, (asin, title, price) in enumerate(hits):
            if price > self.upper or asin in self.rejected:
                continue
            words = match_words(title)
            type_share = coverage(type_words, words)
            if type_share < 0.5:
                continue
            attrs_ok = not self._missing_attributes(goal, words)
            tier = 0 if type_share == 1.0 and attrs_ok else 1 if type_share == 1.0 else 2
            key = (tier, 0.0 if tier == 0 else -type_share, 0 if tier == 0 else -len(asked & words), position)
            ranked.append((key, (tier, asin, title, price)))
        return [item for _, item in sorted(ranked)]

    def _resolve_options(self, goal: dict[str, Any], offered: set[str]) -> dict[str, str | None]:
        """Each asked option -> the offered value that names it: the same text, else the same words
        (``3 ounce (pack of 1)`` for ``3 ounces, pack of 1``), else a near spelling (ratio >= 90);
        never a different number (``pack of 12`` for ``pack of 6``)."""
        from rapidfuzz import fuzz

        out: dict[str, str | None] = {}
        for o in goal["options"]:
            same_words = [v for v in sorted(offered) if match_words(v) == match_words(o)]
            near = [v for v in sorted(offered) if fuzz.ratio(o, v) >= 90 and re.findall(r"\d+", o) == re.findall(r"\d+", v)]
            out[o] = o if o in offered else (same_words or near or [None])[0]
        return out

    # ---------------------------------------------------------------- acting

    def act(self, obs: Observation) -> tuple[str, str]:
        self._before_proposal = (len(self.searches), self.opened)
        info, goal = obs.info, obs.info["goal"]
        page = info["page"]
        clickable = {a[len("click["):-1].lower() for a in obs.admissible or []}
        if page == "start":
            return self._search(goal)
        if page == "results":
            return self._choose(goal, obs, clickable)
        if page == "detail":
            asin = info["asin"]
            if self.reading is None:  # reached by a wrong click
                return ("This is the detail page. I'll go back to the item.", "click[< Prev]")
            body = obs.text.split(SEP, 2)[-1]
            self.seen_words.setdefault(asin, set()).update(match_words(body))
            self.read.setdefault(asin, set()).add(self.reading)
            self.reading = None
            return ("I have read its details. I'll go back to the item.", "click[< Prev]")
        return self._check_item(goal, obs, clickable)

    def overruled(self) -> None:
        """The action the last :meth:`act` proposed did not run; another's did (a student's, in takeover and
        DAgger labels): forget what proposing it assumed (a search made, an item opened, a detail page to be
        read); what the pages showed (fitting items, words read, rejections) stays known."""
        searches, opened = getattr(self, "_before_proposal", (len(self.searches), self.opened))
        del self.searches[searches:]
        self.opened, self.reading = opened, None

    def _remembered(self) -> tuple[str, str, int] | None:
        """The first fully fitting item seen on a results page and not rejected: ``(asin, query, page)``."""
        for asin, (query, page) in self.fitting.items():
            if asin not in self.rejected:
                return asin, query, page
        return None

    def _search(self, goal: dict[str, Any]) -> tuple[str, str]:
        remembered = self._remembered()
        if remembered is not None:  # back here by a wrong click: the search that listed it again
            asin, query, _ = remembered
            return f"{asin} fits, and the search for {query} listed it. I'll search for {query} again.", f"search[{query}]"
        left = [q for q in self._queries(goal) if q not in self.searches]
        if not left:
            raise ExpertGaveUp(f"no listed item fits after searching {', '.join(repr(q) for q in self.searches)}")
        query = left[0]
        self.searches.append(query)
        return f"I need {_what(goal)} under {self.upper:.0f} dollars. I'll search for {query}.", f"search[{query}]"

    def _choose(self, goal: dict[str, Any], obs: Observation, clickable: set[str]) -> tuple[str, str]:
        query, page = obs.info["query"], int(obs.info["page_number"])
        hits = parse_results(obs.text)
        ranked = self._rank(goal, hits)
        for tier, asin, _, _ in ranked:
            if tier == 0:
                self.fitting.setdefault(asin, (query, page))
        remembered = self._remembered()
        if remembered is not None and (not ranked or ranked[0][0] > 0):
            asin, where, on_page = remembered
            if where != query:
                return f"{asin} fits, and the search for {where} listed it. I'll go back to search.", "click[Back to Search]"
            if on_page < page:
                return f"{asin} on page {on_page} fits. I'll go back to it.", "click[< Prev]"
            if on_page > page:
                return f"{asin} on page {on_page} fits. I'll go to the next page.", "click[Next >]"
        if ranked:
            tier, asin, title, price = ranked[0]
            self.opened = asin
            self.seen_words.setdefault(asin, set()).update(match_words(title))
            scan = self._price_scan(hits, asin)
            if tier == 0:
                what = _what(goal)
            elif tier == 1:
                what = _what({**goal, "attributes": []})
            else:
                return (f"{scan} {asin} is the listed item closest to {_indefinite(goal['query'])}. I'll check it.",
                        f"click[{asin}]")
            return f"{scan} {asin} is {what}. I'll check its options.", f"click[{asin}]"
        if "next >" in clickable:
            return (f"{self._budget()}: no item on this page fits. I'll look at the next page.", "click[Next >]")
        return (f"{self._budget()}: no listed item fits. I'll search again with other words.", "click[Back to Search]")

    def _budget(self) -> str:
        return f"Under {self.upper:.0f} dollars"

    def _price_scan(self, hits: list[tuple[str, str, float]], chosen: str) -> str:
        """The listed items up to ``chosen``, in page order, each price against the budget: ``Under 40
        dollars: B0E6C516ED $97.93 no, B8165C7A97 $23.56 yes.`` Every step copies what follows on the
        page (an item id, then its price), so the choice is read off the page, one comparison at a time."""
        parts = []
        for asin, _, price in hits:
            if price > self.upper:
                verdict = "no"
            elif asin == chosen:
                verdict = "yes"
            elif asin in self.rejected:
                verdict = "yes, rejected"
            else:
                verdict = "yes, a weaker match"
            parts.append(f"{asin} ${price:.2f} {verdict}")
            if asin == chosen:
                break
        return f"{self._budget()}: {', '.join(parts)}."

    def _reject(self, asin: str, why: str, back: str = "I'll go back") -> tuple[str, str]:
        self.rejected.add(asin)
        return f"{asin} {why}. {back}.", "click[< Prev]"

    def _check_item(self, goal: dict[str, Any], obs: Observation, clickable: set[str]) -> tuple[str, str]:
        asin = obs.info["asin"]
        item = _ITEM_RE.search(obs.text)
        if item is None:
            return self._reject(asin, "is not what the instruction asks for")
        price = float(item.group(2))
        if price > self.upper:
            return self._reject(asin, f"costs ${price:.2f}, over {self.upper:.0f} dollars")
        words = self.seen_words.setdefault(asin, match_words(item.group(1)))
        if asin != self.opened and not (coverage(match_words(goal["query"]), words) == 1.0
                                        and not self._missing_attributes(goal, words)):
            return self._reject(asin, "is not what the instruction asks for")  # reached by a wrong click
        offered = {v for vals in self._offered(obs).values() for v in vals}
        resolved = self._resolve_options(goal, offered)
        lacking = [o for o, v in resolved.items() if v is None]
        if lacking:
            return self._reject(asin, f"does not offer {', '.join(lacking)}", "I'll go back to the results")
        missing = self._missing_attributes(goal, words)
        if missing:
            unread = [d for d in self.DETAILS if d not in self.read.get(asin, set())]
            if unread:
                self.reading = unread[0]
                return (f"The title does not say {' or '.join(missing)}. I'll read its {unread[0]}.",
                        f"click[{unread[0].title()}]")
        option_names = goal["option_names"]
        selected = _SELECTED_RE.search(obs.text)
        state = (f"I need {', '.join(goal['options'])}; selected: {selected.group(1) if selected else 'none'}."
                 if goal["options"] else "No options are asked.")
        for value in resolved.values():
            if value is not None and goal["chosen"].get(option_names.get(value, "")) != value:
                return (f"{state} I'll choose {value}.", f"click[{value}]")
        if missing:
            return (f"{state} Its page does not mention {' or '.join(missing)}, but it is the best match listed. "
                    f"I'll buy it.", "click[Buy Now]")
        return (f"{state} ${price:.2f} is under {self.upper:.0f} dollars. I'll buy it.", "click[Buy Now]")

    @staticmethod
    def _offered(obs: Observation) -> dict[str, list[str]]:
        """Option values shown on an item page, per option name (from the plan's name table)."""
        names = obs.info["goal"]["option_names"]
        out: dict[str, list[str]] = {}
        for value, name in names.items():
            out.setdefault(name, []).append(value)
        return out


def _indefinite(kind: str) -> str:
    """``"a coffee"``, ``"an umbrella"``, ``"sneakers"``."""
    article = "" if kind.endswith("s") else ("an " if kind[:1] in "aeiou" else "a ")
    return f"{article}{kind}"


def _what(goal: dict[str, Any]) -> str:
    attrs = " and ".join(goal["attributes"])
    return _indefinite(goal["query"]) + (f" that is {attrs}" if attrs else "")


def search_query(goal: dict[str, Any]) -> str:
    return " ".join([*goal["attributes"], goal["query"]]).lower()


# --------------------------------------------------------------------------- task source B

_TYPES: dict[str, dict[str, Any]] = {
    "deodorant": {"category": "beauty", "path": "Beauty & Personal Care › Personal Care › Deodorants",
                  "attributes": ["aluminum free", "sensitive skin", "long lasting", "cruelty free", "travel size"],
                  "options": {"scent": ["bright citrus", "lavender", "unscented", "ginger fresh"],
                              "size": ["2 ounce", "3 ounce", "pack of 2"]}},
    "shampoo": {"category": "beauty", "path": "Beauty & Personal Care › Hair Care › Shampoo",
                "attributes": ["sulfate free", "paraben free", "dry hair", "natural ingredients", "color safe"],
                "options": {"scent": ["coconut", "mint", "rose", "unscented"],
                            "size": ["8 fl oz", "16 fl oz", "32 fl oz"]}},
    "coffee": {"category": "grocery", "path": "Grocery & Gourmet Food › Beverages › Coffee",
               "attributes": ["decaf", "organic", "fair trade", "dark roast", "whole bean"],
               "options": {"flavor": ["vanilla", "hazelnut", "original", "mocha"],
                           "size": ["12 ounce", "2 pound", "pack of 3"]}},
    "snack bar": {"category": "grocery", "path": "Grocery & Gourmet Food › Snacks › Bars",
                  "attributes": ["gluten free", "high protein", "low sugar", "vegan", "keto friendly"],
                  "options": {"flavor": ["peanut butter", "chocolate chip", "berry", "almond"],
                              "size": ["pack of 6", "pack of 12", "pack of 24"]}},
    "t-shirt": {"category": "fashion", "path": "Clothing › Men › Shirts › T-Shirts",
                "attributes": ["machine wash", "cotton", "slim fit", "short sleeve", "moisture wicking"],
                "options": {"color": ["black", "navy", "heather grey", "white"],
                            "size": ["small", "medium", "large", "x-large"]}},
    "sneakers": {"category": "fashion", "path": "Clothing › Shoes › Sneakers",
                 "attributes": ["non slip", "lightweight", "memory foam", "breathable", "rubber sole"],
                 "options": {"color": ["black", "white", "red", "blue"],
                             "size": ["8", "9", "10", "11"]}},
    "storage jar": {"category": "home", "path": "Home & Kitchen › Storage › Jars",
                    "attributes": ["glass", "airtight", "dishwasher safe", "bpa free", "wide mouth"],
                    "options": {"size": ["16 oz", "32 oz", "64 oz"], "color": ["clear", "amber", "blue"]}},
    "throw pillow": {"category": "home", "path": "Home & Kitchen › Bedding › Decorative Pillows",
                     "attributes": ["machine washable", "hypoallergenic", "velvet", "zipper closure", "square"],
                     "options": {"color": ["beige", "emerald", "mustard", "grey"],
                                 "size": ["18 x 18 inch", "20 x 20 inch", "24 x 24 inch"]}},
    "headphones": {"category": "electronics", "path": "Electronics › Headphones › Over-Ear",
                   "attributes": ["wireless", "noise cancelling", "bluetooth", "foldable", "long battery life"],
                   "options": {"color": ["black", "silver", "rose gold"],
                               "style": ["standard", "with case"]}},
    "phone charger": {"category": "electronics", "path": "Electronics › Accessories › Chargers",
                      "attributes": ["fast charging", "usb c", "wall plug", "compact", "dual port"],
                      "options": {"color": ["white", "black"], "size": ["20w", "30w", "65w"]}},
}
_BRANDS = ("Northwind", "Alder & Co", "Brightly", "Kestrel", "Monarch", "Puresense", "Tallow", "Verdant",
           "Oakhurst", "Lumen", "Solace", "Ridgeway")
_PRICE_BOUNDS = (5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0)


SPLIT_SHARES = {"test": 0.15, "dev": 0.10}  # of instruction texts; the rest is train
MAX_STALE_DRAWS = 20_000  # draws in a row that give no new instruction text: the catalogue is exhausted


def instruction_split(instruction: str) -> str:
    """The split an instruction text belongs to, from a hash of the text alone: the same text lands in the
    same split whatever the split sizes or seed, so no profile's train instructions hold another profile's
    test instructions (a teacher trained on ``profiles/teacher.yaml`` never saw the default's test tasks)."""
    return content_split(f"webshop-split:{instruction}", SPLIT_SHARES)


def generate_catalogue(seed: int, n_products: int,
                       counts: Mapping[str, int]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """A catalogue in WebShop's product format and goals in its human-instruction format.

    Products of one type differ in attributes, options and price, so an instruction (type,
    1-2 attributes, 1-2 options, a price bound) needs search and comparison, not just the type.
    Goals are drawn from one seeded stream, each instruction text once, until every split
    (:func:`instruction_split`) has ``counts[split]`` of them; each goal keeps its stream position
    (``goal_id``), so a split's first k goals are the same for any larger count.
    Returns (products, instructions).
    """
    rng = random.Random(f"webshop:{seed}")
    types = sorted(_TYPES)
    products: list[dict[str, Any]] = []
    for i in range(n_products):
        kind = types[i % len(types)]
        spec = _TYPES[kind]
        attrs = sorted(rng.sample(spec["attributes"], rng.randint(2, 3)))
        options = {name: sorted(rng.sample(values, rng.randint(2, len(values))))
                   for name, values in spec["options"].items()}
        brand = rng.choice(_BRANDS)
        name = f"{brand} {kind.title()} - {', '.join(a.title() for a in attrs)}"
        price = round(rng.uniform(4, 140), 2)
        products.append({
            "asin": f"B{rng.randrange(16**9):09X}", "category": spec["category"], "query": kind, "name": name,
            "product_category": spec["path"], "pricing": f"${price:.2f}",
            "full_description": f"{name}. A {kind} by {brand}, {attrs[0]} and {attrs[-1]}.",
            "small_description": [a.capitalize() for a in attrs] + [f"Made by {brand}"],
            "attributes": attrs,
            "customization_options": {n: [{"value": v, "image": None} for v in vals] for n, vals in options.items()},
        })
    instructions: dict[str, list[dict[str, Any]]] = {}
    wanted = {split: k for split, k in counts.items() if k > 0}
    have = dict.fromkeys(wanted, 0)
    seen: set[str] = set()

    def filled() -> bool:
        return all(have[s] >= k for s, k in wanted.items())

    goal_id, stale = -1, 0
    while not filled() and stale < MAX_STALE_DRAWS:
        goal_id += 1
        product = rng.choice(products)
        attrs = sorted(rng.sample(product["attributes"], rng.randint(1, 2)))
        names = rng.sample(sorted(product["customization_options"]), rng.randint(1, len(product["customization_options"])))
        options = [rng.choice(product["customization_options"][n])["value"] for n in sorted(names)]
        price = _price(product["pricing"])
        upper = next(b for b in _PRICE_BOUNDS + (1000.0,) if b > price)
        text = (f"i need {_indefinite(product['query'])} that is {' and '.join(attrs)}, with {', '.join(options)}, "
                f"and price lower than {upper:.2f} dollars")
        if text in seen:
            stale += 1
            continue
        seen.add(text)
        stale = 0
        split = instruction_split(text)
        have[split] = have.get(split, 0) + 1
        instructions.setdefault(product["asin"], []).append({
            "asin": product["asin"], "instruction": text, "instruction_attributes": attrs,
            "instruction_options": options, "price_upper": upper, "goal_id": goal_id,
        })
    if not filled():
        raise ValueError(f"webshop: {n_products} generated products give too few distinct instructions for the splits "
                         f"{dict(counts)} (found {have}); raise tasks.webshop.products or lower the split sizes")
    return products, instructions


def write_catalogue(products: list[dict[str, Any]], instructions: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    from sad.io import write_text_atomic

    write_text_atomic(folder / PRODUCTS_FILE, json.dumps(products, indent=1))
    write_text_atomic(folder / INSTRUCTIONS_FILE, json.dumps(instructions, indent=1))


def goal_tasks(instructions: dict[str, list[dict[str, Any]]], categories: dict[str, str], rel: str, seed: int,
               counts: dict[str, int], max_steps: int = MAX_STEPS) -> dict[str, list[Task]]:
    """Disjoint train/dev/test tasks, one per distinct instruction text (a repeated text is the same task
    and is kept once), chosen so that changing the split sizes never moves a test instruction into train:

    * generated goals (with a ``goal_id``): a text's split comes from the text itself
      (:func:`instruction_split`), and each split takes its first ``counts[split]`` goals in stream order;
    * official files: a seeded order, test from its front, then dev, and train from its back.
    """
    refs = [(asin, j, e) for asin, entries in sorted(instructions.items()) for j, e in enumerate(entries)]
    random.Random(f"webshop-splits:{seed}").shuffle(refs)
    generated = all("goal_id" in e for _, _, e in refs)
    if generated:
        refs.sort(key=lambda ref: ref[2]["goal_id"])
    distinct, seen = [], set()
    for ref in refs:  # the first goal of each text
        if ref[2]["instruction"] not in seen:
            seen.add(ref[2]["instruction"])
            distinct.append(ref)
    need = sum(counts.values())
    if need > len(distinct):
        raise ValueError(f"{rel}: {len(distinct)} distinct instructions, but the splits ask for {need} ({counts})")
    pools: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
    if generated:
        for ref in distinct:
            pools.setdefault(instruction_split(ref[2]["instruction"]), []).append(ref)
    else:
        k_test, k_dev = counts.get("test", 0), counts.get("dev", 0)
        pools = {"test": distinct[:k_test], "dev": distinct[k_test:k_test + k_dev],
                 "train": distinct[k_test + k_dev:][::-1]}
    out: dict[str, list[Task]] = {}
    for split, k in counts.items():
        pool = pools.get(split, [])
        if k > len(pool):
            raise ValueError(f"{rel}: {len(pool)} distinct instructions fall in the {split} split, but it asks for {k} "
                             f"(raise tasks.webshop.products for more)")
        out[split] = [
            Task(env=ENV_NAME, split=split, task_id=f"{ENV_NAME}/{split}/{i:05d}", path=rel,
                 task_type=categories.get(asin) or "product", description=e["instruction"],
                 meta={"asin": asin, "goal_index": j, "max_steps": max_steps})
            for i, (asin, j, e) in enumerate(pool[:k])
        ]
    return out


def read_official(folder: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """WebShop's own files from ``folder`` (``items_shuffle*.json``, ``items_human_ins*.json``),
    checked by loading them as a catalogue; returned unchanged for the tasks root."""
    folder = Path(folder)
    products_files = sorted(folder.glob("items_shuffle*.json"))
    ins_files = sorted(folder.glob("items_human_ins*.json"))
    if not products_files or not ins_files:
        raise FileNotFoundError(f"{folder}: expected items_shuffle*.json and items_human_ins*.json (WebShop's data/)")
    attr_files = sorted(folder.glob("items_ins_v2*.json"))
    for kind, found in (("product", products_files), ("human instruction", ins_files), ("attribute", attr_files)):
        if len(found) > 1:  # e.g. WebShop's full items_shuffle.json beside its items_shuffle_1000.json
            raise ValueError(f"{folder}: {len(found)} {kind} files ({', '.join(p.name for p in found)}); keep the "
                             "one set to use (WebShop's small set: items_shuffle_1000.json, items_ins_v2_1000.json)")
    try:
        products = json.loads(products_files[0].read_text())
        instructions = json.loads(ins_files[0].read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder}: malformed WebShop JSON ({exc})") from None
    if not isinstance(products, list) or not isinstance(instructions, dict):
        raise ValueError(f"{folder}: expected a list of products and a dict asin -> instructions")
    if attr_files:  # WebShop keeps product attributes in a separate file
        try:
            attrs = json.loads(attr_files[0].read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{attr_files[0]}: malformed JSON ({exc})") from None
        for p in products:
            entry = attrs.get(str(p.get("asin")), {})
            if isinstance(entry, dict) and "attributes" in entry and "attributes" not in p:
                p["attributes"] = entry["attributes"]
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, rec in enumerate(products):
        if not isinstance(rec, dict):
            raise ValueError(f"{products_files[0]}: product #{i} is not an object")
        asin = str(rec.get("asin"))
        if asin != "nan" and len(asin) <= 10:  # as WebShop: 'nan' or overlong asins skipped, a repeated one's first kept
            first.setdefault(asin, (i, rec))
    for i, rec in first.values():
        _product_from_record(rec, f"{products_files[0]}: product #{i} ({rec.get('asin', '?')})")
    products, known = [rec for _, rec in first.values()], set(first)
    # as WebShop's get_human_goals: only listed products, and no human instruction without attributes (an entry
    # that states its own price_upper is not in WebShop's format: kept as it is)
    instructions = {a: kept for a, es in instructions.items() if a in known and (kept := [
        e for e in es if not isinstance(e, dict) or e.get("instruction_attributes") or "price_upper" in e])}
    return products, instructions
