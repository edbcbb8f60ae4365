"""`python -m reward.score` end to end (subprocess): verl rows and flat rows, adversarial rows, statuses,
order, and malformed input reported with file and line before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reward.score import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "reward.score", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_scores_rows_in_order(tmp_path: Path):
    verl_row = {
        "data_source": "aime-2024",
        "prompt": [{"role": "user", "content": "Find the number of minutes."}],
        "reward_model": {"style": "rule", "ground_truth": "204"},
        "extra_info": {"index": 0},
    }
    rows = [
        {**verl_row, "response": "... so the walk takes 204 minutes.\nAnswer: 204"},
        {"response": "Answer: $\\frac{1}{2}$", "ground_truth": "0.5", "id": "b"},
        {"response": "no answer at all", "ground_truth": "3"},
        {"response": "Answer: $9^{9^{9}}$", "ground_truth": "3"},  # hangs the verifier -> timeout
        {"response": "Answer: \ud800\u0000 7", "ground_truth": 7},  # lone surrogate, NUL; numeric truth
        {"response": "\\boxed{" * 50_000 + "}" * 50_000, "ground_truth": "1"},
        {"response": "Answer: 1,000", "ground_truth": "1000"},
    ]
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in rows] + [""])  # a blank line is skipped
    out = tmp_path / "out" / "scored.jsonl"
    # A hang bound only (a hanging row that was not cut off would take minutes in sympy): the command's start-up
    # and its two scorer children took 9-12 s here at a load average of 20 on 2 cores; 120 s covers a machine 5x
    # slower. That the 1.5 s limit was applied is checked on the row itself below (its latency_s).
    proc = run_cli(str(src), "--output", str(out), "--workers", "2", "--timeout", "1.5", timeout=120.0)
    assert proc.returncode == 0, proc.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(rows)
    for original, result in zip(rows, scored):
        for key, value in original.items():
            if key != "response":  # compared below (the surrogate survives only as an escape)
                assert result[key] == value
        assert {"correct", "score", "status", "extracted", "latency_s"} <= result.keys()
    assert [r["status"] for r in scored] == ["ok", "ok", "ok", "timeout", "ok", "ok", "ok"]
    assert 1.5 <= scored[3]["latency_s"] < 1.5 + 1.5  # cut off at its limit (+ kill and scheduling slack)
    assert [r["correct"] for r in scored] == [True, True, False, False, False, False, True]
    assert [r["score"] for r in scored] == [1.0, 1.0, -1.0, 0.0, -1.0, -1.0, 1.0]
    assert scored[0]["extracted"] == "204" and scored[2]["extracted"] is None
    assert scored[4]["response"] == rows[4]["response"]
    assert "7 samples scored" in proc.stderr


def test_cli_binary_scheme_and_reward_kwargs(tmp_path: Path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "Answer: 2", "ground_truth": "3"})])
    out = tmp_path / "out.jsonl"
    common = [str(src), "--output", str(out), "--workers", "1", "--quiet"]
    assert main([*common, "--reward-fn", "reward.math:score_math_binary"]) == 0
    assert json.loads(out.read_text())["score"] == 0.0
    assert main([*common, "--reward-kwargs", '{"wrong_score": -0.5}']) == 0
    assert json.loads(out.read_text())["score"] == -0.5


def test_cli_malformed_line_subprocess(tmp_path: Path):
    good = json.dumps({"response": "Answer: 1", "ground_truth": "1"})
    src = write_lines(tmp_path / "in.jsonl", [good, good, "{not json", good])
    out = tmp_path / "out.jsonl"
    proc = run_cli(str(src), "--output", str(out))
    assert proc.returncode == 2
    assert f"{src}:3: invalid JSON" in proc.stderr, proc.stderr
    assert not out.exists()  # validated before anything was scored or written


def test_cli_malformed_lines_name_file_and_line(tmp_path: Path, capsys):
    good = json.dumps({"response": "Answer: 1", "ground_truth": "1"})
    cases = {
        "[1, 2]": "expected a JSON object",
        "[" * 100_000: "invalid JSON",
        json.dumps({"ground_truth": "1"}): "missing field 'response'",
        json.dumps({"response": "Answer: 1"}): "missing field 'ground_truth'",
        json.dumps({"response": None, "ground_truth": "1"}): "'response' must be a string",
        json.dumps({"response": "x", "reward_model": {"ground_truth": ["1"]}}): "'reward_model.ground_truth'",
    }
    for bad_line, fragment in cases.items():
        src = write_lines(tmp_path / "in.jsonl", [good, "", bad_line, good])
        out = tmp_path / "out.jsonl"
        assert main([str(src), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{src}:3: " in err and fragment in err, err
        assert not out.exists()


def test_cli_bad_arguments(tmp_path: Path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "Answer: 1", "ground_truth": "1"})])
    out = str(tmp_path / "o.jsonl")
    assert main([str(src), "--output", out, "--reward-fn", "nowhere.module:fn"]) == 2
    assert "'nowhere.module:fn'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl"), "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(src), "--output", out, "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err
    assert main([str(src), "--output", str(tmp_path)]) == 2
    assert "cannot write --output" in capsys.readouterr().err
    invalid_utf8 = tmp_path / "bytes.jsonl"
    invalid_utf8.write_bytes(b'{"response": "\xff", "ground_truth": "1"}\n')
    assert main([str(invalid_utf8), "--output", out]) == 2
    assert f"{invalid_utf8}:1: not valid UTF-8" in capsys.readouterr().err
