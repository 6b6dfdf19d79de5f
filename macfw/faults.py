"""Randomized real faults against a smoke run: does every run still end with the uninterrupted parameters?

Usage::

    python -m macfw.faults --runs 20 [--faults kill,sigterm,writer,disk_full] [--seed S] [--out DIR]

First one uninterrupted run of ``gin/smoke.gin`` (a save every 10 gradient steps, the newest 2 kept)
gives the reference ``param_checksum``; a second one, with warm data and compilation caches, gives
the run's length ``T`` in seconds. Then ``--runs`` runs, each in a fresh workdir with one fault (each
of ``--faults`` equally often, in a random order) at a uniform moment in ``[0, 0.8 T]`` after the start:

``kill``
    ``kill -9`` of the run (1 or 2 times, each at a random moment), then the same command to the end;
    each restart must resume from the newest checkpoint listed before it.
``sigterm``
    SIGTERM (a SLURM preemption): the run saves and exits 0 (during start-up: exits 0 without a save;
    before ``macfw.run`` has installed its handler, while Python imports JAX, the signal's default
    action ends the process, which has written nothing), then the same command to the end.
``writer``
    a second ``macfw.run`` on the same workdir: whichever holds the workdir trains undisturbed, the
    other exits 2 with one line naming the holder (a second that takes the lock after the first ended
    resumes from the final step, finds the run finished and exits 0).
``disk_full``
    the workdir is a 64 MiB tmpfs; another process fills it (a file written until ENOSPC): the run
    stops with one line ``macfw: error: No space left on device writing PATH (FREE ...)``, exit 2;
    the file is removed (space freed) and the same command resumes to the end. Needs root (``mount``);
    otherwise it is left out with a note.

A run counts as identical when every step above behaved as described and its final
``summary.json`` holds the reference's ``param_checksum``. One line per run, a line saying in how
many runs the fault met a running process (a moment after a fast run's end meets none), then a last line
``K/N identical checksums``; ``OUT/results.json`` has the details. Exit code 0 when K == N.
The data are generated once into ``--cache`` (default ``OUT/cache``); the whole campaign of 20 runs
takes 10-16 minutes on 2 CPU cores (2026-12-07).
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import macfw

REPO = Path(macfw.__file__).resolve().parents[1]
FAULTS = ("kill", "sigterm", "writer", "disk_full")
BINDINGS = ("train.progress = False", "train.save_interval = 10", "train.max_to_keep = 2")
TMPFS_SIZE = "64m"
LOST_SIGNAL_S = 20.0  # a run still going this long after SIGTERM, without saying it stopped, lost the signal
_RESUMED = re.compile(r"resuming from step (\d+) ")


@dataclass
class Outcome:
    """What one run of the campaign did: its fault, the events, the problems found (none: identical)."""

    run: int
    fault: str
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checksum: str | None = None

    @property
    def identical(self) -> bool:
        return not self.problems

    @property
    def delivered(self) -> bool:
        """Whether the fault met a running process (kill, SIGTERM, a full disk, a second writer refused)."""
        marks = ("kill -9 at", "SIGTERM at", "disk filled at", "exit codes [0, 2]", "exit codes [2, 0]")
        return any(m in e for e in self.events for m in marks)


class Campaign:
    """The reference, the timing, and one method per fault (each returns nothing, fills an Outcome)."""

    def __init__(self, out: Path, cache: Path, timeout: float = 1200):
        self.out, self.cache, self.timeout = out, cache, timeout
        env = dict(os.environ)
        env["MACFW_CACHE_DIR"] = str(cache)
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax-compile"))  # restarts skip compiling
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
        self.env = env
        self.checksum: str | None = None
        self.T = 0.0

    # ------------------------------------------------------------------ running macfw.run
    def cmd(self, workdir: Path) -> list[str]:
        binds = [a for b in BINDINGS for a in ("--gin_bindings", b)]
        return [sys.executable, "-m", "macfw.run", "--gin_file", "gin/smoke.gin", *binds, "--workdir", str(workdir)]

    def start(self, workdir: Path, log: Path) -> subprocess.Popen:
        out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
        p = subprocess.Popen(self.cmd(workdir), cwd=REPO, env=self.env, stdout=out, stderr=err, text=True)
        out.close()
        err.close()
        return p

    def finish(self, p: subprocess.Popen, log: Path) -> tuple[int, str, str]:
        try:
            rc = p.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        return rc, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()

    def run_to_end(self, workdir: Path, log: Path, o: Outcome) -> None:
        """The same command to the end: exit 0, resuming from the newest listed checkpoint."""
        listed = listed_steps(workdir)
        rc, out, err = self.finish(self.start(workdir, log), log)
        resumed = [int(x) for x in _RESUMED.findall(out)]
        o.events.append(f"re-run: exit {rc}" + (f", resumed from step {resumed[0]}" if resumed else ""))
        if rc != 0:
            o.problems.append(f"the re-run exited {rc}: {tail(err)}")
        if listed and resumed != [listed[-1]]:
            o.problems.append(f"checkpoints {listed} listed, but the re-run resumed from {resumed or 'nothing'}")

    def final(self, workdir: Path, o: Outcome) -> None:
        try:
            o.checksum = json.loads((workdir / "summary.json").read_text())["param_checksum"]
        except (OSError, ValueError, KeyError):
            o.checksum = None
        if o.checksum != self.checksum:
            o.problems.append(f"final checksum {o.checksum} != reference {self.checksum}")
        rows = csv_steps(workdir / "train.csv")
        if rows != sorted(set(rows)):
            o.problems.append(f"train.csv steps {rows} (a step twice, or out of order)")

    # ------------------------------------------------------------------ the reference
    def prepare(self) -> None:
        """The uninterrupted reference (checksum) and a warm run (its length T), kept in OUT."""
        ref = self.out / "reference"
        if not (ref / "summary.json").exists():
            shutil.rmtree(ref, ignore_errors=True)
            rc, out, err = self.finish(self.start(ref, self.out / "reference"), self.out / "reference")
            if rc != 0:
                raise SystemExit(f"macfw.faults: the reference run failed (exit {rc}): {tail(err, 3000)}")
        self.checksum = json.loads((ref / "summary.json").read_text())["param_checksum"]
        timing = self.out / "timing.json"
        if not timing.exists():
            w = self.out / "timed"
            shutil.rmtree(w, ignore_errors=True)
            t0 = time.time()
            rc, _, err = self.finish(self.start(w, self.out / "timed"), self.out / "timed")
            T = time.time() - t0
            o = Outcome(-1, "none")
            self.final(w, o)
            if rc != 0 or o.problems:
                raise SystemExit(f"macfw.faults: two uninterrupted runs differ (exit {rc}): {o.problems} {tail(err)}")
            timing.write_text(json.dumps({"T": T}))
            shutil.rmtree(w, ignore_errors=True)
        self.T = json.loads(timing.read_text())["T"]

    # ------------------------------------------------------------------ the faults
    def moment(self, rng: random.Random) -> float:
        """A uniform moment in ``[0, 0.8 T]`` after a start: start-up, training, saving, evaluating (a
        moment near ``T`` often falls after a run that went faster than the timed one)."""
        return rng.uniform(0.0, 0.8 * self.T)

    def kill(self, w: Path, o: Outcome, rng: random.Random) -> None:
        for k in range(rng.choice((1, 2))):
            log = self.out / f"{w.name}_kill{k}"
            p = self.start(w, log)
            at = self.moment(rng)
            if wait_for(p, at):
                p.send_signal(signal.SIGKILL)
                o.events.append(f"kill -9 at {at:.1f} s (checkpoints {listed_steps(w)})")
            rc, _, err = self.finish(p, log)
            if rc not in (0, -signal.SIGKILL):
                o.problems.append(f"exit {rc} after kill -9: {tail(err)}")
        self.run_to_end(w, self.out / f"{w.name}_end", o)

    def sigterm(self, w: Path, o: Outcome, rng: random.Random) -> None:
        log = self.out / f"{w.name}_term"
        p = self.start(w, log)
        at = self.moment(rng)
        sent = None
        if wait_for(p, at):
            p.send_signal(signal.SIGTERM)
            o.events.append(f"SIGTERM at {at:.1f} s")
            sent = time.time()
        rc, out, err = self.finish(p, log)
        o.events.append(f"exit {rc}, checkpoints {listed_steps(w)}")
        if rc == -signal.SIGTERM and not written(w):
            o.events.append("ended by SIGTERM before macfw's handler (interpreter start-up), nothing written")
        elif rc != 0:
            o.problems.append(f"exit {rc} after SIGTERM (0 expected): {tail(err)}")
        elif sent is not None and "stopped by" not in out and time.time() - sent > LOST_SIGNAL_S:
            o.problems.append(f"SIGTERM delivered, but the run went on for {time.time() - sent:.0f} s to the end")
        self.run_to_end(w, self.out / f"{w.name}_end", o)

    def writer(self, w: Path, o: Outcome, rng: random.Random) -> None:
        logs = [self.out / f"{w.name}_first", self.out / f"{w.name}_second"]
        first = self.start(w, logs[0])
        at = self.moment(rng)
        time.sleep(at)
        was_running = first.poll() is None
        second = self.start(w, logs[1])
        results = [self.finish(p, log) for p, log in zip((first, second), logs)]
        rcs = [r[0] for r in results]
        o.events.append(f"second writer at {at:.1f} s: exit codes {rcs}")
        if sorted(rcs) == [0, 2]:  # one trained, the other (usually the second) found the workdir in use
            err = results[rcs.index(2)][2]
            errors = [ln for ln in err.splitlines() if ln.startswith("macfw: error:")]
            if len(errors) != 1 or "is in use by another run" not in errors[0] or "Traceback" in err:
                o.problems.append(f"the exit 2 is not one 'in use' line: {tail(err)}")
        elif rcs == [0, 0]:  # the first ended before the second took the lock: it found the run finished
            last = max(listed_steps(w), default=None)
            if f"resuming from step {last} " not in results[1][1]:
                o.problems.append(f"both exited 0 but the second did not start from the final step {last}")
        else:
            o.problems.append(
                f"exit codes {rcs} (first running at the second's start: {was_running}): "
                f"{tail(results[0][2])} {tail(results[1][2])}"
            )

    def disk_full(self, w: Path, o: Outcome, rng: random.Random) -> None:
        w.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(w)], check=True)
        filler = w / "filler"
        try:
            log = self.out / f"{w.name}_full"
            p = self.start(w, log)
            at = self.moment(rng)
            if wait_for(p, at):
                fill(filler)
                o.events.append(f"disk filled at {at:.1f} s")
            rc, _, err = self.finish(p, log)
            errors = [ln for ln in err.splitlines() if ln.startswith("macfw: error:")]
            o.events.append(f"exit {rc}" + (f": {errors[0][:110]}" if errors else ""))
            if rc == 2:
                if len(errors) != 1 or "No space left on device" not in errors[0] or "Traceback" in err:
                    o.problems.append(f"exit 2 without one 'No space left' line: {tail(err)}")
            elif rc != 0:
                o.problems.append(f"exit {rc} on a full disk (2 expected): {tail(err)}")
            filler.unlink(missing_ok=True)  # space freed
            self.run_to_end(w, self.out / f"{w.name}_end", o)
            self.final(w, o)  # checked on the tmpfs, before it goes
        finally:
            subprocess.run(["umount", "-l", str(w)], check=False)


# ---------------------------------------------------------------------------------------- helpers
def tail(text: str, n: int = 400) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "warn" not in ln.lower()]
    return " | ".join(lines)[-n:]


def wait_for(p: subprocess.Popen, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``p`` ends; True when ``p`` is still running."""
    end = time.time() + seconds
    while time.time() < end and p.poll() is None:
        time.sleep(0.02)
    return p.poll() is None


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (ENOSPC), in blocks of 1 MiB, then 4 KiB."""
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12):
            data = b"\0" * block
            try:
                while True:
                    f.write(data)
            except OSError:
                pass


def written(workdir: Path) -> list[str]:
    """What a run has written in ``workdir``: its entries, except the lock file (empty: nothing)."""
    if not workdir.is_dir():
        return []
    return sorted(e.name for e in workdir.iterdir() if e.name != ".lock")


def listed_steps(workdir: Path) -> list[int]:
    """The complete checkpoint steps in ``workdir`` (read-only: no lock, nothing removed)."""
    from macfw.checkpoint import Checkpointer

    ck = workdir / "checkpoints"
    return Checkpointer(ck, read_only=True).all_steps() if ck.is_dir() else []


def csv_steps(path: Path) -> list[int]:
    import csv

    try:
        with open(path, newline="") as f:
            return [int(float(r["step"])) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def can_mount() -> str | None:
    """None when this process can mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "not root (mounting a tmpfs needs root)"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed: {r.stderr.strip()}"
        subprocess.run(["umount", d], check=False)
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m macfw.faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=20, help="runs, each with one random fault (default 20)")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    ap.add_argument("--seed", type=int, default=None, help="seed of the faults and moments (default: the time)")
    ap.add_argument("--out", default=None, help="folder of the runs (default: a new temporary folder)")
    ap.add_argument("--cache", default=None, help="MACFW_CACHE_DIR for the generated data (default OUT/cache)")
    ap.add_argument("--keep", action="store_true", help="keep every run's folder (default: only failed ones)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults or a.runs < 1:
        _parser().error(f"--faults {a.faults!r} / --runs {a.runs}: choose from {', '.join(FAULTS)}; --runs >= 1")
    if not (REPO / "gin" / "smoke.gin").exists():
        raise SystemExit(f"macfw.faults: {REPO / 'gin' / 'smoke.gin'} not found: run from a macfw checkout")
    if "disk_full" in faults and (why := can_mount()):
        print(f"[faults] disk_full left out: {why}", flush=True)
        faults.remove("disk_full")
        if not faults:
            return 1
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="macfw-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    seed = a.seed if a.seed is not None else time.time_ns() % 2**31
    c = Campaign(out, Path(a.cache) if a.cache else out / "cache")
    c.prepare()
    print(
        f"[faults] reference checksum {c.checksum}; a run takes T = {c.T:.1f} s; {a.runs} runs of "
        f"{', '.join(faults)}; seed {seed}; in {out}",
        flush=True,
    )
    results = []
    order = [faults[i % len(faults)] for i in range(a.runs)]  # each fault equally often, in random order
    random.Random(seed).shuffle(order)
    for i in range(a.runs):
        rng = random.Random(seed * 1000 + i)
        o = Outcome(i, order[i])
        w = out / f"run{i:03d}"
        shutil.rmtree(w, ignore_errors=True)
        getattr(c, o.fault)(w, o, rng)
        if o.fault != "disk_full":
            c.final(w, o)
        print(
            f"[faults] run {i}: {o.fault}: {'; '.join(o.events)} -> "
            f"{'identical' if o.identical else 'DIFFERENT: ' + '; '.join(o.problems)}",
            flush=True,
        )
        results.append(o.__dict__ | {"identical": o.identical, "delivered": o.delivered})
        (out / "results.json").write_text(json.dumps({"seed": seed, "checksum": c.checksum, "runs": results}, indent=1))
        if o.identical and not a.keep:
            shutil.rmtree(w, ignore_errors=True)
    k = sum(r["identical"] for r in results)
    hit = sum(r["delivered"] for r in results)
    print(f"[faults] a fault reached the run in {hit} of {len(results)} runs (in the others it came after the end)")
    print(f"{k}/{len(results)} identical checksums", flush=True)
    return 0 if k == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
