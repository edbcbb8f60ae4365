"""score_math and the extraction/normalisation rules, in-process (no isolation needed for benign inputs).

Every expectation here is written by hand; the AIME ground truths come from shared/data/aime-2024.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward import score_math, score_math_binary
from reward.extract import as_exact_number, extract_answer, last_boxed, normalize_answer

AIME_PATH = Path("/work/shared/data/aime-2024.jsonl")
FILLER = "Let me think step by step about the problem. " * 20  # ~900 chars of reasoning

# (response, ground_truth, expected correct, expected extracted)
CASES = [
    ("Answer: 204", "204", True, "204"),
    ("Answer: $204$", "204", True, "204"),
    ("answer: 204", "204", True, "204"),
    ("**Answer:** 204", "204", True, "204"),
    ("Answer: **204**", "204", True, "204"),
    ("Answer: 204.", "204", True, "204"),
    ("Answer:\n204", "204", True, "204"),
    ("Answer: $\\boxed{204}$", "204", True, "204"),
    ("Answer: The answer is 204", "204", True, "204"),
    ("Final Answer: The final answer is $204$. I hope it is correct.", "204", True, "204"),
    ("Answer: 204 minutes", "204", True, "204"),
    ("Answer: $204 \\text{ minutes}$", "204", True, "204"),
    ("Answer: 30^\\circ", "30", True, "30"),
    ("Answer: 50\\%", "50", True, "50"),
    ("Answer: \\$45", "45", True, "45"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: $1{,}000$", "1000", True, "1000"),
    ("Answer: $1\\,000$", "1000", True, "1000"),
    ("Answer: 1,001", "1000", False, "1001"),
    ("Answer: 007", "7", True, "007"),
    ("Answer: 073", "73", True, "073"),
    ("Answer: -5", "-5", True, "-5"),
    ("Answer: \u22125", "-5", True, "-5"),
    ("Answer: 5", "-5", False, "5"),
    ("Answer: x = 3", "3", True, "3"),
    ("Answer: 0.5", "\\frac{1}{2}", True, "0.5"),
    ("The result is \\boxed{\\frac{1}{2}}.", "0.5", True, "\\frac{1}{2}"),
    ("So \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "\\frac{3}{4}"),
    ("So \\boxed{3/4}", "0.75", True, "3/4"),
    ("So \\boxed{0.3333}", "\\frac{1}{3}", False, "0.3333"),
    ("So \\boxed{{42}}", "42", True, "42"),
    ("So \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True, "\\frac{\\sqrt{2}}{2}"),
    ("So \\boxed{2\\pi}", "\\pi \\cdot 2", True, "2\\pi"),
    ("So \\boxed{(1, 2)}", "(1,2)", True, "(1, 2)"),
    ("So \\boxed{x^2+2x+1}", "(x+1)^2", True, "x^2+2x+1"),
    ("So \\boxed{x^2+1}", "(x+1)^2", False, "x^2+1"),
    ("\\fbox{12}", "12", True, "12"),
    ("hence \\boxed 12 is it", "12", True, "12"),
    ("First \\boxed{3}, then corrected: \\boxed{5}", "5", True, "5"),
    ("First \\boxed{5}, then corrected: \\boxed{3}", "5", False, "3"),
    ("Answer: 5\n...on reflection...\nAnswer: 6", "5", False, "6"),
    ("Answer: 6\n\\boxed{5}", "5", False, "6"),  # an "Answer:" line wins over a box
    ("", "5", False, None),
    ("I do not know.", "5", False, None),
    ("Answer:", "5", False, None),
    ("\\boxed{}", "5", False, None),
    ("\\boxed{5", "5", False, None),  # never closed
    ("Answer: 204" + FILLER, "204", False, None),  # outside the last 300 characters
    (FILLER + "Answer: 204", "204", True, "204"),
    ("\\boxed{204}" + FILLER, "204", False, None),
    ("Answer: No", "Yes", False, "No"),
    ("Answer: 204<|im_end|>", "204", True, "204"),
    ("\\boxed{204}</s>", "204", True, "204"),
    ("**Final Answer**: 204", "204", True, "204"),
    ("ANSWER : 204", "204", True, "204"),
    ("Answer: \\(\\frac{1}{2}\\)", "0.5", True, "\\frac{1}{2}"),
    ("Answer: \\[ -\\frac{1}{2} \\]", "-0.5", True, "-\\frac{1}{2}"),
    ("Answer: $$2.50$$", "\\frac{5}{2}", True, "2.50"),
    ("Answer: $\\displaystyle 12$", "12", True, "12"),
    ("Answer: 1,000,000", "1000000", True, "1000000"),
    ("Answer: 5\\sqrt{2}", "\\sqrt{50}", True, "5\\sqrt{2}"),
    ("Answer: 10^{3}", "1000", True, "10^{3}"),
    ("The total is 18.\n#### 18", "18", True, "18"),
    ("Answer: Yes", "Yes", True, "Yes"),
]


@pytest.mark.parametrize("response, ground_truth, correct, extracted", CASES)
def test_score_math_cases(response, ground_truth, correct, extracted):
    result = score_math(response, ground_truth)
    assert result.status == "ok"
    assert result.correct is correct
    assert result.score == (1.0 if correct else -1.0)
    assert result.extracted == extracted


def test_binary_scheme():
    assert score_math_binary("Answer: 204", "204").score == 1.0
    assert score_math_binary("Answer: 205", "204").score == 0.0
    assert score_math_binary("nothing", "204").score == 0.0
    assert score_math("Answer: 205", "204", wrong_score=0.0).score == 0.0


def test_ground_truth_forms_are_normalised_too():
    assert score_math("Answer: 204", "\\boxed{204}").correct
    assert score_math("Answer: 204", "$204$").correct
    assert score_math("Answer: 1000", "1,000").correct


def test_bad_argument_types_raise():
    with pytest.raises(TypeError, match="response"):
        score_math(None, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ground_truth"):
        score_math("Answer: 1", 1)  # type: ignore[arg-type]


def test_aime_2024_rows():
    rows = [json.loads(line) for line in AIME_PATH.read_text().splitlines() if line.strip()]
    assert len(rows) == 30
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        wrong = str(int(truth) + 1)
        assert score_math(FILLER + f"\nAnswer: {truth}", truth).correct, truth
        assert score_math(FILLER + f"\nAnswer: ${truth}$", truth).correct, truth
        assert score_math(FILLER + f"so the answer is $\\boxed{{{truth}}}$.", truth).correct, truth
        assert score_math(FILLER + f"\nAnswer: {int(truth):03d}", truth).correct, truth  # AIME style 073
        assert not score_math(FILLER + f"\nAnswer: {wrong}", truth).correct, truth
        assert not score_math(f"Answer: {truth}\n" + FILLER + f"\nAnswer: {wrong}", truth).correct, truth


def test_extraction_helpers():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("no box") is None
    assert extract_answer("x" * 1000 + "Answer: 3", tail_chars=300) == "3"
    assert normalize_answer("$\\left( 1, 2 \\right)$") == "( 1, 2 )"
    assert as_exact_number("-\\frac{3}{6}") == as_exact_number("-0.5")
    assert as_exact_number("1/0") is None
    assert as_exact_number("9" * 500) is None  # too long to convert


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_extraction_never_raises_and_reads_only_the_tail(text):
    raw = extract_answer(text)
    if raw is not None:
        assert len(raw) <= 300
        normalize_answer(raw)
        as_exact_number(normalize_answer(raw))
