"""Loggers (``macfw.loggers``): selected by name in ``train.loggers``; Weights & Biases offline, its files
under the workdir and its run id kept there, so a resumed run continues the same W&B run; a user's own
logger selected by name. (Unchanged CSV and TensorBoard output with the default loggers:
``tests/test_run_e2e.py``; bad ``train.loggers`` bindings: ``tests/test_bad_bindings.py``.)

The end-to-end tests run ``python -m macfw.run`` on gin/smoke.gin twice on one workdir (20 steps, then
40: a resume from the step-20 checkpoint) with ``train.loggers = ('csv', 'tensorboard', 'wandb',
'list')``; they need wandb (``pip install -e '.[wandb]'``; CI installs it) and skip without it. Nothing
reaches the network: the first run sets ``WANDB_MODE=offline``, the second has no ``WANDB_MODE``, no
API key and an empty netrc (macfw then chooses offline itself), and ``WANDB_BASE_URL`` points at a
closed local port. The W&B files are read with wandb's own protobuf records (``run-<id>.wandb``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from macfw import loggers as L
from macfw import registry
from macfw.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(
    not HAVE_WANDB, reason="wandb is not installed: pip install -e '.[wandb]' (CI installs it)"
)

# A user's logger, in the module a run imports with --import: one JSON line per call into WORKDIR/list.jsonl.
LIST_LOGGER = '''
import json
import macfw
from macfw.loggers import Logger


@macfw.register("logger")
class ListLogger(Logger):
    """Test logger: every call as a JSON line in WORKDIR/list.jsonl."""

    short_name = "list"

    def open(self, workdir, *, resume_step):
        self.f = open(workdir / "list.jsonl", "a")
        self._write(event="open", resume_step=resume_step)

    def _write(self, **kw):
        self.f.write(json.dumps(kw) + "\\n")
        self.f.flush()

    def log_config(self, config_str):
        self._write(event="config", text=config_str)

    def log(self, step, metrics, split):
        self._write(event="log", step=step, split=split, metrics=dict(metrics))

    def close(self):
        self._write(event="close")
        self.f.close()
'''


# ------------------------------------------------------------------------------- selection
def test_selected_by_short_or_registered_name_in_order():
    assert L.logger_classes(("tensorboard", "CSVLogger")) == [L.TensorBoardLogger, L.CSVLogger]
    assert L.logger_classes(()) == []
    assert {"CSVLogger", "TensorBoardLogger", "WandbLogger"} <= set(registry.registered("logger"))
    with pytest.raises(
        ConfigError,
        match=r"unknown logger 'tb'\. Registered loggers: csv \(CSVLogger\), "
        r"tensorboard \(TensorBoardLogger\), wandb \(WandbLogger\)",
    ):
        L.logger_classes(("csv", "tb"))


@pytest.fixture
def test_registrations():
    """Loggers a test registers leave the registry afterwards."""
    before = set(registry.registered("logger"))
    yield
    for name in set(registry.registered("logger")) - before:
        registry._REGISTRY["logger"].pop(name)  # noqa: SLF001  (no public unregister)


def test_a_users_logger_registered_in_the_test_is_selected_by_name(tmp_path, test_registrations):
    @registry.register("logger")
    class MemoryLogger(L.Logger):
        short_name = "memory"

        def open(self, workdir, *, resume_step):
            self.rows, self.resume_step = [], resume_step

        def log(self, step, metrics, split):
            self.rows.append((step, split, dict(metrics)))

        def close(self):
            self.closed = True

    (lg,) = L.make_loggers(("memory",))
    assert type(lg) is MemoryLogger and "memory (MemoryLogger)" in L.available()
    L.open_loggers([lg], tmp_path, resume_step=20, config_str="train.num_steps = 40\n", opened=[])
    lg.log(30, {"critic/loss": 0.5}, "train")
    lg.close()
    assert lg.resume_step == 20 and lg.rows == [(30, "train", {"critic/loss": 0.5})] and lg.closed

    class NotALogger:
        short_name = "nope"

    registry.register("logger", name="NotALoggerForTest")(NotALogger)
    with pytest.raises(ConfigError, match="does not subclass macfw.loggers.Logger"):
        L.logger_classes(("NotALoggerForTest",))


def test_wandb_missing_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install -e '.[wandb]'")):
        L.make_loggers(("csv", "wandb"))


# ------------------------------------------------------------------------------- W&B without wandb.init
def test_wandb_mode_offline_without_a_login_online_with_one_and_the_users_choice_wins(tmp_path):
    netrc = tmp_path / "netrc"
    base = {"NETRC": str(netrc), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    assert L.wandb_mode(None, base)[0] == "offline"  # no netrc file at all
    netrc.write_text("machine github.com login x password y\n")
    mode, why = L.wandb_mode(None, base)
    assert mode == "offline" and "api.wandb.ai" in why
    assert L.wandb_mode(None, {**base, "WANDB_API_KEY": "k" * 40})[0] == "online"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert L.wandb_mode(None, base)[0] == "online"
    # a self-hosted server: the netrc entry of the configured host counts, api.wandb.ai's does not
    assert L.wandb_mode(None, {**base, "WANDB_BASE_URL": "https://wandb.example.org"})[0] == "offline"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings").write_text("[default]\nbase_url = https://api.wandb.ai\n")
    assert L.wandb_mode(None, base)[0] == "online"
    # the user's own choice: WANDB_MODE (left to wandb: None), then WandbLogger.mode over everything
    assert L.wandb_mode(None, {**base, "WANDB_MODE": "disabled"}) == (None, "WANDB_MODE=disabled")
    assert L.wandb_mode(None, {**base, "WANDB_DISABLED": "true"})[0] is None
    assert L.wandb_mode(None, {**base, "WANDB_DISABLED": "false"})[0] == "online"
    assert L.wandb_mode("offline", {**base, "WANDB_MODE": "online"})[0] == "offline"


def test_wandb_run_id_is_written_once_atomically_then_read(tmp_path):
    run_id, resumed = L.wandb_run_id(tmp_path, lambda: "abc123xy")
    assert (run_id, resumed) == ("abc123xy", False)
    assert (tmp_path / L.WANDB_RUN_ID_FILE).read_text() == "abc123xy\n"
    assert L.wandb_run_id(tmp_path, lambda: pytest.fail("a new id on resume")) == ("abc123xy", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [L.WANDB_RUN_ID_FILE]  # no temporary file left
    (tmp_path / L.WANDB_RUN_ID_FILE).write_text("not/an id\n")
    with pytest.raises(ConfigError, match=r"wandb_run_id' holds 'not/an id', not a W&B run id.*Delete the file"):
        L.wandb_run_id(tmp_path, L.new_run_id)
    assert re.fullmatch(r"[a-z0-9]{8}", L.new_run_id())


def test_gin_config_as_wandb_config():
    text = (
        "HIDDEN = (32, 32)\nMAC.horizon = 3\nMAC.sampler = @RejectionSampler()\nMAC.dynamics = @ChunkDynamics\n"
        "QCritic.hidden_dims = %HIDDEN\ndynamics/Ensemble.num = 7\ntrain.loggers = ('csv', 'wandb')\n"
    )
    assert L.gin_bindings(text) == {
        "HIDDEN": [32, 32],
        "MAC.horizon": 3,
        "MAC.sampler": "@RejectionSampler()",
        "MAC.dynamics": "@ChunkDynamics",
        "QCritic.hidden_dims": [32, 32],
        "dynamics/Ensemble.num": 7,
        "train.loggers": ["csv", "wandb"],
    }


# ------------------------------------------------------------------------------- end to end
def wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file (wandb's LevelDB-log format: a 7-byte header
    ``:W&B`` + magic + version, then 32 KiB blocks of records with a 7-byte header: CRC, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with wandb's header: {data[:7]!r} (format changed?)"
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        part = chunk if kind in (1, 2) else part + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()  # pyright: ignore[reportAttributeAccessIssue]  (protobuf: generated at import)
            rec.ParseFromString(part)
            out.append(rec)
    return out


def wandb_part(folder: Path) -> dict:
    """One start of the run: its run record, history rows ``{_step: {key: value}}`` and config updates."""
    (f,) = folder.glob("run-*.wandb")
    run, history, config = None, {}, {}
    for rec in wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(row.pop("_step")), {}).update(row)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return {"file": f, "run": run, "history": history, "config": config}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "MACFW_DEBUG")}
    env.setdefault("MACFW_CACHE_DIR", str(root / "cache"))  # the session's dataset cache (tests/conftest.py)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(
        PYTHONPATH=os.pathsep.join([str(root / "mods"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        NETRC=str(root / "netrc-empty"),
        WANDB_SILENT="true",
        WANDB_ERROR_REPORTING="false",
        WANDB_BASE_URL="http://127.0.0.1:9",
        WANDB_CONFIG_DIR=str(root / "wandb-config"),
        WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_DATA_DIR=str(root / "wandb-data"),
    )
    return env


def _run(workdir: Path, env: dict, *bindings: str) -> subprocess.CompletedProcess:
    b = ["train.progress = False", "train.loggers = ('csv', 'tensorboard', 'wandb', 'list')", *bindings]
    cmd = [
        sys.executable,
        "-m",
        "macfw.run",
        "--import",
        "list_logger",
        "--gin_file",
        "gin/smoke.gin",
        *[a for x in b for a in ("--gin_bindings", x)],
        "--workdir",
        str(workdir),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke run to step 20 (``WANDB_MODE=offline``), then the plain command again (40 steps, resumed;
    no ``WANDB_MODE``: macfw finds no login and goes offline)."""
    root = tmp_path_factory.mktemp("loggers")
    (root / "mods").mkdir()
    (root / "mods" / "list_logger.py").write_text(LIST_LOGGER)
    env = _env(root)
    w = root / "run"
    r1 = _run(w, {**env, "WANDB_MODE": "offline"}, "train.num_steps = 20")
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    run_id = (w / "wandb_run_id").read_text().strip()
    first = sorted((w / "wandb").glob("offline-run-*"))
    r2 = _run(w, env)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return dict(w=w, r1=r1, r2=r2, run_id=run_id, first=first, parts=sorted((w / "wandb").glob("offline-run-*")))


