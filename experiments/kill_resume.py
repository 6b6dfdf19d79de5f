"""SIGKILL-at-random-moments trials: does a killed run always resume to the identical parameters?

One uninterrupted reference run of gin/smoke.gin (its ``param_checksum``, and its wall time ``T``),
then ``--trials`` trials. A trial runs the same command with ``train.save_interval = 10`` (a save every
compiled call, so kills often land in the middle of saves and deletions of old steps, with
``train.max_to_keep = 2``) in a fresh folder, kills it with SIGKILL ``--kills`` times at moments drawn
uniformly from [``--early`` x T, T] after the process started (times ``--jobs``: trials running side
by side share the CPU), and then lets the command run to the end. A trial passes when

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
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _cmd(workdir: Path, *bindings: str) -> list[str]:
    extra = [a for b in bindings for a in ("--gin_bindings", b)]
    return [sys.executable, "-m", "macfw.run", *GIN, *extra, "--workdir", str(workdir)]


def _listed(workdir: Path) -> list[int]:
    from macfw.checkpoint import Checkpointer

    ck = workdir / "checkpoints"
    return Checkpointer(ck, read_only=True).all_steps() if ck.is_dir() else []


def _run(cmd, env, log: Path, kill_after: float | None, timeout: float = 1800) -> tuple[int, str, bool]:
    """Run ``cmd``; SIGKILL it ``kill_after`` seconds after start (if still running). (rc, log text, killed)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        killed = False
        try:
            if kill_after is not None:
                try:
                    p.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    killed = True
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    return rc, log.read_text(), killed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial before the final run")
    ap.add_argument("--early", type=float, default=0.25, help="earliest kill moment, as a fraction of T")
    ap.add_argument("--out", default="/tmp/macfw_kill_resume")
    ap.add_argument("--cache", default=None, help="MACFW_CACHE_DIR (default: OUT/cache)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: time)")
    ap.add_argument("--keep", action="store_true", help="keep every trial's folder (default: only failed ones)")
    ap.add_argument("--jobs", type=int, default=1, help="trials run side by side")
    a = ap.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env(Path(a.cache) if a.cache else out / "cache")
    seed = a.seed if a.seed is not None else int(time.time())

    ref = out / "reference"
    if not (ref / "summary.json").exists():
        shutil.rmtree(ref, ignore_errors=True)
        gen = subprocess.run(  # generate the data first (not timed)
            [sys.executable, "-c", "import macfw.run, macfw.data.ogbench_data as d; "
             "macfw.run.parse_gin(['gin/smoke.gin'], []); print(d.OGBenchDataset().resolve_path())"],
            cwd=REPO, env=env, capture_output=True, text=True)
        if gen.returncode != 0:
            raise SystemExit(f"data generation failed: {gen.stderr[-3000:]}")
        t0 = time.time()
        rc, text, _ = _run(_cmd(ref), env, out / "reference.log", None)
        if rc != 0:
            print(text[-5000:])
            raise SystemExit(f"reference run failed (rc {rc})")
        (ref / "wall_s").write_text(str(time.time() - t0))
    T = float((ref / "wall_s").read_text())
    checksum = json.loads((ref / "summary.json").read_text())["param_checksum"]
    print(f"[kill_resume] reference checksum {checksum}, T = {T:.1f} s; {a.trials} trials x {a.kills} kills "
          f"in [{a.early:.2f}T, T]; seed {seed}", flush=True)

    def one_trial(trial: int) -> dict:
        rng = random.Random(seed * 1000 + trial)
        w = out / f"trial{trial:03d}"
        shutil.rmtree(w, ignore_errors=True)
        cmd = _cmd(w, "train.save_interval = 10", "train.max_to_keep = 2")
        events, problems, rc, text = [], [], None, ""
        t_trial = time.time()
        for attempt in range(a.kills + 5):
            listed = _listed(w)
            kill_after = rng.uniform(a.early * T, T) * a.jobs if attempt < a.kills else None  # jobs share the CPU
            rc, text, killed = _run(cmd, env, out / f"trial{trial:03d}_{attempt}.log", kill_after)
            if listed:
                if f"resuming from step {listed[-1]} " not in text:
                    problems.append(f"run {attempt}: listed {listed} but did not resume from step {listed[-1]}")
                if "cannot be restored" in text:
                    problems.append(f"run {attempt}: the newest listed step {listed[-1]} did not restore")
            events.append({"kill_after_s": kill_after, "killed": killed, "rc": rc, "listed_before": listed,
                           "listed_after": _listed(w)})
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
        steps_at_kill = [e["listed_after"][-1] if e["listed_after"] else None for e in events if e["killed"]]
        print(f"[kill_resume] trial {trial}: {'identical' if ok else 'DIFFERENT'}; {kills} kill(s), newest listed "
              f"step after each: {steps_at_kill}" + (f"; problems: {problems}" if problems else ""), flush=True)
        if ok and not a.keep:
            shutil.rmtree(w, ignore_errors=True)
        return {"trial": trial, "identical": ok, "kills": kills, "events": events, "problems": problems,
                "wall_s": time.time() - t_trial}

    from concurrent.futures import ThreadPoolExecutor

    results = []
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for r in pool.map(one_trial, range(a.trials)):
            results.append(r)
            (out / "results.json").write_text(json.dumps({"reference_checksum": checksum, "T_s": T, "seed": seed,
                                                          "trials": results}, indent=1))
    n_ok = sum(r["identical"] for r in results)
    print(f"[kill_resume] identical: {n_ok}/{len(results)} (kills that happened: "
          f"{sum(r['kills'] for r in results)})", flush=True)
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
