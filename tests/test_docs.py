"""The documentation: its tutorials run as written, its generated parts, its build.

How a tutorial (``docs/tutorials/*.md``) is run -- the convention its author follows:

* Every fenced block opened with exactly ```` ```bash ```` is **run**: the blocks of a page in page
  order, each with ``bash -e -o pipefail``, all in one temporary folder per page. That folder holds
  symbolic links ``gin``, ``examples``, ``experiments`` (and ``.ci``) to the repository's folders, so a
  command reads as it would in the repository root (``--gin_file gin/smoke.gin``) and everything it
  writes (``runs/``, ``out/``, ``data/``) lands in the temporary folder. ``python`` is the interpreter
  running the tests; ``MACFW_CACHE_DIR`` is the test session's cache (tests/conftest.py), so generated
  datasets and compiled programs are shared with the rest of the suite. Blocks do not share shell
  variables: each block stands alone.
* A ``bash`` block whose title starts with "Not run" (```` ```bash title="Not run: paper size" ````)
  is **shown, not run**: paper-size commands, and commands that need a GPU, root or a cluster. Readers
  see the title. Blocks in other languages (``python``, ``text``, ``ini``, ...) are shown only.
* After a run block, ``<!-- test: files PATH ... -->`` lists paths (relative to the folder) that must
  exist once the block has run, and ``<!-- test: output TEXT -->`` a text its output (stdout and
  stderr) must contain. Both are HTML comments: the site does not show them; the page's prose says
  what the commands write.
* Every page under docs/tutorials/ must be listed in ``TUTORIALS`` below (a new page is not skipped
  by accident). A page marked ``slurm`` runs only where ``sbatch`` is on PATH and a cluster answers
  (``sudo bash .ci/slurm-up``), like tests/test_slurm.py.

Runtime (2026-12-07, ``python -m pytest -q tests/test_docs.py``, 17 tests, the SLURM page included):
4 min 39 s of CPU time in all, 16 min of wall time on the project's 2-core machine while five other
sessions' tests kept its load average at 10; per page 40 s (new-component) to 241 s (data-at-scale)
of that wall time. The ``slow`` pages are about 60% of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINKED = ("gin", "examples", "experiments", ".ci")
BLOCK_TIMEOUT = float(os.environ.get("MACFW_TEST_SUBPROCESS_TIMEOUT", "600"))

# page -> marks ("slow": long end-to-end; "slurm": needs a cluster)
TUTORIALS = {
    "first-run.md": (),
    "ablation.md": (),
    "new-component.md": (),
    "new-agent.md": (),
    "paper-tables.md": ("slow",),
    "multi-device.md": ("slow",),
    "data-at-scale.md": ("slow",),
    "slurm.md": ("slow", "slurm"),
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
CHECK = re.compile(r"^\s*<!-- test: (?P<what>files|output) (?P<arg>.+?) -->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    info: str
    code: str
    files: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        if self.info.split(" ", 1)[0] != "bash":
            return False
        title = re.search(r'title="([^"]*)"', self.info)
        return not (title and title.group(1).lower().startswith("not run"))


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the checks that follow it."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, indent = m.group("fence"), m.group("indent")
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
                j += 1
            out.append(Block(i + 1, m.group("info").strip(), "\n".join(body) + "\n"))
            i = j + 1
            continue
        c = CHECK.match(lines[i])
        if c and out:
            target = out[-1].files if c.group("what") == "files" else out[-1].output
            target.extend(c.group("arg").split() if c.group("what") == "files" else [c.group("arg")])
        i += 1
    return out


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_tutorial(page: Path, folder: Path) -> list[str]:
    """Run the page's run blocks in ``folder``; fail with the block and its output. Returns the outputs."""
    for name in LINKED:
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    outputs = []
    for b in blocks(page.read_text()):
        if not b.runs:
            assert not b.files and not b.output, f"{page.name}:{b.line}: checks after a block that is not run"
            continue
        try:
            r = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", b.code],
                cwd=folder,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{page.name}:{b.line}: the block ran past {BLOCK_TIMEOUT:.0f} s:\n{b.code}\n"
                f"----- output:\n{(e.output or '')[-4000:]}",
                pytrace=False,
            )
        where = f"{page.name}:{b.line}:\n{b.code}----- output (last 4000 characters):\n{r.stdout[-4000:]}"
        if r.returncode != 0:
            pytest.fail(f"exit code {r.returncode}, {where}", pytrace=False)
        missing = [f for f in b.files if not (folder / f).exists()]
        if missing:
            pytest.fail(f"the block did not write {missing}, {where}", pytrace=False)
        for text in b.output:
            if text not in r.stdout:
                pytest.fail(f"the output lacks {text!r}, {where}", pytrace=False)
        outputs.append(r.stdout)
    return outputs


