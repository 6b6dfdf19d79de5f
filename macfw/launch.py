"""Launch a list of ``python -m macfw.run`` runs on this machine or on a SLURM cluster (issue 28).

A run is a :class:`RunSpec`: a name for progress lines, its workdir, the command (the argv of
``python -m macfw.run ...``, ``--workdir`` included) and the folder to run it in. Both launchers have
one interface, ``launch(runs) -> list[RunSpec]`` (the runs that failed), wait until every run has
ended, and print one progress line per run start, finish and failure::

    from macfw.launch import LocalLauncher, RunSpec, SlurmLauncher
    runs = [RunSpec("mac seed0", Path("out/mac0"), [sys.executable, "-m", "macfw.run", "--gin_file",
                    "gin/smoke.gin", "--workdir", "out/mac0"], Path.cwd())]
    failed = LocalLauncher(parallel=2).launch(runs)       # subprocesses here, 2 at once
    failed = SlurmLauncher(time_min=120).launch(runs)     # one SLURM job per run (submitit)

Both skip runs whose workdir has ``summary.json`` (written by macfw.run at the end); a run with
checkpoints resumes from the newest (macfw.run does that on the same workdir).

:class:`SlurmLauncher` (``pip install -e '.[slurm]'`` for submitit):

- One job per run, named ``macfw-<12 hex of sha1(absolute workdir)>`` (:func:`job_name`). Re-running
  the launcher on the same runs submits only runs that have no ``summary.json`` and no job of that
  name in ``squeue``; it waits for the queued ones instead of submitting duplicates.
- Preemption before the time limit: SLURM sends USR2 ``signal_delay_s`` seconds before it kills the
  job (submitit's ``--signal``; ``scancel --signal=USR2 JOBID`` does the same by hand). The job's
  callable (:class:`SlurmRun`) then sends SIGTERM to the macfw.run subprocess (which finishes its
  compiled call, saves a checkpoint and exits 0), waits for it, and returns a ``DelayedSubmission`` of
  itself; submitit requeues the job (``scontrol requeue``) and the restarted job runs the same command,
  which resumes from that checkpoint. ``scontrol requeue JOBID`` by an administrator or a
  preemption with ``PreemptMode=REQUEUE``: SLURM sends SIGTERM to the job's processes (the callable
  forwards it to the subprocess too), the subprocess saves and exits 0, and the restarted job
  resumes the same way. The subprocess ignores USR2 (SLURM signals every process of the job;
  USR2's default action would kill it before it saves).
- One writer per workdir: a requeued job starts only after the previous run of the job has ended
  (SLURM requeues a job once all its processes are gone), and a run with a job in the queue is never
  submitted again.
- A job succeeds only when macfw.run exits 0 and ``summary.json`` exists; otherwise its callable
  raises and the launcher reports the run as failed, naming the logs: ``WORKDIR/stdout.log``
  (macfw.run's output, appended by every attempt) and submitit's ``<folder>/<jobid>_0_log.out`` /
  ``_log.err`` (the job's own output; ``folder`` defaults to ``WORKDIR/slurm``).

The SLURM settings are constructor arguments and Gin bindings (``SlurmLauncher.partition = 'gpu'``;
see ``gin/slurm.gin``); :meth:`SlurmLauncher.from_gin` parses Gin files and bindings and lets given
arguments (command-line flags) override them. Workdirs and ``folder`` must be on a file system that
the compute nodes share with the machine that launches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gin

from macfw.errors import ConfigError, check

#: SLURM job states (``squeue %T``) after which a job runs no more; any other state (PENDING,
#: RUNNING, COMPLETING, REQUEUED, SUSPENDED, ...) means the job is still the run's writer.
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_INSTALL_HINT = "pip install -e '.[slurm]'"

#: JAX's GPU memory settings; :class:`LocalLauncher` leaves the runs' environment alone when one is set.
GPU_MEMORY_ENV = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


class SlurmError(RuntimeError):
    """The SLURM cluster cannot be used (no ``sbatch``, ``sinfo``/``squeue`` failing, a refused
    submission); the message names the command, its output and the fix."""


# ------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class RunSpec:
    """One ``python -m macfw.run`` run.

    Attributes:
      name: shown in progress lines, e.g. ``"mac cube-single task2 seeds 0"``.
      workdir: the run folder; made absolute (relative to ``cwd``).
      command: argv of the run (``[sys.executable, "-m", "macfw.run", ..., "--workdir", str(workdir)]``);
        its ``--workdir`` must name ``workdir``. Stored as a tuple.
      cwd: the folder the command runs in (Gin file paths in the command are relative to it).
    """

    name: str
    workdir: Path
    command: Sequence[str]
    cwd: Path

    def __post_init__(self):
        cwd = Path(self.cwd).absolute()
        workdir = Path(self.workdir)
        workdir = (workdir if workdir.is_absolute() else cwd / workdir).absolute()
        command = tuple(str(c) for c in self.command)
        object.__setattr__(self, "cwd", cwd)
        object.__setattr__(self, "workdir", workdir)
        object.__setattr__(self, "command", command)
        given = None
        for i, arg in enumerate(command):
            if arg == "--workdir" and i + 1 < len(command):
                given = command[i + 1]
            elif arg.startswith("--workdir="):
                given = arg.split("=", 1)[1]
        if given is None:
            raise ValueError(
                f"RunSpec {self.name!r}: its command has no --workdir ({list(command)}); add '--workdir {workdir}'."
            )
        if os.path.normpath(cwd / given) != os.path.normpath(workdir):
            raise ValueError(
                f"RunSpec {self.name!r}: the command's --workdir {given!r} is not its workdir "
                f"{str(workdir)!r} (relative paths are taken from cwd {str(cwd)!r}); make them the same."
            )

    @property
    def summary_path(self) -> Path:
        return self.workdir / "summary.json"

    @property
    def log_path(self) -> Path:
        """``WORKDIR/stdout.log``: the run's output (stdout and stderr), appended by every attempt."""
        return self.workdir / "stdout.log"

    def finished(self) -> bool:
        return self.summary_path.exists()


