"""WebShop in text mode: pages, clicks, WebShop's reward, the expert, both task sources."""

import json
import re
from pathlib import Path

import pytest

from sad.config import parse_params
from sad.environments import load_tasks, write_tasks
from sad.envs import webshop as w
from sad.rollout import play_expert


@pytest.fixture()
def shop(tmp_path):
    products, instructions = w.generate_catalogue(3, 40, {"train": 2, "dev": 2, "test": 6})
    w.write_catalogue(products, instructions, tmp_path / "webshop" / "catalogue")
    categories = {p["asin"]: p["category"] for p in products}
    splits = w.goal_tasks(instructions, categories, "catalogue", 0, {"train": 2, "dev": 2, "test": 6})
    return tmp_path, splits["test"]


def test_expert_transcript_for_a_fixed_seed(shop):
    """Hand-checked: search, check the listed prices against the budget in page order, open the first item
    within it that fits, choose both options (the thought tracks which are chosen), buy; every click
    written as the page shows it (the agent copies what it reads)."""
    root, tasks = shop
    episode = play_expert(tasks[1:2], root)[0]
    assert episode.prompt == ("[webshop] WebShop [SEP] Instruction: [SEP] i need a storage jar that is dishwasher safe "
                              "and wide mouth, with clear, 64 oz, and price lower than 30.00 dollars [SEP] [Search]\n")
    assert [s.action for s in episode.steps] == [
        "search[dishwasher safe wide mouth storage jar]", "click[B1396C047C]", "click[clear]", "click[64 oz]",
        "click[Buy Now]"]
    results = episode.steps[0].observation
    assert results.startswith("[Back to Search] [SEP] Page 1 (Total results: 6) [SEP] [B1396C047C] [SEP] "
                              "Alder & Co Storage Jar - Dishwasher Safe, Wide Mouth [SEP] $29.61 [SEP] [B304D84FA0]")
    assert [s.thought for s in episode.steps] == [
        "I need a storage jar that is dishwasher safe and wide mouth under 30 dollars. I'll search for dishwasher "
        "safe wide mouth storage jar.",
        "Under 30 dollars: B1396C047C $29.61 yes. B1396C047C is a storage jar that is dishwasher safe and wide mouth. "
        "I'll check its options.",
        "I need clear, 64 oz; selected: none. I'll choose clear.",
        "I need clear, 64 oz; selected: clear. I'll choose 64 oz.",
        "I need clear, 64 oz; selected: clear, 64 oz. $29.61 is under 30 dollars. I'll buy it."]
    assert "Price: $29.61 [SEP] Rating: N.A. [SEP] [Description] [SEP] [Features] [SEP] [Reviews] [SEP] [Buy Now]" \
        in episode.steps[1].observation
    assert "Selected: clear, 64 oz" in episode.steps[3].observation
    assert episode.steps[4].observation.endswith("[SEP] 1.00")
    assert episode.success and episode.reward == 1.0


def test_expert_checks_listed_prices_one_by_one_up_to_its_choice():
    """The results-page thought walks the listed items in page order up to the chosen one, each id and
    price copied from the page and compared with the budget; items it passes say why."""
    expert = w.WebShopExpert()
    expert.upper, expert.rejected = 30.0, {"B000000003"}
    hits = [("B000000001", "t", 59.75), ("B000000002", "t", 12.5), ("B000000003", "t", 9.99),
            ("B000000004", "t", 29.61), ("B000000005", "t", 5.0)]
    assert expert._price_scan(hits, "B000000004") == (
        "Under 30 dollars: B000000001 $59.75 no, B000000002 $12.50 yes, a weaker match, B000000003 $9.99 yes, rejected, "
        "B000000004 $29.61 yes.")


def test_expert_goes_back_from_an_item_over_the_budget_and_says_why(shop):
    """A wrong click into an item over the budget (an injected mistake): the expert names its price
    against the budget, goes back, and opens the item it chose."""
    root, tasks = shop
    env = w.WebShopEnv(expert_plan=True)
    expert = w.WebShopExpert()
    obs = env.reset(tasks[1], root)
    expert.reset(tasks[1], obs)
    obs = env.step(expert.act(obs)[1])
    obs = env.step("click[B304D84FA0]")  # $59.75, over the 30-dollar budget
    thought, action = expert.act(obs)
    assert (thought, action) == ("B304D84FA0 costs $59.75, over 30 dollars. I'll go back.", "click[< Prev]")
    assert expert.act(env.step(action))[1] == "click[B1396C047C]"


