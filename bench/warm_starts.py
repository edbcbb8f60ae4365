"""Ten warm-starts of one task setting, each measured before RL, and the table of them with the setting's bar:
`python -m bench.warm_starts SETTING [SETTING ...] [--seeds 0 1 2 3 4] [--threads 1 2] [--out DIR]`.

SETTING is `demo` (the built-in `chain` task, conf/model/tiny.yaml's recipe), `long` (the first study's long
chains, experiment=study_fipo_vs_dapo) or `free` (the length study's free_chain, experiment=study_length). Each
(model.init_seed, model.warm_start_threads) pair is one warm-start: `python -m tools.warm_start_check
<the setting's overrides> model.init_seed=S model.warm_start_threads=T --every E --output DIR/SETTING/iS_tT.json`,
run as a child process (its log beside the JSON). Rows whose JSON exists are not run again, so an interrupted
table is finished by the same command. `--cores` warm-starts' threads run at once (two 1-thread warm-starts side
by side on 2 cores; a 2-thread one alone), the 1-thread ones first. The warm-starts land in the runs' cache, so
a run with the same overrides starts from them.

Prints, per setting, a markdown table (the columns of docs/warm_start.md), whether each row passes the setting's
bar (BARS: stated in docs/warm_start.md before the rows were measured), the spread of the numbers RL's room is
judged from, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    overrides: tuple[str, ...]
    every: int  # SFT steps between measurements: the middle one is the table's "at step" column
    habits: tuple[str, ...]  # the habit columns, in order


SETTINGS = {
    "demo": Setting((), 800, ("direct", "stepwise")),
    "long": Setting(("experiment=study_fipo_vs_dapo",), 1200, ("direct", "stepwise")),
    "free": Setting(("experiment=study_length",), 1200, ("direct", "at_once", "partial", "stepwise")),
}


def passes(setting: str, m: dict) -> tuple[bool, str]:
    """The setting's bar before RL on a warm-start's final measurement: (passed, why not)."""
    fails = []
    if setting == "demo":
        fails += ["chains < 60%"] * (m["chain_exact"] < 0.60)
        fails += ["sampled outside 35-55%"] * (not 0.35 <= m["accuracy"] <= 0.55)
    elif setting == "long":
        fails += ["chains < 50%"] * (m["chain_exact"] < 0.50)
        fails += ["sampled outside 30-60%"] * (not 0.30 <= m["accuracy"] <= 0.60)
    else:  # free: longer work pays, and there is room to lengthen
        stepwise = m.get("stepwise_accuracy", 0.0)
        fails += ["stepwise chains < 50%"] * (m["chain_exact"] < 0.50)
        fails += ["sampled stepwise right < 50%"] * (stepwise < 0.50)
        for shorter in ("at_once", "partial"):
            if m.get(f"{shorter}_frac", 0) and stepwise - m[f"{shorter}_accuracy"] < 0.30:
                fails.append(f"stepwise < {shorter} + 30 points")
        fails += ["stepwise > 70% of responses"] * (m.get("stepwise_frac", 0.0) > 0.70)
    return not fails, ", ".join(fails)


def run_all(jobs: list[tuple[str, int, int, Path]], cores: int) -> None:
    """Run each missing warm-start as a child process, at most `cores` threads at a time, in the given order."""
    pending = [job for job in jobs if not job[3].exists()]
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    while pending or running:
        busy = sum(job[2] for _, job, _ in running)
        while pending and busy + pending[0][2] <= cores:
            setting, seed, threads, out = job = pending.pop(0)
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "tools.warm_start_check", *SETTINGS[setting].overrides,
                   f"model.init_seed={seed}", f"model.warm_start_threads={threads}",
                   f"--every={SETTINGS[setting].every}", f"--output={out}"]  # fmt: skip
            print(f"start {setting} init_seed={seed} threads={threads}: {' '.join(cmd[1:])}", flush=True)
            log = out.with_suffix(".log").open("w")
            running.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), job, time.time()))
            busy += threads
        time.sleep(5)
        for proc, job, began in list(running):
            if proc.poll() is not None:
                running.remove((proc, job, began))
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see the log)"
                print(f"{status}: {job[0]} init_seed={job[1]} threads={job[2]} in {time.time() - began:.0f} s",
                      flush=True)  # fmt: skip


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def table(setting: str, rows: list[tuple[int, int, dict]]) -> tuple[str, dict]:
    """The markdown rows of one setting and a summary (pass count, spreads)."""
    s = SETTINGS[setting]
    lines, finals = [], []
    for seed, threads, record in rows:
        final = record["measurements"][-1]
        ends = record.get("round_ends", [])  # with stepwise rounds: the "at step" column is the last round's end
        at = ends[-2] if len(ends) > 2 else s.every
        middle = next((m for m in record["measurements"] if m["step"] == at), None)
        ok, why = passes(setting, final)
        habit_cells = [
            f"{100 * final.get(h + '_frac', 0):.0f}% / {100 * final[h + '_accuracy']:.0f}%"
            if final.get(h + "_frac")
            else "0%"
            for h in s.habits
        ]
        cells = [str(seed), str(threads), f"{final['loss']:.3f}", pct(final["chain_exact"]),
                 pct(final["operation_lines"]), pct(final["result_accuracy"]), pct(final["accuracy"]), *habit_cells,
                 pct(middle and middle["chain_exact"]) + (f" ({len(ends) - 1} rounds)" if len(ends) > 2 else ""),
                 f"{record.get('sft_seconds', record['seconds']):.0f} s",
                 "yes" if ok else f"**no**: {why}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        finals.append((final, ok))

    def spread(key: str) -> list[float]:
        values = [f[key] for f, _ in finals if key in f]
        return [min(values), max(values)] if values else []

    summary = {"setting": setting, "warm_starts": len(finals), "passed": sum(ok for _, ok in finals)}
    for key in ("chain_exact", "accuracy", *(f"{h}_{x}" for h in s.habits for x in ("frac", "accuracy"))):
        summary[key] = spread(key)
    room = [f.get("stepwise_accuracy", 0.0) - f["accuracy"] for f, _ in finals]  # every response made stepwise
    summary["room_for_rl"] = [min(room), max(room)] if room else []
    return "\n".join(lines), summary


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="model.init_seed values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="model.warm_start_threads values")
    parser.add_argument("--cores", type=int, default=2, help="threads that may run at once")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "warm_starts", help="JSON and log folder")
    parser.add_argument("--table-only", action="store_true", help="print the table of the rows already measured")
    args = parser.parse_args(argv)
    path = {(st, s, t): args.out / st / f"i{s}_t{t}.json" for st in args.settings for s in args.seeds
            for t in args.threads}  # fmt: skip
    jobs = sorted(((st, s, t, p) for (st, s, t), p in path.items()), key=lambda j: (j[2], args.settings.index(j[0])))
    if not args.table_only:
        run_all(jobs, args.cores)
    summaries = []
    for setting in args.settings:
        rows = [(s, t, json.loads(path[setting, s, t].read_text())) for t in args.threads for s in args.seeds
                if path[setting, s, t].exists()]  # fmt: skip
        text, summary = table(setting, rows)
        print(f"\n## {setting}: {summary['passed']} of {summary['warm_starts']} pass the bar\n{text}")
        summaries.append(summary)
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
