"""DRaFT-1, AlignProp, ReFL and Nabla-GFlowNet on one budget on the embedded default: the training reward, the
gold verifier score and the samples' diversity over training, as one table and one plot.

Each method runs through its own CLI (``python -m train.<method>``, its ``tiny`` preset: 16 samples per
iteration, reward ``geneval_learned``) for the same number of iterations with the same seed and evaluation
protocol (20-step DPM-Solver++ 2M, CFG-free); every evaluation logs ``eval/reward`` (the training reward, the
learned one by default, on the held-out samples), ``eval/score`` (the GenEval-mini verifier, gold) and
``eval/diversity`` / ``eval/drift`` (train.diversity).  The table holds iteration 0 and the last evaluation;
the plot one panel per metric.  Nabla-GFlowNet's claim (arXiv 2412.07775) is that at equal reward its samples
stay more diverse than DRaFT's; the summaries give diversity at the evaluation where each method's training
reward is highest, and at equal training reward (below).

    python -m bench.reward_backprop_compare --out runs/rb_compare --iters 20 --every 5

``--reward`` trains every method on another differentiable reward (``saturation`` is one they all move, so
the diversity claim can be tested where the reward actually rises), ``--method-extra METHOD=OPTIONS`` gives
one method its own options (a reward scale, a learning rate), ``--jobs N`` runs N methods at once (give each
``--threads``), and ``--merge DIR ...`` rebuilds the table, summaries and plot from earlier outputs (several
seeds, or methods run in separate invocations) without training.  The equal-reward summary takes the highest
training reward that every method of a seed reaches after iteration 0 (and half of that gain) and reads each
method's diversity, gold score and drift there, linearly interpolated between the two evaluations around the
first crossing.  The table and plot name the feature space of the diversity (``eval/feature``; pass
``--extra "--eval.feature geneval_objects"`` for the verifier's objects); runs in different spaces are
refused.

Paired differences (math.md §9.2): the runs of one seed share the held-out and diversity prompts and their
noise, and every evaluation writes its per-image and per-prompt values (``samples/iter_XXXXXX.json``, kept in
``results.json``).  So the table gives each run's gold change from iteration 0 (the learning-rate-0 control)
with its paired standard error, and the equal-reward summary each method's diversity minus DRaFT-1's,
prompt by prompt, with the paired standard error, pooled over the seeds of a ``--merge``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from train.diversity import paired_difference, standard_error
from train.evaluation import paired_score_change, read_record

METHODS = ("draft", "alignprop", "refl", "nabla_gfn")
METRICS = (("eval/reward", "training reward (held-out)"), ("eval/score", "gold: GenEval-mini"),
           ("eval/diversity", "diversity"), ("eval/drift", "drift from base"))  # fmt: skip
RECORD_KEYS = ("iteration", "prompts", "seeds", "tasks", "columns", "diversity", "diversity_prompts", "drift")
COLOURS = {
    "draft": (200, 40, 40),
    "alignprop": (40, 120, 200),
    "refl": (40, 160, 60),
    "nabla_gfn": (150, 60, 170),
}


def method_command(method: str, out: Path, iters: int, every: int, prompts: int, seed: int, extra: list):
    return [sys.executable, "-m", f"train.{method}", "--run-dir", str(out / method), "--overwrite",
            "--max-iters", str(iters), "--eval.every", str(every), "--eval.num-prompts", str(prompts),
            "--seed", str(seed), "--eval.num-steps", "20", "--eval.solver", "dpm2", "--eval.cfg-scale", "1",
            "--max-minutes", "600", "--log.progress", "false", "--log.checkpoint-every", str(iters),
            *extra]  # fmt: skip


def collect(method: str, run: Path, iters: int, seed: int, wall: float, cmd: list) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval/score" in r and "iteration" in r]
    if not evals or evals[-1]["iteration"] != iters:
        got = evals[-1]["iteration"] if evals else "none"
        raise SystemExit(f"train.{method} stopped at iteration {got} of {iters}")
    for e in evals:  # each evaluation's per-image and per-prompt values (train.evaluation.read_record)
        rec = read_record(run, e["iteration"])
        e["record"] = {k: rec[k] for k in RECORD_KEYS if k in rec}
    return {"method": method, "seed": seed, "wall_s": wall, "evals": evals, "cmd": " ".join(cmd[1:])}


def run_methods(jobs: list[tuple[str, list]], out: Path, args) -> list[dict]:
    """Run ``(method, extra options)`` through their CLIs, ``args.jobs`` at a time; the results in the
    given order.  A failing run stops the comparison with its command and the tail of its output."""
    pending, running, done = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            method, extra = pending.pop(0)
            cmd = method_command(method, out, args.iters, args.every, args.eval_prompts, args.seed, extra)
            log = open(out / f"{method}.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
            running[method] = (proc, cmd, log, time.perf_counter())
        time.sleep(0.5)
        for method, (proc, cmd, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[method]
            if proc.returncode != 0:
                for other in running.values():
                    other[0].kill()
                tail = (out / f"{method}.log").read_text()[-3000:]
                raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
            wall = time.perf_counter() - t0
            done[method] = collect(method, out / method, args.iters, args.seed, wall, cmd)
            print(f"{method}: {wall:.0f} s", flush=True)
    return [done[m] for m, _ in jobs]


def feature_of(results: list[dict]) -> str:
    """The one feature space (``eval/feature``) of every run's diversity and drift; runs measured in different
    spaces are not compared."""
    names = {e["eval/feature"] for r in results for e in r["evals"] if e.get("eval/feature")}
    if len(names) > 1:
        raise SystemExit(f"expected runs whose diversity is in one feature space (eval/feature), got "
                         f"{', '.join(sorted(names))}")
    return names.pop() if names else "?"


def table(results: list[dict]) -> str:
    labels = [f"{lab} ({feature_of(results)})" if key == "eval/diversity" else lab for key, lab in METRICS]
    head = "| method | seed | wall s | " + " | ".join(f"{lab} (it 0 -> last)" for lab in labels)
    head += " | gold change, paired (it 0 -> last) |"
    lines = [head, "|" + "---|" * (4 + len(METRICS))]
    for r in results:
        first, last = r["evals"][0], r["evals"][-1]
        cells = []
        for key, _ in METRICS:
            a, b = first.get(key), last.get(key)
            se = last.get(f"{key}_se")  # eval/diversity_se: the standard error over the diversity prompts
            cells.append("n/a" if a is None or b is None else f"{a:.3f} -> {b:.3f}" + (
                f" (se {se:.3f})" if se is not None else ""))
        cells.append(gold_change(first, last))
        row = f"| {r['method']} | {r.get('seed', 0)} | {r['wall_s']:.0f} | "
        lines.append(row + " | ".join(cells) + " |")
    return "\n".join(lines)


def gold_change(first: dict, last: dict) -> str:
    """The gold score's change from ``first`` to ``last`` (iteration 0 is the learning-rate-0 control) with
    its paired standard error over the same held-out prompts and noise (train.evaluation.paired_score_change);
    n/a for results collected before evaluations wrote records."""
    if "record" not in first or "record" not in last:
        return "n/a"
    change, se = paired_score_change(first["record"], last["record"])
    return f"{change:+.3f} (se {se:.3f})"


def crossing(evals: list[dict], level: float, key: str = "eval/reward") -> dict | None:
    """The metrics where the training reward first reaches ``level`` after iteration 0: each value (and the
    iteration) linearly interpolated in the reward between the evaluation before the crossing and the one at
    it; None if it never does."""
    for prev, cur in zip(evals, evals[1:], strict=False):
        a, b = prev.get(key), cur.get(key)
        if a is None or b is None or b < level:
            continue
        f = 1.0 if b <= a else min(max((level - a) / (b - a), 0.0), 1.0)
        out = {"iteration": prev["iteration"] + f * (cur["iteration"] - prev["iteration"])}
        for k, _ in METRICS:
            if k in prev and k in cur:
                out[k] = prev[k] + f * (cur[k] - prev[k])
        out[key] = level if b > a else b
        pp = [e.get("record", {}).get("diversity") for e in (prev, cur)]
        if all(pp) and len(pp[0]) == len(pp[1]):  # per diversity prompt, interpolated the same way
            out["diversity_per_prompt"] = [x + f * (y - x) for x, y in zip(*pp, strict=True)]
            out["diversity_prompts"] = prev["record"].get("diversity_prompts")
        return out
    return None


def at_equal_reward(results: list[dict], fractions=(0.5, 1.0)) -> str:
    """Per seed: the highest training reward that every method reaches after iteration 0 (``fractions`` of its
    gain over the start), and each method's metrics where it first gets there (Nabla-GFN's claim: at equal
    reward, more diversity than DRaFT), with each method's paired diversity difference from DRaFT's; with
    several seeds, those differences pooled per fraction: the mean over the seeds, with two standard errors,
    one from the seeds' paired ones (the evaluations' noise) and one from the spread of the seeds' differences
    (which also holds the training's own randomness; itself noisy with few seeds)."""
    lines, pooled = [], {}
    for seed in sorted({r.get("seed", 0) for r in results}):
        group = [r for r in results if r.get("seed", 0) == seed]
        start = max(r["evals"][0]["eval/reward"] for r in group)
        top = min(max(e["eval/reward"] for e in r["evals"][1:]) for r in group if len(r["evals"]) > 1)
        if top <= start:
            lines.append(f"- seed {seed}: no reward above the start ({start:.3f}) that every method reaches")
            continue
        for frac in fractions:
            level = start + frac * (top - start)
            cells, crossings = [], {}
            for r in group:
                c = crossing(r["evals"], level)
                if c is None:  # a run with no evaluation after iteration 0
                    cells.append(f"{r['method']}: not reached")
                    continue
                vals = ", ".join(f"{label.split(':')[0]} {c[k]:.3f}" for k, label in METRICS[1:] if k in c)
                cells.append(f"{r['method']} (it {c['iteration']:.1f}): {vals}")
                crossings[r["method"]] = c
            lines.append(f"- seed {seed}, training reward {level:.4f}: " + "; ".join(cells))
            for method, d, se, n in paired_diversity(crossings):
                lines.append(f"  - diversity, {method} - draft: {d:+.4f} (paired se {se:.4f}, {n} prompts)")
                pooled.setdefault((frac, method), []).append((d, se))
    for (frac, method), values in pooled.items():
        k = len(values)
        if k < 2:
            continue
        mean = sum(d for d, _ in values) / k
        se = sum(s**2 for _, s in values) ** 0.5 / k
        spread = standard_error([d for d, _ in values])
        lines.append(f"- {k} seeds at {frac:g} of the common gain: diversity, {method} - draft: {mean:+.4f} "
                     f"(se {se:.4f} from the paired evaluations, {spread:.4f} from the spread over the "
                     f"seeds)")  # fmt: skip
    return "\n".join(lines)


def paired_diversity(crossings: dict[str, dict], against: str = "draft") -> list[tuple]:
    """At one reward level: each method's diversity minus ``against``'s, prompt by prompt (one seed's runs
    share the diversity prompts and noise), with the paired standard error
    (train.diversity.paired_difference) -> ``(method, difference, se, prompts)``; none when ``against`` or
    the per-prompt values are missing."""
    base = crossings.get(against, {})
    if "diversity_per_prompt" not in base:
        return []
    out = []
    for method, c in crossings.items():
        if method == against or "diversity_per_prompt" not in c:
            continue
        if c.get("diversity_prompts") != base.get("diversity_prompts"):
            raise SystemExit(f"expected {method} and {against} of one seed to share the diversity prompts, "
                             f"got different ones (another --eval.num-prompts or --eval.diversity-prompts?)")
        d, se = paired_difference(c["diversity_per_prompt"], base["diversity_per_prompt"])
        out.append((method, d, se, len(c["diversity_per_prompt"])))
    return out


def at_best_reward(results: list[dict]) -> str:
    """Per method: the evaluation with the highest training reward after iteration 0, its gold score and
    diversity (Nabla-GFN's claim is about diversity at equal reward)."""
    lines = []
    for r in results:
        later = r["evals"][1:] or r["evals"]
        best = max(later, key=lambda e: e.get("eval/reward", float("-inf")))
        nan = float("nan")
        rew, div = best.get("eval/reward", nan), best.get("eval/diversity", nan)
        lines.append(
            f"- {r['method']} (seed {r.get('seed', 0)}): best training reward {rew:.3f} at iteration "
            f"{best['iteration']}, gold "
            f"{best['eval/score']:.3f}, diversity {div:.3f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """One panel per metric against the iteration, and a last one of diversity against the training reward
    (the claim's axes); one line per method and seed (PIL only)."""
    from PIL import Image, ImageDraw

    feature = feature_of(results)
    panels = [("iteration", key, f"{label} ({feature})" if key == "eval/diversity" else label)
              for key, label in METRICS]  # fmt: skip
    panels.append(("eval/reward", "eval/diversity", f"diversity ({feature}) against training reward"))
    w, h, pad = 360, 240, 36
    img = Image.new("RGB", (w * len(panels), h + 24), "white")
    d = ImageDraw.Draw(img)

    def span(key):
        vals = [e[key] for r in results for e in r["evals"] if key in e]
        if not vals:
            return None
        lo, hi = min(vals), max(vals)
        return lo, (hi if hi > lo else lo + 1e-6)

    for p, (xkey, key, label) in enumerate(panels):
        ys, xs = span(key), span(xkey)
        if ys is None or xs is None:
            continue
        (lo, hi), (xlo, xhi) = ys, xs
        x0 = p * w
        d.rectangle([x0 + pad, 20, x0 + w - 10, h - pad + 20], outline=(0, 0, 0))
        d.text((x0 + pad, 4), label, fill=(0, 0, 0))
        d.text((x0 + 2, 20), f"{hi:.2f}", fill=(0, 0, 0))
        d.text((x0 + 2, h - pad + 10), f"{lo:.2f}", fill=(0, 0, 0))
        right = f"it {xhi:.0f}" if xkey == "iteration" else f"{xhi:.2f}"
        d.text((x0 + w - 40, h - pad + 24), right, fill=(0, 0, 0))
        if xkey != "iteration":
            d.text((x0 + pad, h - pad + 24), f"{xlo:.2f}", fill=(0, 0, 0))
        for r in results:
            pts = [
                (x0 + pad + (w - pad - 10) * (e[xkey] - xlo) / (xhi - xlo),
                 20 + (h - pad) * (1 - (e[key] - lo) / (hi - lo)))
                for e in r["evals"] if key in e and xkey in e
            ]  # fmt: skip
            if len(pts) > 1:  # seed 0 thick, other seeds thin
                d.line(pts, fill=COLOURS[r["method"]], width=2 if r.get("seed", 0) == 0 else 1)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[r["method"]])
    for i, m in enumerate(dict.fromkeys(r["method"] for r in results)):
        d.text((pad + i * 110, h + 8), m, fill=COLOURS[m])
    img.save(path)


def parse_method_extra(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        method, sep, opts = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--method-extra: expected METHOD=OPTIONS, METHOD one of {', '.join(METHODS)}; "
                             f"got {item!r}")  # fmt: skip
        out.setdefault(method, []).extend(opts.split())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/rb_compare")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reward", default=None, help="the differentiable reward of every method (default: each "
                    "preset's, geneval_learned on the embedded default)")  # fmt: skip
    ap.add_argument("--extra", default="", help="options passed to every method, space separated")
    ap.add_argument("--method-extra", action="append", default=[], metavar="METHOD=OPTIONS",
                    help="options for one method only, space separated (repeatable)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=1, help="methods run at once")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="no training: the table, summaries and plot of earlier outputs")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name, val, low in (("--jobs", args.jobs, 1), ("--iters", args.iters, 1), ("--every", args.every, 1),
                           ("--eval-prompts", args.eval_prompts, 0)):
        if val < low:  # else the first method's CLI refuses it under its own option name
            zero = " (0: all)" if low == 0 else ""
            raise SystemExit(f"{name}: expected an integer >= {low}{zero}, got {val}")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: expected names from {', '.join(METHODS)}, got {m!r}")
    if len(set(methods)) != len(methods):
        raise SystemExit(f"--methods: expected each method once (they share --out), got {args.methods}")
    per_method = parse_method_extra(args.method_extra)
    if args.merge:
        results = []
        for d in args.merge:
            f = Path(d) / "results.json"
            if not f.is_file():
                raise SystemExit(f"--merge: expected {f} (an earlier --out), not found")
            results.extend(json.loads(f.read_text()))
    else:
        reward = ["--reward", args.reward] if args.reward else []
        jobs = [(m, [*reward, *args.extra.split(), *per_method.get(m, [])]) for m in methods]
        out.mkdir(parents=True, exist_ok=True)
        results = run_methods(jobs, out, args)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results) + "\n\n" + at_best_reward(results) + "\n\nAt equal training reward:\n"
    text += at_equal_reward(results) + "\n"
    (out / "table.md").write_text(text)
    if not args.merge:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "curves.png")
    print(text)
    print(f"plot: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
