"""Command line: evaluate a saved checkpoint in the OGBench simulator, without training.

``python -m macfw.evaluate --workdir DIR [--step N] [--episodes K] [--tasks 1,2] [--execute_steps E]
[--video PATH] [--seed S] [--workers W] [--batch_size B] [--import MODULE]``

The library behind it is :mod:`macfw.evaluation` (kept apart so that importing ``macfw`` never
imports this entry point, which ``python -m`` must run fresh). The names of :mod:`macfw.evaluation`
are re-exported here for older imports.
"""

from __future__ import annotations

import os
import sys

from macfw.evaluation import *  # noqa: F401,F403  (re-exported)
from macfw.evaluation import evaluate_checkpoint


def _parse_tasks(text: str) -> tuple[int, ...]:
    try:
        tasks = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ValueError(f"--tasks must be comma-separated task numbers like 1,2,3; got {text!r}.") from None
    if not tasks:
        raise ValueError(f"--tasks must name at least one task, like 1,2,3; got {text!r}.")
    return tasks


def _positive(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return n


def main(argv=None) -> int:
    """``python -m macfw.evaluate --workdir DIR [--step N] [--episodes K] [--tasks 1,2] [--execute_steps E]
    [--video PATH] [--seed S] [--workers W] [--batch_size B] [--import MODULE]``: evaluate a saved
    checkpoint without training.

    Prints per-task success and the mean, writes ``DIR/eval_step{N}.json``. Exit code 0, or 2 with
    one line ``macfw.evaluate: error: ...`` on a known error (no checkpoint, bad argument).
    """
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m macfw.evaluate", description="Evaluate a saved macfw checkpoint in the OGBench simulator."
    )
    p.add_argument("--workdir", required=True, help="run folder of `python -m macfw.run`")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per task (default: train.eval_episodes)")
    p.add_argument(
        "--tasks",
        type=_parse_tasks,
        default=None,
        help="comma-separated task ids, e.g. 1,2,3 (default: the run's evaluation tasks)",
    )
    p.add_argument(
        "--execute_steps", type=int, default=None, help="actions executed per chunk (default: train.execute_steps)"
    )
    p.add_argument("--video", default=None, help="write a video (.mp4/.gif) of the first episode of each task")
    p.add_argument(
        "--seed", type=int, default=None, help="evaluation seed (default: the run's own, train.eval_seed + step)"
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="worker processes that step the environments (default: the run's evaluate.workers, else "
        "the number of CPU cores; 1: in this process); the result does not depend on it",
    )
    p.add_argument(
        "--batch_size",
        type=_positive,
        default=None,
        help="episodes in flight, the rows of each policy call (default: the run's own, so the result "
        "matches its eval.csv; 1 for runs from before batched evaluation)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        help="Python module to import first (registers your own components)",
    )
    args = p.parse_args(argv)
    try:
        report = evaluate_checkpoint(
            args.workdir,
            args.step,
            episodes=args.episodes,
            task_ids=args.tasks,
            execute_steps=args.execute_steps,
            video_path=args.video,
            seed=args.seed,
            imports=args.imports,
            workers=args.workers,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("MACFW_DEBUG"):
            raise
        msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        print(f"macfw.evaluate: error: {msg}", file=sys.stderr, flush=True)
        return 2
    print(
        f"[macfw.evaluate] {report['env_name']} ({report['task_mode']}), step {report['step']}, "
        f"{report['episodes_per_task']} episode(s) per task, execute_steps {report['execute_steps']}, "
        f"{report['batch_size']} in flight, {report['workers']} worker(s):"
    )
    for t, v in report["per_task_success"].items():
        print(f"  {t}: success {v:.3f}")
    if report["num_seeds"]:
        print("  per seed: " + ", ".join(f"{r['success']:.3f}" for r in report["per_seed"]))
    print(f"  mean: success {report['success']:.3f} over {report['episodes']} episodes")
    for v in report["video_paths"]:
        print(f"  video: {v}")
    print(f"  written: {report.get('json_path')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