def job_name(workdir: str | os.PathLike) -> str:
    """The SLURM job name of the run in ``workdir``: ``macfw-`` and the first 12 hex digits of the
    SHA-1 of its absolute, symlink-resolved path (the same on every launch, one name per workdir)."""
    path = str(Path(workdir).resolve())
    return "macfw-" + hashlib.sha1(path.encode()).hexdigest()[:12]


def newest_checkpoint(workdir: Path) -> int | None:
    """The newest complete checkpoint's step in ``workdir`` (``checkpoints/<step>/macfw_manifest.json``),
    or None."""
    steps = [
        int(d.name)
        for d in (workdir / "checkpoints").glob("*")
        if d.name.isdigit() and (d / "macfw_manifest.json").exists()
    ]
    return max(steps) if steps else None


def _success_text(summary_path: Path) -> str:
    """``"success 40.0 +- 5.0 %"`` (mean +- std over the run's seeds) from a summary.json."""
    try:
        s = json.loads(summary_path.read_text())
        per = [float(x) for x in (s.get("per_seed_success") or [s["success"]])]
    except (OSError, ValueError, KeyError, TypeError):
        return "no success in summary.json"
    return f"success {100 * statistics.fmean(per):.1f} +- {100 * statistics.pstdev(per):.1f} %"


