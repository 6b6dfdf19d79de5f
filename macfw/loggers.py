"""Loggers: where a run's metrics go, as registered components selected by name in Gin.

``train.loggers`` names the loggers of a run (default ``('csv', 'tensorboard')``)::

    train.loggers = ('csv', 'tensorboard', 'wandb')
    WandbLogger.project = 'macfw'
    WandbLogger.group = 'mac-cube-single'

- ``'csv'``: :class:`CSVLogger`, ``WORKDIR/train.csv`` and ``WORKDIR/eval.csv``;
- ``'tensorboard'``: :class:`TensorBoardLogger`, ``WORKDIR/events.out.tfevents.*``;
- ``'wandb'``: :class:`WandbLogger`, a Weights & Biases run (``pip install -e '.[wandb]'``), its
  files in ``WORKDIR/wandb/``, offline without a W&B login.

A logger is built from its Gin bindings when the run's settings are checked (before anything is
written: a bad binding or a missing package fails there), then opened (:meth:`Logger.open`) on the run
folder by the lead process only (process 0 of a multi-host run; the others log nothing), given
the run's Gin config (:meth:`Logger.log_config`), called with every logged row
(:meth:`Logger.log`) and closed at the end, also when the run fails or stops on a signal.

What a logger receives: ``log(step, metrics, split)`` with ``step`` the gradient step and
``metrics`` the row of ``train.csv`` (``split = 'train'``: ``wall_time_s``, ``updates_per_s`` and
the agent's metrics, e.g. ``critic/loss``; every ``train.log_interval`` gradient steps) or of
``eval.csv`` (``split = 'eval'``: ``success``, ``episodes``, ``success/task<i>``, ...; every
``train.eval_interval`` steps), without the ``step`` column. On a resume from step ``S`` the
loop logs again from the first interval after ``S``; ``open`` gets ``resume_step = S`` (None on a
fresh start) to drop or skip what it wrote after ``S``.

Your own logger: subclass :class:`Logger`, register it and select it by its ``short_name`` (or
its class name)::

    @macfw.register("logger")
    class PrintLogger(Logger):
        short_name = "print"

        def open(self, workdir, *, resume_step):
            pass

        def log(self, step, metrics, split):
            print(step, split, metrics)

        def close(self):
            pass

then ``train.loggers = ('csv', 'print')`` with ``--import my_module``.
"""

from __future__ import annotations

import abc
import netrc
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from macfw import diskfull, registry
from macfw.errors import ConfigError, check
from macfw.logs import CSVLog, write_text_atomic

#: The loggers of a run when ``train.loggers`` is not bound (today's files: CSV and TensorBoard).
DEFAULT_LOGGERS: tuple[str, ...] = ("csv", "tensorboard")
#: What ``split`` may be in :meth:`Logger.log`.
SPLITS: tuple[str, ...] = ("train", "eval")
#: The file in the run folder that keeps a run's W&B run id (:class:`WandbLogger`).
WANDB_RUN_ID_FILE = "wandb_run_id"
WANDB_INSTALL = "pip install -e '.[wandb]'"


class Logger(abc.ABC):
    """Base of the loggers: ``open`` on the run folder, ``log`` rows, ``close``.

    Subclasses take only their Gin settings in ``__init__`` (check them there and raise
    :class:`~macfw.errors.ConfigError`: the loop builds the loggers before it writes anything) and
    set :attr:`short_name`, the name ``train.loggers`` selects them by.
    """

    #: The name in ``train.loggers`` (e.g. ``'csv'``); None: the registered (class) name only.
    short_name: ClassVar[str | None] = None

    @abc.abstractmethod
    def open(self, workdir: Path, *, resume_step: int | None) -> None:
        """Start logging into the run folder ``workdir`` (absolute, exists, writable).

        Args:
          workdir: the run folder.
          resume_step: the gradient step the run resumes from (rows the loop logged after it
            will be logged again), None on a fresh start.
        """

    @abc.abstractmethod
    def log(self, step: int, metrics: Mapping[str, float], split: str) -> None:
        """One row: the values of ``metrics`` at gradient step ``step``.

        Args:
          step: the gradient step (the CSV files' ``step`` column).
          metrics: column name -> number (floats; ``episodes`` is an int), in the CSV files' order.
          split: ``'train'`` (a ``train.csv`` row) or ``'eval'`` (an ``eval.csv`` row).
        """

    def log_config(self, config_str: str) -> None:  # noqa: B027  (optional: a logger may ignore the config)
        """The run's Gin config (``gin.config_str()``, as in ``WORKDIR/config.gin``); default: ignored."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release what :meth:`open` opened; called once, also after an error."""


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(
            f"split = {split!r} is not one of {list(SPLITS)}: a logger logs 'train' (train.csv) or "
            "'eval' (eval.csv) rows."
        )
    return split


