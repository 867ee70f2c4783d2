"""The demo's printed verdicts: the threshold check and the retention line, on evaluation summaries."""

from __future__ import annotations

from jobs import demo


def _cls(ap, precision, target=0.8, promise=(0.7, 0.9), assign=True, rate=0.1, prevalence=0.1):
    return {"ap": ap, "precision": precision, "target_precision": target, "promised_precision": list(promise),
            "assign": assign, "assigned_rate": rate, "prevalence": prevalence, "zero_shot": False}


def test_threshold_check_names_each_kind_of_miss(capsys) -> None:
    summary = {"classes": {
        "held": _cls(0.95, 0.82),
        "too_high": _cls(0.99, 0.97, promise=(0.9, 1.0)),  # off target, inside its promise
        "too_low": _cls(0.85, 0.60),  # off target and outside its promise
        "weak": _cls(0.40, 0.30, rate=0.5, prevalence=0.2),  # AP below 0.8: only over-assignment counts
        "unassigned": _cls(0.90, None, assign=False, promise=(None, None), rate=0.0),
    }}
    misses, over, off_promise = demo.threshold_check(summary)
    assert misses == ["too_high", "too_low"]
    assert over == ["weak"]
    assert off_promise == ["too_low", "weak"]
    out = capsys.readouterr().out
    assert "missed by too_high, too_low" in out and "2 of 4 assigned classes" in out


def test_compare_says_whether_the_base_fallback_meets_the_retention_goal(capsys) -> None:
    overall = {"gap_at_10": 0.77, "gap": 0.8, "map": 0.8, "ece": 0.02, "retrieval_map": 0.9,
               "retrieval_recall_at_1": 1.0}
    base = {"version": "b", "overall": {**overall, "gap_at_10": 0.3}, "zero_shot": {"p": {"auc": 0.87}, "s": {"auc": 0.9}}}
    tuned = {"version": "t", "overall": overall, "zero_shot": {"p": {"auc": 0.4}, "s": {"auc": 0.7}}}
    fallback = {"version": "t", "overall": overall, "zero_shot": base["zero_shot"]}
    assert demo.compare(base, tuned, fallback) == (0.3, 0.77)
    assert "with model.zero_shot_from=base: met" in capsys.readouterr().out
    fallback["zero_shot"] = {"p": {"auc": 0.84}, "s": {"auc": 0.9}}
    demo.compare(base, tuned, fallback)
    assert "with model.zero_shot_from=base: missed" in capsys.readouterr().out