def test_reward_follows_webshop_formula(shop):
    root, tasks = shop
    env = w.WebShopEnv()
    env.reset(tasks[1], root)
    env.step("search[dishwasher safe wide mouth storage jar]")
    env.step("click[b1396c047c]")
    env.step("click[clear]")  # one of two options: (2 attributes + 1 option + price) / (2 + 2 + 1)
    obs = env.step("click[buy now]")
    assert obs.done and not obs.success and obs.reward == pytest.approx(4 / 5)
    env.reset(tasks[1], root)
    results = env.step("search[deodorant]")
    hit = next(a for a, title, _ in w.parse_results(results.text) if "Deodorant" in title)
    env.step(f"click[{hit.lower()}]")
    assert env.step("click[buy now]").reward == 0.0  # wrong product type: r_type = 0


def test_over_budget_item_loses_the_price_point(shop):
    root, tasks = shop
    env = w.WebShopEnv()
    env.reset(tasks[1], root)
    env.step("search[dishwasher safe wide mouth storage jar]")
    env.step("click[b304d84fa0]")  # $59.75, wide mouth but not dishwasher safe, over the 30 dollar bound
    obs = env.step("click[buy now]")
    assert obs.info["r_price"] == 0.0 and obs.reward < 1.0


def test_invalid_actions_are_counted_never_raised(shop):
    root, tasks = shop
    env = w.WebShopEnv()
    env.reset(tasks[0], root)
    for bad in ("click[buy now]", "dance", "search[]"):
        obs = env.step(bad)
        assert obs.valid is False and obs.text.startswith("Invalid action!")
    env.step("search[headphones]")
    assert env.step("search[again]").valid is False  # search only from the search page
    assert env.step("click[b0000000000]").valid is False
    assert env.steps == 6


def test_pagination_and_back_navigation(tmp_path):
    products, instructions = w.generate_catalogue(1, 120, {"train": 1, "dev": 1, "test": 3})
    w.write_catalogue(products, instructions, tmp_path / "webshop" / "catalogue")
    tasks = w.goal_tasks(instructions, {}, "catalogue", 0, {"train": 1, "dev": 1, "test": 3})["test"]
    env = w.WebShopEnv()
    env.reset(tasks[0], tmp_path)
    page1 = env.step("search[free]")
    assert "Page 1 (Total results: " in page1.text and "[Next >]" in page1.text and "< prev" not in page1.admissible
    page2 = env.step("click[next >]")
    assert "Page 2 " in page2.text and "[< Prev]" in page2.text
    assert w.parse_results(page2.text) != w.parse_results(page1.text)
    assert "Page 1 " in env.step("click[< prev]").text
    assert env.step("click[back to search]").text.startswith("WebShop [SEP] Instruction:")


def test_expert_solves_generated_tasks_with_injected_mistakes(tmp_path):
    products, instructions = w.generate_catalogue(0, 150, {"train": 60, "dev": 0, "test": 0})
    w.write_catalogue(products, instructions, tmp_path / "webshop" / "catalogue")
    tasks = w.goal_tasks(instructions, {}, "catalogue", 0, {"train": 60, "dev": 0, "test": 0})["train"]
    episodes = play_expert(tasks, tmp_path, perturb=0.2, seed=1)
    assert all(e.success for e in episodes)
    assert sum(not s.imitate for e in episodes for s in e.steps) > 10
    assert max(e.n_steps for e in episodes) <= w.MAX_STEPS


