"""Data loading (verl schema, real AIME rows, parquet), the resumable sampler, the synthetic task, sizes."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.config.errors import ConfigError
from orchestration.config.schema import DataConf
from orchestration.config.sizes import derive_sizes
from orchestration.data.prompts import DataError, PromptSampler, drop_long_prompts, load_datasets, load_rows
from orchestration.data.tasks import habit_of, habit_stats, make_rows, worked_solution
from reward.math import score_math

AIME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aime-2024.jsonl"


@pytest.mark.skipif(not AIME.exists(), reason="shared/data is beside the checkout in development and CI")
def test_real_aime_rows_load_unchanged():
    rows = load_rows(AIME)
    assert len(rows) == 30
    assert rows[0].ground_truth == "204" and rows[0].messages[0]["role"] == "user"
    assert "Answer:" in rows[0].messages[0]["content"]
    assert rows[0].data_source == "aime-2024" and rows[0].source.endswith("aime-2024.jsonl:1")


def test_parquet_round_trip_and_numeric_ground_truth(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"ground_truth": "4"}},
        ]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    rows = load_rows(tmp_path / "d.parquet")
    assert [r.ground_truth for r in rows] == ["2", "4"]
    (tmp_path / "n.jsonl").write_text(json.dumps({"prompt": "3+3?", "reward_model": {"ground_truth": 6}}) + "\n")
    assert load_rows(tmp_path / "n.jsonl")[0].ground_truth == "6"
    assert len(load_datasets([tmp_path / "d.parquet", tmp_path / "n.jsonl"])) == 3


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", "line 2|:2: not valid JSON"),
        (json.dumps({"prompt": [{"role": "user", "content": "x"}]}), ":2: 'reward_model.ground_truth'"),
        (json.dumps({"prompt": [], "reward_model": {"ground_truth": "1"}}), ":2: 'prompt' must be"),
        (
            json.dumps({"prompt": [{"role": "bot", "content": "x"}], "reward_model": {"ground_truth": "1"}}),
            "role",
        ),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, match):
    good = json.dumps({"prompt": [{"role": "user", "content": "ok"}], "reward_model": {"ground_truth": "1"}})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_rows(path)
    assert "bad.jsonl" in str(info.value)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported"):
        load_rows(tmp_path / "x.csv")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from rollout import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def test_drop_long_prompts_counts_rendered_tokens_under_at_and_over_the_limit(tmp_path, tokenizer):
    """Prompts of exactly limit - 1, limit and limit + 1 tokens, and a long one in multi-byte text, counted
    independently of chat_prompt_ids: by the template's own tokenization, `apply_chat_template(tokenize=True)
    ["input_ids"]` (the filter used to take `len()` of that BatchEncoding: 2 for every prompt)."""
    limit = 300

    def tokens(content):
        messages = [{"role": "user", "content": content}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])

    overhead = tokens("")
    assert tokens("x" * 10) == overhead + 10, "the tiny tokenizer is byte-level: one token per ASCII character"
    contents = {n: "x" * (n - overhead) for n in (limit - 1, limit, limit + 1)}
    long = "é ∑ " * limit
    contents[tokens(long)] = long
    assert [tokens(c) for c in contents.values()] == list(contents) and list(contents)[3] > 6 * limit
    path = tmp_path / "rows.jsonl"
    lines = [
        {"prompt": [{"role": "user", "content": c}], "reward_model": {"ground_truth": "1"}} for c in contents.values()
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    kept, dropped = drop_long_prompts(load_rows(path), tokenizer, limit)
    assert [r.source for r in kept] == [f"{path}:1", f"{path}:2"]
    assert dropped == [(f"{path}:3", limit + 1), (f"{path}:4", list(contents)[3])]
    everyone = rf"every one of the 4 prompts of {path} is longer than data.max_prompt_tokens=10 \(the shortest has"
    with pytest.raises(DataError, match=rf"{everyone} {limit - 1} tokens"):
        drop_long_prompts(load_rows(path), tokenizer, 10)


def test_sampler_is_a_permutation_per_epoch_and_resumes_exactly():
    sampler = PromptSampler(7, seed=3)
    first = sampler.next_indices(7)
    assert sorted(first) == list(range(7))
    uninterrupted = PromptSampler(7, seed=3)
    expected = uninterrupted.next_indices(5) + uninterrupted.next_indices(12)
    resumed = PromptSampler(7, seed=3)
    head = resumed.next_indices(5)
    state = resumed.state_dict()
    again = PromptSampler(7, seed=3)
    again.load_state_dict(state)
    assert head + again.next_indices(12) == expected
    assert sorted(expected[7:14]) == list(range(7))  # the second epoch is a full permutation too
    with pytest.raises(DataError, match="dataset or seed changed"):
        PromptSampler(8, seed=3).load_state_dict(state)


def _left_to_right(prompt: str) -> list[int]:
    """Independent evaluation of "Compute left to right: 7 +3 -2 *3": every intermediate value, via eval()."""
    start, *steps = prompt.split(":", 1)[1].split()
    values = [int(start)]
    for step in steps:
        values.append(eval(f"({values[-1]}){step}"))
    return values


def test_synthetic_task_rows_are_correct_and_disjoint():
    train, test = make_rows(200, 50, seed=0, min_steps=3, max_steps=4, max_value=30)
    assert len(train) == 200 and len(test) == 50
    prompts = {r["prompt"][0]["content"] for r in train}
    assert not prompts & {r["prompt"][0]["content"] for r in test}
    ops_seen = set()
    for row in train + test:
        prompt = row["prompt"][0]["content"]
        values = _left_to_right(prompt)
        assert 4 <= len(values) <= 5 and all(0 <= v <= 30 for v in values), prompt
        ops_seen |= {step[0] for step in prompt.split(":", 1)[1].split()[1:]}
        assert row["reward_model"]["ground_truth"] == str(values[-1])
        *chain, answer = row["extra_info"]["solution"].split("\n")
        assert answer == f"Answer: {values[-1]}"
        assert len(chain) == len(values) - 1
        for line, before, after in zip(chain, values, values[1:]):
            lhs, rhs = line.split("=")
            assert lhs.startswith(str(before)) and eval(lhs) == int(rhs) == after, (prompt, line)
    assert ops_seen == {"+", "-", "*"}
    chain = worked_solution((7, [("+", 3), ("-", 2), ("*", 3), ("-", 9)]))
    assert chain == "7+3=10\n10-2=8\n8*3=24\n24-9=15\nAnswer: 15"
    assert make_rows(5, 5, seed=4) == make_rows(5, 5, seed=4)
    with pytest.raises(ValueError, match="max_value"):
        make_rows(5, 5, max_value=8)


MIX = {"at_once": 0.2, "partial": 0.5, "stepwise": 0.3}


def _free_rows(seed=0, num_train=2000, num_test=100, mix=MIX):
    return make_rows(num_train, num_test, seed=seed, min_steps=6, max_steps=8, task="free_chain", habit_mix=mix)


def test_free_chain_rows_are_deterministic_and_share_the_chain_problems():
    train, test = _free_rows()
    assert (train, test) == _free_rows()
    assert _free_rows(seed=1)[0] != train
    chain_train, chain_test = make_rows(2000, 100, seed=0, min_steps=6, max_steps=8)
    assert [r["prompt"] for r in chain_train + chain_test] == [r["prompt"] for r in train + test]
    assert [r["extra_info"]["solution"] for r in chain_test] == [r["extra_info"]["solution"] for r in test]
    assert {r["data_source"] for r in train + test} == {"synthetic-free-chain"}
    assert {r["extra_info"]["habit"] for r in test} == {"stepwise"}  # held-out rows carry the whole chain
    # The drawn habits follow the mix: 2000 binomial draws, sd = sqrt(p(1-p)/2000) <= 0.0112; 5 sd is 0.056.
    for habit, share in MIX.items():
        drawn = sum(r["extra_info"]["habit"] == habit for r in train) / len(train)
        assert abs(drawn - share) < 0.056, (habit, drawn)
    # partial solutions write 1..n-2 operations one per line (n = 6..8): every count from 1 to 6 occurs
    written = {r["extra_info"]["lines_written"] for r in train if r["extra_info"]["habit"] == "partial"}
    assert written == set(range(1, 7))


def test_free_chain_solutions_check_out_by_an_independent_evaluation():
    mix = {"direct": 0.1, "at_once": 0.2, "partial": 0.4, "stepwise": 0.3}
    train, test = _free_rows(num_train=400, num_test=50, mix=mix)
    seen, lengths = set(), {habit: [] for habit in mix}
    for row in train + test:
        prompt, solution = row["prompt"][0]["content"], row["extra_info"]["solution"]
        values = _left_to_right(prompt)  # eval() of every prefix, not the generator's chain_values
        steps = prompt.split(":", 1)[1].split()[1:]
        assert 6 <= len(steps) <= 8 and row["reward_model"]["ground_truth"] == str(values[-1])
        *work, answer = solution.split("\n")
        assert answer == f"Answer: {values[-1]}", solution
        habit, written = row["extra_info"]["habit"], row["extra_info"]["lines_written"]
        assert habit_of(solution) == habit, solution
        seen.add(habit)
        lengths[habit].append(len(solution))
        # the lines cover the prompt's operations in order: `written` one per line, then the rest in one line
        groups = {"direct": [], "stepwise": [[s] for s in steps]}.get(habit)
        if groups is None:
            assert 0 <= written <= len(steps) - 2 and (written > 0) == (habit == "partial")
            groups = [[s] for s in steps[:written]] + [steps[written:]]
        assert len(work) == len(groups), solution
        done = 0
        for line, ops in zip(work, groups):
            lhs, rhs = line.split("=")
            assert lhs == f"{values[done]}{''.join(ops)}", (prompt, line)
            folded = values[done]
            for op in ops:  # left to right, as the prompt says (not Python's precedence)
                folded = eval(f"({folded}){op}")
            done += len(ops)
            assert int(rhs) == folded == values[done], (prompt, line)
        assert done == (0 if habit == "direct" else len(steps))
        assert score_math(solution, row["reward_model"]["ground_truth"]).correct
        wrong = solution.replace(answer, f"Answer: {values[-1] + 1}")
        assert not score_math(wrong, row["reward_model"]["ground_truth"]).correct
    assert seen == set(mix)
    mean = {habit: sum(v) / len(v) for habit, v in lengths.items()}
    assert mean["direct"] < mean["at_once"] < mean["partial"] < mean["stepwise"]  # the habits differ in length


@pytest.mark.parametrize(
    ("response", "habit"),
    [
        ("Answer: 24", "direct"),
        ("**Answer:** 24", "direct"),
        ("7+3-2*3=24\nAnswer: 24", "at_once"),
        ("7+3=10\n10-2*3=24\nAnswer: 24", "partial"),
        ("7+3=10\n\n10-2=8\n8*3=24\nAnswer: 24", "stepwise"),
        ("7+3=11\n11-2=9\nAnswer: 27", "stepwise"),  # the format, not the arithmetic or the count
        ("7+3-2=8\n8*3=24\nAnswer: 24", "other"),  # several operations before a single one
        ("7+3=10\nso ten\nAnswer: 10", "other"),  # prose between the lines
        ("7+3=10\n10-2=8", "other"),  # no answer line
        ("", "other"),
    ],
)
def test_habit_of_reads_the_format(response, habit):
    assert habit_of(response) == habit


def test_habit_stats_by_hand():
    records = [("direct", True, 10), ("stepwise", False, 70), ("stepwise", True, 60), ("other", False, 256)]
    stats = habit_stats(records)
    assert stats == {
        "direct_frac": 0.25,
        "direct_accuracy": 1.0,
        "direct_length": 10.0,
        "at_once_frac": 0.0,
        "partial_frac": 0.0,
        "stepwise_frac": 0.5,
        "stepwise_accuracy": 0.5,
        "stepwise_length": 65.0,
        "other_frac": 0.25,
        "other_accuracy": 0.0,
        "other_length": 256.0,
    }
    assert habit_stats([]) == {}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"synthetic_task": "sums"}, "data.synthetic_task: must be one of"),
        ({"synthetic_task": "free_chain", "synthetic_habit_mix": {"direct": 0.5, "long": 0.5}}, "unknown habit"),
        ({"synthetic_task": "free_chain", "synthetic_habit_mix": {"direct": 0.5, "partial": 0.4}}, "sum to 1"),
        ({"synthetic_task": "free_chain", "synthetic_habit_mix": {}}, "data.synthetic_habit_mix"),
        ({"synthetic_task": "free_chain", "synthetic_min_steps": 2}, "data.synthetic_min_steps: free_chain needs"),
    ],
)
def test_task_config_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        DataConf(**change)
    with pytest.raises(ValueError, match="task must be one of"):
        make_rows(2, 2, task="sums")


SIZES = dict(
    policy_loss="fipo",
    group_size=16,
    train_batch_prompts=512,
    gen_batch_prompts=2048,
    mini_batch_prompts=64,
    learner_world_size=128,
    micro_batch_tokens=22528,
    max_prompt_tokens=2048,
    max_response_tokens=20480,
    rollout_workers=32,
)


def test_official_recipe_schedule():
    sizes = derive_sizes(**SIZES)
    assert (sizes.train_batch_samples, sizes.mini_batches_per_step, sizes.mini_batch_samples) == (
        8192,
        8,
        1024,
    )
    assert sizes.mini_batch_samples_per_rank == 8
    assert sizes.describe().startswith("1 step = 512 prompts × 16 = 8192 samples → 8 optimizer step(s) of 1024 samples")
    assert "micro-batches ≤ 22528 tokens" in sizes.describe()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(mini_batch_prompts=512), "FIPO with one mini-batch per step"),
        (
            dict(mini_batch_prompts=100),
            "train_batch_prompts=512 is not a multiple of algorithm.mini_batch_prompts",
        ),
        (dict(learner_world_size=3), "learner.world_size=3"),
        (dict(gen_batch_prompts=100), "algorithm.gen_batch_prompts=100"),
        (dict(micro_batch_tokens=1000), "learner.micro_batch_tokens=1000"),
        (dict(group_size=0), "algorithm.group_size must be a positive integer"),
    ],
)
def test_size_errors_name_the_keys(change, match):
    with pytest.raises(ConfigError, match=match):
        derive_sizes(**{**SIZES, **change})


def test_without_dynamic_sampling_a_generation_round_is_the_train_batch():
    sizes = derive_sizes(**{**SIZES, "filter_groups": False})
    assert (sizes.gen_batch_prompts, sizes.gen_batch_samples) == (512, 8192)
    assert "generation rounds of 512 prompts × 16" in sizes.describe()
    assert derive_sizes(**SIZES).gen_batch_prompts == 2048


def test_dapo_may_use_one_mini_batch():
    sizes = derive_sizes(**{**SIZES, "policy_loss": "dapo", "mini_batch_prompts": 512})
    assert sizes.mini_batches_per_step == 1