def _tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a run's output, without the launcher's own notes, joined by `` | ``."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    text = [ln.strip() for ln in text if ln.strip() and not ln.startswith("[macfw.launch ")]
    return " | ".join(text[-lines:])


def _check_runs(runs: Iterable[RunSpec]) -> list[RunSpec]:
    runs = list(runs)
    seen: dict[Path, str] = {}
    for r in runs:
        if not isinstance(r, RunSpec):
            raise TypeError(f"launch() takes RunSpec objects, got {type(r).__name__}: {r!r}")
        if r.workdir in seen:
            raise ValueError(
                f"runs {seen[r.workdir]!r} and {r.name!r} share the workdir {r.workdir}: "
                "give every run its own workdir (two writers would corrupt it)."
            )
        seen[r.workdir] = r.name
    return runs


class Launcher:
    """Runs a list of :class:`RunSpec` to their end. ``prefix`` starts every progress line."""

    prefix: str = "[launch]"

    def _say(self, text: str) -> None:
        print(f"{self.prefix} {text}", flush=True)

    def launch(self, runs: Iterable[RunSpec]) -> list[RunSpec]:
        """Run every run without ``summary.json`` to its end; return the runs that failed (a run
        succeeded when its command exited 0 and wrote ``summary.json``)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------- locally
class LocalLauncher(Launcher):
    """Subprocesses on this machine, ``parallel`` at once, each one's output appended to
    ``WORKDIR/stdout.log``; runs with ``summary.json`` are skipped.

    Ctrl-C (or any error) while runs are going sends them SIGTERM and waits for them, so each saves
    a checkpoint and exits (re-launch to resume).

    With ``parallel > 1`` the runs start with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the
    environment sets JAX's GPU memory already (``XLA_PYTHON_CLIENT_PREALLOCATE``, ``_MEM_FRACTION`` or
    ``_ALLOCATOR``): by default each JAX process takes 75% of every GPU's memory when it starts, so the
    second run on one GPU would fail with out-of-memory. Each then takes the memory it uses (no effect
    on a CPU).

    Args:
      parallel: runs at once (one process each).
      prefix: starts every progress line.
      poll_s: seconds between checks of the running processes.
    """

    def __init__(self, parallel: int = 1, prefix: str = "[launch]", poll_s: float = 1.0):
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"LocalLauncher(parallel={parallel!r}): must be an integer >= 1 (runs at once).")
        self.parallel, self.prefix, self.poll_s = parallel, prefix, poll_s

    def child_env(self) -> dict[str, str] | None:
        """The runs' environment: None (this process's) with one run at a time or when JAX's GPU memory
        is set already; else this process's plus ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (see the class)."""
        if self.parallel == 1 or any(k in os.environ for k in GPU_MEMORY_ENV):
            return None
        return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    def launch(self, runs: Iterable[RunSpec]) -> list[RunSpec]:
        runs = _check_runs(runs)
        todo = [r for r in runs if not r.finished()]
        for r in runs:
            if r not in todo:
                self._say(f"{r.name}: done already ({r.workdir})")
        running: list[tuple[RunSpec, subprocess.Popen, float]] = []
        failed: list[RunSpec] = []
        env = self.child_env()
        if env is not None and todo:
            self._say(
                f"{self.parallel} runs at once: each starts with XLA_PYTHON_CLIENT_PREALLOCATE=false (runs "
                "sharing a GPU take the memory they use; set XLA_PYTHON_CLIENT_MEM_FRACTION to choose)"
            )
        try:
            while todo or running:
                while todo and len(running) < self.parallel:
                    r = todo.pop(0)
                    r.workdir.mkdir(parents=True, exist_ok=True)
                    step = newest_checkpoint(r.workdir)
                    with open(r.log_path, "a") as log:
                        p = subprocess.Popen(list(r.command), cwd=r.cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
                    running.append((r, p, time.time()))
                    how = f"resumed from step {step}" if step is not None else "started"
                    self._say(f"{r.name}: {how} in {r.workdir}")
                for item in list(running):
                    r, p, t0 = item
                    if p.poll() is None:
                        continue
                    running.remove(item)
                    if p.returncode == 0 and r.finished():
                        self._say(f"{r.name}: finished in {time.time() - t0:.0f} s, {_success_text(r.summary_path)}")
                    else:
                        failed.append(r)
                        why = (
                            f"exit {p.returncode}"
                            if p.returncode
                            else "exit 0 without summary.json (stopped by a signal)"
                        )
                        self._say(f"{r.name}: FAILED ({why}); see {r.log_path}")
                if running or todo:
                    time.sleep(self.poll_s)
        except BaseException:
            for _, p, _ in running:  # let each save a checkpoint (macfw.run: SIGTERM -> save, exit 0)
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for r, p, _ in running:
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                self._say(f"{r.name}: stopped (exit {p.returncode}); re-launch to resume from its checkpoint")
            raise
        return failed


# ---------------------------------------------------------------------------------- on SLURM
def _import_submitit():
    try:
        import submitit
    except ImportError as e:
        raise ImportError(
            f"SlurmLauncher needs submitit, which is not installed ({e}). Install macfw's SLURM extra: {_INSTALL_HINT}"
        ) from None
    return submitit


def _preempt_signal() -> signal.Signals:
    """The signal submitit's jobs treat as preemption (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, "SIG" + name, signal.SIGUSR2)


class RunFailed(RuntimeError):
    """macfw.run exited non-zero in a SLURM job."""


class RunInterrupted(RuntimeError):
    """macfw.run exited 0 without ``summary.json``: it was stopped by a signal after saving (a
    requeued job resumes it; a cancelled one stays unfinished)."""


class SlurmRun:
    """What a SLURM job runs (pickled by submitit): ``spec.command`` as a subprocess, in ``spec.cwd``,
    output appended to ``WORKDIR/stdout.log``.

    ``__call__`` returns the run's summary (a dict) when the command exits 0 and ``summary.json``
    exists; it raises :class:`RunFailed` when the command exits non-zero and :class:`RunInterrupted`
    when it exits 0 without ``summary.json``. A job that finds ``summary.json`` already there
    returns it without running anything.

    :meth:`checkpoint` is submitit's preemption hook (called on USR2, see the module docstring): it
    sends SIGTERM to the subprocess, waits up to ``stop_timeout_s`` seconds for it to save and exit,
    and returns a ``DelayedSubmission`` of a fresh copy of itself, which submitit requeues. SIGTERM
    sent to the job (``scontrol requeue``, ``scancel``, a preemption that requeues) is forwarded to the
    subprocess. The subprocess ignores the preemption signal itself, which SLURM sends to every
    process of the job.
    """

    def __init__(self, spec: RunSpec, stop_timeout_s: float = 60.0):
        self.spec = spec
        self.stop_timeout_s = float(stop_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._returncode: int | None = None

    def __getstate__(self):  # a live process does not travel in submitit's pickle
        return {"spec": self.spec, "stop_timeout_s": self.stop_timeout_s}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["stop_timeout_s"])

    def __repr__(self) -> str:
        return f"SlurmRun({self.spec.name!r}, workdir={str(self.spec.workdir)!r})"

    def _note(self, text: str) -> None:
        """A line in the job's own log (submitit's ``_log.out``) and in ``WORKDIR/stdout.log``."""
        line = f"[macfw.launch {time.strftime('%H:%M:%S')}] job {os.environ.get('SLURM_JOB_ID', '?')}: {text}"
        print(line, flush=True)
        try:
            with open(self.spec.log_path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass

    def __call__(self) -> dict:
        spec = self.spec
        if spec.finished():
            self._note(f"{spec.summary_path} exists already; nothing to run")
            return json.loads(spec.summary_path.read_text())
        spec.workdir.mkdir(parents=True, exist_ok=True)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        step = newest_checkpoint(spec.workdir)
        self._note(
            f"on {socket.gethostname()} (restart {restarts}, "
            f"{'from step ' + str(step) if step is not None else 'no checkpoint yet'}): {' '.join(spec.command)}"
        )
        ignore = _preempt_signal()

        def child_setup():  # the subprocess ignores the preemption signal (USR2's default: terminate)
            signal.signal(ignore, signal.SIG_IGN)

        with open(spec.log_path, "a") as log:
            self._proc = subprocess.Popen(
                list(spec.command), cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup
            )
        proc = self._proc
        # The wait happens in a thread: the main thread only sleeps, so a signal handler (checkpoint()
        # on USR2, the SIGTERM forwarder) can wait for the subprocess without re-entering Popen.wait.
        waiter = threading.Thread(target=lambda: setattr(self, "_returncode", proc.wait()), daemon=True)
        waiter.start()
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._forward_sigterm) if in_main else None
        try:
            while self._returncode is None:
                time.sleep(0.2)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        rc = self._returncode
        if rc != 0:
            raise RunFailed(
                f"{spec.name}: macfw.run exited with {rc}: {_tail(spec.log_path, 1) or 'no output'} "
                f"(its output: {spec.log_path})"
            )
        if not spec.finished():
            raise RunInterrupted(
                f"{spec.name}: macfw.run exited 0 without {spec.summary_path}: stopped by a signal "
                "after saving a checkpoint (a requeued job resumes from it; re-launch otherwise)"
            )
        self._note(f"finished: {spec.summary_path}")
        return json.loads(spec.summary_path.read_text())

    def _forward_sigterm(self, signum, frame) -> None:
        proc = self._proc
        if proc is not None and self._returncode is None:
            self._note("SIGTERM: forwarded to macfw.run, which saves a checkpoint and exits")
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass

    def _stop(self) -> None:
        """SIGTERM to the subprocess; wait up to ``stop_timeout_s`` for it to save and exit."""
        proc = self._proc
        if proc is None or self._returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
        except OSError:
            return
        deadline = time.time() + self.stop_timeout_s
        while self._returncode is None and time.time() < deadline:
            time.sleep(0.2)
        if self._returncode is None:
            self._note(
                f"macfw.run did not exit {self.stop_timeout_s:.0f} s after SIGTERM; requeuing anyway "
                "(SLURM ends it; the restart resumes from the newest complete checkpoint)"
            )
        else:
            self._note(
                f"macfw.run exited {self._returncode} after SIGTERM (newest checkpoint: step "
                f"{newest_checkpoint(self.spec.workdir)})"
            )

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: stop the subprocess (it saves) and requeue this run."""
        submitit = _import_submitit()
        self._note("preemption signal: stopping macfw.run so that it saves, then requeuing this job")
        self._stop()
        return submitit.helpers.DelayedSubmission(SlurmRun(self.spec, self.stop_timeout_s))