def test_official_files_go_through_the_same_code_path(tmp_path):
    """Small files in WebShop's published formats: items_shuffle, items_ins_v2, items_human_ins."""
    data = tmp_path / "webshop_data"
    data.mkdir()
    products = [
        {"asin": "B078GWRC1J", "category": "beauty", "query": "deodorant", "product_category":
         "Beauty & Personal Care › Personal Care › Deodorants & Antiperspirants › Deodorants",
         "name": "Bright Citrus Deodorant by Earth Mama | Natural and Safe for Sensitive Skin, Pregnancy and Breastfeeding",
         "full_description": "Calendula is a natural ingredient.", "pricing": "$10.99", "images": [],
         "small_description": ["Natural and safe for sensitive skin"],
         "customization_options": {"scent": [{"value": "Bright Citrus", "image": None}, {"value": "Calming Lavender", "image": None}],
                                   "size": [{"value": "3 Ounce (Pack of 1)", "image": None}]}},
        {"asin": "B07Y8Z6N4X", "category": "beauty", "query": "deodorant", "product_category":
         "Beauty & Personal Care › Personal Care › Deodorants & Antiperspirants",
         "name": "Ginger Fresh Deodorant for Men", "full_description": "", "pricing": ["$15.95", "$17.95"],
         "images": [], "small_description": [], "customization_options": {}},
    ]
    (data / "items_shuffle_1000.json").write_text(json.dumps(products))
    (data / "items_ins_v2_1000.json").write_text(json.dumps({
        "B078GWRC1J": {"attributes": ["sensitive skin", "natural"], "instruction": "", "instruction_attributes": []},
        "B07Y8Z6N4X": {"attributes": ["long lasting"]}}))
    (data / "items_human_ins.json").write_text(json.dumps({
        "B078GWRC1J": [{"asin": "B078GWRC1J", "instruction": "i need a deodorant for sensitive skin in bright citrus",
                        "instruction_attributes": ["sensitive skin"], "instruction_options": ["bright citrus"]},
                       {"asin": "B078GWRC1J", "instruction": "natural deodorant, calming lavender",
                        "instruction_attributes": ["natural"], "instruction_options": ["calming lavender"]}],
        "B07Y8Z6N4X": [{"asin": "B07Y8Z6N4X", "instruction": "long lasting deodorant for men",
                        "instruction_attributes": ["long lasting"], "instruction_options": []}]}))
    params = parse_params({"tasks": {"envs": ["webshop"], "train": 1, "dev": 1, "test": 1,
                                     "webshop": {"official": str(data)}}})
    root = tmp_path / "tasks"
    write_tasks(params, root)
    tasks = [t for s in ("train", "dev", "test") for t in load_tasks(root, "webshop", s)]
    assert len(tasks) == 3
    catalogue = w.load_catalogue(str(root / "webshop" / "catalogue"))
    assert catalogue.products["B07Y8Z6N4X"].price == 15.95
    assert catalogue.products["B078GWRC1J"].attributes == ("sensitive skin", "natural")
    goal = catalogue.goals["B078GWRC1J"][0]
    assert goal.price_upper in (20.0, 30.0, 40.0, 50.0) and "and price lower than" in goal.instruction
    episodes = play_expert(tasks, root)
    failed = [(e.task_id, e.reward, e.meta, [(s.thought, s.action) for s in e.steps]) for e in episodes if not e.success]
    assert not failed, failed


def test_bad_catalogue_names_the_file_and_product(tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / w.PRODUCTS_FILE).write_text(json.dumps([{"asin": "B1", "name": "x", "pricing": "call for price"}]))
    (folder / w.INSTRUCTIONS_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"items_shuffle.json product #0: no price in 'call for price'"):
        w.load_catalogue(str(folder))
    (folder / w.PRODUCTS_FILE).write_text(json.dumps([{"pricing": "$3"}]))
    with pytest.raises(ValueError, match=r"items_shuffle.json product #0: product lacks field\(s\) \['asin', 'name'\]"):
        w.load_catalogue(str(folder))


def test_a_catalogue_is_read_afresh_when_rewritten_or_seen_from_another_directory(tmp_path, monkeypatch):
    """The in-memory copy follows the files: the same relative folder in another working directory, or a
    catalogue rewritten in place (a retrain in a long-lived worker), is read again, never served stale."""
    shops = []
    for seed in (1, 2):
        (tmp_path / str(seed)).mkdir()
        monkeypatch.chdir(tmp_path / str(seed))
        w.write_catalogue(*w.generate_catalogue(seed=seed, n_products=4, counts={"train": 2}), Path("cat"))
        shops.append(set(w.load_catalogue("cat").products))
    assert shops[0] != shops[1]
    w.write_catalogue(*w.generate_catalogue(seed=3, n_products=5, counts={"train": 2}), Path("cat"))
    assert set(w.load_catalogue("cat").products) not in shops


