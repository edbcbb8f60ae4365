"""A prompt that does not fit the engines' context at run time (the engines render it longer than the driver's
filter counted it: another chat template) is a DataError naming its dataset row, raised before vLLM sees it."""

import shutil

import pytest

from orchestration.data.prompts import DataError, drop_long_prompts, load_rows
from orchestration.evaluation import generate_rows
from rollout.types import SamplingConfig

pytestmark = [pytest.mark.vllm]
PREAMBLE = "Be careful. " * 4  # 48 more tokens per prompt under the byte-level tokenizer


def test_a_template_change_is_an_error_naming_the_row_not_a_crash_in_vllm(tmp_path):
    from transformers import AutoTokenizer

    from rollout.tiny import build_tiny_model
    from rollout.worker import RolloutWorker

    driver_dir = build_tiny_model(tmp_path / "driver")
    engine_dir = tmp_path / "engine"  # the same model, its chat template changed after the data was filtered
    shutil.copytree(driver_dir, engine_dir)
    template = (engine_dir / "chat_template.jinja").read_text()
    (engine_dir / "chat_template.jinja").write_text("{{ '" + PREAMBLE + "' }}" + template)
    lines = [f'{{"prompt": "What is {i} + {i}? {"x" * 40 * i}", "reward_model": {{"ground_truth": "{2 * i}"}}}}'
             for i in range(3)]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, dropped = drop_long_prompts(load_rows(path), AutoTokenizer.from_pretrained(driver_dir), 128)
    assert len(rows) == 3 and not dropped, "the driver's count lets every row through"
    counts = [len(AutoTokenizer.from_pretrained(engine_dir).apply_chat_template(list(r.messages),
              add_generation_prompt=True)["input_ids"]) for r in rows]  # fmt: skip
    first = next(i for i, n in enumerate(counts) if n > 128)
    assert first > 0, "the first row fits; a later one does not"
    engine = RolloutWorker(engine_dir, engine="vllm", dtype="float32", max_model_len=128 + 16, seed=0)
    expected = rf"^{path}:{first + 1}: the prompt has {counts[first]} tokens as the engine renders it; with "
    expected += r"rollout.max_response_tokens=16 it does not fit the engines' context of 144 tokens"
    with pytest.raises(DataError, match=expected):
        generate_rows(engine, rows, SamplingConfig(max_tokens=16, seed=0))
    assert len(generate_rows(engine, rows[:first], SamplingConfig(max_tokens=4, seed=0))) == first, "still usable"