def _params():
    out = []
    for name, marks in TUTORIALS.items():
        m = [getattr(pytest.mark, x) for x in marks if x == "slow"]
        if "slurm" in marks:
            m.append(pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster (sbatch, sinfo) on this machine"))
        out.append(pytest.param(name, marks=m, id=name[:-3]))
    return out


def test_every_tutorial_page_is_tested():
    pages = sorted(p.name for p in (DOCS / "tutorials").glob("*.md") if p.name != "index.md")
    assert pages == sorted(TUTORIALS), "list each tutorial page in tests/test_docs.py TUTORIALS"
    for name in TUTORIALS:
        bs = blocks((DOCS / "tutorials" / name).read_text())
        assert any(b.runs for b in bs), f"{name} has no block the test runs"


def test_the_convention_parses_as_documented():
    text = (
        "```bash\necho a\n```\n<!-- test: files a b -->\n<!-- test: output hello world -->\n"
        '```bash title="Not run: paper size"\nexit 1\n```\n```python\nraise SystemExit(1)\n```\n'
        "- item\n\n    ```bash\n    echo indented\n    ```\n"
    )
    bs = blocks(text)
    assert [b.runs for b in bs] == [True, False, False, True]
    assert bs[0].files == ["a", "b"] and bs[0].output == ["hello world"]
    assert bs[3].code == "echo indented\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", _params())
def test_tutorial_runs_as_written(name, tmp_path):
    run_tutorial(DOCS / "tutorials" / name, tmp_path)


# ------------------------------------------------------------------------------- generated parts
def _docs_module(name: str):
    """docs/<name>.py, imported (docs/ is not a package)."""
    import importlib

    if str(DOCS) not in sys.path:
        sys.path.insert(0, str(DOCS))
    return importlib.import_module(name)


def test_components_page_lists_every_registered_component():
    gen_components = _docs_module("gen_components")

    from macfw import registry

    md = gen_components.markdown()
    for kind, names in cast("dict[str, list[str]]", registry.registered()).items():
        for n in names:
            assert f"| `{n}` |" in md, f"{kind} {n} missing from the generated components page"
        if names:
            assert f"### `{kind}`" in md
    assert "| `train` |" in md and "| `OGBenchDataset` |" in md
    assert "<!-- generated: components -->" in (DOCS / "configuration" / "components.md").read_text()


def test_performance_data_files_are_complete_and_render():
    gen_performance = _docs_module("gen_performance")

    names = gen_performance.names()
    assert {"bench-cpu-small", "all-agents-cpu-small", "profile-cpu-small", "scale-bench"} <= set(names)
    page = (DOCS / "performance.md").read_text()
    for n in names:
        doc = gen_performance.load(n)  # kind, date, machine, command, provenance, result
        assert doc["entries"], n
        assert f"<!-- generated: performance {n} -->" in page, f"docs/data/{n}.json is not on the performance page"
        md = gen_performance.render(n)
        for e in doc["entries"]:
            assert e["date"] in md and e["command"] in md


def test_performance_add_takes_a_commands_json(tmp_path, monkeypatch):
    gen_performance = _docs_module("gen_performance")

    shutil.copy(DOCS / "data" / "bench-cpu-small.json", tmp_path / "b.json")
    monkeypatch.setattr(gen_performance, "DATA", tmp_path)
    result = {
        "preset": "cpu-small",
        "agent": "MAC",
        "updates_per_s": 12.5,
        "utilisation": 0.7,
        "flops_per_update": 1.2e10,
        "matmul_peak_flops": 2e11,
    }
    (tmp_path / "r.json").write_text(json.dumps(result))
    gen_performance.main(
        ["add", "b", str(tmp_path / "r.json"), "--machine", "m", "--command", "c", "--date", "2030-01-02"]
    )
    md = gen_performance.render("b")
    assert "| 2030-01-02 | m | `c` | 12.5 | 0.700 | 1.2e10 | 2e11 | from the command's JSON |" in md


def test_protocol_page_has_every_cell():
    gen_protocol = _docs_module("gen_protocol")

    from macfw import protocol

    md = gen_protocol.markdown()
    for name, t in protocol.TABLES.items():
        assert f"`--protocol {name}`" in md
        for a in t.agents:
            assert f"| `{a}` |" in md
        for e in t.envs:
            assert f"`{e}`" in md


def test_hook_fills_every_marker_and_refuses_unknown_ones():
    hooks = _docs_module("hooks")

    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        if "<!-- generated:" in text:
            assert "<!-- generated:" not in hooks.fill(text), page
    with pytest.raises(ValueError, match="unknown generated part"):
        hooks.fill("<!-- generated: nothing -->")


# ----------------------------------------------------------------------------------- the build
def test_readme_is_short_and_keeps_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m macfw.run "
        "--gin_file gin/quickstart.gin --workdir runs/quickstart"
    ) in readme
    assert (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -q -n 2"
    ) in readme


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert exe is not None
    r = subprocess.run(
        [exe, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(_env(), NO_MKDOCS_2_WARNING="1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    html = (tmp_path / "site" / "configuration" / "components" / "index.html").read_text()
    assert "RejectionSampler" in html and "generated:" not in html
