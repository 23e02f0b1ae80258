"""Head-to-head: DiffusionNFT against Flow-GRPO on the embedded default, same reward, seed, evaluation and
training-time budget (issue 5).

Three runs, one after another as subprocesses (so they never compete for cores), each with its module's
``tiny`` preset (the reference hyperparameters scaled to the embedded default):

* ``nft-dpm2``      ``python -m train.nft`` (rollouts with the DPM-Solver++ 2M ODE, the default);
* ``nft-flow-sde``  ``python -m train.nft --sample.solver flow-sde`` (rollouts with Flow-GRPO's SDE);
* ``grpo``          ``python -m train.grpo`` (Flow-GRPO: cps rollouts in its tiny preset, PPO clip, KL to the
  reference).

All three get the same ``--reward``, ``--seed``, ``--device`` and identical ``--eval.*`` options (held-out
prompts, ODE solver and steps, CFG scale of the base-model evaluation, evaluation interval), so every score is
the same measurement: GenEval-mini's strict held-out score, CFG-free, eval-EMA weights, fixed seeds.

The budget is training time.  Each run trains until its cumulative ``train/iter_s`` (rollout + reward +
update, from ``metrics.jsonl``; evaluation and checkpoints excluded) reaches ``--minutes``; the harness then
sends the run SIGINT, which the loops treat as Ctrl-C: finish the iteration (or drop its rollout),
checkpoint, exit with code 3; the harness then resumes the run at that iteration for its final evaluation.  A
run may so train one iteration past the budget; its actual training seconds are reported.  Evaluation is
excluded because it is identical work for every method but is scheduled in iterations, so a method with cheap
iterations evaluates more often; the curves are given against total elapsed seconds as well.
``--max-minutes`` (a wall-clock cap on each invocation) is only a safety net; a run it stopped says so
(``stop_reason``).

Reported per run: the held-out score curve (iteration, elapsed seconds, training seconds, strict score,
partial score, per task type), final and best score, the training seconds (and iterations) to reach
``--target``, a relative target (the base model's CFG-free score + ``--relative-delta``) and the slower
method's best score (the lower of Flow-GRPO's and DiffusionNFT's best: the paper's measure), ``null`` when
not reached; across runs, the ratio of Flow-GRPO's time to DiffusionNFT's (dpm2) where both reached a target,
DiffusionNFT dpm2 against flow-sde, and each CFG-free result against the base model with CFG
(``eval/base_cfg/score`` at iteration 0).  Every run is evaluated on the same held-out prompts and noise, so
the scores are also compared image by image from the evaluations' records (docs/math.md §9.2, paired
differences): each run's final score against its iteration 0 (its learning-rate-0 control), and each pair of
runs' final scores, each with its paired standard error.

Writes ``<out-dir>/headtohead-<device>.json`` (``-quick`` added with ``--quick``) and a PNG of the score
against training seconds and against iterations (drawn with PIL).

Run: ``python -m bench.headtohead --minutes 9 --threads 1``; ``--quick`` is the CI smoke run; ``--replot
results.json`` redraws the PNG of a results file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import _common

ROOT = _common.ROOT
INTERRUPTED_EXIT = 3  # a train.* loop stopped by a signal, checkpoint written (train/loop.py)


@dataclass(frozen=True)
class RunSpec:
    name: str
    module: str
    extra: tuple[str, ...] = ()
    label: str = ""


RUNS = (
    RunSpec("nft-dpm2", "train.nft", (), "DiffusionNFT (dpm2 ODE rollouts)"),
    RunSpec("nft-flow-sde", "train.nft", ("--sample.solver", "flow-sde"), "DiffusionNFT (flow-sde rollouts)"),
    RunSpec("grpo", "train.grpo", (), "Flow-GRPO (cps, its tiny preset)"),
)
NFT, NFT_SDE, GRPO = (r.name for r in RUNS)

# --quick: the same three runs, shrunk so that all of them take seconds (CI)
QUICK_OVERRIDES = (
    ("--eval.num-prompts", "12"),
    ("--eval.every", "1"),
    ("--eval.grid-images", "4"),
    ("--sample.prompts-per-iter", "2"),
    ("--sample.images-per-prompt", "2"),
    ("--train.batch-size", "4"),
)
QUICK_MAX_ITERS = 2
FULL_MAX_ITERS = 1_000_000  # never the binding stop: the budget is


class HeadToHeadError(RuntimeError):
    """A run failed or produced no usable metrics."""


# ------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------
def _number(kind, *, lo=None, lo_inclusive=False):
    def parse(text):
        what = "an integer" if kind is int else "a number"
        if lo is not None:
            what += f" {'>=' if lo_inclusive else '>'} {lo:g}"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if lo is not None and (value < lo if lo_inclusive else value <= lo):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _device(text):
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.headtohead",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    p.add_argument(
        "--minutes",
        type=_number(float, lo=0),
        default=9.0,
        help="training-time budget of each run, in minutes of cumulative train/iter_s (default 9)",
    )
    p.add_argument(
        "--target", type=_number(float), default=0.7, help="absolute held-out score target (default 0.7)"
    )
    p.add_argument(
        "--relative-delta",
        type=_number(float, lo=0),
        default=0.05,
        help="relative target: the base model's CFG-free score plus this (default 0.05)",
    )
    p.add_argument("--seed", type=_number(int, lo=0, lo_inclusive=True), default=0, help="seed of every run")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--reward", default="geneval_mini", help="reward of every run (default geneval_mini)")
    p.add_argument(
        "--threads",
        type=_number(int, lo=1, lo_inclusive=True),
        default=None,
        help="torch threads of each run (OMP_NUM_THREADS; default: this process's torch.get_num_threads())",
    )
    p.add_argument(
        "--eval-every",
        type=_number(int, lo=1, lo_inclusive=True),
        default=5,
        help="iterations between evaluations, the same for every run (default 5)",
    )
    p.add_argument(
        "--eval-prompts",
        type=_number(int, lo=0, lo_inclusive=True),
        default=0,
        help="held-out prompts per evaluation, the same for every run (0: all; default 0)",
    )
    p.add_argument(
        "--eval-steps", type=_number(int, lo=1, lo_inclusive=True), default=10, help="eval dpm2 steps (10)"
    )
    p.add_argument(
        "--max-minutes",
        type=_number(float, lo=0),
        default=None,
        help="safety cap on each invocation's wall clock (default: 3 x --minutes + 5)",
    )
    p.add_argument("--out-dir", default=str(_common.RESULTS_DIR), help="where the JSON and PNG go")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2 iterations of tiny batches per run")
    p.add_argument("--keep-runs", default=None, metavar="DIR", help="keep the run directories under DIR")
    p.add_argument(
        "--replot",
        default=None,
        metavar="JSON",
        help="only redraw the PNG of an existing results file (next to it) and print its summary",
    )
    p.add_argument(
        "--runs",
        default=",".join(r.name for r in RUNS),
        help=f"comma-separated subset of {', '.join(r.name for r in RUNS)} (default: all)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    known = [r.name for r in RUNS]
    bad = [n for n in names if n not in known]
    if bad or not names:
        parser.error(f"--runs: expected names from {', '.join(known)}, got {args.runs!r}")
    args.runs = [r for r in RUNS if r.name in names]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device: expected a machine with CUDA for 'cuda', found none")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out-dir: expected a directory, got the file {str(out_dir)!r}")
    if args.keep_runs is not None:
        keep = Path(args.keep_runs)
        if keep.exists() and not keep.is_dir():
            parser.error(f"--keep-runs: expected a directory, got the file {str(keep)!r}")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.max_minutes is None:
        args.max_minutes = 3 * args.minutes + 5
    return args


# ------------------------------------------------------------------------------------------------------------
# Curves and summary numbers (pure functions of metrics.jsonl rows)
# ------------------------------------------------------------------------------------------------------------
def _is_task_key(key: str) -> bool:
    """``eval/<task>`` for a GenEval-mini task type (not the reward, gold, diversity or drift columns)."""
    from train.data.geneval_mini import TASKS

    return key.startswith("eval/") and key[len("eval/") :] in TASKS


def curve_from_metrics(rows: list[dict]) -> list[dict]:
    """Evaluation points of a run, in order: ``iteration``, ``elapsed_s`` (wall clock of the invocation when
    the evaluation finished), ``train_s`` (cumulative ``train/iter_s`` up to and including that iteration),
    ``score``, ``score_partial`` and ``tasks`` (score per task type)."""
    train_s_at: dict[int, float] = {0: 0.0}
    total = 0.0
    for row in sorted((r for r in rows if "train/iter_s" in r), key=lambda r: r["iteration"]):
        total += float(row["train/iter_s"])
        train_s_at[int(row["iteration"])] = total
    curve = []
    for row in rows:
        if "eval/score" not in row:
            continue
        it = int(row["iteration"])
        done = [t for i, t in train_s_at.items() if i <= it]
        curve.append(
            {
                "iteration": it,
                "elapsed_s": float(row["elapsed_s"]),
                "train_s": round(max(done) if done else 0.0, 3),
                "score": float(row["eval/score"]),
                "score_partial": row.get("eval/score_partial"),
                "tasks": {k[len("eval/") :]: v for k, v in row.items() if _is_task_key(k)},
            }
        )
    return curve


def base_cfg_from_metrics(rows: list[dict]) -> dict | None:
    """The base model's CFG evaluation, logged with iteration 0's evaluation: ``score``, ``score_partial``,
    ``tasks``; ``None`` if absent."""
    for row in rows:
        if "eval/base_cfg/score" in row:
            prefix = "eval/base_cfg/"
            vals = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            return {
                "score": float(vals["score"]),
                "score_partial": vals.get("score_partial"),
                "tasks": {k: v for k, v in vals.items() if _is_task_key(f"eval/{k}")},
            }
    return None


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """The first evaluation whose score is >= ``target``: its ``train_s``, ``elapsed_s``, ``iteration`` and
    ``score``; ``None`` when no evaluation reached it.  Resolution is the evaluation interval."""
    for p in curve:
        if p["score"] >= target:
            return {k: p[k] for k in ("train_s", "elapsed_s", "iteration", "score")}
    return None


def time_ratio(slow: dict | None, fast: dict | None, key: str = "train_s") -> float | None:
    """``slow[key] / fast[key]`` (e.g. Flow-GRPO's training seconds to a target over DiffusionNFT's); ``None``
    unless both reached the target and the denominator is positive (reached at iteration 0: no ratio)."""
    if slow is None or fast is None or not fast[key] > 0:
        return None
    return slow[key] / fast[key]


def run_summary(curve: list[dict], targets: dict[str, float]) -> dict:
    """Final and best evaluation of a curve and the time to each named target."""
    if not curve:
        raise HeadToHeadError("no evaluation in metrics.jsonl")
    final = curve[-1]
    best = max(curve, key=lambda p: (p["score"], -p["iteration"]))
    pick = ("iteration", "train_s", "elapsed_s", "score", "score_partial")
    return {
        "iterations": final["iteration"],
        "train_s": final["train_s"],
        "s_per_iter": final["train_s"] / final["iteration"] if final["iteration"] else None,
        "evaluations": len(curve),
        "score_iter0": curve[0]["score"] if curve[0]["iteration"] == 0 else None,
        "final": {k: final[k] for k in pick},
        "best": {k: best[k] for k in pick},
        "time_to_target": {name: time_to_target(curve, value) for name, value in targets.items()},
    }


def compare(a_name: str, a: dict, b_name: str, b: dict, targets: dict[str, float]) -> dict:
    """Two run summaries side by side: final and best score and, per target, both runs' training seconds to it
    and the ratios ``a / b`` of training seconds, elapsed seconds and iterations (``None`` unless both got
    there)."""
    out = {
        "ratio": f"{a_name} / {b_name}",
        "final_score": {a_name: a["final"]["score"], b_name: b["final"]["score"]},
        "best_score": {a_name: a["best"]["score"], b_name: b["best"]["score"]},
        "time_to_target": {},
    }
    for name in targets:
        ta, tb = a["time_to_target"][name], b["time_to_target"][name]
        out["time_to_target"][name] = {
            "target": targets[name],
            "train_s": {
                a_name: None if ta is None else ta["train_s"],
                b_name: None if tb is None else tb["train_s"],
            },
            "ratio_train_s": time_ratio(ta, tb, "train_s"),
            "ratio_elapsed_s": time_ratio(ta, tb, "elapsed_s"),
            "ratio_iterations": time_ratio(ta, tb, "iteration"),
        }
    return out


PAIRED_COLUMNS = ("strict", "partial")


def _change(before: dict, after: dict) -> dict:
    from train.evaluation import paired_score_change  # torch and the loops: only when records are read

    out = {}
    for column in PAIRED_COLUMNS:
        mean, se = paired_score_change(before, after, column)
        # a task type with one image has no variance estimate: no standard error (JSON has no NaN)
        out[column] = {"mean": mean, "se": se if math.isfinite(se) else None}
    return out


def paired_summary(records: dict[str, dict]) -> dict | None:
    """docs/math.md §9.2: ``records``: run name -> ``{"first": record, "final": record}`` (the evaluation
    records of its iteration 0 and of its last evaluation; ``None`` where missing).  Returns each run's
    ``change_from_iteration_0`` and, for each pair of runs in order, ``final_difference`` (``"a - b"``: a's
    final score minus b's), the strict and partial scores' mean paired change and standard error; ``None``
    when there is neither (no run with both records, fewer than two with a final one).  The runs share the
    held-out prompts and seeds (``paired_score_change`` refuses them otherwise)."""
    change = {
        name: _change(r["first"], r["final"])
        for name, r in records.items()
        if r.get("first") is not None and r.get("final") is not None
    }
    finals = [(name, r["final"]) for name, r in records.items() if r.get("final") is not None]
    diffs = {
        f"{a} - {b}": _change(rb, ra)
        for i, (a, ra) in enumerate(finals)
        for b, rb in finals[i + 1 :]
    }
    if not change and not diffs:
        return None
    return {"change_from_iteration_0": change, "final_difference": diffs}


def summarize(
    runs: dict[str, dict], target: float, relative_delta: float, records: dict[str, dict] | None = None
) -> dict:
    """``runs``: name -> ``{"curve": [...], "base_cfg": {...}}``.  Adds each run's ``summary`` in place and
    returns the cross-run summary (targets, GRPO vs NFT, NFT dpm2 vs flow-sde, CFG-free vs base CFG, and with
    ``records`` (see :func:`paired_summary`) the paired score changes)."""
    first = next(iter(runs.values()))
    base_free = first["curve"][0]["score"] if first["curve"] and first["curve"][0]["iteration"] == 0 else None
    base_cfg = first.get("base_cfg")
    targets = {"absolute": target}
    if base_free is not None:
        targets["relative"] = round(base_free + relative_delta, 6)
    if GRPO in runs and NFT in runs and runs[GRPO]["curve"] and runs[NFT]["curve"]:
        # the paper's measure (DiffusionNFT, arXiv 2509.16117): the training time each method needs to
        # reach the slower method's best score
        targets["slower_best"] = min(max(p["score"] for p in runs[n]["curve"]) for n in (GRPO, NFT))
    for run in runs.values():
        run["summary"] = run_summary(run["curve"], targets)
    out = {
        "targets": targets,
        "relative_target_rule": f"base model CFG-free score ({base_free}) + {relative_delta}",
        "base": {
            "cfg_free_score": base_free,
            "cfg_free_score_per_run": {n: r["summary"]["score_iter0"] for n, r in runs.items()},
            "cfg_score": None if base_cfg is None else base_cfg["score"],
            "cfg_tasks": None if base_cfg is None else base_cfg["tasks"],
        },
        "runs": {
            n: {
                "iterations": r["summary"]["iterations"],
                "train_s": r["summary"]["train_s"],
                "final_score": r["summary"]["final"]["score"],
                "best_score": r["summary"]["best"]["score"],
                "time_to_target_train_s": {
                    k: (None if v is None else v["train_s"])
                    for k, v in r["summary"]["time_to_target"].items()
                },
            }
            for n, r in runs.items()
        },
    }
    if GRPO in runs and NFT in runs:
        out["grpo_vs_nft"] = compare(GRPO, runs[GRPO]["summary"], NFT, runs[NFT]["summary"], targets)
    if NFT_SDE in runs and NFT in runs:
        out["nft_flow_sde_vs_dpm2"] = compare(
            NFT_SDE, runs[NFT_SDE]["summary"], NFT, runs[NFT]["summary"], targets
        )
    if base_cfg is not None:
        out["cfg_free_vs_base_cfg"] = {
            n: {
                "final_minus_base_cfg": r["summary"]["final"]["score"] - base_cfg["score"],
                "best_minus_base_cfg": r["summary"]["best"]["score"] - base_cfg["score"],
            }
            for n, r in runs.items()
        }
    if records:
        out["paired"] = paired_summary(records)
    return out


# ------------------------------------------------------------------------------------------------------------
# Running the loops
# ------------------------------------------------------------------------------------------------------------
def run_command(spec: RunSpec, args, run_dir: Path) -> list[str]:
    """The exact command line of one run (without the environment)."""
    opts = {
        "--preset": "tiny",
        "--reward": args.reward,
        "--seed": str(args.seed),
        "--device": args.device,
        "--threads": str(args.threads),  # the loops' own option; the tiny presets would otherwise use 1
        "--train-threads": str(args.threads),  # the same in training (train.nft's tiny preset would use 2)
        "--run-dir": str(run_dir),
        "--max-minutes": f"{args.max_minutes:g}",
        "--max-iters": str(QUICK_MAX_ITERS if args.quick else FULL_MAX_ITERS),
        # identical evaluation for every run (the presets differ: train.grpo's tiny one evaluates 20 steps)
        "--eval.solver": "dpm2",
        "--eval.num-steps": str(args.eval_steps),
        "--eval.cfg-scale": "1",  # the runs are scored CFG-free; the base model once with CFG 4.5
        "--eval.base-cfg-scale": "4.5",
        "--eval.images-per-prompt": "1",
        "--eval.every": str(args.eval_every),
        "--eval.num-prompts": str(args.eval_prompts),
        "--log.progress": "false",
    }
    if args.quick:
        opts.update(QUICK_OVERRIDES)
        if spec.module == "train.nft":  # 4 images per iteration: the tiny preset's 8 steps do not divide them
            opts["--train.steps-per-iter"] = "1"
    cmd = [sys.executable, "-m", spec.module, *spec.extra]
    for opt, val in opts.items():
        cmd += [opt, val]
    return cmd


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_rows(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete lines of ``metrics.jsonl`` from byte ``offset`` on -> ``(rows, new offset)``."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(ln) for ln in data[:end].decode().splitlines() if ln.strip()]
    return rows, offset + end


def execute(spec: RunSpec, cmd: list[str], env: dict, run_dir: Path, budget_s: float, max_iters: int) -> dict:
    """Run one loop to its training-time budget.  Its output goes to ``<run_dir>.log`` and, prefixed, to this
    process's stdout; returns the stop reason, exit code and wall seconds."""
    log_path = run_dir.with_suffix(".log")
    metrics_path = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    train_s, offset, last_iter, signalled = 0.0, 0, 0, False
    saw_max_minutes = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C at the terminal reaches this process only; it forwards one
        )
        try:
            for line in proc.stdout:
                log.write(line)
                print(f"[{spec.name}] {line}", end="", flush=True)
                saw_max_minutes |= line.startswith("stopping: --max-minutes")
                rows, offset = _read_rows(metrics_path, offset)
                for row in rows:
                    if "train/iter_s" in row:
                        train_s += float(row["train/iter_s"])
                        last_iter = int(row["iteration"])
                # the loop only traps SIGINT while iterating: past max_iters it has already left the loop
                if not signalled and train_s >= budget_s and last_iter < max_iters:
                    proc.send_signal(signal.SIGINT)
                    signalled = True
            rc = proc.wait()
            if signalled and rc == INTERRUPTED_EXIT:
                # the loop stops on SIGINT without an off-schedule evaluation; resumed at the iteration it
                # reached, it adds the run's final one and exits 0
                rows, offset = _read_rows(metrics_path, offset)
                last_iter = max([last_iter] + [int(r["iteration"]) for r in rows if "train/iter_s" in r])
                fin = subprocess.run(
                    [*cmd, "--resume", str(run_dir), "--max-iters", str(last_iter)],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                log.write(fin.stdout)
                print("".join(f"[{spec.name}] {ln}" for ln in fin.stdout.splitlines(keepends=True)), end="")
                rc = fin.returncode
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # the loop checkpoints and exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    wall_s = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise HeadToHeadError(
            f"{spec.name}: `{shlex.join(cmd)}` exited with code {rc}; log {log_path}, last lines:\n{tail}"
        )
    stop = "budget" if signalled else ("max-minutes" if saw_max_minutes else "max-iters")
    return {"stop_reason": stop, "returncode": rc, "wall_s": round(wall_s, 1), "log": str(log_path)}


