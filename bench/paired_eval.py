"""Paired comparison of two evaluations from their records (``samples/iter_XXXXXX.json``, math.md §9.2).

Evaluations of one seed sample the same held-out and diversity prompts from the same noise, so the
difference between two of them (a run's iteration 0, its learning-rate-0 control, and a later one; or two
runs of one seed) is read image by image and prompt by prompt, and its standard error leaves out the spread
between prompts that both share:

    python -m bench.paired_eval RUN                      # RUN's iteration 0 -> its last evaluation
    python -m bench.paired_eval RUN --to 10              # iteration 0 -> 10
    python -m bench.paired_eval RUN_A RUN_B --to 20      # RUN_A -> RUN_B, both at iteration 20

For every score column both records hold (``strict`` is GenEval-mini's score on the embedded default,
``partial`` its partial score, ``reward/NAME`` the training reward's parts, ``gold/NAME`` the gold rewards)
it prints the two means, the paired change and its standard error (train.evaluation.paired_score_change);
for ``strict``, how many images went from failing to passing and back; and the paired change of the
diversity (per prompt) and of the drift (per image) when both records have them.  ``--json FILE`` writes the
same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench._common import check_json_path
from train.diversity import paired_difference
from train.evaluation import paired_score_change, read_record, record_mean


def iterations(run: Path) -> list[int]:
    """The iterations of ``run``'s evaluation records, in order."""
    found = sorted(int(p.stem[len("iter_") :]) for p in (run / "samples").glob("iter_[0-9]*.json")
                   if p.stem[len("iter_") :].isdigit())  # fmt: skip
    if not found:
        raise SystemExit(f"expected evaluation records (samples/iter_XXXXXX.json) in {run}, found none")
    return found


def compare(before: dict, after: dict) -> dict:
    """Every shared column's means, paired change and standard error; the strict column's flips; the paired
    diversity and drift changes."""
    out = {"columns": {}}
    for col in before["columns"]:
        if col not in after["columns"]:
            continue
        a, b = before["columns"][col], after["columns"][col]
        change, se = paired_score_change(before, after, col)
        means = {"before": record_mean(before, col), "after": record_mean(after, col)}
        out["columns"][col] = {**means, "change": change, "se": se}
        if col == "strict":
            out["fail_to_pass"] = sum(1 for x, y in zip(a, b, strict=True) if y > x)
            out["pass_to_fail"] = sum(1 for x, y in zip(a, b, strict=True) if y < x)
    for key in ("diversity", "drift"):
        if key in before and key in after and len(before[key]) == len(after[key]):
            if key == "diversity" and before.get("diversity_prompts") != after.get("diversity_prompts"):
                raise SystemExit("expected two evaluations of the same diversity prompts, got different ones")
            change, se = paired_difference(after[key], before[key])
            means = {k: sum(r[key]) / len(r[key]) for k, r in (("before", before), ("after", after))}
            out[key] = {**means, "change": change, "se": se}
    return out


def report(res: dict, what: str) -> str:
    lines = [what, "| value | before | after | paired change | se |", "|---|---|---|---|---|"]
    rows = [*res["columns"].items(), *((k, res[k]) for k in ("diversity", "drift") if k in res)]
    for name, v in rows:
        cells = f"{v['before']:.4f} | {v['after']:.4f} | {v['change']:+.4f} | {v['se']:.4f}"
        lines.append(f"| {name} | {cells} |")
    if "fail_to_pass" in res:
        lines.append(f"strict: {res['fail_to_pass']} images failing -> passing, {res['pass_to_fail']} "
                     f"passing -> failing")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN", help="one run directory, or two of one seed")
    ap.add_argument("--from", dest="start", type=int, default=None,
                    help="the earlier evaluation's iteration (one run; default 0: lr-0 control)")  # fmt: skip
    ap.add_argument("--to", type=int, default=None,
                    help="the later evaluation's iteration (default: the last)")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)
    check_json_path(args.json)
    runs = [Path(r) for r in args.runs]
    if len(runs) > 2:
        raise SystemExit(f"RUN: expected one run directory or two, got {len(runs)}")
    if len(runs) == 2 and args.start is not None:
        raise SystemExit("--from: expected with one run only (two runs are compared at the same --to)")
    its = [iterations(r) for r in runs]
    if len(runs) == 1:
        start = 0 if args.start is None else args.start
        end = its[0][-1] if args.to is None else args.to
        pairs = ((runs[0], start), (runs[0], end))
    else:
        end = min(its[0][-1], its[1][-1]) if args.to is None else args.to
        pairs = ((runs[0], end), (runs[1], end))
    for run, it in pairs:
        if it not in its[runs.index(run)]:
            raise SystemExit(f"--from/--to: expected an evaluated iteration of {run} "
                             f"({', '.join(map(str, its[runs.index(run)]))}), got {it}")  # fmt: skip
    before, after = (read_record(run, it) for run, it in pairs)
    try:
        res = compare(before, after)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    what = " -> ".join(f"{run} at iteration {it}" for run, it in pairs)
    print(report(res, what))
    if args.json:
        ends = {"before": [str(pairs[0][0]), pairs[0][1]], "after": [str(pairs[1][0]), pairs[1][1]]}
        Path(args.json).write_text(json.dumps({**ends, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