@pytest.mark.slow
@needs_wandb
def test_wandb_run_folder_under_the_workdir_with_the_kept_run_id(runs):
    w, run_id = runs["w"], runs["run_id"]
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    assert len(runs["first"]) == 1 and re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}", runs["first"][0].name)
    assert f"[macfw] wandb: run {run_id} (new), mode offline [WANDB_MODE=offline]" in runs["r1"].stdout
    part = wandb_part(runs["first"][0])
    assert part["run"].run_id == run_id and part["run"].project == "macfw" and part["run"].display_name == "run"
    # the train rows at 10 and 20, the evaluation at 20, with the CSV files' names and values
    assert sorted(part["history"]) == [10, 20]
    header = list(_rows(w / "train.csv")[0])
    assert header[:3] == ["step", "wall_time_s", "updates_per_s"] and "train/critic/loss" not in header
    for row in _rows(w / "train.csv")[:2]:
        logged = part["history"][int(row["step"])]
        assert {f"train/{c}" for c in header[1:]} <= set(logged)
        for c in ("dynamics/loss", "critic/loss", "wall_time_s"):
            assert logged[f"train/{c}"] == pytest.approx(float(row[c]), rel=1e-6), c
    eval_row = _rows(w / "eval.csv")[0]
    assert int(eval_row["step"]) == 20
    assert {f"eval/{c}" for c in eval_row if c != "step"} <= set(part["history"][20])
    assert part["history"][20]["eval/success"] == pytest.approx(float(eval_row["success"]))
    # the run's Gin config: the bindings by name and the text
    assert part["config"]["gin"]["train.num_steps"] == 20 and part["config"]["gin"]["MAC.horizon"] == 3
    assert "train.num_steps = 20" in part["config"]["gin_config"]


