"""Real-shaped data end to end: a short training run on the public-schema AIME 2024 file (shared/data), whose
prompts are long once rendered with the tiny byte-level tokenizer (~370-1,200 tokens), with data.max_prompt_tokens
set so that some are dropped. Through rollout (vLLM), reward, advantage, the 2-rank learner and evaluation; the run
reports how many prompts it dropped (console, every metrics row, run_info.json) and trains on the rest.

The dropped rows are counted independently of the loader's `chat_prompt_ids`: by the chat template's own
tokenization (`apply_chat_template(tokenize=True)["input_ids"]`)."""

import json
import re
from pathlib import Path

import pytest
from test_train_e2e import run_train

AIME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aime-2024.jsonl"
LIMIT = 600  # tokens: drops the longer ~40% of AIME's prompts under the tiny byte-level tokenizer
pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.skipif(not AIME.exists(), reason="shared/data is beside the checkout in development and CI"),
]


def test_a_run_on_aime_drops_the_long_prompts_names_them_and_trains_on_the_rest(tmp_path):
    from transformers import AutoTokenizer

    out, tiny = tmp_path / "run", tmp_path / "tiny"
    data = [f"data.train_files=[{AIME}]", f"data.val_files=[{AIME}]", f"data.max_prompt_tokens={LIMIT}"]
    run_train(out, tiny, *data, "trainer.total_steps=2", "trainer.eval_every=2", "rollout.max_response_tokens=32")
    (model_dir,) = tiny.glob("seed*")  # the run's one tiny model (model.tiny_dir/seed<S>-<hash>, rollout.tiny)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = AIME.read_text().splitlines()
    lengths = {
        f"{AIME}:{i}": len(tokenizer.apply_chat_template(json.loads(line)["prompt"], add_generation_prompt=True)
                           ["input_ids"])
        for i, line in enumerate(lines, start=1)
    }  # fmt: skip
    too_long = [f"{source} ({n} tokens)" for source, n in lengths.items() if n > LIMIT]
    assert 0 < len(too_long) < len(lines)

    info = json.loads((out / "run_info.json").read_text())["data"]
    assert info["dropped_long_train_prompts"] == too_long == info["dropped_long_val_prompts"]
    assert info["train_prompts"] == info["val_prompts"] == len(lines) - len(too_long)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert all(row["data/dropped_long_train_prompts"] == len(too_long) for row in rows)
    assert all(row["data/dropped_long_val_prompts"] == len(too_long) for row in rows)
    assert "eval/avg_at_k" in rows[1] and "eval/initial_avg_at_k" in rows[0], "evaluated on the kept problems"
    assert all(row["learner/response_tokens"] > 0 for row in rows), "the learner trained on the kept prompts"
    log = Path(f"{out}.log").read_text()
    printed = re.search(r"data: dropped (\d+) train prompt\(s\) longer than data.max_prompt_tokens=600: (\S+)", log)
    assert printed and int(printed.group(1)) == len(too_long) and printed.group(2) == too_long[0].split()[0]
