"""Confidence intervals the judges, the gold figures and the gate share (not a stage).

Each is a small pure function with its equation in the docstring, so a test can check it against hand values.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def normal_quantile(confidence: float) -> float:
    """z with P(−z ≤ Z ≤ z) = confidence for a standard normal Z: 1.96 at 0.95."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}; it must lie in (0, 1), e.g. 0.95.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), with p̂ = successes/n and z the normal quantile.
    `successes` may be fractional (a tie counted as half a win).
    """
    if n <= 0 or not 0 <= successes <= n or not 0 < confidence < 1:
        raise ValueError(
            f"wilson_interval got successes={successes}, n={n}, confidence={confidence}; it needs n >= 1, "
            "0 <= successes <= n (ties may count as half) and confidence in (0, 1), e.g. 0.95."
        )
    z = normal_quantile(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(after: Sequence[float], before: Sequence[float],
                               confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference with its normal interval: (d̄, d̄ − z·s_d/√n, d̄ + z·s_d/√n).

    d_i = after_i − before_i on the same n items (for 0/1 correctness, d_i ∈ {−1, 0, 1}); d̄ = Σd_i/n and
    s_d² = Σ(d_i − d̄)²/(n − 1). Pairing removes the between-item variance that two independent intervals would
    carry, so the interval is narrower when both models get the same items right. The normal approximation wants
    n in the tens at least (the held-out set has 200); where every d_i is equal, s_d = 0 and the interval has no
    width, which is what the data say but not a guarantee, so read it beside n.
    """
    n = len(after)
    if n != len(before) or n < 2:
        raise ValueError(
            f"paired_difference_interval got {len(after)} and {len(before)} values; it needs two equally long "
            "lists over the same items, in the same order, at least 2 of them."
        )
    differences = [a - b for a, b in zip(after, before)]
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = normal_quantile(confidence) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def win_rate_figures(outcomes: Sequence[str], confidence: float) -> dict:
    """Win-rate with ties counted half, (wins + ½·ties)/n, and its Wilson interval; the counts beside it."""
    wins, ties = outcomes.count("win"), outcomes.count("tie")
    rate = (wins + 0.5 * ties) / len(outcomes)
    lower, upper = wilson_interval(wins + 0.5 * ties, len(outcomes), confidence)
    return {"win_rate": round(rate, 4), "win_rate_lower": round(lower, 4), "win_rate_upper": round(upper, 4),
            "wins": wins, "ties": ties, "losses": outcomes.count("loss"), "n": len(outcomes)}


def agreement_figures(reference: Sequence[str], picks: Sequence[str | None], confidence: float) -> dict:
    """How often a judge picks the response people chose: agree / n over the n pairs it decides, with the Wilson
    interval, and the counts beside it.

    `reference` holds people's labels, 'a' or 'b' (their ties are left out before: a tie has no side to agree with);
    `picks` the judge's on the same pairs, 'a', 'b', 'tie', or None where its two orders disagreed. A tie or None
    decides nothing, so it is counted but left out of n; n / pairs is the share of the set the rate covers. With no
    pair decided there is no rate, and only the counts come back.
    """
    if len(reference) != len(picks) or not set(reference) <= {"a", "b"} or not set(picks) <= {"a", "b", "tie", None}:
        raise ValueError(
            f"agreement_figures got {len(reference)} reference labels ({sorted(set(reference))}) and {len(picks)} "
            f"picks ({sorted(set(picks), key=str)}); it needs one pick per pair, labels 'a' or 'b' (people's ties left out) "
            "and picks 'a', 'b', 'tie' or None (inconsistent).")
    decided = [(r, p) for r, p in zip(reference, picks) if p in ("a", "b")]
    agree = sum(r == p for r, p in decided)
    figures = {"n": len(decided), "agree": agree, "pairs": len(picks), "ties": list(picks).count("tie"),
               "inconsistent": list(picks).count(None)}
    if decided:
        lower, upper = wilson_interval(agree, len(decided), confidence)
        figures.update(rate=round(agree / len(decided), 4), lower=round(lower, 4), upper=round(upper, 4))
    return figures
