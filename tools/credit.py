"""FIPO's token credit, as a picture: which tokens the future-KL weights up, for a pair of policies.

    python -m tools.credit --old outputs/demo/checkpoints/step_30/hf \\
        --new outputs/demo/checkpoints/step_40/hf --data outputs/demo/data/synthetic_val.jsonl
    python -m tools.credit --run-dir outputs/demo        # its last two checkpoints and its val split

For a few traces (sampled from π_old, the policy that generates the batch in FIPO, or read from a
--traces jsonl of {"messages": [...], "response": "..."}), per response token t:

    ℓ_old(t), ℓ_new(t)   log-probs under π_old and π_θ (plain transformers forward, float32)
    Δ_t = clamp(ℓ_new − ℓ_old, ±20)                              (FIPO_SPEC §3.1)
    F_t = Σ_{k≥t} γ^(k−t) · Δ_k · [Δ_k ≤ log c]                  (§3.2-3.3: advantage.discounted_future_sum
                                                                   with the participation mask)
    f_t = clip(exp F_t)                                          (§3.4: advantage.influence_weights)

exactly as advantage.fipo_policy_loss computes them inside the learner (the same function,
advantage.losses.future_kl_weights, is called here).
The safety rule (f clamped to [0.8, 1] where Â < 0 and the ratio exceeds safety_threshold) needs the group
advantage, which a single trace does not have; it is reported as `safety_if_negative` per token instead.

Outputs in --output-dir: credit.html (each trace's tokens coloured by f and by F, hover titles and data-*
attributes holding Δ, F, f), credit.png (per-trace curves of Δ, F, f over the tokens) and credit.json (every
number).
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from advantage import FIPOLossConfig
from advantage.losses import LOG_RATIO_CLAMP, future_kl_weights
from orchestration.checkpoint import CheckpointManager
from orchestration.data.prompts import load_datasets
from rollout.types import chat_prompt_ids


@dataclass(frozen=True)
class Trace:
    """One prompt and response, with its per-token credit.

    messages: the prompt's chat messages; response_ids: [T] the response tokens; tokens: their decoded text.
    old_log_probs, new_log_probs, delta, future_kl, weights: [T] float lists (ℓ_old, ℓ_new, Δ, F, f).
    participates: [T] bools, Δ ≤ log c; safety_if_negative: [T] bools, ratio > safety_threshold (the weight
    would be clamped to [0.8, 1] were the advantage negative). reward: the verifier's score, or None.
    """

    messages: list[dict]
    response: str
    response_ids: list[int]
    tokens: list[str]
    old_log_probs: list[float]
    new_log_probs: list[float]
    delta: list[float]
    future_kl: list[float]
    weights: list[float]
    participates: list[bool]
    safety_if_negative: list[bool]
    reward: float | None = None
    ground_truth: str | None = None


def token_log_probs(model, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
    """[T] float32 log-probs of `response_ids` after `prompt_ids` under `model` (one unpadded forward)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0]
    p = len(prompt_ids)
    log_probs = torch.log_softmax(logits[p - 1 : -1], dim=-1)
    return log_probs.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def credit(
    old_log_probs: torch.Tensor, new_log_probs: torch.Tensor, response_mask: torch.Tensor, config: FIPOLossConfig
) -> dict[str, torch.Tensor]:
    """Δ, participation, F and f for log-probs [B, T] float32 (response_mask [B, T] bool, True on real tokens),
    from the function advantage.fipo_policy_loss calls (advantage.losses.future_kl_weights: before its
    advantage-dependent safety rule)."""
    mask = response_mask.bool()
    delta = (new_log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    participates, future_kl, weights = future_kl_weights(delta, mask, config)
    return {
        "delta": delta,
        "participates": participates,
        "future_kl": future_kl,
        "weights": weights,
        "safety_if_negative": mask & (torch.exp(delta) > config.safety_threshold),
    }


def sample_response(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int):
    """Token ids of one response sampled from `model` (stops at and keeps eos)."""
    torch.manual_seed(seed)
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, len(prompt_ids) :].tolist()