def _run_cmd(cmd: list[str], timeout: float = 60.0) -> str:
    """stdout of ``cmd``; a failure raises :class:`SlurmError` naming the command and its output."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"'{' '.join(cmd)}' failed: {e}. Is the SLURM cluster up (sinfo)?") from None
    if out.returncode != 0:
        raise SlurmError(
            f"'{' '.join(cmd)}' exited {out.returncode}: {(out.stderr or out.stdout).strip()}. "
            "Is the SLURM cluster up (sinfo)?"
        )
    return out.stdout


def slurm_available() -> str | None:
    """None when ``sbatch`` is on PATH and ``sinfo`` answers; else why not (one line)."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (no SLURM client; a one-node test cluster: sudo bash .ci/slurm-up)"
    try:
        _run_cmd(["sinfo", "-h", "-o", "%P"], timeout=30)
    except SlurmError as e:
        return f"the SLURM cluster does not answer: {e}"
    return None


def gres_has_gpu(gres: Iterable[str]) -> bool:
    """Whether any node's GRES (lines of ``sinfo -h -o %G``: ``(null)``, ``gpu:a100:4(S:0-1)``,
    ``gpu:2,shard:8``) names a GPU."""
    return any(item.strip().lower().startswith("gpu") for line in gres for item in line.split(","))


