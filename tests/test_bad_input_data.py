"""Bad input on purpose (issue 34): dataset files and config combinations a user gets wrong, each fed for real.

Every case either fails before anything expensive (model build, warm-start, Ray) with an error that names the
file and line (jsonl, from 1), `file:row N` (parquet, from 0) or the config key, or is a documented, counted
skip. The expected texts are written out here by hand, not taken from the code under test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from orchestration.cluster.preflight import check_model_context, model_context, preflight
from orchestration.config.components import check_config
from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf, register_configs, to_object
from orchestration.data.prompts import DataError, find_duplicates, load_rows
from orchestration.inputs import load_prompt_rows
from reward.math import score_math

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
AIME = ROOT.parent / "shared" / "data" / "aime-2024.jsonl"
needs_aime = pytest.mark.skipif(not AIME.exists(), reason="shared/data is beside the checkout in development and CI")
register_configs()


def load(*overrides: str) -> TrainConf:
    """The composed, validated config, as tests/test_orchestration_config.py loads it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


GOOD = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}}


def write_jsonl(path: Path, *rows) -> Path:
    """One good row on line 1, then `rows` (dicts, dumped as JSON), each line ending in a newline."""
    path.write_text("".join(json.dumps(row) + "\n" for row in (GOOD, *rows)))
    return path


def row(prompt=GOOD["prompt"], truth="2", **fields) -> dict:
    return {"prompt": prompt, "reward_model": {"ground_truth": truth}, **fields}


# ---------------------------------------------------------------------------------------------------- rows


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"reward_model": {"ground_truth": "2"}}, "'prompt' must be a non-empty list of chat messages, got None"),
        (row(prompt=5), "'prompt' must be a non-empty list of chat messages, got 5"),
        (row(prompt=[]), "'prompt' must be a non-empty list of chat messages, got []"),
        (
            row(prompt=[{"role": "user", "content": 7}]),
            "prompt[0] must be {'role': str, 'content': str}, got {'role': 'user', 'content': 7}",
        ),
        (row(prompt=[{"role": "bot", "content": "hi"}]), "prompt[0].role must be system/user/assistant, got 'bot'"),
        (row(prompt=[{"role": "user", "content": ""}]), "prompt[0] is a user message with no text (content '')"),
        (
            row(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": " \n"}]),
            "prompt[1] is a user message with no text (content ' \\n')",
        ),
        (row(prompt=""), "prompt[0] is a user message with no text (content '')"),
        ({"prompt": GOOD["prompt"]}, "'reward_model.ground_truth' must be a non-empty string, got None"),
        (
            {"prompt": GOOD["prompt"], "reward_model": {"style": "rule"}},
            "'reward_model.ground_truth' must be a non-empty string, got None",
        ),
        (row(truth=""), "'reward_model.ground_truth' must be a non-empty string, got ''"),
        (row(truth="   "), "'reward_model.ground_truth' must be a non-empty string, got '   '"),
        (row(truth=True), "'reward_model.ground_truth' must be a non-empty string, got True"),
        (
            row(truth=[1, 2]),
            "'reward_model.ground_truth' is a list, [1, 2]: the scorer compares one answer; write it as one string "
            '(e.g. "1, 2" for several values)',
        ),
        (row(extra_info=["a", "b"]), "'extra_info' must be an object, got list"),
        (["not", "an", "object"], "a row must be an object, got list"),
    ],
    ids=[
        "missing-prompt",
        "prompt-a-number",
        "prompt-empty-list",
        "content-not-a-string",
        "unknown-role",
        "empty-user-content",
        "blank-user-content-after-system",
        "prompt-empty-string",
        "missing-reward-model",
        "missing-ground-truth",
        "empty-ground-truth",
        "blank-ground-truth",
        "boolean-ground-truth",
        "list-ground-truth",
        "extra-info-a-list",
        "row-not-an-object",
    ],
)
def test_a_bad_row_is_a_data_error_naming_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", bad)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}:2: {message}"


def test_a_blank_system_message_is_harmless_and_loads(tmp_path):
    """Only a user message without text is refused: an empty system prompt is common in exported data."""
    path = write_jsonl(tmp_path / "d.jsonl", row(prompt=[{"role": "system", "content": ""}, *GOOD["prompt"]]))
    assert load_rows(path)[1].messages == ({"role": "system", "content": ""}, GOOD["prompt"][0])


@needs_aime
def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    """The real AIME file, written back with line 5 in Latin-1 (a 'é' as the single byte 0xe9)."""
    lines = AIME.read_text(encoding="utf-8").splitlines(keepends=True)
    problem = json.loads(lines[4])
    problem["prompt"][0]["content"] = "Café: " + problem["prompt"][0]["content"]
    lines[4] = json.dumps(problem, ensure_ascii=False) + "\n"
    path = tmp_path / "aime-latin1.jsonl"
    path.write_bytes(b"".join(line.encode("latin-1") if i == 4 else line.encode() for i, line in enumerate(lines)))
    column = lines[4].encode("latin-1").index(b"\xe9") + 1
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}:5: not UTF-8 text (byte 0xe9 at byte {column} of the line)"


