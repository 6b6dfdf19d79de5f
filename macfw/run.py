"""Command line: ``python -m macfw.run --gin_file F [--gin_file F2] [--gin_bindings B] --workdir DIR``.

Re-running the same command on the same DIR resumes from the newest complete checkpoint.

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after saving (re-run to resume); 2 a known user
error (unknown component or Gin binding, a configured value out of range such as ``MAC.horizon = 0``
(before anything is written to DIR), bad dataset file or environment, a checkpoint that does not
fit the config, workdir not writable, workdir in use by another run: one writer per workdir, see
:mod:`macfw.workdir_lock`), printed as one line ``macfw: error: ...`` on stderr; 3 the
training diverged (NaN/Inf; the step and loss terms are named); 130 a second Ctrl-C. Set
``MACFW_DEBUG=1`` to get the full traceback of known errors too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import signal
import sys
from typing import NoReturn

import gin

import macfw  # noqa: F401  (registers every built-in component)
import macfw.train  # noqa: F401  (registers train() with Gin)
from macfw import diskfull, registry
from macfw.memory import retain_freed_memory


class GinConfigError(ValueError):
    """A Gin file or binding that cannot be parsed or names an unknown parameter."""


def _configurable_params(name: str) -> list[str] | None:
    """The parameters a Gin configurable accepts (None when it cannot be found)."""
    try:
        from gin import config as gin_config

        selector = gin_config._REGISTRY.get_match(name)  # noqa: SLF001
        if selector is None:
            return None
        fn = selector.wrapped
        target = fn.__init__ if inspect.isclass(fn) else fn
        params = [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
        return params
    except Exception:
        return None


def _gin_error(e: Exception) -> GinConfigError:
    msg = str(e)
    first = msg.splitlines()[0] if msg else type(e).__name__
    where = " ".join(line.strip() for line in msg.splitlines()[1:3])
    m = re.search(r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'", msg)
    if m:
        conf, param = m.group(1), m.group(2)
        params = _configurable_params(conf) or []
        close = difflib.get_close_matches(param, params, n=3)
        hint = f" Did you mean {', '.join(repr(f'{conf}.{c}') for c in close)}?" if close else ""
        return GinConfigError(
            f"Unknown Gin binding {conf}.{param} ({where}): {conf} has no parameter {param!r}.{hint} "
            f"Its parameters: {params}. Fix the binding in the Gin file or --gin_bindings."
        )
    return GinConfigError(
        f"Bad Gin config: {first} ({where}). Fix the Gin file or --gin_bindings (form: Configurable.parameter = value)."
    )


def parse_gin(gin_files, gin_bindings) -> None:
    """Parse Gin files and bindings; an unknown component name lists the registered ones.

    Raises:
      registry.UnknownComponentError: a ``@Name`` that is not registered.
      GinConfigError (a ValueError): any other Gin error (unknown parameter, syntax): names the
        binding and its line, and for an unknown parameter lists the valid ones.
      FileNotFoundError: a Gin file that does not exist.
    """
    for f in gin_files:  # lets `include 'gin/mac.gin'` resolve from the repo and from the file's folder
        if not os.path.isfile(f):
            raise FileNotFoundError(f"Gin file {f!r} does not exist (relative to {os.getcwd()!r}). Fix --gin_file.")
        d = os.path.dirname(os.path.abspath(f))
        for path in (d, os.path.dirname(d), os.path.dirname(os.path.dirname(d))):
            gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))
    except (ValueError, SyntaxError) as e:
        msg = str(e)
        m = re.search(r"No configurable matching (?:reference )?'@?([\w./]+)(?:\(\))?'", msg)
        if m:
            name = m.group(1).split("/")[-1].split(".")[-1]
            binding = re.search(r"^\s*([\w./]+)\s*=\s*@", msg, re.M)
            slot = binding.group(1).split(".")[-1] if binding else None
            kinds = [slot] if slot in registry.KINDS else [k for k in registry.KINDS if registry.registered(k)]
            listing = "; ".join(f"{k}: {registry.registered(k)}" for k in kinds)
            raise registry.UnknownComponentError(
                f"Unknown component {name!r} in the Gin config. Registered components — {listing}. "
                f"Fix the name, or import the module that registers it with --import.\n{msg}"
            ) from None
        raise _gin_error(e) from None


def known_errors() -> tuple[type[BaseException], ...]:
    """User errors reported as one line (exit code 2) instead of a traceback."""
    from macfw.checkpoint import CheckpointMismatchError, CheckpointSaveError
    from macfw.data.ogbench_data import DatasetError
    from macfw.errors import ConfigError
    from macfw.evaluation import TaskMismatchError, WorkerDiedError
    from macfw.train import WorkdirError
    from macfw.workdir_lock import WorkdirBusyError

    return (
        registry.UnknownComponentError,
        GinConfigError,
        DatasetError,
        FileNotFoundError,
        CheckpointMismatchError,
        CheckpointSaveError,
        ConfigError,
        WorkdirError,
        WorkdirBusyError,
        TaskMismatchError,
        WorkerDiedError,  # after its restarts (the step's checkpoint was saved before the evaluation)
        diskfull.DiskFullError,
    )


def one_line(e: BaseException) -> str:
    """The exception's message without Gin's call context, on one line."""
    lines = [
        ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("In call to configurable")
    ]
    if isinstance(e, registry.UnknownComponentError):
        lines = lines[:1]
    return " ".join(lines) or type(e).__name__


def report(prog: str, e: BaseException) -> None:
    """``<prog>: error: <one line>`` on stderr, in one write (another thread's output cannot split it)."""
    sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
    sys.stderr.flush()


def last_word(prog: str, e: BaseException) -> NoReturn:
    """:func:`report` as the process's last output, then exit 2 at once (``os._exit``).

    For a full disk: Orbax's and TensorStore's threads, tensorboardX's writer and the exit handlers
    would now fail on it too, each printing a traceback, some of them after the line (TensorStore's
    "Event loop is closed" from its own threads; tests/test_faults.py saw one split the line). So
    stderr and stdout are pointed at ``/dev/null`` first, for every thread, and the line goes to a
    copy of the original stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    line = f"{prog}: error: {one_line(e)}\n".encode()
    try:
        err = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.write(err, line)
    except OSError:  # no stderr to duplicate: say it the plain way
        report(prog, e)
    os._exit(2)


def _early_signals() -> None:
    """Until train() takes over: SIGTERM/SIGINT stop the start-up at once (nothing to save yet).

    The signal is also kept (:func:`macfw.signals.note_early`): a handler's exception that lands in
    code that ignores exceptions (a garbage-collection callback: "Exception ignored in ...") would
    otherwise be lost and the run would go on; train() then stops at its first check."""
    from macfw.signals import note_early
    from macfw.train import Preempted

    def handle(signum, frame):
        note_early(signum)
        raise Preempted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``<macfw cache>/jax-compile``, so a resumed or repeated
    run skips compilation. ``JAX_COMPILATION_CACHE_DIR`` overrides the folder; ``MACFW_NO_COMPILE_CACHE=1``
    turns it off."""
    if os.environ.get("MACFW_NO_COMPILE_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    try:
        import jax

        from macfw.data.generate import default_cache_dir

        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax-compile"))
        # every program, not only those that took over 1 s to compile (JAX's default): a run's start
        # compiles a dozen small ones (the init, evaluation's policy call, a rollout) that add up to seconds
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except Exception as e:  # never fail a run for a cache
        print(f"[macfw] compilation cache disabled: {e}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m macfw.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gin_file", action="append", default=[], help="Gin config file (repeatable).")
    p.add_argument("--gin_bindings", action="append", default=[], help="Gin binding, e.g. 'train.num_steps = 10'.")
    p.add_argument("--workdir", required=True, help="Run folder; re-use it to resume.")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        help="Python module to import first (registers your own components).",
    )
    p.add_argument("--coordinator_address", default=None, help="multi-host: jax.distributed coordinator HOST:PORT")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    args = p.parse_args(argv)
    if not args.gin_file:
        p.error("give at least one --gin_file (e.g. gin/quickstart.gin)")
    from macfw.train import NonFiniteError, Preempted

    debug = bool(os.environ.get("MACFW_DEBUG"))
    in_main = argv is None
    if in_main:
        _early_signals()
    _enable_compilation_cache()
    diskfull.install_thread_hook()  # a full disk in a writer thread: kept for one line, not a traceback
    diskfull.quiet_library_logs()
    diskfull.clear()  # (an earlier run in this process: its full disk is not this run's)
    retain_freed_memory()  # XLA's per-dispatch buffers stay mapped (macfw.memory)
    try:
        from macfw.parallel import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        for mod in args.imports:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise FileNotFoundError(f"--import {mod!r} failed ({e}). Fix the module name or PYTHONPATH.") from e
        parse_gin(args.gin_file, args.gin_bindings)
        from macfw.train import train

        summary = train(args.workdir)
        if in_main:  # done: a signal from now on (a job ending as it finishes) has nothing to stop or save
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
    except Preempted as e:
        print(
            f"[macfw] stopped by signal {e.args[0] if e.args else ''} during start-up; nothing to save. "
            "Re-run the same command to resume.",
            flush=True,
        )
        return 0
    except KeyboardInterrupt:
        print(
            "macfw: interrupted (second Ctrl-C); the last started checkpoint save was waited for.",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except Exception as e:
        full = diskfull.disk_full_error(e, fallback_path=args.workdir) or diskfull.disk_full_error(
            diskfull.pending(), fallback_path=args.workdir
        )
        if debug or not (full is not None or isinstance(e, (NonFiniteError, *known_errors()))):
            raise
        if full is not None and in_main:  # the other threads and exit handlers would fail on it too
            last_word("macfw", full)
        report("macfw", full or e)
        return 3 if full is None and isinstance(e, NonFiniteError) else 2
    if summary.get("interrupted"):
        saved = summary.get("last_saved_step")
        print(
            f"[macfw] stopped by a signal at step {summary['step']} ("
            + (f"newest checkpoint: step {saved}" if saved is not None else "no checkpoint yet")
            + "); re-run the same command to resume.",
            flush=True,
        )
        return 0
    if "success" not in summary:  # non-lead process of a multi-host run
        return 0
    print(
        f"[macfw] done: step {summary['step']}, success {summary['success']:.3f} over {summary['episodes']} "
        f"episodes, {summary['wall_time_s']:.0f} s; summary in {args.workdir}/summary.json",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
