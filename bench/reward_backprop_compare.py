"""DRaFT-1, AlignProp, ReFL and Nabla-GFlowNet on one budget on the embedded default: the learned reward, the
gold verifier score and the samples' diversity over training, as one table and one plot.

Each method runs through its own CLI (``python -m train.<method>``, its ``tiny`` preset: 16 samples per
iteration, reward ``geneval_learned``) for the same number of iterations with the same seed and evaluation
protocol (20-step DPM-Solver++ 2M, CFG-free); every evaluation logs ``eval/reward`` (the learned reward on
the held-out samples), ``eval/score`` (the GenEval-mini verifier, gold) and ``eval/diversity`` /
``eval/drift`` (train.diversity).  The table holds iteration 0 and the last evaluation; the plot one panel
per metric.  Nabla-GFlowNet's claim (arXiv 2412.07775) is that at equal reward its samples stay more diverse
than DRaFT's; the summary compares diversity at the evaluations where each method's learned reward is
highest.

    python -m bench.reward_backprop_compare --out runs/rb_compare --iters 20 --every 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("draft", "alignprop", "refl", "nabla_gfn")
METRICS = (("eval/reward", "learned reward (held-out)"), ("eval/score", "gold: GenEval-mini"),
           ("eval/diversity", "diversity"), ("eval/drift", "drift from base"))  # fmt: skip
COLOURS = {
    "draft": (200, 40, 40),
    "alignprop": (40, 120, 200),
    "refl": (40, 160, 60),
    "nabla_gfn": (150, 60, 170),
}


def run_method(method: str, out: Path, iters: int, every: int, prompts: int, seed: int, extra: list) -> dict:
    run = out / method
    cmd = [sys.executable, "-m", f"train.{method}", "--run-dir", str(run), "--overwrite", "--max-iters",
           str(iters), "--eval.every", str(every), "--eval.num-prompts", str(prompts), "--seed", str(seed),
           "--eval.num-steps", "20", "--eval.solver", "dpm2", "--eval.cfg-scale", "1", "--max-minutes", "600",
           "--log.progress", "false", "--log.checkpoint-every", str(iters), *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval/score" in r and "iteration" in r]
    if evals[-1]["iteration"] != iters:
        raise SystemExit(f"train.{method} stopped at iteration {evals[-1]['iteration']} of {iters}")
    return {"method": method, "wall_s": wall, "evals": evals, "cmd": " ".join(cmd[1:])}


def table(results: list[dict]) -> str:
    head = "| method | wall s | " + " | ".join(f"{label} (it 0 -> last)" for _, label in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for r in results:
        first, last = r["evals"][0], r["evals"][-1]
        cells = []
        for key, _ in METRICS:
            a, b = first.get(key), last.get(key)
            cells.append("n/a" if a is None or b is None else f"{a:.3f} -> {b:.3f}")
        lines.append(f"| {r['method']} | {r['wall_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_best_reward(results: list[dict]) -> str:
    """Per method: the evaluation with the highest learned reward after iteration 0, its gold score and
    diversity (Nabla-GFN's claim is about diversity at equal reward)."""
    lines = []
    for r in results:
        later = r["evals"][1:] or r["evals"]
        best = max(later, key=lambda e: e.get("eval/reward", float("-inf")))
        nan = float("nan")
        rew, div = best.get("eval/reward", nan), best.get("eval/diversity", nan)
        lines.append(
            f"- {r['method']}: best learned reward {rew:.3f} at iteration {best['iteration']}, gold "
            f"{best['eval/score']:.3f}, diversity {div:.3f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """One panel per metric, iteration on x, one line per method (PIL only)."""
    from PIL import Image, ImageDraw

    w, h, pad = 360, 240, 36
    img = Image.new("RGB", (w * len(METRICS), h + 24), "white")
    d = ImageDraw.Draw(img)
    x_max = max(e["iteration"] for r in results for e in r["evals"]) or 1
    for p, (key, label) in enumerate(METRICS):
        vals = [e[key] for r in results for e in r["evals"] if key in e]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-6
        x0 = p * w
        d.rectangle([x0 + pad, 20, x0 + w - 10, h - pad + 20], outline=(0, 0, 0))
        d.text((x0 + pad, 4), label, fill=(0, 0, 0))
        d.text((x0 + 2, 20), f"{hi:.2f}", fill=(0, 0, 0))
        d.text((x0 + 2, h - pad + 10), f"{lo:.2f}", fill=(0, 0, 0))
        d.text((x0 + w - 40, h - pad + 24), f"it {x_max}", fill=(0, 0, 0))
        for r in results:
            pts = [
                (x0 + pad + (w - pad - 10) * e["iteration"] / x_max,
                 20 + (h - pad) * (1 - (e[key] - lo) / (hi - lo)))
                for e in r["evals"] if key in e
            ]  # fmt: skip
            if len(pts) > 1:
                d.line(pts, fill=COLOURS[r["method"]], width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[r["method"]])
    for i, m in enumerate(METHODS):
        d.text((pad + i * 110, h + 8), m, fill=COLOURS[m])
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/rb_compare")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--extra", default="", help="options passed to every method, space separated")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for m in args.methods.split(","):
        if m not in METHODS:
            raise SystemExit(f"--methods: expected names from {', '.join(METHODS)}, got {m!r}")
        extra = args.extra.split()
        results.append(run_method(m, out, args.iters, args.every, args.eval_prompts, args.seed, extra))
        print(f"{m}: {results[-1]['wall_s']:.0f} s", flush=True)
    text = table(results) + "\n\n" + at_best_reward(results) + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "curves.png")
    print(text)
    print(f"plot: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