def compute_traces(
    old_dir: str | Path,
    new_dir: str | Path,
    prompts: Sequence[tuple[list[dict], str | None, str | None]],
    config: FIPOLossConfig,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Trace]:
    """Credit of each (messages, response or None to sample one from π_old, ground truth or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reward.math import score_math  # heavy: math_verify, only with ground truths

    tokenizer = AutoTokenizer.from_pretrained(old_dir)
    old = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
    traces = []
    for i, (messages, response, truth) in enumerate(prompts):
        prompt_ids = chat_prompt_ids(tokenizer, messages)
        if response is None:
            response_ids = sample_response(old, tokenizer, prompt_ids, max_new_tokens, temperature, seed + i)
        else:
            response_ids = tokenizer.encode(response, add_special_tokens=False)
        if response_ids:
            old_lp = token_log_probs(old, prompt_ids, response_ids)[None]
            new_lp = token_log_probs(new, prompt_ids, response_ids)[None]
        else:  # an empty response: a trace of no tokens, shown as such (its reward is still the verifier's)
            old_lp = new_lp = torch.zeros((1, 0), dtype=torch.float32)
        c = credit(old_lp, new_lp, torch.ones_like(old_lp, dtype=torch.bool), config)
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        traces.append(
            Trace(
                messages=list(messages),
                response=text,
                response_ids=response_ids,
                tokens=[tokenizer.decode([t]) for t in response_ids],
                old_log_probs=old_lp[0].tolist(),
                new_log_probs=new_lp[0].tolist(),
                delta=c["delta"][0].tolist(),
                future_kl=c["future_kl"][0].tolist(),
                weights=c["weights"][0].tolist(),
                participates=c["participates"][0].tolist(),
                safety_if_negative=c["safety_if_negative"][0].tolist(),
                reward=score_math(text, truth).score if truth is not None else None,
                ground_truth=truth,
            )
        )
    return traces


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _blend(rgb: tuple[int, int, int], amount: float) -> str:
    """White blended towards `rgb` by `amount` in [0, 1], as a CSS colour."""
    a = max(0.0, min(1.0, amount))
    r, g, b = (round(255 + (c - 255) * a) for c in rgb)
    return f"rgb({r},{g},{b})"


RED, BLUE = (214, 39, 40), (31, 119, 180)


def _diverging(value: float, scale: float) -> str:
    """Red for positive, blue for negative, white at 0; full colour at |value| = scale."""
    if scale <= 0:
        return "rgb(255,255,255)"
    return _blend(RED if value > 0 else BLUE, abs(value) / scale)


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "↵").replace(" ", "·")) or "∅"


def render_html(traces: Sequence[Trace], config: FIPOLossConfig, title: str) -> str:
    """An HTML page: per trace, tokens coloured by f (red above 1, blue below) and by F (red > 0, blue < 0)."""
    hi = 1.0 + config.weight_clip if config.weight_clip > 0 else 10.0
    lo = (1.0 if config.weight_clip_high_only else 1.0 - config.weight_clip) if config.weight_clip > 0 else 0.0
    f_scale = max(hi - 1.0, 1.0 - lo, 1e-12)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}.tok{font-family:monospace;font-size:15px;"
        "padding:2px 1px;margin:0 1px;border-radius:3px;white-space:pre}.row{line-height:2.2em}"
        ".lab{display:inline-block;width:11em;color:#555;font-size:13px}.trace{margin-bottom:2em}"
        ".filtered{outline:1px dashed #000}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>FIPO token credit (FIPO_SPEC §3): Δ = clamp(log π<sub>θ</sub> − log π<sub>old</sub>, ±20); "
        f"F = discounted future sum of Δ over participating tokens (Δ ≤ log c, c = {config.clip_c:g}; "
        f"half-life τ = {config.decay_rate:g} tokens, γ = {config.gamma:.6f}); f = clip(exp F) to "
        f"[{lo:g}, {hi:g}]. Row 1: coloured by f (red &gt; 1, blue &lt; 1); row 2: by F (red &gt; 0, blue &lt; 0, "
        "full colour at the trace's max |F|). Hover a token for its numbers; dashed tokens left the future-KL "
        "(ratio &gt; c). ↵ is a newline, · a space.</p>",
    ]
    for i, trace in enumerate(traces):
        f_max = max((abs(v) for v in trace.future_kl), default=0.0)
        prompt = " / ".join(m["content"] for m in trace.messages)
        reward = (
            ""
            if trace.reward is None
            else f" · reward {trace.reward:+g} (truth {html.escape(str(trace.ground_truth))})"
        )
        parts.append(f"<div class='trace' id='trace-{i}'><h3>trace {i}: {html.escape(prompt)}{reward}</h3>")
        if not trace.tokens:
            parts.append("<p class='row'>(empty response: no tokens)</p>")
        for row, values, shift, scale in (
            ("by f (influence weight)", trace.weights, 1.0, f_scale),
            ("by F (future-KL)", trace.future_kl, 0.0, f_max),
        ):
            parts.append(f"<div class='row'><span class='lab'>{row}</span>")
            for t, token in enumerate(trace.tokens):
                d, fk, w = trace.delta[t], trace.future_kl[t], trace.weights[t]
                tip = (
                    f"token {t} {token!r}: log π_old {trace.old_log_probs[t]:.4f}, log π_θ {trace.new_log_probs[t]:.4f}"
                    f", Δ {d:+.5f}, F {fk:+.5f}, f {w:.5f}"
                    + ("" if trace.participates[t] else " (filtered: ratio > c)")
                )
                cls = "tok" if trace.participates[t] else "tok filtered"
                background = _diverging(values[t] - shift, scale)
                parts.append(
                    f"<span class='{cls}' style='background:{background}' title='{html.escape(tip)}' "
                    f"data-t='{t}' data-delta='{d!r}' data-future-kl='{fk!r}' data-weight='{w!r}'>"
                    f"{_show(token)}</span>"
                )
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def credit_figure(traces: Sequence[Trace], config: FIPOLossConfig, title: str):
    """Per trace: Δ as bars, F and f as lines over the response tokens (token text on the x axis). Axes show
    plain values, never matplotlib's offset notation ("1e-5+1" above the axis); the weight axis spans the
    configured clip range, so weights that barely move read as the flat line near 1 they are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(traces), 1)
    width = max(10.0, 0.22 * max((len(t.tokens) for t in traces), default=10))
    fig, axes = plt.subplots(n, 1, figsize=(width, 3.2 * n), squeeze=False, constrained_layout=True)
    if config.weight_clip > 0:
        lo, hi = (1.0 if config.weight_clip_high_only else 1.0 - config.weight_clip), 1.0 + config.weight_clip
    else:  # the official "cap at 10" mode: no fixed range
        lo, hi = 1.0, 1.0
    for ax, trace in zip(axes[:, 0], traces):
        x = list(range(len(trace.tokens)))
        ax.bar(x, trace.delta, color=["tab:red" if d > 0 else "tab:blue" for d in trace.delta], alpha=0.4, label="Δ")
        ax.plot(x, trace.future_kl, color="black", lw=1.5, label="F (future-KL)")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_ylabel("Δ, F (nats)")
        ax.set_xticks(x, [t.replace("\n", "↵") for t in trace.tokens], fontsize=7, family="monospace")
        ax2 = ax.twinx()
        ax2.plot(x, trace.weights, color="tab:green", lw=2, label="f (weight)")
        ax2.set_ylabel("f", color="tab:green")
        weights = list(trace.weights) or [1.0]
        ax2.set_ylim(min(lo, *weights) - 0.02, max(hi, *weights) + 0.02)
        for axis in (ax, ax2):
            axis.ticklabel_format(axis="y", style="plain", useOffset=False)
        reward = "" if trace.reward is None else f"  (reward {trace.reward:+g})"
        ax.set_title(" / ".join(m["content"] for m in trace.messages) + reward, fontsize=9)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
    params = f"τ = {config.decay_rate:g}, c = {config.clip_c:g}, ε_f = {config.weight_clip:g}"
    fig.suptitle(f"{title}\n({params})", fontsize=10, wrap=True)  # long checkpoint paths wrap, not clip
    return fig