def device_slug(device: str) -> str:
    """``cpu``, or the CUDA device name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-").lower()


def _record(run_dir: Path, iteration: int) -> dict | None:
    """The evaluation record of ``iteration`` (``None`` if the run wrote none: the summary then leaves that
    run's paired changes out rather than lose the run)."""
    from train.evaluation import read_record

    try:
        return read_record(run_dir, iteration)
    except FileNotFoundError as e:
        print(f"warning: {e}; its paired changes are left out", file=sys.stderr)
        return None


def run_all(args) -> dict:
    """Run every requested loop and return the results document (not yet written)."""
    env = child_env(args.threads)
    budget_s = args.minutes * 60
    max_iters = QUICK_MAX_ITERS if args.quick else FULL_MAX_ITERS
    keep = args.keep_runs is not None
    root = Path(args.keep_runs) if keep else Path(tempfile.mkdtemp(prefix="headtohead-"))
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    records: dict[str, dict] = {}
    try:
        for spec in args.runs:
            run_dir = root / spec.name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cmd = run_command(spec, args, run_dir)
            shown = f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} " + shlex.join(
                ["python", *cmd[1:]]
            )
            print(f"== {spec.name}: {shown}", flush=True)
            load_start = os.getloadavg()[0]  # other work on the machine skews the timings: say so
            info = execute(spec, cmd, env, run_dir, budget_s, max_iters)
            info["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
            rows = _read_rows(run_dir / "metrics.jsonl", 0)[0]
            curve = curve_from_metrics(rows)
            if not curve:
                raise HeadToHeadError(f"{spec.name}: no evaluation in {run_dir / 'metrics.jsonl'}")
            runs[spec.name] = {
                "label": spec.label,
                "command": shown,
                "run_dir": str(run_dir) if keep else None,
                **info,
                "elapsed_s": max(r["elapsed_s"] for r in rows),
                "base_cfg": base_cfg_from_metrics(rows),
                "curve": curve,
            }
            records[spec.name] = {
                "first": _record(run_dir, 0) if curve[0]["iteration"] == 0 else None,
                "final": _record(run_dir, curve[-1]["iteration"]),
            }
            if not keep:
                runs[spec.name]["log"] = None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarize(runs, args.target, args.relative_delta, records)
    quick = dict(QUICK_OVERRIDES)
    env_info = _common.environment()
    return {
        "benchmark": "headtohead",
        "date": env_info["date"],
        "git_commit": env_info["git_commit"],
        "device": device_slug(args.device),
        "threads": args.threads,
        "environment": env_info,
        "quick": args.quick,
        "command": shlex.join(["python", "-m", "bench.headtohead", *args.argv]),
        "budget": {
            "train_minutes_per_run": args.minutes,
            "train_s_per_run": budget_s,
            "enforced_on": "cumulative train/iter_s (rollout + reward + update; evaluation excluded): the "
            "harness sends SIGINT once it is reached, the loop finishes that iteration (or drops its "
            "rollout), checkpoints and exits; the harness resumes it at that iteration for its final "
            "evaluation",
            "max_minutes_cap": args.max_minutes,
            "max_iters": max_iters,
        },
        "settings": {
            "seed": args.seed,
            "reward": args.reward,
            "preset": "tiny",
            "eval": {
                "solver": "dpm2",
                "num_steps": args.eval_steps,
                "every": int(quick["--eval.every"]) if args.quick else args.eval_every,
                "num_prompts": int(quick["--eval.num-prompts"]) if args.quick else args.eval_prompts,
                "images_per_prompt": 1,
                "cfg_scale_base": 4.5,
            },
            "quick_overrides": quick if args.quick else None,
        },
        "summary": summary,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------------------
# The plot (PIL only; matplotlib is not a dependency)
# ------------------------------------------------------------------------------------------------------------
COLORS = {NFT: (31, 119, 180), NFT_SDE: (255, 127, 14), GRPO: (44, 160, 44)}
_EXTRA_COLORS = ((148, 103, 189), (140, 86, 75), (227, 119, 194))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``: about ``n`` of them, steps of 1, 2 or 5 x 10^k."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


DASHES = {"solid": None, "dashed": (10, 6), "dotted": (3, 4)}


def _styled_line(draw, p0, p1, fill, style, width=2):
    if DASHES[style] is None:
        draw.line([p0, p1], fill, width)
    else:
        _dashed(draw, p0, p1, fill, width, *DASHES[style])


def _dashed(draw, p0, p1, fill, width=2, dash=8, gap=6):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    pos = 0.0
    while pos < length:
        end = min(pos + dash, length)
        a, b = pos / length, end / length
        seg = [(x0 + (x1 - x0) * f, y0 + (y1 - y0) * f) for f in (a, b)]
        draw.line(seg, fill, width)
        pos = end + gap


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-9 else "0"


def _panel(draw, box, series, xkey, xlabel, ylim, hlines, fonts, title):
    """One axes: ``series`` = [(label, color, [(x, y), ...])], ``hlines`` = [(label, color, y, style)]."""
    font, small = fonts
    left, top, right, bottom = box
    xmax = max([x for _, _, pts in series for x, _ in pts] + [1e-9])
    xticks = nice_ticks(0.0, xmax)
    yticks = nice_ticks(*ylim)
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for t in yticks:
        _, py = px(x0, t)
        draw.line([(left, py), (right, py)], (232, 232, 232), 1)
        draw.text((left - 8, py), _fmt_tick(t), (0, 0, 0), small, anchor="rm")
    for t in xticks:
        qx, _ = px(t, y0)
        draw.line([(qx, top), (qx, bottom)], (232, 232, 232), 1)
        draw.text((qx, bottom + 8), _fmt_tick(t), (0, 0, 0), small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0), width=1)
    for _, color, y, style in hlines:
        if y0 <= y <= y1:
            _styled_line(draw, px(x0, y), px(x1, y), color, style)
    for _, color, pts in series:
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, color, 3, joint="curve")
        for qx, qy in xy:
            draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=color)
    draw.text(((left + right) / 2, bottom + 34), xlabel, (0, 0, 0), font, anchor="mt")
    draw.text(((left + right) / 2, top - 12), title, (0, 0, 0), font, anchor="ms")