@needs_aime
def test_a_file_cut_short_names_its_last_line_and_says_so(tmp_path):
    """The real AIME file copied only up to the middle of its 3rd object, as an interrupted download leaves it."""
    data = AIME.read_bytes()
    third = data.split(b"\n")[2]
    path = tmp_path / "aime-cut.jsonl"
    path.write_bytes(data[: data.index(third) + len(third) // 2])
    with pytest.raises(DataError, match=r"was the file cut short\?") as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path}:3: not valid JSON (")
    assert str(info.value).endswith("(the file's last line has no newline: was the file cut short?)")


def test_a_byte_order_mark_and_windows_line_ends_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(row(truth="3")).encode())
    assert [(r.ground_truth, r.source) for r in load_rows(path)] == [("2", f"{path}:1"), ("3", f"{path}:2")]


def test_a_broken_line_in_the_middle_is_not_called_cut_short(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x",\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert (
        str(info.value) == f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 16)"
    )


# ---------------------------------------------------------------------------------------------------- parquet


def test_parquet_extra_columns_load_and_are_carried(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([row(ability="MATH", difficulty=3, data_source="dapo")]), path)
    (loaded,) = load_rows(path)
    assert (loaded.ground_truth, loaded.data_source, loaded.source) == ("2", "dapo", f"{path}:row 0")
    assert loaded.other == {"ability": "MATH", "difficulty": 3}


def test_parquet_missing_columns_are_named(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "1+1?", "answer": "2"}]), path)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert (
        str(info.value) == f"{path}: missing column(s) ['prompt', 'reward_model']; columns are ['question', 'answer']"
    )


def test_a_bad_parquet_row_is_named_by_its_row_number(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([row(), row(truth="")]), path)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}:row 1: 'reward_model.ground_truth' must be a non-empty string, got ''"


def test_a_parquet_file_cut_short_is_a_data_error(tmp_path):
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist([row()] * 50), whole)
    path = tmp_path / "cut.parquet"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path}: not a readable parquet file (cut short?): ")


# ---------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("content", ["", "\n", "\n   \n\t\n"], ids=["empty", "one-newline", "blank-lines"])
def test_a_file_without_rows_is_a_data_error(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}: the dataset has no rows (the file is empty or holds only blank lines)"


def test_a_directory_is_refused_with_what_to_give_instead(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(DataError) as info:
        load_rows(folder)
    assert (
        str(info.value) == f"{folder} is a directory, not a dataset file: give its .jsonl / .parquet files one by one"
    )
    cfg = load(f"data.train_files=[{folder}]", f"trainer.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as info:
        load_prompt_rows(cfg)
    assert str(info.value) == (
        f"data.train_files: ['{folder}'] is a directory, not a file: list the .jsonl / .parquet files in it"
    )


def test_a_json_file_is_refused_saying_which_formats_work(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD]))
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == (
        f"{path}: unsupported dataset format '.json' (use .jsonl, one JSON object per line, or .parquet)"
    )


@pytest.mark.parametrize("which", ["train", "val"])
def test_an_empty_train_or_validation_file_names_the_key_and_the_file(tmp_path, which):
    good, empty = write_jsonl(tmp_path / "good.jsonl"), tmp_path / "empty.jsonl"
    empty.write_text("")
    train, val = (empty, good) if which == "train" else (good, empty)
    cfg = load(f"data.train_files=[{train}]", f"data.val_files=[{val}]", f"trainer.output_dir={tmp_path / 'run'}")
    with pytest.raises(DataError) as info:
        load_prompt_rows(cfg)
    assert str(info.value) == (
        f"data.{which}_files: {empty}: the dataset has no rows (the file is empty or holds only blank lines)"
    )


def test_a_bad_row_in_a_configured_file_names_the_key_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", GOOD, row(truth=""))
    cfg = load(f"data.train_files=[{path}]", f"trainer.output_dir={tmp_path / 'run'}")
    with pytest.raises(DataError) as info:
        load_prompt_rows(cfg)
    assert (
        str(info.value) == f"data.train_files: {path}:3: 'reward_model.ground_truth' must be a non-empty string, got ''"
    )


