"""Aggregation on hand-made votes: majority, splits, too few votes, kappa, gold accuracy, flagging."""
import pytest

from rlhf.labeling.aggregate import (GoldScore, QualityPolicy, Vote, agreement_with_majority, campaign_figures,
                                     category_counts, fleiss_kappa, gold_scores, majority_vote)


def votes_for(pair_id: str, **choices: str) -> list[Vote]:
    return [Vote(pair_id, annotator, choice) for annotator, choice in choices.items()]


def test_majority_of_three_with_agreement():
    outcome = majority_vote(["a", "a", "b"], [1, 1, 1], min_votes=3)
    assert (outcome.status, outcome.choice, outcome.votes) == ("majority", "a", 3)
    assert outcome.agreement == pytest.approx(2 / 3)


def test_tie_is_a_choice_that_can_win():
    outcome = majority_vote(["tie", "tie", "a"], [1, 1, 1], min_votes=3)
    assert (outcome.status, outcome.choice) == ("majority", "tie")


def test_even_split_has_no_majority():
    outcome = majority_vote(["a", "b", "tie", "both_bad"], [1, 1, 1, 1], min_votes=3)
    assert (outcome.status, outcome.choice, outcome.agreement) == ("split", None, None)
    assert majority_vote(["a", "a", "b", "b"], [1, 1, 1, 1], min_votes=3).status == "split"


def test_too_few_votes_gives_no_verdict():
    outcome = majority_vote(["a", "a"], [1, 1], min_votes=3)
    assert (outcome.status, outcome.choice, outcome.votes) == ("too_few_votes", None, 2)
    assert majority_vote([], [], min_votes=3).status == "too_few_votes"


def test_weights_break_a_tie_and_zero_weight_does_not_count():
    # a down-weighted dissenter cannot split a pair with one trusted vote on each side
    outcome = majority_vote(["a", "b", "b"], [1, 1, 0.5], min_votes=3)
    assert (outcome.choice, outcome.agreement) == ("b", pytest.approx(1.5 / 2.5))
    excluded = majority_vote(["a", "a", "b", "b"], [1, 1, 1, 0], min_votes=3)
    assert (excluded.choice, excluded.votes, excluded.agreement) == ("a", 3, pytest.approx(2 / 3))


def test_fleiss_kappa_hand_computed():
    # items (a, b): [3,0] P=1, [2,1] P=(4+1-3)/6=1/3, [0,3] P=1 -> P̄=7/9
    # p_a=5/9, p_b=4/9 -> P̄e=41/81; κ=(63/81-41/81)/(40/81)=22/40
    assert fleiss_kappa([[3, 0], [2, 1], [0, 3]]) == pytest.approx(0.55)


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories, P̄=0.378, P̄e=0.213, κ=0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_edges():
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)  # perfect agreement
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category only: chance agreement is 1, κ undefined
    assert fleiss_kappa([[1, 0]]) is None  # a single rating says nothing about agreement
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)  # two raters always disagreeing


def test_category_counts_columns_follow_vote_choices():
    votes = votes_for("p1", ann="a", bob="a", cy="both_bad") + votes_for("p2", ann="tie", bob="b", cy="b")
    assert category_counts(votes) == [[2, 0, 0, 1], [0, 2, 1, 0]]


def test_gold_accuracy_counts_answers_not_skips():
    gold = {"g1": "a", "g2": "b", "g3": "tie"}
    votes = (votes_for("g1", ann="a", bob="b") + votes_for("g2", ann="b", bob="skip")
             + votes_for("g3", ann="a", bob="tie") + votes_for("real", ann="a", bob="a"))
    scores = gold_scores(votes, gold)
    assert scores == {"ann": GoldScore(answered=3, correct=2), "bob": GoldScore(answered=2, correct=1)}
    assert scores["ann"].accuracy == pytest.approx(2 / 3)


def test_agreement_with_majority_ignores_pairs_without_one():
    votes = votes_for("p1", ann="a", bob="a", cy="b") + votes_for("p2", ann="a", bob="b", cy="tie")
    outcomes = {"p1": majority_vote(["a", "a", "b"], [1, 1, 1], 3), "p2": majority_vote(["a", "b", "tie"], [1, 1, 1], 3)}
    assert agreement_with_majority(votes, outcomes) == {"ann": 1.0, "bob": 1.0, "cy": 0.0}


def careless_campaign() -> tuple[list[Vote], dict[str, str]]:
    """ann and bob answer gold right; cy gets every gold pair wrong and disagrees on p1."""
    gold = {"g1": "a", "g2": "b", "g3": "a"}
    votes = []
    for pair_id, answer in gold.items():
        wrong = "b" if answer == "a" else "a"
        votes += votes_for(pair_id, ann=answer, bob=answer, cy=wrong)
    votes += votes_for("p1", ann="a", bob="b", cy="b")  # cy decides p1 unless excluded
    votes += votes_for("p2", ann="tie", bob="tie", cy="tie")
    return votes, gold


def test_flagged_annotator_is_excluded():
    votes, gold = careless_campaign()
    policy = QualityPolicy(gold_accuracy_threshold=0.7, gold_min_answers=3, flagged_vote_weight=0.0)
    figures = campaign_figures(votes, gold, ["p1", "p2", "p3"], policy, min_votes=2)
    assert figures.flagged == {"cy"}
    assert figures.weights == {"ann": 1.0, "bob": 1.0, "cy": 0.0}
    assert figures.outcomes["p1"].status == "split"  # without cy, ann and bob disagree
    assert (figures.outcomes["p2"].choice, figures.outcomes["p2"].votes) == ("tie", 2)
    assert figures.outcomes["p3"].status == "too_few_votes"  # no votes at all
    assert "g1" not in figures.outcomes  # gold pairs get no verdict
    # κ over ann and bob on p1 ([1,1,0,0]) and p2 ([0,0,2,0]): P̄=(0+1)/2, p=(1/4,1/4,1/2,0), P̄e=3/8 -> κ=0.2
    assert figures.kappa == pytest.approx(0.2)


def test_flagged_annotator_is_down_weighted():
    votes, gold = careless_campaign()
    policy = QualityPolicy(gold_accuracy_threshold=0.7, gold_min_answers=3, flagged_vote_weight=0.5)
    p1 = campaign_figures(votes, gold, ["p1", "p2"], policy, min_votes=3).outcomes["p1"]
    assert (p1.choice, p1.votes, p1.agreement) == ("b", 3, pytest.approx(1.5 / 2.5))


def test_without_enough_gold_answers_nobody_is_flagged():
    votes, gold = careless_campaign()
    figures = campaign_figures(votes, gold, ["p1", "p2"], QualityPolicy(gold_min_answers=4), min_votes=3)
    assert figures.flagged == frozenset()
    assert figures.outcomes["p1"].choice == "b"  # cy counts in full


@pytest.mark.parametrize("kwargs", [{"gold_accuracy_threshold": 1.5}, {"gold_min_answers": 0},
                                    {"flagged_vote_weight": 1.0}, {"flagged_vote_weight": -0.1}])
def test_policy_rejects_values_out_of_range(kwargs):
    with pytest.raises(ValueError, match="must"):
        QualityPolicy(**kwargs)