def render_png(traces: Sequence[Trace], config: FIPOLossConfig, path: str | Path, title: str) -> Path:
    """credit_figure saved as a PNG at `path`. A character the font lacks (CJK, emoji) is drawn as a box,
    without matplotlib's warning per missing glyph."""
    import matplotlib.pyplot as plt

    fig = credit_figure(traces, config, title)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# CLI


def last_two_checkpoints(run_dir: str | Path) -> tuple[Path, Path]:
    """The hf/ exports of a run's two newest complete checkpoints (older, newer)."""

    done = [p / "hf" for p in CheckpointManager(run_dir).complete() if (p / "hf" / "config.json").is_file()]
    if len(done) < 2:
        raise FileNotFoundError(f"{run_dir} has {len(done)} complete checkpoint(s) with an hf/ export; need 2")
    return done[-2], done[-1]


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: object) -> str:
    """A JSON string as text the tokenizer and the HTML page take: a lone surrogate (JSON "\\ud800", which
    no decoder writes) becomes U+FFFD; a number becomes its string."""
    return LONE_SURROGATE.sub("\ufffd", str(value))


def load_prompts(args: argparse.Namespace) -> list[tuple[list[dict], str | None, str | None]]:
    """(messages, response or None, ground truth or None) for each trace to show."""
    if args.traces:
        rows = [json.loads(line) for line in Path(args.traces).read_text().splitlines() if line.strip()]
        return [
            (
                [{**m, "content": _text(m["content"])} for m in r["messages"]],
                _text(r["response"]),
                None if r.get("ground_truth") is None else _text(r["ground_truth"]),
            )
            for r in rows[: args.num_traces]
        ]

    data = args.data or [str(Path(args.run_dir) / "data" / "synthetic_val.jsonl")]
    rows = load_datasets(data)
    chosen = random.Random(args.seed).sample(range(len(rows)), min(args.num_traces, len(rows)))
    return [(list(rows[i].messages), None, rows[i].ground_truth) for i in sorted(chosen)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.credit", description=__doc__.split("\n\n")[0])
    p.add_argument("--old", help="π_old: Hugging Face model dir (the policy that sampled the batch)")
    p.add_argument("--new", help="π_θ: Hugging Face model dir (the policy being trained)")
    p.add_argument("--run-dir", help="a training output_dir: its last two checkpoints and val split by default")
    p.add_argument("--data", nargs="*", help="verl-schema .jsonl/.parquet to draw prompts from")
    p.add_argument("--traces", help='jsonl of {"messages": [...], "response": "...", "ground_truth": ...} to read')
    p.add_argument("--num-traces", type=int, default=4, help="traces to show (default 4)")
    p.add_argument("--max-response-tokens", type=int, default=64, help="sampled response length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for π_old's traces")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and sampling seed")
    p.add_argument("--decay-rate", type=float, default=32.0, help="τ: future-KL half-life, tokens (default 32)")
    p.add_argument("--clip-c", type=float, default=10.0, help="dual-clip c = participation filter (default 10)")
    p.add_argument("--weight-clip", type=float, default=0.2, help="ε_f (default 0.2; 0 = cap at 10)")
    p.add_argument(
        "--weight-clip-high-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip f to [1, 1+ε_f] (32B recipe, default) instead of [1-ε_f, 1+ε_f] (7B recipe)",
    )
    p.add_argument("--safety-threshold", type=float, default=10.0, help="FIPO safety threshold (default 10)")
    p.add_argument("--output-dir", help="where credit.html/.png/.json go (default <run-dir>/credit or ./credit)")
    args = p.parse_args(argv)
    if args.run_dir is None and (args.old is None or args.new is None):
        p.error("give --old and --new, or --run-dir")
    if args.traces is None and not args.data and args.run_dir is None:
        p.error("give --data, --traces or --run-dir")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    old, new = (args.old, args.new)
    if old is None or new is None:
        old, new = last_two_checkpoints(args.run_dir)
    config = FIPOLossConfig(
        clip_c=args.clip_c,
        decay_rate=args.decay_rate,
        weight_clip=args.weight_clip,
        weight_clip_high_only=args.weight_clip_high_only,
        safety_threshold=args.safety_threshold,
    )
    traces = compute_traces(
        old,
        new,
        load_prompts(args),
        config,
        max_new_tokens=args.max_response_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    out = Path(args.output_dir or (Path(args.run_dir) / "credit" if args.run_dir else "credit"))
    out.mkdir(parents=True, exist_ok=True)
    title = f"π_old = {old}  →  π_θ = {new}"
    paths = {
        "html": out / "credit.html",
        "png": out / "credit.png",
        "json": out / "credit.json",
    }
    paths["html"].write_text(render_html(traces, config, title), encoding="utf-8")
    render_png(traces, config, paths["png"], title)
    record = {"old": str(old), "new": str(new), "config": asdict(config), "traces": [asdict(t) for t in traces]}
    paths["json"].write_text(json.dumps(record, indent=1))
    for trace in traces:
        if not trace.tokens:
            print(f"{trace.messages[-1]['content']!r}: an empty response (no tokens)")
            continue
        print(
            f"{trace.messages[-1]['content']!r}: {len(trace.tokens)} tokens, "
            f"Δ mean {sum(trace.delta) / len(trace.delta):+.4f}, "
            f"F [{min(trace.future_kl):+.4f}, {max(trace.future_kl):+.4f}], f [{min(trace.weights):.4f}, "
            f"{max(trace.weights):.4f}]"
        )
    print(f"wrote {paths['html']}, {paths['png']}, {paths['json']}")
    return paths


if __name__ == "__main__":
    main()