# ------------------------------------------------------------------------------- selection
def _names_by_short_name() -> dict[str, list[str]]:
    """``{selectable name: [registered names]}``: every logger's short name and its registered name."""
    out: dict[str, list[str]] = {}
    for reg_name in registry.registered("logger"):
        cls = registry.get("logger", reg_name)
        short = getattr(cls, "short_name", None)
        for n in {reg_name, short} - {None}:
            out.setdefault(n, []).append(reg_name)
    return out


def available() -> str:
    """The registered loggers as ``"csv (CSVLogger), tensorboard (TensorBoardLogger), ..."``."""
    parts = []
    for reg_name in registry.registered("logger"):
        short = getattr(registry.get("logger", reg_name), "short_name", None)
        parts.append(f"{short} ({reg_name})" if short and short != reg_name else reg_name)
    return ", ".join(parts)


def logger_classes(names: Any, binding: str = "train.loggers") -> list[type[Logger]]:
    """The registered logger classes that ``names`` selects, in order.

    Args:
      names: a tuple or list of logger names: short names (``'csv'``, ``'tensorboard'``,
        ``'wandb'``) or registered class names (``'WandbLogger'``); may be empty (no logs).
      binding: the Gin binding named in errors.

    Raises:
      ConfigError: ``names`` is not a tuple of names (e.g. a bare string: ``('wandb')`` is a
        string in Gin, ``('wandb',)`` a tuple), names one logger twice, or names a logger that is
        not registered (the message lists the registered ones).
    """
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        hint = f" (for one logger write ({names!r},) with the comma)" if isinstance(names, str) else ""
        raise ConfigError(
            f"{binding} = {names!r} is out of range: must be a tuple of logger names, e.g. "
            f"('csv', 'tensorboard'){hint}. Registered loggers: {available()}. "
            f"Fix the Gin binding {binding}."
        )
    table = _names_by_short_name()
    classes: list[type[Logger]] = []
    for n in names:
        regs = table.get(n)
        if not regs:
            raise ConfigError(
                f"{binding} = {tuple(names)!r} names an unknown logger {n!r}. Registered loggers: "
                f"{available()}. Fix the Gin binding {binding}, or register your own with "
                "@macfw.register('logger') (and --import its module)."
            )
        if len(regs) > 1:
            raise ConfigError(
                f"{binding}: the logger name {n!r} is claimed by several registered loggers {regs}. "
                f"Select one by its registered name, e.g. {regs[0]!r}."
            )
        cls = registry.get("logger", regs[0])
        if not (isinstance(cls, type) and issubclass(cls, Logger)):
            raise ConfigError(
                f"{binding}: {n!r} is registered as a logger but {cls!r} does not subclass "
                "macfw.loggers.Logger. Subclass it (open, log, close)."
            )
        if cls in classes:
            raise ConfigError(
                f"{binding} = {tuple(names)!r} names the logger {n!r} ({regs[0]}) twice: it would "
                f"write its files twice. Fix the Gin binding {binding}."
            )
        classes.append(cls)
    return classes


