"""SIGKILL-at-random-moments trials: does a killed run always resume to the identical parameters?

One uninterrupted reference run of gin/smoke.gin (its ``param_checksum``; a second uninterrupted run,
which must agree, gives the timing with warm data and compilation caches: ``T0`` from the start to the
first save (after the first compiled call), ``D`` from there to the end),
then ``--trials`` trials. A trial runs the same command with ``train.save_interval = 10`` (a save every
compiled call, so kills often land in the middle of saves and deletions of old steps, with
``train.max_to_keep = 2``) in a fresh folder, kills it with SIGKILL ``--kills`` times -- each kill,
with probability ``--early``, at a uniform moment in [0, T0] after the start, else at a uniform moment
in [0, D] after the run's first new save began (training, saving, deleting old steps, evaluating) --
and then lets the command run to the end. A trial passes when

* every restart after a kill resumes from the newest step listed just before it ("resuming from
  step N"), without falling back to an older step (the newest listed step restores), and
* the final ``param_checksum`` equals the reference's.

The data are generated once into ``--cache`` (default: a folder under ``--out``).

Usage::

    python experiments/kill_resume.py --trials 20 [--kills 2] [--jobs 1] [--out /tmp/kill_resume] [--seed 0]

Prints one line per trial and finally ``identical: K/N``; writes ``--out/results.json``. Exit code 0 when
all trials pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIN = ["--gin_file", "gin/smoke.gin", "--gin_bindings", "train.progress = False"]


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["MACFW_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax-compile"))  # restarts skip compilation
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


def _cmd(workdir: Path, *bindings: str) -> list[str]:
    extra = [a for b in bindings for a in ("--gin_bindings", b)]
    return [sys.executable, "-m", "macfw.run", *GIN, *extra, "--workdir", str(workdir)]


def _listed(workdir: Path) -> list[int]:
    from macfw.checkpoint import Checkpointer

    ck = workdir / "checkpoints"
    return Checkpointer(ck, read_only=True).all_steps() if ck.is_dir() else []


def _ckpt_names(workdir: Path) -> set:
    ck = workdir / "checkpoints"
    try:
        return {n for n in os.listdir(ck) if n.split(".")[0].isdigit()}
    except OSError:
        return set()


def _run(cmd, env, log: Path, kill: tuple | None, workdir: Path, timeout: float = 1800) -> tuple[int, str, list | None]:
    """Run ``cmd``; SIGKILL it as ``kill`` says (if still running).

    Returns (rc, log text, the checkpoint folder's step entries at the kill, or None when not killed).

    ``kill``: None (never), ``("at", t)``: t seconds after the start, or ``("train", d)``: d seconds
    after this run's first save began (a new step folder, temporary or final, appeared: the first
    compiled call is done), i.e. while training, saving and deleting old steps.
    """
    before = _ckpt_names(workdir)
    with open(log, "w") as f:
        t0 = time.time()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        killed = None
        deadline = None if kill is None or kill[0] != "at" else t0 + kill[1]
        try:
            while kill is not None and p.poll() is None and time.time() - t0 < timeout:
                if deadline is None and _ckpt_names(workdir) - before:
                    deadline = time.time() + kill[1]
                if deadline is not None and time.time() >= deadline:
                    p.send_signal(signal.SIGKILL)
                    killed = sorted(_ckpt_names(workdir))
                    break
                time.sleep(0.02)
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    return rc, log.read_text(), killed


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial before the final run")
    ap.add_argument(
        "--early",
        type=float,
        default=0.2,
        help="fraction of kills at a uniform moment of the start-up (the rest: while training/saving)",
    )
    ap.add_argument("--out", default="/tmp/macfw_kill_resume")
    ap.add_argument("--cache", default=None, help="MACFW_CACHE_DIR (default: OUT/cache)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: time)")
    ap.add_argument("--keep", action="store_true", help="keep every trial's folder (default: only failed ones)")
    ap.add_argument("--jobs", type=int, default=1, help="trials run side by side")
    return ap


def _reference_run(out: Path, env: dict, ref: Path) -> None:
    """Generate the data (not timed), then run the uninterrupted reference into ``ref`` unless it finished."""
    if (ref / "summary.json").exists():
        return
    shutil.rmtree(ref, ignore_errors=True)
    gen = subprocess.run(  # generate the data first (not timed)
        [
            sys.executable,
            "-c",
            "import macfw.run, macfw.data.ogbench_data as d; "
            "macfw.run.parse_gin(['gin/smoke.gin'], []); print(d.OGBenchDataset().resolve_path())",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if gen.returncode != 0:
        raise SystemExit(f"data generation failed: {gen.stderr[-3000:]}")
    rc, text, _ = _run(_cmd(ref), env, out / "reference.log", None, ref)  # also fills the compilation cache
    if rc != 0:
        print(text[-5000:])
        raise SystemExit(f"reference run failed (rc {rc})")


def _timing_run(out: Path, env: dict, ref: Path) -> None:
    """A second uninterrupted run (warm caches) that must match the reference; writes ``ref/timing.json``."""
    if (ref / "timing.json").exists():
        return
    timed = out / "timed"
    shutil.rmtree(timed, ignore_errors=True)
    t0 = time.time()  # T0: start-up until the first save begins; D: from there to the end (warm caches)
    p = subprocess.Popen(
        _cmd(timed, "train.save_interval = 10", "train.max_to_keep = 2"),
        cwd=REPO,
        env=env,
        stdout=open(out / "timed.log", "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    t_first = None
    while p.poll() is None:
        if t_first is None and _ckpt_names(timed):
            t_first = time.time()
        time.sleep(0.02)
    t_end = time.time()
    if (
        p.returncode != 0
        or t_first is None
        or json.loads((timed / "summary.json").read_text())["param_checksum"]
        != json.loads((ref / "summary.json").read_text())["param_checksum"]
    ):
        raise SystemExit(f"two uninterrupted runs differ (rc {p.returncode}); see {out / 'timed.log'}")
    (ref / "timing.json").write_text(json.dumps({"T0": t_first - t0, "D": t_end - t_first}))
    shutil.rmtree(timed, ignore_errors=True)


def _one_trial(
    trial: int, a: argparse.Namespace, out: Path, env: dict, seed: int, T0: float, D: float, checksum: str
) -> dict:
    """One trial: ``a.kills`` SIGKILLs, then a run to the end; checks each resume and the final checksum."""
    rng = random.Random(seed * 1000 + trial)
    w = out / f"trial{trial:03d}"
    shutil.rmtree(w, ignore_errors=True)
    cmd = _cmd(w, "train.save_interval = 10", "train.max_to_keep = 2")
    events, problems, rc, text = [], [], None, ""
    t_trial = time.time()
    for attempt in range(a.kills + 5):
        listed = _listed(w)
        kill = None
        if attempt < a.kills:  # mostly while training and saving, sometimes anywhere in start-up
            kill = ("at", rng.uniform(0.0, T0)) if rng.random() < a.early else ("train", rng.uniform(0.0, D))
        rc, text, at_kill = _run(cmd, env, out / f"trial{trial:03d}_{attempt}.log", kill, w)
        killed = at_kill is not None
        if listed:
            resumed = [int(x) for x in re.findall(r"resuming from step (\d+) ", text)]
            if resumed != [listed[-1]] and (resumed or not killed):  # (a run killed early says nothing)
                problems.append(f"run {attempt}: listed {listed} but resumed from {resumed or 'nothing'}")
            if "cannot be restored" in text:
                problems.append(f"run {attempt}: the newest listed step {listed[-1]} did not restore")
        events.append(
            {
                "kill": kill,
                "killed": killed,
                "folders_at_kill": at_kill,
                "rc": rc,
                "listed_before": listed,
                "listed_after": _listed(w),
            }
        )
        if rc == 0 and not killed:
            break
        if rc not in (0, -signal.SIGKILL):
            problems.append(f"run {attempt}: exit code {rc}: {text[-500:]}")
            break
    final = None
    if (w / "summary.json").exists():
        final = json.loads((w / "summary.json").read_text()).get("param_checksum")
    if final != checksum:
        problems.append(f"final checksum {final} != reference {checksum}")
    ok = not problems
    kills = sum(e["killed"] for e in events)
    at = [e["folders_at_kill"] for e in events if e["killed"]]
    print(
        f"[kill_resume] trial {trial}: {'identical' if ok else 'DIFFERENT'}; {kills} kill(s), step folders at "
        f"each kill: {at}" + (f"; problems: {problems}" if problems else ""),
        flush=True,
    )
    if ok and not a.keep:
        shutil.rmtree(w, ignore_errors=True)
    return {
        "trial": trial,
        "identical": ok,
        "kills": kills,
        "events": events,
        "problems": problems,
        "wall_s": time.time() - t_trial,
    }


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:  # Orbax's notes about read-only checkpoint managers (used here to list steps) are noise
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env(Path(a.cache) if a.cache else out / "cache")
    seed = a.seed if a.seed is not None else int(time.time())

    ref = out / "reference"
    _reference_run(out, env, ref)
    _timing_run(out, env, ref)
    timing = json.loads((ref / "timing.json").read_text())
    T0, D = timing["T0"], timing["D"]
    T = T0 + D
    checksum = json.loads((ref / "summary.json").read_text())["param_checksum"]
    print(
        f"[kill_resume] reference checksum {checksum}; start-up T0 = {T0:.1f} s, then training/saving/eval "
        f"D = {D:.1f} s; {a.trials} trials x {a.kills} kills (fraction {a.early:.2f} in start-up); seed {seed}",
        flush=True,
    )

    def one_trial(trial: int) -> dict:
        return _one_trial(trial, a, out, env, seed, T0, D, checksum)

    from concurrent.futures import ThreadPoolExecutor

    results = []
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for r in pool.map(one_trial, range(a.trials)):
            results.append(r)
            (out / "results.json").write_text(
                json.dumps({"reference_checksum": checksum, "T_s": T, "seed": seed, "trials": results}, indent=1)
            )
    n_ok = sum(r["identical"] for r in results)
    print(
        f"[kill_resume] identical: {n_ok}/{len(results)} (kills that happened: {sum(r['kills'] for r in results)})",
        flush=True,
    )
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