def _official_shop(tmp_path, products, attributes, instructions, counts=(1, 1, 1)):
    """Official-format WebShop files written here by hand (not by the generator), through the tasks code."""
    data = tmp_path / "webshop_data"
    data.mkdir()
    (data / "items_shuffle_1000.json").write_text(json.dumps(products))
    (data / "items_ins_v2_1000.json").write_text(json.dumps({a: {"attributes": v} for a, v in attributes.items()}))
    (data / "items_human_ins.json").write_text(json.dumps(instructions))
    train, dev, test = counts
    params = parse_params({"tasks": {"envs": ["webshop"], "train": train, "dev": dev, "test": test,
                                     "webshop": {"official": str(data)}}})
    root = tmp_path / "tasks"
    write_tasks(params, root)
    return root, [t for s in ("train", "dev", "test") for t in load_tasks(root, "webshop", s)]


def _product(asin, query, name, pricing, options=None, bullets=()):
    return {"asin": asin, "category": "fashion", "query": query, "product_category": "Clothing, Shoes & Jewelry › Men",
            "name": name, "full_description": "", "pricing": pricing, "images": [], "small_description": list(bullets),
            "customization_options": {k: [{"value": v, "image": None} for v in vals] for k, vals in (options or {}).items()}}


def test_official_records_are_read_as_webshop_reads_them(tmp_path):
    """WebShop's load_products and get_human_goals: no price is $100, an option without values is left out, a
    lone bullet-point string is one bullet point, a repeated asin keeps its first record, an instruction
    without attributes is no goal, and the price bound follows the instruction without its full stop."""
    shirt = _product("B01", "shirt", "Navy Cotton Shirt", "", options={"size": ["large"]},
                     bullets=["soft cotton"])
    shirt["small_description"] = "soft cotton shirt"
    shirt["customization_options"]["color"] = None
    again = {**_product("B01", "shirt", "Another Shirt", "$1.00")}
    pants = _product("B02", "pants", "Grey Pants", "$20.00")
    instructions = {"B01": [{"asin": "B01", "instruction": "i want a cotton shirt.", "instruction_attributes": ["cotton"],
                             "instruction_options": ["large"]},
                            {"asin": "B01", "instruction": "a shirt", "instruction_attributes": [],
                             "instruction_options": []}],
                    "B02": [{"asin": "B02", "instruction": "grey pants", "instruction_attributes": ["grey"],
                             "instruction_options": []},
                            {"asin": "B02", "instruction": "warm grey pants", "instruction_attributes": ["warm"],
                             "instruction_options": []}],
                    "B03": [{"asin": "B03", "instruction": "not listed", "instruction_attributes": ["x"]}]}
    root, tasks = _official_shop(tmp_path, [shirt, again, pants], {}, instructions, counts=(1, 1, 1))
    catalogue = w.load_catalogue(str(root / "webshop" / "catalogue"))
    b01 = catalogue.products["B01"]
    assert (b01.name, b01.price, b01.bullet_points, b01.options) == (
        "Navy Cotton Shirt", w.DEFAULT_PRICE, ("soft cotton shirt",), {"size": ("large",)})
    assert sorted(t.description.split(",")[0].rstrip(".") for t in tasks) == [
        "grey pants", "i want a cotton shirt", "warm grey pants"]
    assert [g.instruction.split(", and price")[0] for g in catalogue.goals["B01"]] == ["i want a cotton shirt"]
    data = tmp_path / "webshop_data"
    (data / "items_shuffle.json").write_text("[]")  # WebShop's full set beside its small one
    with pytest.raises(ValueError, match=r"webshop_data: 2 product files \(items_shuffle.json, items_shuffle_1000.json\)"):
        w.read_official(data)


