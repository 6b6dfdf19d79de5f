"""The performance page's tables, written from the JSON files under docs/data/.

Every file ``docs/data/*.json`` holds measurements of one kind::

    {"kind": "bench" | "all_agents" | "profile" | "scale_bench" | "parity",
     "title": "...",
     "entries": [{"date": "2026-12-01", "machine": "...", "command": "python -m macfw.bench ...",
                  "provenance": "json" | "hand-entered", "note": "...", "result": {...}}, ...]}

``result`` is what the command writes with ``--json`` (``python -m macfw.bench``: one dict;
``--all-agents``: a list of dicts; ``--profile``: the profile dict; ``python -m
macfw.data.scale_bench``: its dict; ``python experiments/parity.py``: its dict of agents). Entries
marked ``"provenance": "hand-entered"`` were copied from the README of their date, where no JSON
of the run was kept: they hold only the figures the README gave (a missing figure prints as "–").

docs/performance.md holds markers ``<!-- generated: performance FILE -->``; the MkDocs hook
(``docs/hooks.py``) replaces each with :func:`render` of ``docs/data/FILE.json`` at every build.

    python docs/gen_performance.py                      # print every file's tables
    python docs/gen_performance.py add bench-cpu-small RESULT.json --machine "..." --command "..."

``add`` appends a measurement to ``docs/data/<name>.json`` (date: today, unless ``--date``), taking
``result`` from the JSON the command wrote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
KINDS = ("bench", "all_agents", "profile", "scale_bench", "parity")
PHASE_KINDS = ("matrix products", "elementwise", "reductions", "random numbers", "data movement")


def load(name: str) -> dict:
    """``docs/data/<name>.json``, checked: a known kind, and every entry with date, machine and command."""
    path = DATA / f"{name}.json"
    doc = json.loads(path.read_text())
    if doc.get("kind") not in KINDS:
        raise ValueError(f"{path}: 'kind' must be one of {KINDS}, got {doc.get('kind')!r}")
    for i, e in enumerate(doc.get("entries", [])):
        missing = [k for k in ("date", "machine", "command", "provenance", "result") if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {missing}")
        if e["provenance"] not in ("json", "hand-entered"):
            raise ValueError(f"{path}: entry {i}: provenance must be 'json' or 'hand-entered'")
        datetime.date.fromisoformat(e["date"])
    return doc


def _num(v, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, tuple)):
        return "–".join(_num(x, fmt) for x in v)
    out = format(v, fmt)
    return out.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _cmd(e: dict) -> str:
    return f"`{e['command']}`"


def _origin(e: dict) -> str:
    return "hand-entered from the README" if e["provenance"] == "hand-entered" else "from the command's JSON"


def _bench(doc: dict) -> list[str]:
    lines = [
        "| date | machine | command | updates/s | utilisation | FLOP per update | matmul peak (FLOP/s) "
        "| source | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in doc["entries"]:
        r = e["result"]
        util = r.get("utilisation")
        lines.append(
            " | ".join(
                [
                    f"| {e['date']}",
                    e["machine"],
                    _cmd(e),
                    _num(r.get("updates_per_s"), ".4g"),
                    _num(util, ".3f"),
                    _num(r.get("flops_per_update"), ".4g"),
                    _num(r.get("matmul_peak_flops"), ".3g"),
                    _origin(e),
                    e.get("note", "") + " |",
                ]
            )
        )
    return lines


def _all_agents(doc: dict) -> list[str]:
    lines = []
    for e in doc["entries"]:
        lines += [
            f"**{e['date']}**, {e['machine']}: `{e['command']}` ({_origin(e)}). {e.get('note', '')}",
            "",
            "| agent | updates/s | utilisation | FLOP per update |",
            "|---|---|---|---|",
        ]
        for r in e["result"]:
            lines.append(
                f"| {r.get('name', r.get('agent'))} | {_num(r.get('updates_per_s'), '.2f')} | "
                f"{_num(r.get('utilisation'), '.3f')} | {_num(r.get('flops_per_update'), '.3g')} |"
            )
        lines.append("")
    return lines


def _profile(doc: dict) -> list[str]:
    lines = []
    for e in doc["entries"]:
        r = e["result"]
        facts = [f"{r.get('agent', 'MAC')} at `{r.get('preset', 'cpu-small')}`"]
        for key, text in (
            ("wall_ms", "wall time {} ms per update"),
            ("op_time_ms", "op time {} ms"),
            ("busy_ms", "an operation running for {} ms"),
        ):
            if r.get(key) is not None:
                facts.append(text.format(_num(r[key], ".1f")))
        if r.get("matmul_peak_flops") is not None:
            facts.append(f"matmul peak {_num(r['matmul_peak_flops'], '.3g')} FLOP/s")
        head = (
            f"**{e['date']}**, {e['machine']}: `{e['command']}` ({_origin(e)}): {', '.join(facts)}. {e.get('note', '')}"
        )
        lines += [
            head,
            "",
            "| phase | wall (ms) | op time (ms) | matrix products (ms) | fraction of peak | "
            "elementwise | reductions | random numbers | data movement |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for phase, row in r["phases"].items():
            lines.append(
                " | ".join(
                    [
                        f"| {phase}",
                        _num(row.get("wall"), ".1f"),
                        _num(row.get("total"), ".1f"),
                        *[
                            _num(row.get(k), ".1f")
                            + (
                                f" | {_num(row.get('matmul_fraction_of_peak'), '.2f')}"
                                if k == "matrix products"
                                else ""
                            )
                            for k in PHASE_KINDS
                        ],
                    ]
                )
                + " |"
            )
        lines.append("")
    return lines


def _gb(v):
    return None if v is None else v / 2**30


def _scale_bench(doc: dict) -> list[str]:
    lines = [
        "| date | machine | command | transitions (shards) | peak RSS (GiB) | stores on disk (GiB) | "
        "conversion (s) | sampler batches/s | updates/s on disk | in memory | ratio | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in doc["entries"]:
        r = e["result"]
        n = r.get("transitions", r.get("rows"))
        shards = r.get("num_shards")
        lines.append(
            " | ".join(
                [
                    f"| {e['date']}",
                    e["machine"],
                    _cmd(e),
                    f"{_num(n, ',')}" + (f" ({shards})" if shards else ""),
                    _num(_gb(r.get("peak_rss_bytes")), ".2f"),
                    _num(_gb(r.get("disk_bytes")), ".2f"),
                    _num(r.get("convert_s"), ".1f"),
                    _num(r.get("sampler_batches_per_s"), ".0f"),
                    _num(r.get("updates_per_s_ondisk"), ".0f"),
                    _num(r.get("updates_per_s_inmemory"), ".0f"),
                    _num(r.get("ondisk_over_inmemory"), ".2f"),
                    _origin(e) + " |",
                ]
            )
        )
    return lines


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def _parity(doc: dict) -> list[str]:
    """Per entry: every agent's largest relative difference from the authors' code, the terms skipped
    as the authors' named defects, and both sides' update rates, FLOPs and utilisation."""
    lines = []
    for e in doc["entries"]:
        lines += [
            f"**{e['date']}**, {e['machine']}: `{e['command']}` ({_origin(e)}). {e.get('note', '')}",
            "",
            "| agent | max rel. err | terms compared | skipped (the authors' defects) | updates/s macfw "
            "| updates/s authors | ratio | macfw, one update per call | FLOP per update macfw / authors "
            "| utilisation macfw / authors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for agent, r in e["result"].items():
            ups = r.get("updates_per_s") or {}
            one = (r.get("updates_per_s_single_call") or {}).get("macfw")
            fl, ut = r.get("flops_per_update") or {}, r.get("utilisation") or {}
            cells = [
                f"| {agent}",
                _num(r.get("max_rel_err"), ".1e"),
                str(len(r.get("terms", {}))),
                str(len(r.get("skipped", {}))),
                _num(ups.get("macfw"), ".2f"),
                _num(ups.get("reference"), ".2f"),
                _ratio(ups.get("macfw"), ups.get("reference")),
                "–" if one is None else f"{one:.2f} ({_ratio(one, ups.get('reference'))})",
                f"{_num(fl.get('macfw'), '.3g')} / {_num(fl.get('reference'), '.3g')}",
                f"{_num(ut.get('macfw'), '.3f')} / {_num(ut.get('reference'), '.3f')} |",
            ]
            lines.append(" | ".join(cells))
        lines.append("")
    return lines


RENDER = {
    "bench": _bench,
    "all_agents": _all_agents,
    "profile": _profile,
    "scale_bench": _scale_bench,
    "parity": _parity,
}


def render(name: str) -> str:
    """The Markdown of ``docs/data/<name>.json`` (with a link to the file)."""
    doc = load(name)
    lines = RENDER[doc["kind"]](doc)
    lines += ["", f"*Generated from [`docs/data/{name}.json`](data/{name}.json) by `docs/gen_performance.py`.*"]
    return "\n".join(lines)


def names() -> list[str]:
    return sorted(p.stem for p in DATA.glob("*.json"))


def add(name: str, result_path: str, *, machine: str, command: str, date: str | None, note: str) -> Path:
    path = DATA / f"{name}.json"
    doc = json.loads(path.read_text())
    doc["entries"].append(
        {
            "date": date or datetime.date.today().isoformat(),
            "machine": machine,
            "command": command,
            "provenance": "json",
            "note": note,
            "result": json.loads(Path(result_path).read_text()),
        }
    )
    path.write_text(json.dumps(doc, indent=1) + "\n")
    load(name)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    a = sub.add_parser("add", help="append a measurement (the JSON a command wrote) to docs/data/NAME.json")
    a.add_argument("name")
    a.add_argument("result")
    a.add_argument("--machine", required=True)
    a.add_argument("--command", required=True)
    a.add_argument("--date", default=None)
    a.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.cmd == "add":
        print(add(args.name, args.result, machine=args.machine, command=args.command, date=args.date, note=args.note))
        return 0
    for n in names():
        print(f"## {n}\n\n{render(n)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