def write_plot(doc: dict, path: Path) -> Path:
    """Held-out score against training seconds (left) and iterations (right), one line per run, the base model
    with CFG and the relative target as horizontal lines."""
    from PIL import Image, ImageDraw

    runs = doc["runs"]
    summary = doc["summary"]
    width, height = 1500, 720
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    fonts = (_font(18), _font(15))
    colors = {}
    for i, name in enumerate(runs):
        colors[name] = COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])
    hlines = []
    base_cfg = summary["base"].get("cfg_score")
    if base_cfg is not None:
        hlines.append((f"base model, CFG 4.5 ({base_cfg:.3f})", (90, 90, 90), base_cfg, "dashed"))
    rel = summary["targets"].get("relative")
    if rel is not None:
        hlines.append((f"relative target ({rel:.3f})", (214, 39, 40), rel, "dotted"))
    ys = [p["score"] for r in runs.values() for p in r["curve"]] + [h[2] for h in hlines]
    absolute = summary["targets"]["absolute"]
    lo, hi = min(ys), max(ys)
    pad = max(0.01, 0.08 * (hi - lo))
    if lo - pad <= absolute <= hi + 3 * pad:  # drawn only when it does not squash the curves
        hlines.append((f"target {absolute:g}", (214, 39, 40), absolute, "solid"))
        lo, hi = min(lo, absolute), max(hi, absolute)
    ylim = (max(0.0, lo - pad), min(1.0, hi + pad) if hi + pad > lo - pad else lo + 0.1)
    for key, xlabel, box, title in (
        ("train_s", "training seconds (cumulative train/iter_s, evaluation excluded)", (90, 80, 720, 540),
         "held-out score vs training time"),
        ("iteration", "iteration", (840, 80, 1470, 540), "held-out score vs iterations"),
    ):  # fmt: skip
        series = [(n, colors[n], [(p[key], p["score"]) for p in r["curve"]]) for n, r in runs.items()]
        _panel(draw, box, series, key, xlabel, ylim, hlines, fonts, title)
    label = Image.new("RGB", (300, 30), (255, 255, 255))
    ImageDraw.Draw(label).text((150, 15), "held-out score", (0, 0, 0), fonts[0], anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, 310 - 150))
    # legend
    env = doc.get("environment", {})

    def reached(r):
        t = r["time_to_target_train_s"].get("relative")
        return "relative target not reached" if t is None else f"relative target at {t:.0f} s"

    columns = (
        [
            (f"{runs[n].get('label') or n}: final {r['final_score']:.3f}, best {r['best_score']:.3f}, "
             f"{r['iterations']} it, {reached(r)}", colors[n], None)
            for n, r in summary["runs"].items()
        ],
        [(label, color, style) for label, color, _, style in hlines],
    )  # fmt: skip
    for x, entries in zip((90, 1040), columns, strict=True):
        for row, (label, color, style) in enumerate(entries):
            yy = 630 + row * 26
            if style:
                _styled_line(draw, (x, yy), (x + 40, yy), color, style)
            else:
                draw.line([(x, yy), (x + 40, yy)], color, 3)
                draw.ellipse([x + 16, yy - 4, x + 24, yy + 4], fill=color)
            draw.text((x + 52, yy), label, (0, 0, 0), fonts[1], anchor="lm")
    minutes = doc["budget"]["train_minutes_per_run"]
    caption = (
        f"GenEval-mini strict held-out score (CFG-free, dpm2 {doc['settings']['eval']['num_steps']} steps), "
        f"{doc['device']}, {doc['threads']} thread(s), {minutes:g} min training per run, "
        f"seed {doc['settings']['seed']}{', QUICK' if doc.get('quick') else ''}"
        f" -- {env.get('git_commit', '')[:12]} {doc.get('date', '')[:10]}"
    )
    draw.text((width / 2, 20), caption, (0, 0, 0), fonts[1], anchor="mt")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------------------------
