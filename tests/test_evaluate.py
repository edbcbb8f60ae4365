"""Evaluation: evaluate_rows's estimators on hand-worked samples, its chunking invariance, and the
`python -m tools.evaluate` CLI end to end on a tiny jsonl with the tiny model (transformers engine;
a vLLM variant is marked)."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from orchestration.data.prompts import PromptRow, load_rows
from orchestration.data.tasks import make_rows, write_jsonl
from orchestration.evaluation import eval_metrics, evaluate_rows
from reward.extract import answers_at_once
from rollout.types import Sample, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    correct: bool
    extracted: str | None


class FakeGenerator:
    """Returns fixed texts per prompt (looked up by prompt content) and records the sampling seeds it got."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts, self.seeds = texts, []

    def generate(self, prompts, sampling):
        self.seeds.append(sampling.seed)
        out = []
        for p, messages in enumerate(prompts):
            for i, text in enumerate(self.texts[messages[-1]["content"]][: sampling.n]):
                ids = tuple(range(len(text) + 1))
                out.append(Sample(p, (1,), ids, torch.zeros(len(ids)), "length" if i == 0 else "stop", 0, text))
        return out


class EndsWithTruth:
    """Correct when the text ends with the ground truth; the extracted answer is the last character."""

    def score_batch(self, responses, truths, extras):
        return [Result(r.endswith(t), r[-1:]) for r, t in zip(responses, truths)]


class FakeScorer:
    """Correct when the text equals the ground truth; the extracted answer is the text ('' → None)."""

    def score_batch(self, responses, truths, extras):
        return [Result(r == t, r or None) for r, t in zip(responses, truths)]


def row(content, truth):
    return PromptRow(({"role": "user", "content": content},), truth, f"test:{content}")


