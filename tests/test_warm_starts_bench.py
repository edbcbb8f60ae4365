"""bench/warm_starts.py: the bars of docs/warm_start.md applied to a warm-start's measurements, and the table's
summary, on hand-made measurements (the numbers are chosen on either side of each bar)."""

from __future__ import annotations

import json

import pytest

from bench.warm_starts import main, passes


def _final(**kw) -> dict:
    return {"chain_exact": 0.8, "accuracy": 0.45, "loss": 0.05, "operation_lines": 0.99, "result_accuracy": 0.99} | kw


@pytest.mark.parametrize(
    ("setting", "final", "ok", "why"),
    [
        ("demo", _final(chain_exact=0.60, accuracy=0.35), True, ""),
        ("demo", _final(chain_exact=0.59), False, "chains < 60%"),
        ("demo", _final(accuracy=0.56), False, "sampled outside 35-55%"),
        ("long", _final(chain_exact=0.50, accuracy=0.30), True, ""),
        ("long", _final(chain_exact=0.49, accuracy=0.61), False, "chains < 50%, sampled outside 30-60%"),
    ],
)
def test_the_chain_settings_bars(setting, final, ok, why):
    assert passes(setting, final) == (ok, why)


def _free(**kw) -> dict:
    habits = {"stepwise_frac": 0.4, "stepwise_accuracy": 0.9, "at_once_frac": 0.1, "at_once_accuracy": 0.1,
              "partial_frac": 0.2, "partial_accuracy": 0.6}  # fmt: skip
    return _final(chain_exact=0.6) | habits | kw


@pytest.mark.parametrize(
    ("final", "ok", "why"),
    [
        (_free(), True, ""),  # stepwise 90% is 30 points above partial's 60%: on the bar
        (_free(partial_accuracy=0.61), False, "stepwise < partial + 30 points"),
        (_free(stepwise_frac=0.71), False, "stepwise > 70% of responses"),
        (
            _free(stepwise_accuracy=0.45, at_once_accuracy=0.0, partial_accuracy=0.0),
            False,
            "sampled stepwise right < 50%",
        ),  # fmt: skip
        (_free(chain_exact=0.49), False, "stepwise chains < 50%"),
        (_free(at_once_frac=0.0, at_once_accuracy=0.95), True, ""),  # a habit never sampled is not compared
    ],
)
def test_the_free_chain_bar(final, ok, why):
    assert passes("free", final) == (ok, why)


def test_the_table_of_measured_rows(tmp_path, capsys):
    folder = tmp_path / "long"
    folder.mkdir()
    for seed, (chains, accuracy, stepwise) in enumerate([(0.9, 0.4, 0.95), (0.3, 0.2, 0.5)]):
        middle = _final(step=1200, chain_exact=0.1)
        final = _final(step=2400, chain_exact=chains, accuracy=accuracy, stepwise_frac=0.5,
                       stepwise_accuracy=stepwise, direct_frac=0.5, direct_accuracy=0.1)  # fmt: skip
        record = {"measurements": [middle, final], "seconds": 100.0 + seed}
        (folder / f"i{seed}_t1.json").write_text(json.dumps(record))
    (summary,) = main(["long", "--seeds", "0", "1", "2", "--threads", "1", "--out", str(tmp_path), "--table-only"])
    out = capsys.readouterr().out
    assert "## long: 1 of 2 pass the bar" in out  # seed 2 was not measured: no row
    assert "| 0 | 1 | 0.050 | 90.0% | 99.0% | 99.0% | 40.0% | 50% / 10% | 50% / 95% | 10.0% | 100 s | yes |" in out
    assert "**no**: chains < 50%, sampled outside 30-60%" in out
    assert summary["chain_exact"] == [0.3, 0.9] and summary["passed"] == 1
    assert summary["room_for_rl"] == pytest.approx([0.3, 0.55])  # stepwise right minus sampled right
