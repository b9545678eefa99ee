"""Metric and interval functions on hand-computed cases."""

import numpy as np
import pytest

from sad.metrics import action_agrees, cot_match, rouge_l, rouge_tokens
from sad.stats import bootstrap_ci, paired_comparison


def test_rouge_l_by_hand():
    # LCS("i need to find the mug", "i need a mug") = "i need mug" = 3; P = 3/6, R = 3/4
    assert rouge_l("I need to find the mug.", "i need a mug") == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)  # LCS 1 of 3 each side
    assert rouge_l("Same words here", "same, WORDS; here!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("x", "") == 0.0
    assert rouge_tokens("Go to Cabinet-1, now") == ["go", "to", "cabinet", "1", "now"]


def test_cot_match_uses_the_threshold_inclusively():
    assert cot_match("I need a mug", "i need to find the mug", 0.6)  # exactly 0.6
    assert not cot_match("I need a mug", "i need to find the mug", 0.61)


def test_action_agreement_ignores_case_and_spacing_only():
    assert action_agrees("go to  Cabinet 1", "go to cabinet 1")
    assert not action_agrees("go to cabinet 1", "go to cabinet 2")
    assert not action_agrees("", "look")
    assert not action_agrees("", "")  # two missing actions are not agreement


def test_all_or_no_tasks_won_is_not_reported_as_certain():
    """Every resample of 20/20 wins is 20/20: the percentile bootstrap says [100, 100]. The interval is the
    Wilson score interval over the tasks there (seeds do not add tasks); non-binary values keep the bootstrap's."""
    ci = bootstrap_ci([[1.0] * 20, [1.0] * 20])
    assert (ci.mean, ci.high) == (1.0, 1.0) and ci.low == pytest.approx(0.8389, abs=1e-4)
    assert (ci.n_seeds, ci.n_tasks) == (2, 20)
    none = bootstrap_ci([[0.0] * 20])
    assert (none.mean, none.low) == (0.0, 0.0) and none.high == pytest.approx(0.1611, abs=1e-4)
    assert none.fmt() == "0.0 [0.0, 16.1]"
    assert bootstrap_ci([[0.5] * 20]).low == 0.5  # a score, not success: nothing to widen


def test_interval_matches_the_normal_approximation_for_many_episodes():
    rng = np.random.default_rng(1)
    values = (rng.random(2000) < 0.3).astype(float)
    ci = bootstrap_ci([values.tolist()], n_boot=4000)
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert ci.low == pytest.approx(values.mean() - half, abs=0.005)
    assert ci.high == pytest.approx(values.mean() + half, abs=0.005)


def test_seed_variance_widens_the_interval():
    same = bootstrap_ci([[1, 0] * 20, [1, 0] * 20, [1, 0] * 20])
    spread = bootstrap_ci([[1] * 40, [0] * 40, [1, 0] * 20])
    assert same.mean == spread.mean == 0.5
    assert (spread.high - spread.low) > 2 * (same.high - same.low)


def test_interval_is_reproducible_and_validates_its_input():
    assert bootstrap_ci([[0, 1, 1]]) == bootstrap_ci([[0, 1, 1]])
    with pytest.raises(ValueError, match="seeds"):
        bootstrap_ci([])


def test_tasks_of_several_envs_are_resampled_within_their_env():
    """An agent that wins all 20 ALFWorld tasks and loses all 20 HotPotQA ones is at 50%, each env's rate
    uncertain only as 20 tasks leave it: stratified, the two envs' Wilson intervals combined as independent
    estimates (+-5.7 points); pooled, as if the env did not matter, it spans about +-15 points."""
    row, envs = [1.0] * 20 + [0.0] * 20, ["alfworld"] * 20 + ["hotpotqa"] * 20
    stratified, pooled = bootstrap_ci([row], strata=envs), bootstrap_ci([row])
    assert stratified.mean == 0.5 and (stratified.low, stratified.high) == pytest.approx((0.4430, 0.5570), abs=1e-4)
    assert pooled.low < 0.4 and pooled.high > 0.6
    mixed = [1.0, 0.0] * 10 + [1.0] * 5 + [0.0] * 15
    assert bootstrap_ci([mixed], strata=envs).mean == pytest.approx(0.375)
    cmp = paired_comparison([row], [[0.0] * 40], strata=envs)
    assert (cmp.difference.low, cmp.difference.high) == (0.5, 0.5)
    with pytest.raises(ValueError, match="strata label 3 tasks, the matrix has 40"):
        bootstrap_ci([row], strata=["a", "b", "c"])


def test_paired_comparison_by_hand():
    a = [[1, 1, 0, 1], [1, 0, 0, 1]]
    b = [[0, 1, 0, 0], [1, 0, 1, 0]]
    cmp = paired_comparison(a, b, n_boot=500)
    # differences: [1,0,0,1] and [0,0,-1,1] -> mean 2/8
    assert cmp.difference.mean == pytest.approx(0.25)
    assert (cmp.wins, cmp.losses) == (3, 1)
    assert cmp.difference.low <= 0.25 <= cmp.difference.high
    assert paired_comparison(b, b).difference.mean == 0.0
    with pytest.raises(ValueError, match="equal"):
        paired_comparison([[1, 0]], [[1, 0, 1]])


def test_the_verdict_of_two_agents_that_won_the_same_tasks_says_so():
    from sad.report import ci_level, verdict

    same = paired_comparison([[1, 0, 0, 1]], [[1, 0, 0, 1]]).as_dict()
    text = verdict({"all envs": same}, "sad", "token_kd", 0.95)
    assert text.startswith("**No difference between sad and token_kd**: identical on every task")
    better = paired_comparison([[1] * 30], [[0] * 30]).as_dict()
    assert verdict({"all envs": better}, "sad", "token_kd", 0.975).startswith("**sad beats token_kd**: +100.0 points")
    assert "97.5% CI" in verdict({"all envs": better}, "sad", "token_kd", 0.975) and ci_level(0.95) == "95"


def test_a_metric_some_seeds_lack_is_averaged_over_the_seeds_that_report_it():
    """A seed kept from an earlier run (a resumed evaluate or distill) may lack a metric a newer library adds, or hold
    None for it: the mean over seeds is over those that report a number, not halved by the others."""
    from sad.stages.layout import mean_over_seeds

    per_seed = {"0": {"success_rate": 0.5, "prefill_tokens_cut": 4.0, "note": "x"},
                "1": {"success_rate": 0.25, "prefill_tokens_cut": None},
                "2": {"success_rate": 0.0}}
    assert mean_over_seeds(per_seed) == {"prefill_tokens_cut": 4.0, "success_rate": 0.25}


def test_step_accuracy_by_action_kind_is_averaged_over_seeds_per_env_and_verb():
    """results.md's per-verb table: one row per (env, expert verb) with its dev step count, each agent's mean over
    its seeds; a verb an agent's evaluation lacks is "-", and no per-kind numbers at all give no table."""
    from sad.report import step_accuracy_by_kind_table

    def seed(take: float, go: float | None) -> dict:
        kinds = {"take": {"step_accuracy": take, "parsed_rate": 1.0, "steps": 4}}
        if go is not None:
            kinds["go"] = {"step_accuracy": go, "parsed_rate": 1.0, "steps": 10}
        return {"envs": {"alfworld": {"by_kind": kinds}}}

    results = {"teacher": {"step_accuracy": {"seeds": {"0": seed(1.0, 0.9)}}},
               "sad": {"step_accuracy": {"seeds": {"0": seed(0.25, None), "1": seed(0.75, None)}}},
               "sft": {}}
    rows = step_accuracy_by_kind_table(results).splitlines()
    assert rows[0] == "| env | action | dev steps | teacher | sad |"
    assert rows[2:] == ["| alfworld | `go` | 10 | 90.0% | - |", "| alfworld | `take` | 4 | 100.0% | 50.0% |"]
    assert step_accuracy_by_kind_table({"sft": {}}) == ""
