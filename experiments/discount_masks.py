"""MAC's discount and single-task mask semantics, 2 x 2, at one budget (issue 8, item 5).

The authors' configuration uses a per-step discount ``gamma = 0.999`` for every MAC run, and their
single-task loader sets every mask to 1 (the success model learns 0, imagined single-task rollouts
never terminate). macfw can also label success from OGBench's masks
(``OGBenchDataset.singletask_masks = 'ogbench'``). This script trains every combination of
``gamma in {0.99, 0.999}`` and ``singletask_masks in {'ogbench', 'ones'}`` with ``train.num_seeds``
seeds vmapped in one process per cell, then writes ``OUT/table.md`` (success mean +- std over
seeds; each seed's success is the fraction of its ``train.eval_episodes`` episodes solved) and
``OUT/table.json``.

Each cell is its own run folder ``OUT/gamma<G>-masks-<M>``: re-running the command resumes
unfinished cells and skips finished ones.

Example (the measurement behind gin/mac.gin's defaults; 4 cells side by side on one GPU)::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/discount_masks.py --out runs/discount_masks \\
        --gin_file gin/quickstart.gin --seeds 3 --parallel 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GAMMAS = (0.99, 0.999)
MASKS = ("ogbench", "ones")


def cell_dir(out: Path, gamma: float, masks: str) -> Path:
    return out / f"gamma{gamma}-masks-{masks}"


def command(args, gamma: float, masks: str) -> list[str]:
    cmd = [sys.executable, "-m", "macfw.run"]
    for f in args.gin_file:
        cmd += ["--gin_file", f]
    for b in (
        f"GAMMA = {gamma}",
        f"OGBenchDataset.singletask_masks = '{masks}'",
        f"train.num_seeds = {args.seeds}",
        "train.progress = False",
        *args.gin_bindings,
    ):
        cmd += ["--gin_bindings", b]
    return cmd + ["--workdir", str(cell_dir(args.out, gamma, masks))]


def run_all(args) -> None:
    cells = [c for c in itertools.product(GAMMAS, MASKS) if not (cell_dir(args.out, *c) / "summary.json").exists()]
    running: list[tuple[tuple, subprocess.Popen, float]] = []
    while cells or running:
        while cells and len(running) < args.parallel:
            c = cells.pop(0)
            d = cell_dir(args.out, *c)
            d.mkdir(parents=True, exist_ok=True)
            log = open(d / "stdout.log", "a")
            p = subprocess.Popen(command(args, *c), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            running.append((c, p, time.time()))
            print(f"[discount_masks] started gamma={c[0]} masks={c[1]}", flush=True)
        for item in list(running):
            c, p, t0 = item
            if p.poll() is not None:
                running.remove(item)
                print(
                    f"[discount_masks] gamma={c[0]} masks={c[1]}: exit {p.returncode} after {time.time() - t0:.0f} s",
                    flush=True,
                )
                if p.returncode != 0:
                    raise SystemExit(f"cell gamma={c[0]} masks={c[1]} failed; see {cell_dir(args.out, *c)}/stdout.log")
        time.sleep(2)


def table(out: Path) -> tuple[str, dict]:
    rows, data = [], {}
    for gamma, masks in itertools.product(GAMMAS, MASKS):
        s = json.loads((cell_dir(out, gamma, masks) / "summary.json").read_text())
        per_seed = s.get("per_seed_success") or [s["success"]]
        m, sd = 100 * float(np.mean(per_seed)), 100 * float(np.std(per_seed))
        eps = s["episodes"] // len(per_seed)
        data[f"{gamma}/{masks}"] = {
            "mean": m,
            "std": sd,
            "per_seed": per_seed,
            "episodes_per_seed": eps,
            "step": s["step"],
            "wall_time_s": s["wall_time_s"],
            "updates_per_s": s["updates_per_s"],
        }
        rows.append((gamma, masks, m, sd, len(per_seed), eps, s["step"]))
    lines = [
        "| gamma | singletask_masks | success % (mean +- std over seeds) | seeds | episodes per seed | "
        "gradient steps |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {g} | {k} | {m:.1f} +- {sd:.1f} | {n} | {e} | {st} |" for g, k, m, sd, n, e, st in rows]
    return "\n".join(lines) + "\n", data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the four run folders and the table")
    p.add_argument("--gin_file", action="append", default=None, help="config (default gin/quickstart.gin)")
    p.add_argument("--gin_bindings", action="append", default=[], help="extra binding for every cell")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (train.num_seeds)")
    p.add_argument("--parallel", type=int, default=1, help="cells trained at once (one process each)")
    args = p.parse_args(argv)
    args.gin_file = args.gin_file or ["gin/quickstart.gin"]
    args.out = args.out.absolute()
    run_all(args)
    md, data = table(args.out)
    (args.out / "table.md").write_text(md)
    (args.out / "table.json").write_text(json.dumps(data, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