def make_loggers(names: Any, binding: str = "train.loggers") -> list[Logger]:
    """Build the loggers ``names`` selects from their Gin bindings (nothing is opened or written).

    Raises:
      ConfigError: see :func:`logger_classes`; or a logger's own binding out of range, or its
        package missing (``'wandb'`` without wandb: names ``pip install -e '.[wandb]'``).
    """
    return [cls() for cls in logger_classes(names, binding)]


# ------------------------------------------------------------------------------- CSV, TensorBoard
@registry.register("logger")
class CSVLogger(Logger):
    """``'csv'``: ``WORKDIR/train.csv`` and ``WORKDIR/eval.csv``, append-only, one row per log; a resumed
    run first drops the rows after its checkpoint (:class:`macfw.logs.CSVLog`).

    The header is the first row's keys: ``step``, then the metrics in the order logged
    (The run folder page lists the columns).
    """

    short_name = "csv"

    def __init__(self):
        self._files: dict[str, CSVLog] = {}

    def open(self, workdir: Path, *, resume_step: int | None) -> None:
        workdir = Path(workdir)
        self._files = {
            "train": CSVLog(workdir / "train.csv", resume_step),
            "eval": CSVLog(workdir / "eval.csv", resume_step),
        }

    def log(self, step: int, metrics: Mapping[str, float], split: str) -> None:
        self._files[_check_split(split)].write({"step": step, **metrics})

    def close(self) -> None:  # every row is written and closed at once
        self._files = {}


