"""The warm-start's measurements (orchestration/data/warm_start_eval.py) and its check before RL: the bookkeeping
of the teacher-forced report against oracles whose right and wrong tokens are known, a measurement that does not
change the training it runs inside, and a failed warm-start stopping the demo in plain words, before Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestration.data.tasks import make_rows
from orchestration.data.warm_start_eval import chain_roles, teacher_forced_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def test_roles_of_a_chain_by_hand():
    roles = chain_roles("7+3=10\n10*2=20\nAnswer: 20")
    expected = (
        [("copy", 1)] + [("operation", 1)] * 3 + [("result", 1)] * 3  # 7 | +3= | 10\n
        + [("copy", 2)] * 2 + [("operation", 2)] * 3 + [("result", 2)] * 3  # 10 | *2= | 20\n
        + [("format", 0)] * 8 + [("answer", 0)] * 2  # "Answer: " | 20
    )  # fmt: skip
    assert roles == expected
    assert chain_roles("Answer: 20") is None and chain_roles("7+3-2=8\nAnswer: 8") is None


class Oracle(torch.nn.Module):
    """A stand-in "model" that predicts each next token of its input right, except the operand digit of line
    `wrong_line` (1-based) of the response, which it predicts as the next digit: the bookkeeping's golden case."""

    def __init__(self, tokenizer, wrong_line=None):
        super().__init__()
        self.tok, self.wrong_line = tokenizer, wrong_line

    def forward(self, input_ids, attention_mask):
        vocab = len(self.tok)
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong_line is not None:
            marker = self.tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
            for row in range(input_ids.shape[0]):
                ids = input_ids[row].tolist()
                start = max(i for i in range(len(ids)) if ids[i : i + len(marker)] == marker) + len(marker)
                text = self.tok.decode(ids[start:], skip_special_tokens=True)
                line_start = sum(len(line) + 1 for line in text.split("\n")[: self.wrong_line - 1])
                line = text.split("\n")[self.wrong_line - 1]
                operand = line_start + next(i for i, c in enumerate(line) if c in "+-*") + 1
                digit = int(text[operand])
                nxt[row, start + operand - 1] = ord(str(digit % 9 + 1))  # predicted at the position before it
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, vocab).float())


def test_report_of_an_oracle_and_of_one_that_misses_line_2s_operation(tokenizer):
    _, rows = make_rows(0, 12, seed=3, min_steps=3, max_steps=5)
    perfect = teacher_forced_report(Oracle(tokenizer), tokenizer, rows, batch_size=5)
    assert perfect["chain_exact"] == 1.0 and perfect["operation_lines"] == 1.0
    assert all(perfect[f"{role}_accuracy"] == 1.0 for role in ("copy", "operation", "result", "answer"))
    assert perfect["operation_by_line"] == [1.0] * 5

    missed = teacher_forced_report(Oracle(tokenizer, wrong_line=2), tokenizer, rows, batch_size=5)
    lines = [len(r["extra_info"]["solution"].split("\n")) - 1 for r in rows]  # operations per problem
    assert missed["operation_by_line"] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert missed["chain_exact"] == 0.0
    assert missed["operation_lines"] == pytest.approx(1 - len(rows) / sum(lines), abs=1e-12)
    # each line's operation is 3 characters ("<op>b="), one of them wrong per problem
    assert missed["operation_accuracy"] == pytest.approx(1 - len(rows) / (3 * sum(lines)), abs=1e-12)
    assert missed["result_accuracy"] == 1.0 and missed["copy_accuracy"] == 1.0