@pytest.mark.slow
@needs_wandb
def test_a_resumed_run_continues_the_same_wandb_run(runs):
    w, run_id = runs["w"], runs["run_id"]
    assert "resuming from step 20" in runs["r2"].stdout
    assert (w / "wandb_run_id").read_text() == run_id + "\n"
    # no WANDB_MODE, no API key, an empty netrc: macfw chose offline itself
    assert re.search(
        rf"\[macfw\] wandb: run {run_id} \(continued\), mode offline \[no W&B login found", runs["r2"].stdout
    ), runs["r2"].stdout[-3000:]
    parts = runs["parts"]
    assert len(parts) == 2 and parts[0] == runs["first"][0]
    assert all(p.name.endswith("-" + run_id) for p in parts)
    second = wandb_part(parts[1])
    assert second["run"].run_id == run_id
    assert sorted(second["history"]) == [30, 40] and "eval/success" in second["history"][40]
    rows = {int(r["step"]): r for r in _rows(w / "train.csv")}
    assert sorted(rows) == [10, 20, 30, 40]
    assert second["history"][30]["train/dynamics/loss"] == pytest.approx(float(rows[30]["dynamics/loss"]), rel=1e-6)
    assert second["config"]["gin"]["train.num_steps"] == 40


@pytest.mark.slow
@needs_wandb
def test_a_users_logger_gets_every_row_the_csv_files_get(runs):
    w = runs["w"]
    events = [json.loads(line) for line in (w / "list.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(events) if e["event"] == "open"]
    assert [events[i]["resume_step"] for i in starts] == [None, 20]
    for (a, b), steps in zip(((starts[0], starts[1]), (starts[1], len(events))), ((10, 20), (30, 40))):
        part = events[a:b]
        assert part[1]["event"] == "config" and "train.loggers = " in part[1]["text"]
        assert part[-1] == {"event": "close"}
        logs = [(e["step"], e["split"]) for e in part if e["event"] == "log"]
        assert logs == [(steps[0], "train"), (steps[1], "train"), (steps[1], "eval")], logs
    train_rows = {int(r["step"]): r for r in _rows(w / "train.csv")}
    eval_rows = {int(r["step"]): r for r in _rows(w / "eval.csv")}
    for e in events:
        if e["event"] == "log":
            row = (train_rows if e["split"] == "train" else eval_rows)[e["step"]]
            assert list(e["metrics"]) == [c for c in row if c != "step"]  # the columns, in order
            assert e["metrics"]["wall_time_s" if e["split"] == "train" else "success"] == pytest.approx(
                float(row["wall_time_s" if e["split"] == "train" else "success"])
            )


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """summary.json and the run-id file are written through mkstemp (mode 0600); they must end with the
    mode a plain open() gives (0666 less the umask), so others can read a run folder on a shared cluster."""
    import os
    import stat

    from macfw.logs import write_json_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "s.json", {"a": 1})
        write_text_atomic(tmp_path / "t.txt", "x")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(tmp_path / p).st_mode) for p in ("s.json", "t.txt", "plain")}
    assert modes["s.json"] == modes["t.txt"] == modes["plain"] == 0o644, modes