def test_train_files_without_val_files_say_there_is_no_evaluation(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl")
    train, val = load_prompt_rows(load(f"data.train_files=[{path}]", f"trainer.output_dir={tmp_path / 'run'}"))
    assert (len(train), val) == (1, [])
    assert capsys.readouterr().out == (
        "data: no data.val_files, so no evaluation (trainer.eval_every / trainer.eval_before_train have nothing to "
        "evaluate)\n"
    )


# ---------------------------------------------------------------------------------------------------- duplicates


def test_duplicate_rows_are_kept_counted_and_named(tmp_path, capsys):
    other = row(prompt=[{"role": "user", "content": "What is 2+2?"}], truth="4")
    path = write_jsonl(tmp_path / "train.jsonl", other, GOOD, row(truth="3"), other, GOOD, GOOD)
    rows = load_rows(path)
    assert len(rows) == 7, "duplicates stay: sampling is unchanged"
    # lines 3, 5, 6, 7 repeat lines 1 and 2; line 4 has the same prompt as line 1 but another ground truth
    expected = [(f"{path}:3", f"{path}:1"), (f"{path}:5", f"{path}:2"), (f"{path}:6", f"{path}:1"),
                (f"{path}:7", f"{path}:1")]  # fmt: skip
    assert find_duplicates(rows) == expected
    assert find_duplicates(load_rows(write_jsonl(tmp_path / "unique.jsonl", other))) == []
    val = write_jsonl(tmp_path / "val.jsonl", other)
    train, _ = load_prompt_rows(
        load(f"data.train_files=[{path}]", f"data.val_files=[{val}]", f"trainer.output_dir={tmp_path / 'run'}")
    )
    assert len(train) == 7
    assert capsys.readouterr().out == (
        f"data: 4 train row(s) repeat an earlier row's prompt and ground truth (kept, so drawn as often as their "
        f"copies): {path}:3 (= {path}:1), {path}:5 (= {path}:2), {path}:6 (= {path}:1) and 1 more\n"
    )


@needs_aime
def test_the_real_aime_file_has_no_duplicates():
    assert find_duplicates(load_rows(AIME)) == []


# ---------------------------------------------------------------------------------------------------- ground truths


@pytest.mark.parametrize(
    "truth,right,wrong",
    [
        ("\\frac{1}{2}", ["1/2", "0.5", "\\dfrac{1}{2}"], ["1/3", "2"]),
        ("\\boxed{3}", ["3", "\\boxed{3}"], ["4"]),
        ("1/2", ["\\frac{1}{2}", "0.5"], ["0.3"]),
        ("\\frac{\\sqrt{2}}{2}", ["\\sqrt{2}/2"], ["\\sqrt{2}"]),
        ("1, 2", ["1, 2", "2, 1"], ["1"]),
    ],
    ids=["latex-frac", "latex-boxed", "fraction", "latex-sqrt", "several-values-as-one-string"],
)
def test_latex_and_fraction_ground_truths_load_unchanged_and_score(tmp_path, truth, right, wrong):
    """Ground truths are carried as written; the real scorer accepts equivalent answers and rejects others."""
    path = write_jsonl(tmp_path / "d.jsonl", row(truth=truth))
    assert load_rows(path)[1].ground_truth == truth
    for answer in right:
        assert score_math(f"Some work.\nAnswer: {answer}", truth).correct, (truth, answer)
    for answer in wrong:
        assert not score_math(f"Some work.\nAnswer: {answer}", truth).correct, (truth, answer)


def test_numeric_ground_truths_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", row(truth=204), row(truth=0.5))
    assert [r.ground_truth for r in load_rows(path)] == ["2", "204", "0.5"]
    assert score_math("Answer: 1/2", "0.5").correct


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["algorithm.mini_batch_prompts=999"],
            "algorithm.mini_batch_prompts=999 is larger than algorithm.train_batch_prompts=16 (a mini-batch is a "
            "part of a step's batch)",
        ),
        (
            ["algorithm.mini_batch_prompts=6"],
            "algorithm.train_batch_prompts=16 is not a multiple of algorithm.mini_batch_prompts=6",
        ),
        (
            ["learner.world_size=3"],
            "a mini-batch of algorithm.mini_batch_prompts × algorithm.group_size = 64 samples does not split evenly "
            "over learner.world_size=3 ranks",
        ),
        (
            ["learner.micro_batch_tokens=100"],
            "learner.micro_batch_tokens=100 is smaller than one sequence (data.max_prompt_tokens + "
            "rollout.max_response_tokens = 160)",
        ),
        (
            ["algorithm.gen_batch_prompts=8"],
            "algorithm.gen_batch_prompts=8 must be >= algorithm.train_batch_prompts=16 (one generation round must "
            "be able to fill a step)",
        ),
    ],
    ids=["mini-batch-larger-than-batch", "batch-not-a-multiple", "ranks-do-not-divide", "micro-batch", "gen-batch"],
)
def test_sizes_that_cannot_work_are_refused_naming_the_keys(overrides, message):
    """What `check_config` (the first thing build_run does) says for the demo's config and one bad size."""
    with pytest.raises(ConfigError) as info:
        check_config(load(*overrides))
    assert str(info.value) == message