@registry.register("logger")
class TensorBoardLogger(Logger):
    """``'tensorboard'``: TensorBoard events in ``WORKDIR`` (``tensorboard --logdir WORKDIR``); a resumed
    run purges the events after its checkpoint.

    Training metrics keep their names (``critic/loss``); evaluation metrics are ``eval/<name>``.

    Args:
      eval_metrics: the evaluation columns written (default only ``success``: ``eval/success``).
      train_exclude: training columns not written (default the throughput columns).
    """

    short_name = "tensorboard"

    def __init__(
        self,
        eval_metrics: Sequence[str] = ("success",),
        train_exclude: Sequence[str] = ("wall_time_s", "updates_per_s"),
    ):
        for b, v in (
            ("TensorBoardLogger.eval_metrics", eval_metrics),
            ("TensorBoardLogger.train_exclude", train_exclude),
        ):
            check(
                b,
                v,
                isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
                "a tuple of metric names (CSV column names)",
            )
        self.eval_metrics, self.train_exclude = tuple(eval_metrics), frozenset(train_exclude)
        self.writer = None
        self.workdir: Path | None = None

    def open(self, workdir: Path, *, resume_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        diskfull.install_thread_hook()  # a full disk in tensorboardX's thread: raised by log(), no traceback
        self.workdir = Path(workdir)
        # max_queue: room for every event between two log() calls, so that a put never blocks on a writer
        # thread that died since the last check (tensorboardX's default of 10 blocks forever then)
        self.writer = SummaryWriter(
            str(workdir), purge_step=resume_step + 1 if resume_step is not None else None, max_queue=10_000
        )

    def _check_writer(self) -> None:
        """tensorboardX writes from a thread with a bounded queue: once that thread has died (a full disk),
        ``add_scalar`` would block forever when the queue is full. Raise its error instead (checked at
        every call; the queue holds 10,000 events, far more than one call adds).

        Raises:
          DiskFullError: the thread died of a full disk (the message names the events file).
          OSError: the thread died of something else.
        """
        ew = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
        thread = getattr(ew, "_worker", None)  # tensorboardX's EventFileWriter (private; absent: no check)
        if thread is None or thread.is_alive() or getattr(ew, "_closed", False):
            return
        events = getattr(getattr(ew, "_ev_writer", None), "_file_name", None) or self.workdir
        diskfull.raise_pending(fallback_path=events)
        raise OSError(f"TensorBoard's event writer thread for {events} stopped (see its error above).")

    def log(self, step: int, metrics: Mapping[str, float], split: str) -> None:
        writer = self.writer
        assert writer is not None, "TensorBoardLogger.log before open()"
        self._check_writer()
        if _check_split(split) == "train":
            for k, v in metrics.items():
                if k not in self.train_exclude:
                    writer.add_scalar(k, v, step)
        else:
            for k in self.eval_metrics:
                if k in metrics:
                    writer.add_scalar(f"eval/{k}", metrics[k], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------- Weights & Biases
def _import_wandb():
    """``import wandb``, or a :class:`ConfigError` that names the extra to install."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            f"train.loggers selects 'wandb' but the wandb package cannot be imported ({e}). Install "
            f"it with `{WANDB_INSTALL}` (or `pip install wandb`), or leave 'wandb' out of "
            "train.loggers."
        ) from None
    return wandb


def _wandb_host(environ: Mapping[str, str]) -> str:
    """The W&B server's host name: ``WANDB_BASE_URL``, else the ``base_url`` that ``wandb login --host``
    saved in wandb's settings file, else ``api.wandb.ai``."""
    from urllib.parse import urlsplit

    url = environ.get("WANDB_BASE_URL")
    if not url:
        import configparser

        cfg_dir = environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
        parser = configparser.ConfigParser()
        try:
            parser.read(os.path.join(cfg_dir, "settings"))
            url = parser.get("default", "base_url", fallback=None)
        except (configparser.Error, OSError):
            url = None
    return urlsplit(url).netloc if url else "api.wandb.ai"


def wandb_login_found(environ: Mapping[str, str] | None = None) -> str | None:
    """Where a W&B login is configured, or None: ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` in
    the environment, or an entry with a key for the W&B host (:func:`_wandb_host`) in the netrc file
    (``NETRC``, else ``~/.netrc``; ``wandb login`` writes it). Reads files only, never the network."""
    environ = os.environ if environ is None else environ
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if environ.get(var):
            return var
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not environ.get("NETRC") and not os.path.exists(path):
        path = os.path.join(os.path.expanduser("~"), "_netrc")
    try:
        creds = netrc.netrc(path).authenticators(_wandb_host(environ))
    except (OSError, netrc.NetrcParseError):
        return None
    return path if creds and creds[2] else None


def wandb_mode(mode: str | None, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The ``mode`` to give ``wandb.init`` and why.

    ``mode`` bound in Gin wins; else a ``WANDB_MODE`` (or ``WANDB_DISABLED=true``) in the
    environment (returned as None: wandb reads it); else ``'online'`` with a W&B login
    (:func:`wandb_login_found`), ``'offline'`` without one.

    Returns:
      ``(mode or None, reason)``.
    """
    environ = os.environ if environ is None else environ
    if mode is not None:
        return mode, "WandbLogger.mode"
    if environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={environ['WANDB_MODE']}"
    if environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return None, f"WANDB_DISABLED={environ['WANDB_DISABLED']}"
    where = wandb_login_found(environ)
    if where is not None:
        return "online", f"W&B login found in {where}"
    return "offline", f"no W&B login found (no WANDB_API_KEY, no netrc entry for {_wandb_host(environ)})"


_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def new_run_id(length: int = 8) -> str:
    """A new W&B run id: ``length`` random lowercase letters and digits (wandb's own form)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def wandb_run_id(workdir: Path, new_id) -> tuple[str, bool]:
    """The run folder's W&B run id: read from ``WORKDIR/wandb_run_id``, else ``new_id()`` written there
    atomically (a reader sees no file or the whole id).

    Returns:
      ``(run id, True when it was read: a resumed W&B run)``.

    Raises:
      ConfigError: the file holds something that is not a run id (letters, digits, ``-``, ``_``).
    """
    path = Path(workdir) / WANDB_RUN_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if not _RUN_ID.match(run_id):
            raise ConfigError(
                f"{str(path)!r} holds {run_id[:60]!r}, not a W&B run id (1 to 128 letters, digits, "
                "'-', '_'). Delete the file to start a new W&B run for this workdir, or write the id "
                "of the W&B run to continue into it."
            )
        return run_id, True
    run_id = str(new_id())
    write_text_atomic(path, run_id + "\n")
    return run_id, False


def gin_bindings(config_str: str) -> dict[str, Any]:
    """The bindings of a Gin config as a flat dict for W&B's run config, macros substituted:
    ``{'MAC.horizon': 10, 'dynamics/Ensemble.num': 7, 'MAC.sampler': '@RejectionSampler()',
    'HIDDEN': [256, 256], 'ChunkDynamics.hidden_dims': [256, 256], ...}`` (tuples as lists).

    Raises:
      ValueError (or a Gin parsing error): ``config_str`` is not a Gin config.
    """
    from gin import config_parser

    class _Macro(str):
        pass

    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return "@" + scoped_name + ("()" if evaluate else "")

        def macro(self, name):
            return _Macro(name)

    raw: dict[str, Any] = {}
    macros: dict[str, Any] = {}
    for st in config_parser.ConfigParser(config_str, Delegate()):
        if not isinstance(st, config_parser.BindingStatement):
            continue
        sel = (st.scope + "/" if st.scope else "") + st.selector
        if st.arg_name:
            raw[f"{sel}.{st.arg_name}"] = st.value
        else:  # a macro: NAME = value
            raw[sel] = macros[sel] = st.value

    def plain(v, depth=0):
        if isinstance(v, _Macro):
            return plain(macros[v], depth + 1) if v in macros and depth < 16 else "%" + v
        if isinstance(v, (tuple, list)):
            return [plain(x, depth) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x, depth) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return repr(v)

    return {k: plain(v) for k, v in raw.items()}


@registry.register("logger")
class WandbLogger(Logger):
    """``'wandb'``: a Weights & Biases run, offline unless a W&B login is configured (optional:
    ``pip install -e '.[wandb]'``).

    Metrics are logged with wandb's step = the gradient step, named ``train/<column>`` and
    ``eval/<column>`` after the CSV files' columns (``train/critic/loss``, ``train/updates_per_s``,
    ``eval/success``, ``eval/success/task2``). The run config is the Gin config: every binding by
    name (W&B shows ``gin.MAC.horizon``; macros substituted) and the whole text (``gin_config``).

    Files: wandb's own, in ``WORKDIR/wandb/`` (``offline-run-<time>-<id>/`` or ``run-<time>-<id>/``
    per start). The run id is kept in ``WORKDIR/wandb_run_id`` (written on the first start:
    ``WANDB_RUN_ID`` if set, else a new id), so a resumed run continues the same W&B run
    (``resume='allow'``); offline, each start writes its own folder and ``wandb sync
    WORKDIR/wandb/offline-run-*`` uploads them into that one run, in order. A resumed online run
    skips the steps W&B already has (wandb refuses steps below its last).

    Mode: :func:`wandb_mode`: ``mode`` when bound, else ``WANDB_MODE`` from the environment,
    else ``'online'`` with a W&B login (``WANDB_API_KEY``, or a netrc entry from ``wandb login``),
    else ``'offline'``. Only the lead process of a multi-host run opens it.

    Args:
      project: the W&B project.
      entity: the W&B team or user (None: your default entity).
      group: W&B group, e.g. one per configuration to put seeds together (None: no group).
      name: the run's display name (None: the workdir's folder name).
      tags: W&B tags, a tuple of strings.
      mode: ``'online'``, ``'offline'``, ``'disabled'`` or None (automatic, above).

    Raises:
      ConfigError: (when built) wandb is not installed (names ``pip install -e '.[wandb]'``) or a
        binding is out of range; (when opened) ``WORKDIR/wandb_run_id`` is not a run id, or
        ``wandb.init`` failed (the message has wandb's reason and the fixes).
    """

    short_name = "wandb"
    MODES: ClassVar[tuple[str, ...]] = ("online", "offline", "disabled")

    def __init__(
        self,
        project: str = "macfw",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
    ):
        for b, v in (("WandbLogger.entity", entity), ("WandbLogger.group", group), ("WandbLogger.name", name)):
            check(b, v, v is None or (isinstance(v, str) and v != ""), "None or a non-empty string")
        check("WandbLogger.project", project, isinstance(project, str) and project != "", "a non-empty string")
        check(
            "WandbLogger.tags",
            tags,
            isinstance(tags, (tuple, list)) and all(isinstance(t, str) and t for t in tags),
            "a tuple of non-empty strings, e.g. ('mac', 'smoke')",
        )
        check(
            "WandbLogger.mode",
            mode,
            mode is None or mode in self.MODES,
            f"None (automatic: WANDB_MODE, else online with a W&B login, else offline) or one of {list(self.MODES)}",
        )
        self.wandb = _import_wandb()
        self.project, self.entity, self.group, self.name = project, entity, group, name
        self.tags, self.mode = tuple(tags), mode
        self.run = None
        self.run_id: str | None = None
        self._first_step = 0

    def open(self, workdir: Path, *, resume_step: int | None) -> None:
        wandb = self.wandb
        workdir = Path(workdir)
        env_id = os.environ.get("WANDB_RUN_ID")
        self.run_id, resumed = wandb_run_id(workdir, lambda: env_id or new_run_id())
        mode, why = wandb_mode(self.mode)
        try:
            self.run = wandb.init(
                project=self.project,
                entity=self.entity,
                group=self.group,
                name=self.name or workdir.name,
                tags=list(self.tags),
                dir=str(workdir),
                id=self.run_id,
                resume="allow",
                mode=cast(Literal["online", "offline", "disabled"] | None, mode),  # None, or one of MODES (checked)
            )
        except Exception as e:
            raise ConfigError(
                f"WandbLogger: wandb.init failed for run id {self.run_id!r} in mode {mode or 'from ' + why} "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). Log in with "
                "`wandb login`, or run offline (WANDB_MODE=offline or WandbLogger.mode = 'offline'), or leave "
                "'wandb' out of train.loggers."
            ) from e
        self._first_step = int(getattr(self.run, "step", 0) or 0)  # online resume: W&B's next step
        effective = getattr(getattr(self.run, "settings", None), "mode", None) or mode
        where = f"{workdir / 'wandb'}"
        sync = f"; upload with `wandb sync {where}/offline-run-*`" if effective in ("offline", "dryrun") else ""
        print(
            f"[macfw] wandb: run {self.run_id} ({'continued' if resumed else 'new'}), mode {effective} "
            f"[{why}]; files in {where}{sync}",
            flush=True,
        )

    def log(self, step: int, metrics: Mapping[str, float], split: str) -> None:
        _check_split(split)
        if step < self._first_step:
            return
        assert self.run is not None, "WandbLogger.log before open()"
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=int(step))

    def log_config(self, config_str: str) -> None:
        try:
            bindings = gin_bindings(config_str)
        except Exception:  # a config the parser cannot read: keep the text alone
            bindings = {}
        assert self.run is not None, "WandbLogger.log_config before open()"
        self.run.config.update({"gin": bindings, "gin_config": config_str}, allow_val_change=True)

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()


def open_loggers(
    loggers: Iterable[Logger], workdir: Path, *, resume_step: int | None, config_str: str, opened: list
) -> list[Logger]:
    """Open ``loggers`` on ``workdir`` one by one, appending each to ``opened`` as soon as it is open
    (so that the caller closes exactly those when a later one fails), and give each the config.

    Returns:
      ``opened``.
    """
    for lg in loggers:
        lg.open(Path(workdir), resume_step=resume_step)
        opened.append(lg)
        lg.log_config(config_str)
    return opened


__all__ = [
    "Logger",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "DEFAULT_LOGGERS",
    "SPLITS",
    "WANDB_RUN_ID_FILE",
    "logger_classes",
    "make_loggers",
    "open_loggers",
    "available",
    "wandb_mode",
    "wandb_login_found",
    "wandb_run_id",
    "new_run_id",
    "gin_bindings",
]
