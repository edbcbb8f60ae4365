"""The token-credit tool (tools/credit.py) on two tiny checkpoints: the numbers in its HTML match an
independent float64 computation (log-probs by a float64 forward, F by the plain right-to-left recurrence), and
its PNG is a real image."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DECAY_RATE = 4.0  # a short half-life so the discount visibly matters over a ~30-token response


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """π_old = a tiny model; π_θ = the same weights plus small noise (a policy a few updates later)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("credit")
    old = build_tiny_model(root / "old")
    model = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    new = root / "new"
    model.save_pretrained(new)
    AutoTokenizer.from_pretrained(old).save_pretrained(new)
    return old, new, root


def run_credit(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.credit", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def reference_credit(old_dir, new_dir, messages, response, decay_rate, clip_c, eps_f):
    """Independent float64: per-token log-probs, Δ, participation, F by recurrence, f = clip(exp F, 1, 1+ε_f)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(old_dir)
    prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    response_ids = tok.encode(response)
    ids = torch.tensor([prompt + response_ids])
    lps = []
    for d in (old_dir, new_dir):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
        lps.append([logp[t, r].item() for t, r in enumerate(response_ids)])
    delta = [max(-20.0, min(20.0, n - o)) for o, n in zip(*lps)]
    gamma = 2.0 ** (-1.0 / decay_rate)
    future, acc = [0.0] * len(delta), 0.0
    for t in range(len(delta) - 1, -1, -1):
        acc = (delta[t] if delta[t] <= math.log(clip_c) else 0.0) + gamma * acc
        future[t] = acc
    weights = [min(max(math.exp(f), 1.0), 1.0 + eps_f) for f in future]
    return delta, future, weights


def html_values(page, trace):
    block = page.split(f"id='trace-{trace}'")[1].split("</div></div>")[0]
    found = re.findall(r"data-t='(\d+)' data-delta='([^']+)' data-future-kl='([^']+)' data-weight='([^']+)'", block)
    n = len({t for t, *_ in found})
    return [[float(v) for v in row[1:]] for row in found[:n]]


def test_html_values_match_an_independent_float64_computation(checkpoints, tmp_path):
    old, new, _ = checkpoints
    messages = [{"role": "user", "content": "Compute left to right: 17 +5 +8"}]
    response = "17+5=22\n22+8=30\nAnswer: 30"
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"messages": messages, "response": response, "ground_truth": "30"}) + "\n")
    out = tmp_path / "out"
    run_credit("--old", old, "--new", new, "--traces", traces, "--decay-rate", DECAY_RATE, "--output-dir", out)
    got = html_values((out / "credit.html").read_text(encoding="utf-8"), 0)
    delta, future, weights = reference_credit(old, new, messages, response, DECAY_RATE, 10.0, 0.2)
    assert len(got) == len(response)  # one byte-level token per character
    assert [g[0] for g in got] == pytest.approx(delta, abs=2e-5)
    assert [g[1] for g in got] == pytest.approx(future, abs=1e-4)
    assert [g[2] for g in got] == pytest.approx(weights, abs=1e-4)
    assert max(abs(f) for f in future) > 1e-3, "the two policies differ: F is not trivially 0"
    record = json.loads((out / "credit.json").read_text())
    assert record["traces"][0]["reward"] == 1.0  # "Answer: 30" is right
    assert record["config"]["decay_rate"] == DECAY_RATE


def test_sampled_traces_and_png(checkpoints, tmp_path):
    old, new, root = checkpoints
    from orchestration.data.tasks import make_rows, write_jsonl

    _, val = make_rows(0, 5, seed=3)
    data = write_jsonl(val, tmp_path / "val.jsonl")
    out = tmp_path / "out"
    proc = run_credit("--old", old, "--new", new, "--data", data, "--num-traces", 2, "--max-response-tokens", 12,
                      "--no-weight-clip-high-only", "--output-dir", out)  # fmt: skip
    record = json.loads((out / "credit.json").read_text())
    assert len(record["traces"]) == 2 and "wrote" in proc.stdout
    for trace in record["traces"]:
        assert 1 <= len(trace["tokens"]) <= 12
        assert all(0.8 - 1e-6 <= w <= 1.2 + 1e-6 for w in trace["weights"])  # the 7B recipe's [0.8, 1.2]
    from PIL import Image

    with Image.open(out / "credit.png") as image:
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300


def test_png_axes_show_plain_values_not_offset_notation():
    """Weights of 1 + 1e-5 once showed as "1e-5+1" above the axis; now every axis reads plain values and the
    weight axis spans the clip range [1, 1.2]."""
    import matplotlib.pyplot as plt

    from advantage import FIPOLossConfig
    from tools.credit import Trace, credit_figure

    n = 6
    trace = Trace(
        messages=[{"role": "user", "content": "Compute left to right: 1 +2"}], response="1+2=3", response_ids=[1] * n,
        tokens=list("1+2=3\n"), old_log_probs=[-1.0] * n, new_log_probs=[-1.0 + 1e-6] * n, delta=[1e-6] * n,
        future_kl=[1e-5 * (n - i) for i in range(n)], weights=[1.0 + 1e-5 * (n - i) for i in range(n)],
        participates=[True] * n, safety_if_negative=[False] * n, reward=1.0,
    )  # fmt: skip
    fig = credit_figure([trace], FIPOLossConfig(), "old → new")
    fig.canvas.draw()
    weight_axis = fig.axes[1]
    lo, hi = weight_axis.get_ylim()
    assert lo <= 1.0 and hi >= 1.2
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_ylabel()
    plt.close(fig)