def _no_failed_action_twice(episode) -> bool:
    """No search sent twice, no invalid action repeated, no item opened again after it was rejected."""
    searches = [s.action for s in episode.steps if s.action.startswith("search[")]
    invalid = [s.action for s in episode.steps if not s.valid]
    rejected, reopened = set(), False
    for step in episode.steps:
        opened = re.match(r"click\[(B[0-9A-Z]{9})\]", step.action)
        reopened |= bool(opened and opened.group(1) in rejected)
        if re.search(r"(B[0-9A-Z]{9}) (does not offer|is not what)", step.thought):
            rejected.add(re.search(r"B[0-9A-Z]{9}", step.thought).group(0))
    return len(searches) == len(set(searches)) and len(invalid) == len(set(invalid)) and not reopened


def test_expert_buys_the_right_item_when_titles_word_the_type_differently(tmp_path):
    """Titles that word the instruction's product type otherwise (possessive, plural, word order, extra
    words), a price range string, and a look-alike lacking the asked option listed among the candidates."""
    products = [
        _product("B0TSHIRT05", "men's t shirt", "Men's Cotton T Shirt, Cotton Crew T-Shirts for Men, Pack of 5", "$15.99",
                 {"color": ["Black", "White"], "size": ["Large", "Medium"]}),  # lacks navy
        _product("B0TSHIRT03", "men's t shirt", "Cotton Crew Neck T Shirt for Men Pack of 3", "$19.99",
                 {"color": ["Black", "Navy"], "size": ["Large", "Medium"]}),
        _product("B0WOMENTEE", "women's t shirt", "Women's V-Neck Tee Soft Stretch", "$12.99", {"size": ["Small"]}),
        _product("B0SNEAKER1", "women's sneakers", "Lightweight Running Shoes Sneaker for Women Breathable Mesh",
                 "$34.99 - $39.99", {"size": ["7", "8", "9"]}, bullets=["Lightweight mesh upper"]),
        _product("B0SNEAKER2", "men's sneakers", "Men's Running Shoes Sneaker Wide Fit", "$29.99", {"size": ["8", "10"]}),
        _product("B0DOGTOY01", "chew toy for dogs", "Dogs' Durable Toys: Chew Toy Set for Large Dogs, 4 Pieces", "$22.50",
                 {"color": ["Blue", "Red"]}),
    ]
    attributes = {"B0TSHIRT05": ["machine wash"], "B0TSHIRT03": ["machine wash", "cotton"], "B0WOMENTEE": ["stretch"],
                  "B0SNEAKER1": ["lightweight"], "B0SNEAKER2": ["wide fit"], "B0DOGTOY01": ["durable"]}
    instructions = {
        "B0TSHIRT03": [{"asin": "B0TSHIRT03", "instruction": "cotton crew neck t shirts for men, navy in large",
                        "instruction_attributes": ["cotton"], "instruction_options": ["navy", "large"]}],
        "B0SNEAKER1": [{"asin": "B0SNEAKER1", "instruction": "i want lightweight running sneakers for women, size 8",
                        "instruction_attributes": ["lightweight"], "instruction_options": ["8"]}],
        "B0DOGTOY01": [{"asin": "B0DOGTOY01", "instruction": "durable chew toys for my dog, in red",
                        "instruction_attributes": ["durable"], "instruction_options": ["red"]}],
    }
    root, tasks = _official_shop(tmp_path, products, attributes, instructions)
    catalogue = w.load_catalogue(str(root / "webshop" / "catalogue"))
    assert catalogue.products["B0SNEAKER1"].price == 34.99  # a range prices at its low end
    episodes = play_expert(tasks, root)
    detail = [(e.task_id, e.reward, [(s.thought, s.action) for s in e.steps]) for e in episodes if not e.success]
    assert all(e.success and e.reward == 1.0 and e.meta["r_option"] == 1.0 for e in episodes), detail

    def bought(e):  # the item page last opened before click[Buy Now]
        return [re.match(r"click\[(B0\w+)\]", s.action).group(1) for s in e.steps if re.match(r"click\[B0\w+\]", s.action)][-1]

    assert sorted(bought(e) for e in episodes) == ["B0DOGTOY01", "B0SNEAKER1", "B0TSHIRT03"]
    shirts = next(e for e in episodes if bought(e) == "B0TSHIRT03")
    actions = [s.action for s in shirts.steps]
    assert "click[B0TSHIRT05]" in actions and "does not offer navy" in " ".join(s.thought for s in shirts.steps)  # rejected
    assert actions[-3:] == ["click[navy]", "click[large]", "click[Buy Now]"]
    assert all(_no_failed_action_twice(e) for e in episodes), [[s.action for s in e.steps] for e in episodes]