def test_a_measurement_inside_the_warm_start_leaves_it_unchanged(tiny, tokenizer, tmp_path):
    from safetensors.torch import load_file

    from orchestration.data.warm_start import WarmStartConfig, warm_start
    from orchestration.data.warm_start_eval import sampled_report

    train, held_out = make_rows(32, 4, seed=0)
    examples = [(r["prompt"], r["extra_info"]["solution"]) for r in train]
    config = WarmStartConfig(steps=6, batch_rows=4, warmup_steps=1)
    reports = []

    def measure(step, loss, model):
        reports.append(sampled_report(model, tokenizer, held_out, samples=2, temperature=1.0, top_p=0.7,
                                      max_tokens=8, seed=step))  # fmt: skip
        model.train()

    measured = warm_start(tiny, examples, config, tmp_path / "measured", measure)
    plain = warm_start(tiny, examples, config, tmp_path / "plain")
    assert len(reports) == 6 and all(0.0 <= r["accuracy"] <= 1.0 for r in reports)
    a, b = load_file(measured / "model.safetensors"), load_file(plain / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "sampling inside the warm-start changed the trained weights"


def test_a_failed_warm_start_stops_the_demo_before_rl_in_plain_words(tmp_path):
    # 2 SFT steps cannot teach the chains: the check (model.warm_start_min_chain_accuracy, set by conf/model/tiny.yaml)
    # must stop the demo with one error line, before Ray starts, the warm-start kept in its cache.
    overrides = [
        f"trainer.output_dir={tmp_path / 'demo'}",
        f"model.tiny_dir={tmp_path / 'tiny'}",
        f"model.warm_start_dir={tmp_path / 'warm'}",
        "model.tiny_hidden_size=32",
        "model.tiny_layers=1",
        "model.tiny_heads=1",
        "model.tiny_kv_heads=1",
        "model.tiny_intermediate_size=64",
        "model.warm_start_steps=2",
        "model.warm_start_warmup_steps=1",
        "data.synthetic_train_prompts=64",
        "data.synthetic_val_prompts=20",
    ]
    proc = subprocess.run([sys.executable, "-m", "tools.demo", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "warm-start failed" in errors[0] and "model.warm_start_min_chain_accuracy" in errors[0]
    assert "warm-start check: on 20 held-out problems" in proc.stdout
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()
    cached = [p for p in (tmp_path / "warm").iterdir() if (p / "warm_start_args.json").is_file()]
    assert len(cached) == 1 and json.loads((cached[0] / "warm_start_args.json").read_text())["config"]["steps"] == 2


def test_without_held_out_problems_the_check_is_skipped_and_said(tmp_path, capsys):
    from orchestration.inputs import prepare_model

    overrides = [f"trainer.output_dir={tmp_path / 'run'}", f"model.tiny_dir={tmp_path / 'tiny'}",
                 f"model.warm_start_dir={tmp_path / 'warm'}", "model.tiny_hidden_size=32", "model.tiny_layers=1",
                 "model.tiny_heads=1", "model.tiny_kv_heads=1", "model.tiny_intermediate_size=64",
                 "model.warm_start_steps=2", "model.warm_start_warmup_steps=1", "data.synthetic_train_prompts=16",
                 "data.synthetic_val_prompts=0"]  # fmt: skip
    cfg = _compose(overrides)
    assert (Path(prepare_model(cfg)) / "warm_start_args.json").is_file()  # a 2-step warm-start, not stopped
    assert "warm-start check: skipped, no held-out problems" in capsys.readouterr().out
    assert not (tmp_path / "run" / "warm_start_check.json").exists()


def test_a_held_out_row_that_is_not_a_stepwise_chain_is_named(tokenizer):
    _, rows = make_rows(0, 3, seed=1)
    rows[1]["extra_info"]["solution"] = "7+3-2=8\nAnswer: 8"  # a free_chain "at once" line, not one per operation
    with pytest.raises(ValueError, match=r"held-out row 1: not a stepwise chain: '7\+3-2=8\\nAnswer: 8'"):
        teacher_forced_report(Oracle(tokenizer), tokenizer, rows)


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from orchestration.config.schema import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose("config", overrides=overrides))


def _left_to_right(prompt: str) -> list[int]:
    """The chain's values computed from the prompt text alone (independent of orchestration.data.tasks)."""
    start, *steps = prompt.split(": ", 1)[1].split()
    values = [int(start)]
    for step in steps:
        op, operand = step[0], int(step[1:])
        values.append({"+": values[-1] + operand, "-": values[-1] - operand, "*": values[-1] * operand}[op])
    return values


def test_the_stepwise_stage_trains_first_on_the_same_problems_then_the_mixed_habits(tmp_path):
    from orchestration.data.tasks import habit_of
    from orchestration.inputs import prepare_model, warm_start_stages

    cfg = _compose(["experiment=study_length", f"trainer.output_dir={tmp_path / 'run'}",
                    f"model.tiny_dir={tmp_path / 'tiny'}", f"model.warm_start_dir={tmp_path / 'warm'}",
                    "model.tiny_hidden_size=32", "model.tiny_layers=1", "model.tiny_heads=1", "model.tiny_kv_heads=1",
                    "model.tiny_intermediate_size=64", "model.warm_start_stepwise_steps=3", "model.warm_start_steps=2",
                    "model.warm_start_warmup_steps=1", "model.warm_start_min_chain_accuracy=0",
                    "model.warm_start_stepwise_lr=4e-3", "model.warm_start_lr=1e-3",
                    "data.synthetic_train_prompts=40", "data.synthetic_val_prompts=4"])  # fmt: skip
    (stepwise, first), (mixed, second) = warm_start_stages(cfg)
    assert (first.steps, second.steps) == (3, 2)
    assert (first.lr, second.lr) == (4e-3, 1e-3)  # each stage its own peak lr
    assert [m for m, _ in stepwise] == [m for m, _ in mixed]  # the same problems, in the same order
    for messages, target in stepwise:  # every operation on its own line, each line right, then the answer
        values = _left_to_right(messages[-1]["content"])
        lines = target.splitlines()
        assert habit_of(target) == "stepwise" and len(lines) == len(values)
        assert [int(line.rsplit("=", 1)[1]) for line in lines[:-1]] == values[1:]
        assert lines[-1] == f"Answer: {values[-1]}"
    assert {habit_of(t) for _, t in mixed} - {"stepwise"}  # the second stage keeps the study's habit mix
    final = Path(prepare_model(cfg))
    stage_one = Path(json.loads((final / "warm_start_args.json").read_text())["base_model"])
    assert stage_one.parent == tmp_path / "warm" and stage_one != final  # the second stage starts from the first
    assert json.loads((stage_one / "warm_start_args.json").read_text())["config"]["steps"] == 3


@pytest.mark.parametrize("target,rounds", [(0.0, 1), (1.0, 3)])
def test_the_stepwise_rounds_stop_at_the_target_or_the_most_rounds(tmp_path, target, rounds):
    """model.warm_start_stepwise_rounds=3: a target every round meets (0) stops after the first round; one no
    3-step model meets (every chain right) trains all three, each from the last round's model."""
    from orchestration.inputs import prepare_model

    cfg = _compose(["experiment=study_length", f"trainer.output_dir={tmp_path / 'run'}",
                    f"model.tiny_dir={tmp_path / 'tiny'}", f"model.warm_start_dir={tmp_path / 'warm'}",
                    "model.tiny_hidden_size=32", "model.tiny_layers=1", "model.tiny_heads=1", "model.tiny_kv_heads=1",
                    "model.tiny_intermediate_size=64", "model.warm_start_stepwise_steps=3", "model.warm_start_steps=2",
                    "model.warm_start_stepwise_rounds=3", f"model.warm_start_stepwise_target={target}",
                    "model.warm_start_warmup_steps=1", "model.warm_start_min_chain_accuracy=0",
                    "data.synthetic_train_prompts=40", "data.synthetic_val_prompts=4"])  # fmt: skip
    from orchestration.data.warm_start import sft_seconds

    chain, seconds, final = [], 0.0, Path(prepare_model(cfg))
    path = final
    while path.parent == tmp_path / "warm":  # walk back from the final model to the tiny model it started from
        args = json.loads((path / "warm_start_args.json").read_text())
        chain.append(args["config"]["steps"])
        seconds += args["seconds"]
        path = Path(args["base_model"])
    assert chain == [2] + [3] * rounds  # the mixed stage, after `rounds` stepwise rounds
    assert path.parent == tmp_path / "tiny" and sft_seconds(final) == pytest.approx(seconds)  # every stage's SFT


def test_the_tool_measures_every_n_steps_and_each_round_once_trained_or_found_cached(tmp_path):
    """tools.warm_start_check over 2 stepwise rounds of 3 steps and a mixed stage of 2, measuring every 2 steps
    (steps count on across rounds and stages): trained, at 2, 3 (round end), 4, 6, 8; then, all cached, once at
    the end of each round and stage."""
    from tools.warm_start_check import main

    overrides = ["experiment=study_length", f"model.tiny_dir={tmp_path / 'tiny'}",
                 f"model.warm_start_dir={tmp_path / 'warm'}", "model.tiny_hidden_size=32", "model.tiny_layers=1",
                 "model.tiny_heads=1", "model.tiny_kv_heads=1", "model.tiny_intermediate_size=64",
                 "model.warm_start_stepwise_steps=3", "model.warm_start_steps=2", "model.warm_start_stepwise_rounds=2",
                 "model.warm_start_stepwise_target=1.0", "model.warm_start_warmup_steps=1",
                 "data.synthetic_train_prompts=40", "data.synthetic_val_prompts=4",
                 "--every", "2", "--problems", "2", "--samples", "1"]  # fmt: skip
    trained = main(overrides)
    assert [m["step"] for m in trained["measurements"]] == [2, 3, 4, 6, 8]
    assert trained["round_ends"] == [3, 6, 8] and len(trained["losses"]) == 8
    cached = main(overrides)
    assert [m["step"] for m in cached["measurements"]] == cached["round_ends"] == [3, 6, 8]
    assert cached["model_dir"] == trained["model_dir"] and cached["sft_seconds"] == trained["sft_seconds"] > 0


def test_the_stepwise_stage_on_a_dataset_is_a_config_error(tmp_path):
    from orchestration.config.errors import ConfigError
    from orchestration.inputs import warm_start_stages

    rows = tmp_path / "train.jsonl"
    row = {"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "x",
           "reward_model": {"ground_truth": "2"}, "extra_info": {"solution": "Answer: 2"}}  # fmt: skip
    rows.write_text(json.dumps(row) + "\n")
    cfg = _compose([f"data.train_files=[{rows}]", "model.warm_start_steps=2", "model.warm_start_stepwise_steps=2"])
    with pytest.raises(ConfigError, match="model.warm_start_stepwise_steps"):
        warm_start_stages(cfg)
