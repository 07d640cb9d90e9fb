"""The claims verdict: the rule benchmarks/README.md states, on made-up per-seed differences."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import claims  # noqa: E402


def test_verdict_follows_the_stated_rule():
    assert claims.verdict([2.0, 2.2, 1.8], 0.5) == "holds here"               # clear gain
    assert claims.verdict([0.3, 0.35, 0.4], 0.5) == "does not hold here"      # real but below 0.5
    assert claims.verdict([-3.0, -2.0, -2.5], 0.5) == "does not hold here"    # a loss
    assert claims.verdict([20.0, -10.0, 5.0], 0.5) == "cannot tell (spread too wide)"
    assert claims.verdict([0.02, 0.03, 0.04], 0.0) == "holds here"            # a threshold claim


def test_competitive_means_not_clearly_worse():
    assert claims.verdict([0.1, -0.1, 0.0], 0.5, competitive=True) == "holds here"      # a tie
    assert claims.verdict([-3.0, -2.5, -2.8], 0.5, competitive=True) == "does not hold here"
    assert claims.verdict([-8.0, 6.0, 1.0], 0.5, competitive=True) == "cannot tell (spread too wide)"


def test_table_has_a_row_per_claim_and_every_label_is_a_run():
    fake = {"suite": "default", "accuracy": {"test": dict.fromkeys(["sort", "inc", "first_ge5", "has7"], 0.9),
                                             "shift": {"has7": 0.5}},
            "learned": {"head_similarity": {"a": 0.9, "b": 0.95}}}
    wobble = lambda i: fake | {"accuracy": {"test": dict.fromkeys(fake["accuracy"]["test"], 0.9 - 0.01 * i),
                                            "shift": {"has7": 0.5 + 0.01 * i}}}
    results = {label: [wobble(i) for i in range(3)] for label in claims.RUNS}
    rows = claims.claims_table(results).splitlines()[2:]
    assert len(rows) == len(claims.CLAIMS)
    for paper, claim, setting, metric, a, b in claims.CLAIMS:
        assert a in claims.RUNS and (isinstance(b, float) or b.lstrip("~") in claims.RUNS)
    assert all(r.endswith(("holds here |", "does not hold here |", "cannot tell (spread too wide) |"))
               for r in rows)