def test_expert_gives_up_with_a_reason_instead_of_repeating_a_failed_search(tmp_path):
    products = [_product("B0TSHIRT03", "men's t shirt", "Cotton Crew Neck T Shirt for Men", "$19.99", {"size": ["Large"]}),
                _product("B0KETTLE01", "electric kettle", "Stainless Steel Electric Kettle 1.7 Liter", "$24.99")]
    instructions = {"B0KETTLE01": [{"asin": "B0KETTLE01", "instruction": "a glass teapot for loose leaf tea",
                                    "instruction_attributes": [], "instruction_options": [], "price_upper": 10.0}],
                    "B0TSHIRT03": [{"asin": "B0TSHIRT03", "instruction": "men's t shirt, large",
                                    "instruction_attributes": ["cotton"], "instruction_options": ["large"]},
                                   {"asin": "B0TSHIRT03", "instruction": "a large t shirt for men",
                                    "instruction_attributes": ["cotton"], "instruction_options": ["large"]}]}
    root, tasks = _official_shop(tmp_path, products, {}, instructions)
    episodes = {e.meta.get("description", e.task_id): e for e in play_expert(tasks, root)}
    teapot = next(e for e in episodes.values() if "teapot" in e.prompt)
    assert not teapot.success and "no listed item fits after searching" in teapot.meta["expert_gave_up"]
    assert teapot.n_steps < w.MAX_STEPS and _no_failed_action_twice(teapot), [s.action for s in teapot.steps]
    assert all(e.success for e in episodes.values() if "t shirt" in e.prompt)


def _split_texts(counts, products=300):
    _, instructions = w.generate_catalogue(0, products, counts)
    splits = w.goal_tasks(instructions, {}, "catalogue", 0, counts)
    return {split: [t.description for t in tasks] for split, tasks in splits.items()}


def test_split_sizes_never_move_a_test_instruction_into_train():
    """A teacher trained on a large task set (profiles/teacher.yaml) must never have seen the default's test
    tasks: an instruction's split follows from its text, each text is one task, and a smaller split is the
    start of a larger one."""
    small = _split_texts({"train": 20, "dev": 5, "test": 20})
    large = _split_texts({"train": 1200, "dev": 30, "test": 50})
    for texts in (small, large):
        every = [t for split in texts.values() for t in split]
        assert len(every) == len(set(every))  # no instruction twice, within or across splits
    assert not set(small["test"]) & set(large["train"]) and not set(large["test"]) & set(small["train"])
    assert not set(small["dev"]) & set(large["train"])
    assert large["test"][:20] == small["test"] and large["dev"][:5] == small["dev"]


def test_too_small_a_catalogue_for_the_splits_says_what_to_change():
    with pytest.raises(ValueError, match="raise tasks.webshop.products"):
        w.generate_catalogue(0, 2, {"train": 500, "dev": 0, "test": 50})


def test_official_instructions_split_test_from_the_front_and_train_from_the_back():
    instructions = {f"B00000000{i}": [{"asin": f"B00000000{i}", "instruction": f"item {i}", "instruction_attributes": [],
                                       "instruction_options": []}] for i in range(8)}
    instructions["B000000000"].append(dict(instructions["B000000001"][0], asin="B000000000"))  # a repeated text
    small = w.goal_tasks(instructions, {}, "catalogue", 0, {"train": 2, "dev": 1, "test": 2})
    large = w.goal_tasks(instructions, {}, "catalogue", 0, {"train": 4, "dev": 1, "test": 3})
    text = {split: [t.description for t in tasks] for split, tasks in small.items()}
    assert large["test"][0].description == text["test"][0] and large["test"][1].description == text["test"][1]
    assert [t.description for t in large["train"][:2]] == text["train"]
    every = [t.description for tasks in large.values() for t in tasks]
    assert len(every) == len(set(every)) == 8  # 8 distinct texts (9 goals, one text twice)
    with pytest.raises(ValueError, match="8 distinct instructions"):
        w.goal_tasks(instructions, {}, "catalogue", 0, {"train": 6, "dev": 1, "test": 2})