def test_estimators_match_hand_computed_values():
    rows = [row("a", "5"), row("b", "7"), row("c", "1")]
    gen = FakeGenerator(
        {
            "a": ["5", "3", "5", "3"],  # 2/4 correct; tie 5 vs 3 → the first answer (5) wins → cons ✓
            "b": ["", "8", "8", "7"],  # 1/4; majority 8 (the empty answer does not vote) → cons ✗
            "c": ["", "", "", ""],  # 0/4; no votes → cons ✗
        }
    )
    report = evaluate_rows(gen, FakeScorer(), rows, SamplingConfig(n=4, seed=100))
    assert report["avg_at_k"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert report["cons_at_k"] == pytest.approx(1 / 3)
    assert report["pass_at_k"] == pytest.approx(2 / 3)  # n = k: solved at least once
    assert report["no_answer_frac"] == pytest.approx(5 / 12)
    assert report["truncated_frac"] == pytest.approx(3 / 12)  # the first sample of each says "length"
    lengths = [2, 2, 2, 2, 1, 2, 2, 2, 1, 1, 1, 1]
    assert report["response_length_mean"] == pytest.approx(sum(lengths) / 12)
    assert [p["correct"] for p in report["per_problem"]] == [2, 1, 0]
    assert [p["majority_answer"] for p in report["per_problem"]] == ["5", "8", None]
    assert (report["k"], report["problems"], report["samples"]) == (4, 3, 12)
    assert report["answer_first_frac"] == 0.0 and report["answer_first_accuracy"] is None
    assert report["reasoned_accuracy"] == pytest.approx(3 / 12)
    assert set(eval_metrics(report)) == {
        "eval/avg_at_k",
        "eval/cons_at_k",
        "eval/pass_at_k",
        "eval/response_length_mean",
        "eval/answer_first_frac",
        "eval/reasoned_accuracy",  # eval/answer_first_accuracy is left out: no response answered at once
    }


def test_answers_at_once_and_the_accuracy_of_each_habit():
    assert answers_at_once("Answer: 5") and answers_at_once("\n **Answer:** 5") and answers_at_once("answer：5")
    assert not answers_at_once("2+3=5\nAnswer: 5") and not answers_at_once("5") and not answers_at_once("")

    gen = FakeGenerator({"a": ["Answer: 5", "Answer: 4", "2+3=5\nAnswer: 5", "2+3=6\nAnswer: 6", "2+3=5\nAnswer: 5"]})
    report = evaluate_rows(gen, EndsWithTruth(), [row("a", "5")], SamplingConfig(n=5))
    assert report["answer_first_frac"] == pytest.approx(2 / 5)
    assert report["answer_first_accuracy"] == pytest.approx(1 / 2)
    assert report["reasoned_accuracy"] == pytest.approx(2 / 3)
    assert eval_metrics(report)["eval/answer_first_accuracy"] == pytest.approx(1 / 2)


def test_habits_are_reported_on_the_built_in_tasks_only():
    texts = ["Answer: 5", "2+3=5\n5-1=4\nAnswer: 4", "2+3-1=4\nAnswer: 4", "2+3=5\n5-1=4\nAnswer: 5", "Answer: 6"]
    task_row = PromptRow(({"role": "user", "content": "a"},), "4", "synthetic_val.jsonl:1", "synthetic-free-chain")
    report = evaluate_rows(FakeGenerator({"a": texts}), EndsWithTruth(), [task_row], SamplingConfig(n=5))
    # by hand: direct 2/5 (both wrong), stepwise 2/5 (1 right), at_once 1/5 (right); FakeGenerator: len(text) + 1 ids
    assert report["habits"] == pytest.approx(
        {
            "direct_frac": 0.4,
            "direct_accuracy": 0.0,
            "direct_length": 10.0,
            "at_once_frac": 0.2,
            "at_once_accuracy": 1.0,
            "at_once_length": 18.0,  # "2+3-1=4\nAnswer: 4": 17 characters
            "partial_frac": 0.0,
            "stepwise_frac": 0.4,
            "stepwise_accuracy": 0.5,
            "stepwise_length": 22.0,  # 21 characters
            "other_frac": 0.0,
        }
    )
    assert eval_metrics(report)["eval/habit/stepwise_frac"] == pytest.approx(0.4)
    other = evaluate_rows(FakeGenerator({"a": texts}), EndsWithTruth(), [row("a", "4")], SamplingConfig(n=5))
    assert other["habits"] == {} and not any("habit" in key for key in eval_metrics(other))


def test_pass_at_k_uses_the_unbiased_estimator_when_n_exceeds_k():
    # k = sampling.n, so pass@k with n > k only arises through eval_metrics.pass_at_k; check the report uses n = k
    gen = FakeGenerator({"a": ["5", "3", "3", "3"]})
    report = evaluate_rows(gen, FakeScorer(), [row("a", "5")], SamplingConfig(n=4))
    assert report["pass_at_k"] == 1.0 and report["avg_at_k"] == 0.25 and report["cons_at_k"] == 0.0


def test_chunking_keeps_every_samples_seed():
    texts = {c: ["x"] * 2 for c in "abcde"}
    rows = [row(c, "x") for c in "abcde"]
    whole, chunked = FakeGenerator(texts), FakeGenerator(texts)
    done = []
    a = evaluate_rows(whole, FakeScorer(), rows, SamplingConfig(n=2, seed=10))
    b = evaluate_rows(
        chunked,
        FakeScorer(),
        rows,
        SamplingConfig(n=2, seed=10),
        chunk_prompts=2,
        on_progress=lambda d, t: done.append(d),
    )
    assert whole.seeds == [10] and chunked.seeds == [10, 14, 18]  # seed + start·k: sample seeds unchanged
    assert done == [2, 4, 5]
    assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(*args):
    cmd = [sys.executable, "-m", "tools.evaluate", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_cli_end_to_end_on_a_tiny_jsonl(tmp_path, tiny_model, engine):
    _, val = make_rows(0, 3, seed=1)
    data = write_jsonl(val, tmp_path / "val.jsonl")
    out = tmp_path / "report.json"
    proc = run_cli(
        "--model", tiny_model, "--data", data, "--k", 4, "--max-response-tokens", 8, "--max-prompt-tokens", 96,
        "--workers", 1, "--engine", engine, "--output", out, "--chunk-prompts", 2,
    )  # fmt: skip
    report = json.loads(out.read_text())
    for key in ("avg_at_k", "cons_at_k", "pass_at_k", "response_length_mean", "per_problem", "sampling", "model"):
        assert key in report
    assert report["k"] == 4 and report["problems"] == 3 and report["samples"] == 12
    assert report["sampling"]["top_p"] == 0.7 and report["sampling"]["temperature"] == 1.0  # the paper's protocol
    assert 1 <= report["response_length_mean"] <= 8
    assert [p["source"] for p in report["per_problem"]] == [r.source for r in load_rows(data)]
    assert 0.0 <= report["avg_at_k"] <= report["pass_at_k"] <= 1.0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["avg_at_k"] == report["avg_at_k"]
    assert "problems" in proc.stderr  # progress on stderr


def test_cli_skips_long_prompts_and_counts_them(tmp_path, tiny_model):
    rows = [
        {"prompt": [{"role": "user", "content": "Compute left to right: 1 +2"}], "reward_model": {"ground_truth": "3"}},
        {"prompt": [{"role": "user", "content": "x" * 500}], "reward_model": {"ground_truth": "1"}},
    ]
    data = write_jsonl(rows, tmp_path / "mixed.jsonl")
    out = tmp_path / "r.json"
    run_cli("--model", tiny_model, "--data", data, "--k", 2, "--max-response-tokens", 4, "--engine", "hf",
            "--max-prompt-tokens", 96, "--workers", 1, "--output", out)  # fmt: skip
    report = json.loads(out.read_text())
    assert report["skipped_long_prompts"] == 1 and report["problems"] == 1
