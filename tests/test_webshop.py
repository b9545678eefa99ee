"""WebShop in text mode: pages, clicks, WebShop's reward, the expert, both task sources."""

import json

import pytest

from sad.benchmarks import load_tasks, write_tasks
from sad.config import parse_params
from sad.envs import webshop as w
from sad.rollout import play_expert


@pytest.fixture()
def shop(tmp_path):
    products, instructions = w.generate_catalogue(3, 40, 10)
    w.write_catalogue(products, instructions, tmp_path / "webshop" / "catalogue")
    categories = {p["asin"]: p["category"] for p in products}
    splits = w.goal_tasks(instructions, categories, "catalogue", 0, {"train": 2, "dev": 2, "test": 6})
    return tmp_path, splits["test"]


def test_expert_transcript_for_a_fixed_seed(shop):
    """Hand-checked: search, open the first fitting item, choose both options, buy; every click
    written as the page shows it (the agent copies what it reads)."""
    root, tasks = shop
    episode = play_expert(tasks[:1], root)[0]
    assert episode.prompt == ("[webshop] WebShop [SEP] Instruction: [SEP] i need headphones that is bluetooth and "
                              "long battery life, with rose gold, standard, and price lower than 30.00 dollars "
                              "[SEP] [Search]\n")
    assert [s.action for s in episode.steps] == [
        "search[bluetooth long battery life headphones]", "click[B8E375843F]", "click[rose gold]",
        "click[standard]", "click[Buy Now]"]
    results = episode.steps[0].observation
    assert results.startswith("[Back to Search] [SEP] Page 1 (Total results: 5) [SEP] [B8E375843F] [SEP] "
                              "Oakhurst Headphones - Bluetooth, Long Battery Life [SEP] $27.79")
    assert "Price: $27.79 [SEP] Rating: N.A. [SEP] [Description] [SEP] [Features] [SEP] [Reviews] [SEP] [Buy Now]" \
        in episode.steps[1].observation
    assert "Selected: rose gold, standard" in episode.steps[3].observation
    assert episode.steps[4].observation.endswith("[SEP] 1.00")
    assert episode.success and episode.reward == 1.0


def test_reward_follows_webshop_formula(shop):
    root, tasks = shop
    env = w.WebShopEnv()
    env.reset(tasks[0], root)
    env.step("search[bluetooth long battery life headphones]")
    env.step("click[b8e375843f]")
    env.step("click[rose gold]")  # one of two options: (2 attributes + 1 option + price) / (2 + 2 + 1)
    obs = env.step("click[buy now]")
    assert obs.done and not obs.success and obs.reward == pytest.approx(4 / 5)
    env.reset(tasks[0], root)
    results = env.step("search[deodorant]")
    hit = next(a for a, title, _ in w.parse_results(results.text) if "Deodorant" in title)
    env.step(f"click[{hit.lower()}]")
    assert env.step("click[buy now]").reward == 0.0  # wrong product type: r_type = 0


def test_over_budget_item_loses_the_price_point(shop):
    root, tasks = shop
    env = w.WebShopEnv()
    env.reset(tasks[0], root)
    env.step("search[bluetooth long battery life headphones]")
    env.step("click[b46c9d074a]")  # $125.27, bluetooth but not long battery life, over the 30 dollar bound
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
    products, instructions = w.generate_catalogue(1, 120, 5)
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
    products, instructions = w.generate_catalogue(0, 150, 60)
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
    assert all(e.success for e in episodes), [(e.task_id, e.reward, [s.action for s in e.steps]) for e in episodes]


def test_bad_catalogue_names_the_file_and_product(tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / w.PRODUCTS_FILE).write_text(json.dumps([{"asin": "B1", "name": "x"}]))
    (folder / w.INSTRUCTIONS_FILE).write_text("{}")
    w.load_catalogue.cache_clear()
    with pytest.raises(ValueError, match=r"items_shuffle.json product #0: product lacks field\(s\) \['pricing'\]"):
        w.load_catalogue(str(folder))