@dataclass
class _Waiting:
    """A run's job while :meth:`SlurmLauncher.launch` waits for it."""

    job_id: str
    state: str
    t0: float
    ran: bool = False


@gin.configurable("SlurmLauncher")  # pyright: ignore[reportCallIssue]  (gin's untyped decorator factory)
class SlurmLauncher(Launcher):
    """One SLURM job per run, through submitit, with requeue on preemption (see the module docstring).

    Args:
      partition: SLURM partition (``--partition``); None: the cluster's default partition.
      time_min: time limit of each job (minutes, ``--time``). A run longer than that is signalled
        ``signal_delay_s`` before the limit, saves, and is requeued (at most ``max_num_timeout``
        times), resuming each time.
      gpus_per_job: accelerators per job (``--gpus-per-node``). ``'auto'``: 1 when the partition's
        nodes have GPU GRES (``sinfo -h -o %G``), else none (said once); an integer >= 0: exactly that.
      cpus_per_job: CPU cores per job (``--cpus-per-task``); None: the partition's default (often 1;
        evaluation steps its environments in one worker per core, so give a GPU job 4-8).
      mem_gb: host memory per job (GB, ``--mem``); None: the partition's default.
      folder: where submitit's files (``<jobid>_submission.sh``, ``_submitted.pkl``, ``_0_log.out``,
        ``_0_log.err``, ``_0_result.pkl``) go; None: ``WORKDIR/slurm`` of each run.
      account, qos, constraint: ``--account``, ``--qos``, ``--constraint`` (None: not given).
      setup: shell lines run in the job before the run (``module load ...``, ``source venv/bin/activate``).
      sbatch_args: more ``#SBATCH`` options, e.g. ``{'exclude': 'node7'}``.
      signal_delay_s: seconds between the preemption signal (USR2) and the time limit; the run must
        save within it (the save takes one compiled call plus the checkpoint write).
      max_num_timeout: requeues allowed after hitting the time limit (preemptions are not counted).
      poll_s: seconds between ``squeue`` checks while waiting.
      prefix: starts every progress line.
    """

    def __init__(
        self,
        partition: str | None = None,
        time_min: int = 240,
        gpus_per_job: int | str = "auto",
        cpus_per_job: int | None = None,
        mem_gb: float | None = None,
        folder: str | os.PathLike | None = None,
        account: str | None = None,
        qos: str | None = None,
        constraint: str | None = None,
        setup: Sequence[str] = (),
        sbatch_args: dict | None = None,
        signal_delay_s: int = 120,
        max_num_timeout: int = 20,
        poll_s: float = 10.0,
        prefix: str = "[launch]",
    ):
        check(
            "SlurmLauncher.time_min",
            time_min,
            isinstance(time_min, int) and not isinstance(time_min, bool) and time_min >= 1,
            "an integer >= 1 (minutes)",
        )
        check(
            "SlurmLauncher.gpus_per_job",
            gpus_per_job,
            gpus_per_job == "auto"
            or (isinstance(gpus_per_job, int) and not isinstance(gpus_per_job, bool) and gpus_per_job >= 0),
            "'auto' or an integer >= 0",
        )
        check(
            "SlurmLauncher.cpus_per_job",
            cpus_per_job,
            cpus_per_job is None
            or (isinstance(cpus_per_job, int) and not isinstance(cpus_per_job, bool) and cpus_per_job >= 1),
            "None or an integer >= 1",
        )
        check(
            "SlurmLauncher.mem_gb",
            mem_gb,
            mem_gb is None or (isinstance(mem_gb, (int, float)) and not isinstance(mem_gb, bool) and mem_gb > 0),
            "None or a number > 0 (GB)",
        )
        check(
            "SlurmLauncher.signal_delay_s",
            signal_delay_s,
            isinstance(signal_delay_s, int) and 10 <= signal_delay_s < 60 * time_min,
            f"an integer in 10 .. {60 * time_min - 1} (seconds, "
            f"below the time limit SlurmLauncher.time_min = {time_min} minutes)",
        )
        check(
            "SlurmLauncher.max_num_timeout",
            max_num_timeout,
            isinstance(max_num_timeout, int) and max_num_timeout >= 0,
            "an integer >= 0",
        )
        check("SlurmLauncher.poll_s", poll_s, isinstance(poll_s, (int, float)) and poll_s > 0, "a number > 0 (seconds)")
        if isinstance(setup, str):
            raise ConfigError(
                f"SlurmLauncher.setup = {setup!r} is out of range: must be a list of shell lines, "
                f"not one string. Fix the Gin binding SlurmLauncher.setup (e.g. [{setup!r}])."
            )
        self.partition, self.time_min, self.gpus_per_job = partition, time_min, gpus_per_job
        self.cpus_per_job, self.mem_gb = cpus_per_job, mem_gb
        self.folder = None if folder is None else Path(folder).absolute()
        self.account, self.qos, self.constraint = account, qos, constraint
        self.setup, self.sbatch_args = list(setup), dict(sbatch_args or {})
        self.signal_delay_s, self.max_num_timeout, self.poll_s = signal_delay_s, max_num_timeout, float(poll_s)
        self.prefix = prefix
        self._gpus: int | None = None

    @classmethod
    def from_gin(
        cls, gin_files: Sequence[str | os.PathLike] = (), bindings: Sequence[str] = (), **overrides
    ) -> SlurmLauncher:
        """A launcher from Gin files and bindings (``SlurmLauncher.partition = 'gpu'``, ...); the
        ``overrides`` that are not None (command-line flags) take precedence over them."""
        with gin.unlock_config():
            gin.parse_config_files_and_bindings([str(f) for f in gin_files], list(bindings))
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    # -- cluster queries ---------------------------------------------------------------------
    def resolved_gpus(self) -> int:
        """The accelerators each job asks for (``gpus_per_job``, with ``'auto'`` resolved once)."""
        if self._gpus is None:
            if self.gpus_per_job != "auto":
                self._gpus = int(self.gpus_per_job)
            else:
                cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", self.partition] if self.partition else [])
                gres = [g.strip() for g in _run_cmd(cmd).splitlines() if g.strip()]
                self._gpus = 1 if gres_has_gpu(gres) else 0
                if not self._gpus:
                    where = f"partition {self.partition}" if self.partition else "the default partition"
                    self._say(
                        f"the nodes of {where} have no GPU GRES ('{' '.join(cmd)}': "
                        f"{', '.join(sorted(set(gres))) or 'nothing'}): jobs request no accelerator "
                        "(set SlurmLauncher.gpus_per_job to ask for some anyway)"
                    )
        return self._gpus

    @staticmethod
    def queued() -> dict[str, list[tuple[str, str]]]:
        """This user's jobs in ``squeue``: job name -> [(job id, state), ...]."""
        import getpass

        out = _run_cmd(["squeue", "-h", "-u", getpass.getuser(), "-o", "%j|%i|%T"])
        jobs: dict[str, list[tuple[str, str]]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                jobs.setdefault(parts[0], []).append((parts[1], parts[2]))
        return jobs

    def log_folder(self, run: RunSpec) -> Path:
        """Where submitit's files of ``run``'s jobs go."""
        return self.folder if self.folder is not None else run.workdir / "slurm"

    def job_logs(self, run: RunSpec, job_id: str) -> tuple[Path, Path]:
        """The job's stdout and stderr files (submitit's ``<jobid>_0_log.out`` and ``_log.err``)."""
        folder = self.log_folder(run)
        return folder / f"{job_id}_0_log.out", folder / f"{job_id}_0_log.err"

    def submit(self, run: RunSpec) -> str:
        """Submit ``run`` as one job (no checks: :meth:`launch` decides what to submit); its job id."""
        submitit = _import_submitit()
        run.workdir.mkdir(parents=True, exist_ok=True)
        ex = submitit.SlurmExecutor(folder=self.log_folder(run), max_num_timeout=self.max_num_timeout)
        params: dict = dict(
            job_name=job_name(run.workdir),
            time=self.time_min,
            nodes=1,
            ntasks_per_node=1,
            signal_delay_s=self.signal_delay_s,
            additional_parameters={"requeue": True, **self.sbatch_args},
        )
        if self.cpus_per_job is not None:
            params["cpus_per_task"] = self.cpus_per_job
        if self.partition:
            params["partition"] = self.partition
        if self.resolved_gpus():
            params["gpus_per_node"] = self.resolved_gpus()
        if self.mem_gb is not None:
            params["mem"] = f"{max(1, round(self.mem_gb * 1024))}M"
        for key, value in (("account", self.account), ("qos", self.qos), ("constraint", self.constraint)):
            if value:
                params[key] = value
        if self.setup:
            params["setup"] = list(self.setup)
        ex.update_parameters(**params)
        stop_timeout_s = max(10.0, self.signal_delay_s - 20.0)
        try:
            job = ex.submit(SlurmRun(run, stop_timeout_s=stop_timeout_s))
        except Exception as e:  # submitit's FailedJobError carries sbatch's message
            raise SlurmError(
                f"{run.name}: sbatch refused the job ({type(e).__name__}: {str(e).strip()}). Fix the "
                f"SlurmLauncher settings (partition={self.partition!r}, time_min={self.time_min}, "
                f"gpus={self.resolved_gpus()}, cpus_per_job={self.cpus_per_job}, "
                f"mem_gb={self.mem_gb}) for this cluster (sinfo -o '%P %c %m %G %l')."
            ) from None
        return str(job.job_id)

    # -- the launch ----------------------------------------------------------------------------
    def _failure_reason(self, run: RunSpec, job_id: str, state: str | None) -> str:
        kind, value = self._result(run, job_id)
        lines = [ln.strip() for ln in str(value).strip().splitlines() if ln.strip()] if kind == "error" else []
        why = lines[-1] if lines else "no result from the job (killed, cancelled, or failed before it started)"
        why = re.sub(r"^macfw\.launch\.", "", why)  # "RunFailed: ..."
        out, err = self.job_logs(run, job_id)
        return f"job {job_id}, {state or 'left the queue'}: {why}; see {run.log_path} and {err} ({out.name})"

    def _transition(self, run: RunSpec, w: _Waiting, state: str) -> None:
        """One progress line when a job starts running, and when a job that ran is pending again."""
        if state == "RUNNING":
            again = " again after a requeue" if w.ran else ""
            step = newest_checkpoint(run.workdir)
            self._say(f"{run.name}: job {w.job_id} running{again}" + (f" (resumes from step {step})" if step else ""))
            w.ran = True
        elif state in ("PENDING", "REQUEUED") and w.ran and w.state not in ("PENDING", "REQUEUED"):
            step = newest_checkpoint(run.workdir)
            self._say(
                f"{run.name}: job {w.job_id} requeued ({state}: preempted, timed out or 'scontrol requeue'); "
                + (f"it resumes from step {step}" if step is not None else "no checkpoint: it starts from step 0")
            )
        w.state = state

    def _finished_after(self, run: RunSpec, job_id: str, grace_s: float = 30.0) -> bool:
        """``summary.json`` exists once the job has left the queue. When the job's result says it
        succeeded (it saw ``summary.json``) but the file is not visible here yet (a shared file
        system's attribute cache), look again for up to ``grace_s`` seconds."""
        if run.finished():
            return True
        if self._result(run, job_id)[0] != "success":
            return False
        deadline = time.time() + grace_s
        while time.time() < deadline:
            time.sleep(1.0)
            if run.finished():
                return True
        return False

    def _result(self, run: RunSpec, job_id: str) -> tuple[str | None, object]:
        """submitit's result of the job: ``("success", summary)``, ``("error", traceback text)`` or
        ``(None, None)`` when there is none (yet)."""
        path = self.log_folder(run) / f"{job_id}_0_result.pkl"
        try:
            import pickle

            with open(path, "rb") as f:
                kind, value = pickle.load(f)
            return kind, value
        except Exception:
            return None, None

    def launch(self, runs: Iterable[RunSpec]) -> list[RunSpec]:
        """Submit the runs without ``summary.json`` and without a job in the queue, wait for those and
        for the queued ones, and return the runs that did not finish (see :class:`SlurmLauncher`)."""
        runs = _check_runs(runs)
        if all(r.finished() for r in runs):
            for r in runs:
                self._say(f"{r.name}: done already ({r.workdir})")
            return []
        why = slurm_available()
        if why is not None:
            raise SlurmError(f"SlurmLauncher cannot launch: {why}.")
        _import_submitit()
        queue = self.queued()
        waiting: dict[RunSpec, _Waiting] = {}
        for r in runs:
            if r.finished():
                self._say(f"{r.name}: done already ({r.workdir})")
                continue
            active = [(j, s) for j, s in queue.get(job_name(r.workdir), []) if s not in ENDED_STATES]
            if active:
                jid, state = active[0]
                extra = f" (and {len(active) - 1} more of the same name!)" if len(active) > 1 else ""
                self._say(
                    f"{r.name}: already in the queue as job {jid} ({state}){extra}; waiting for it "
                    f"instead of submitting another ({r.workdir})"
                )
                waiting[r] = _Waiting(jid, state, time.time(), ran=state == "RUNNING")
                continue
            step = newest_checkpoint(r.workdir)
            jid = self.submit(r)
            how = f"resumes from step {step}" if step is not None else "new"
            self._say(
                f"{r.name}: submitted as job {jid} ({how}; logs {self.log_folder(r)}/{jid}_0_log.*, {r.log_path})"
            )
            waiting[r] = _Waiting(jid, "SUBMITTED", time.time())
        try:
            return self._wait(waiting)
        except KeyboardInterrupt:
            names = ",".join(job_name(r.workdir) for r in waiting)
            self._say(
                f"stopped waiting; {len(waiting)} job(s) keep running in the queue (re-launch to wait for "
                f"them, no duplicates are submitted; 'scancel --name={names}' stops them)"
            )
            raise

    def _wait(self, waiting: dict[RunSpec, _Waiting]) -> list[RunSpec]:
        """Poll ``squeue`` until every job in ``waiting`` has ended; the runs that did not finish."""
        failed: list[RunSpec] = []
        errors_since: float | None = None
        while waiting:
            time.sleep(self.poll_s)
            try:
                queue = self.queued()
                errors_since = None
            except SlurmError as e:  # slurmctld restarting: keep waiting, give up after 10 minutes
                errors_since = errors_since or time.time()
                if time.time() - errors_since > 600:
                    raise SlurmError(f"squeue has failed for 10 minutes; the jobs keep running. {e}") from None
                continue
            for r, w in list(waiting.items()):
                state = next((s for j, s in queue.get(job_name(r.workdir), []) if j == w.job_id), None)
                if state is not None and state not in ENDED_STATES:
                    if state != w.state:
                        self._transition(r, w, state)
                    continue
                del waiting[r]
                if self._finished_after(r, w.job_id):
                    self._say(
                        f"{r.name}: finished (job {w.job_id}, {time.time() - w.t0:.0f} s after launch), "
                        f"{_success_text(r.summary_path)}"
                    )
                else:
                    failed.append(r)
                    self._say(f"{r.name}: FAILED ({self._failure_reason(r, w.job_id, state)})")
        return failed