@pytest.mark.parametrize(
    "spec,message",
    [
        ("rollout:1@0:generate", "'rollout:1@0:generate' targets rollout 1 at step 0, but the run has 1 rollout"),
        ("learner:0@60:update", "'learner:0@60:update' targets learner 0 at step 60, but the run has 2 learner"),
    ],
    ids=["no-such-worker", "step-past-the-end"],
)
def test_a_fault_aimed_at_a_worker_or_step_that_does_not_exist_is_refused(spec, message):
    with pytest.raises(ConfigError) as info:
        load(f"trainer.fault_inject=[{spec}]")
    assert str(info.value).startswith(f"trainer.fault_inject: {message} worker(s) and trainer.total_steps=60")


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny model whose context is 256 tokens."""
    from rollout import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("short") / "model", max_position_embeddings=256)


def test_a_response_budget_beyond_the_models_context_is_refused(short_model, tmp_path):
    config = short_model / "config.json"
    assert json.loads(config.read_text())["max_position_embeddings"] == 256
    check_model_context(short_model, 192, 64)  # exactly the context: fits
    with pytest.raises(ConfigError) as info:
        check_model_context(short_model, 192, 65)
    check_model_context(short_model, 192, 65, allow_long=True)  # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: the user's choice
    assert str(info.value) == (
        f"data.max_prompt_tokens=192 + rollout.max_response_tokens=65 = 257 tokens exceeds the model's context of "
        f"256 tokens (max_position_embeddings=256 in {config}, model.path): lower one of the two keys, or extend the "
        "model's context (rope_scaling in its config.json; or, at your own risk, VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 in "
        "cluster.env, which vLLM and this check then accept)"
    )
    cfg = load(f"model.path={short_model}", "data.max_prompt_tokens=200", f"trainer.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"^data\.max_prompt_tokens=200 \+ rollout\.max_response_tokens=64 = 264"):
        preflight(cfg)
    preflight(load(f"model.path={short_model}", f"trainer.output_dir={tmp_path / 'run'}"))  # 96 + 64 fits
    preflight(load(f"model.path={short_model}", "data.max_prompt_tokens=200", f"trainer.output_dir={tmp_path / 'run'}",
                   "+cluster.env.VLLM_ALLOW_LONG_MAX_MODEL_LEN='1'"))  # fmt: skip


def test_model_context_follows_vllms_rope_scaling_rules(tmp_path):
    def context(**config):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return model_context(tmp_path)

    assert context(max_position_embeddings=4096)[0] == 4096
    assert context(max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 2.0})[0] == 8192
    assert context(max_position_embeddings=4096, rope_scaling={"rope_type": "dynamic", "factor": 4.0})[0] == 16384
    # YaRN and llama3 configs already hold the extended length in max_position_embeddings (vLLM: the same)
    assert context(max_position_embeddings=32768, rope_scaling={"rope_type": "yarn", "factor": 4.0})[0] == 32768
    assert context(text_config={"max_position_embeddings": 1024})[0] == 1024
    assert context(hidden_size=8) is None and model_context(tmp_path / "nowhere") is None


# ---------------------------------------------------------------------------------------------------- the console


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m orchestration.train OVERRIDES` in a fresh shell (fresh HOME, nothing exported)."""
    cmd = [sys.executable, "-m", "orchestration.train", f"trainer.output_dir={tmp_path / 'run'}",
           f"model.tiny_dir={tmp_path / 'tiny'}", f"model.warm_start_dir={tmp_path / 'ws'}", *overrides]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _assert_nothing_built(tmp_path: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, "the message alone, no traceback"
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "ws").exists() and not (tmp_path / ".ray").exists()


def test_an_unknown_key_prints_hydras_message_without_a_traceback(tmp_path):
    result = _train(tmp_path, "learner.lrr=1")
    _assert_nothing_built(tmp_path, result)
    assert "Could not override 'learner.lrr'" in result.stderr and "Key 'lrr' not in 'LearnerConf'" in result.stderr


def test_the_console_shows_a_bad_size_and_a_bad_row_alone(tmp_path):
    """What a user sees for each: one `error: ` line naming the key (and the file and line), nothing built.
    (The model-context check runs in the same `preflight` call: test_a_response_budget_beyond_...)"""
    bad_file = write_jsonl(tmp_path / "train.jsonl", row(prompt=[]))
    cases = [
        (["algorithm.mini_batch_prompts=999"], "error: algorithm.mini_batch_prompts=999 is larger than "),
        ([f"data.train_files=[{bad_file}]"], f"error: data.train_files: {bad_file}:2: 'prompt' must be a non-empty"),
    ]
    for overrides, start in cases:
        result = _train(tmp_path, *overrides)
        _assert_nothing_built(tmp_path, result)
        assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr[-2000:]