def results_stem(doc: dict) -> str:
    return f"headtohead-{doc['device']}" + ("-quick" if doc.get("quick") else "")


def write_results(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results_stem(doc)}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    return json_path, write_plot(doc, out_dir / f"{results_stem(doc)}.png")


def _s(value, unit="s") -> str:
    return "not reached" if value is None else f"{value:.0f} {unit}"


def _r(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report(doc: dict) -> str:
    """A plain-text summary of the results document."""
    s = doc["summary"]
    t = s["targets"]
    minutes = doc["budget"]["train_minutes_per_run"]
    lines = [
        f"head-to-head on {doc['device']}, {doc['threads']} thread(s), {minutes:g} min training per run, "
        f"seed {doc['settings']['seed']}",
        f"base model: CFG-free {s['base']['cfg_free_score']}, CFG 4.5 {s['base']['cfg_score']}",
        f"targets: absolute {t['absolute']:g}, relative {t.get('relative')}, the slower method's best "
        f"{t.get('slower_best')}",
        f"{'run':<14}{'iters':>7}{'train s':>9}{'final':>8}{'best':>8}"
        + "".join(f"{'to ' + k:>16}" for k in t),
    ]
    for name, r in s["runs"].items():
        lines.append(
            f"{name:<14}{r['iterations']:>7}{r['train_s']:>9.0f}{r['final_score']:>8.3f}{r['best_score']:>8.3f}"
            + "".join(f"{_s(r['time_to_target_train_s'][k]):>16}" for k in t)
        )
    for key, title in (("grpo_vs_nft", "Flow-GRPO / NFT"), ("nft_flow_sde_vs_dpm2", "NFT flow-sde / dpm2")):
        if key in s:
            ratios = ", ".join(f"{k} {_r(v['ratio_train_s'])}" for k, v in s[key]["time_to_target"].items())
            lines.append(f"{title} training time to target: {ratios}")
    paired = s.get("paired")
    if paired:
        lines.append("paired on the same held-out prompts and noise (strict score, standard error):")
        for name, c in paired["change_from_iteration_0"].items():
            lines.append(f"  {name}: final - iteration 0 {_pm(c['strict'])}")
        for pair, c in paired["final_difference"].items():
            lines.append(f"  final, {pair}: {_pm(c['strict'])}")
    return "\n".join(lines)


def _pm(v: dict) -> str:
    return f"{v['mean']:+.3f} ({'n/a' if v['se'] is None else format(v['se'], '.3f')})"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        src = Path(args.replot)
        if not src.is_file():
            print(f"error: --replot: expected a results JSON file, got {str(src)!r}", file=sys.stderr)
            return 2
        doc = json.loads(src.read_text())
        print(report(doc))
        print(f"plot written to {write_plot(doc, src.with_suffix('.png'))}")
        return 0
    try:
        doc = run_all(args)
    except HeadToHeadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    json_path, png_path = write_results(doc, Path(args.out_dir))
    print(report(doc))
    print(f"results written to {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
