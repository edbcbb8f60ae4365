"""The demo's pieces: the supervised warm-start (labels, determinism, caching), the plot, and the whole
`python -m tools.demo` on a shortened schedule (warm-start of a few steps, 2 RL steps, evaluation,
summary, curves, token credit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestration.data.tasks import make_rows
from orchestration.data.warm_start import (
    ARGS_FILE,
    WarmStartConfig,
    collate,
    encode_examples,
    warm_start,
    with_shortcuts,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def examples(n=64):
    train, _ = make_rows(n, 0, seed=0)
    return [(r["prompt"], r["extra_info"]["solution"]) for r in train]


def test_loss_only_on_the_assistant_tokens(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ex = [
        ([{"role": "user", "content": "Compute left to right: 1 +2"}], "1+2=3\nAnswer: 3"),
        ([{"role": "user", "content": "x"}], "y"),
    ]
    (ids0, p0), (ids1, p1) = encode_examples(tok, ex)
    assert tok.decode(ids0[p0:]) == "1+2=3\nAnswer: 3<|im_end|>"
    assert tok.decode(ids0[:p0]).endswith("<|im_start|>assistant\n")
    input_ids, attention, labels = collate([(ids0, p0), (ids1, p1)], tok.pad_token_id)
    assert labels[0, :p0].eq(-100).all() and labels[0, p0 : len(ids0)].tolist() == ids0[p0:]
    assert labels[1, len(ids1) :].eq(-100).all() and attention[1, len(ids1) :].eq(0).all()
    assert labels[1, p1 : len(ids1)].tolist() == [ord("y"), tok.eos_token_id]


def test_shortcuts_keep_only_the_answer_line_of_a_seeded_fraction():
    ex = examples(400)
    cut = with_shortcuts(ex, 0.25, seed=1)
    short = [s for (_, s), (_, full) in zip(cut, ex) if s != full]
    assert 70 <= len(short) <= 130 and all(s.startswith("Answer: ") and "\n" not in s for s in short)
    assert [s for _, s in cut] == [s for _, s in with_shortcuts(ex, 0.25, seed=1)]
    assert with_shortcuts(ex, 0.0, seed=1) == ex


def test_warm_start_is_deterministic_learns_and_is_cached(tiny, tmp_path, monkeypatch):
    import orchestration.data.warm_start as warm_start_module

    config = WarmStartConfig(steps=30, lr=3e-3, batch_rows=8, warmup_steps=5)
    first = warm_start(tiny, examples(), config, tmp_path / "a")
    record = json.loads((first / ARGS_FILE).read_text())
    assert record["final_loss"] < record["first_loss"] - 0.5, record
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached warm-start trained again")

    # cached: the second call neither trains nor rewrites the model (checked by what it does, not how long it takes)
    with monkeypatch.context() as patch:
        patch.setattr(warm_start_module, "train_sft", no_training)
        again = warm_start(tiny, examples(), config, tmp_path / "a")
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    # the same arguments elsewhere give the same weights; other arguments a different cache entry
    other = warm_start(tiny, examples(), config, tmp_path / "b")
    assert other.name == first.name
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = warm_start(tiny, examples(), WarmStartConfig(steps=2, batch_rows=8), tmp_path / "a")
    assert changed != first
    # the result is a complete HF directory (tokenizer included; the tiny-model marker is not copied)
    assert (first / "vocab.json").is_file() and not (first / "tiny_model_args.json").exists()


def test_plot_writes_a_valid_png(tmp_path):
    from PIL import Image

    from tools.plot import main as plot_main

    for name, weights in (("fipo", True), ("dapo", False)):
        run = tmp_path / name
        run.mkdir()
        rows = []
        for step in range(4):
            row = {"step": step, "reward/mean": 0.1 * step, "reward/accuracy": 0.2 + 0.1 * step,
                   "rollout/response_length_mean": 20 + step}  # fmt: skip
            if weights:
                row |= {f"learner/last_mini_batch/influence_weights_{s}": 1.0 + 0.01 * step for s in ("mean", "max")}
                row |= {"learner/last_mini_batch/influence_weights_min": 1.0, "learner/influence_weights_mean": 1.0}
            if step == 0:
                row |= {"eval/initial_avg_at_k": 0.3, "eval/initial_cons_at_k": 0.4, "eval/initial_pass_at_k": 0.6}
            if step % 2 == 1:
                row |= {"eval/avg_at_k": 0.5, "eval/cons_at_k": 0.6, "eval/pass_at_k": 0.8}
            rows.append(row)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"algorithm": name}))
    single = plot_main([str(tmp_path / "fipo")])
    compare = plot_main([str(tmp_path / "fipo"), str(tmp_path / "dapo"), "--output", str(tmp_path / "cmp.png")])
    for path in (single, compare):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1320, 880)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_demo_end_to_end_on_a_short_schedule(tmp_path):
    out = tmp_path / "demo"
    overrides = [
        f"trainer.output_dir={out}",
        f"model.tiny_dir={tmp_path / 'tiny'}",
        f"model.warm_start_dir={tmp_path / 'warm'}",
        "model.tiny_hidden_size=64",
        "model.tiny_layers=2",
        "model.tiny_heads=2",
        "model.tiny_kv_heads=1",
        "model.tiny_intermediate_size=128",
        "model.warm_start_steps=4",
        "model.warm_start_min_chain_accuracy=0",  # 4 steps cannot pass the check (test_warm_start_check)
        "model.warm_start_warmup_steps=1",
        "algorithm.group_size=4",
        "algorithm.train_batch_prompts=4",
        "algorithm.gen_batch_prompts=4",
        "algorithm.mini_batch_prompts=2",
        "algorithm.filter_groups=false",  # 4 warm-start steps do not make the model right yet
        "algorithm.overlong_buffer_tokens=8",
        "rollout.max_response_tokens=24",
        "data.synthetic_train_prompts=64",
        "data.synthetic_val_prompts=4",
        "trainer.total_steps=2",
        "trainer.save_every=1",
        "trainer.eval_every=2",
        "trainer.eval_samples=2",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # vLLM's CPU start-up notices stay off the console (rollout/engine.py filters them by message)
    for notice in ("`torch.set_num_threads` after the thread binding", "NUMA binding: Using MEMBIND policy"):
        assert notice not in proc.stdout + proc.stderr, notice
    summary = json.loads((out / "summary.json").read_text())
    for key in ("initial_accuracy", "final_accuracy", "steps", "wall_seconds", "algorithm"):
        assert summary[key] is not None, key
    assert summary["algorithm"] == "fipo" and summary["steps"] == 2 and summary["warm_start_steps"] == 4
    assert 0.0 <= summary["initial_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((out / "wandb").glob("offline-run-*"))
    from PIL import Image

    for png in (out / "curves.png", out / "credit" / "credit.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300
    assert "data-future-kl" in (out / "credit" / "credit.html").read_text(encoding="utf-8")
    assert str(out / "summary.json") in proc.stdout
    assert list((tmp_path / "warm").iterdir()), "the warm-start cache was used"
