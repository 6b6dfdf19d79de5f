"""Every agent against the authors' code: the same losses on the same batch, and the speed of both (issue 29).

    python experiments/parity.py --reference-dir DIR --agents mac,mopo,mobile,leq,fmpc,gciql,nstep_sacbc,sharsa \\
        [--json p.json] [--updates 10] [--no-speed] [--speed-sizes cpu-small|paper] [--check]

DIR is a checkout of the MAC authors' code (kwanyoungpark/MAC); it is imported from there, never
copied, and needs the extra ``pip install -e '.[parity]'`` (flax, distrax, ml_collections). For each
agent, at small sizes (``experiments/parity_cases/<agent>.py``): both implementations are built with
the same initial parameters (macfw's Equinox modules mapped into the authors' Flax parameter tree),
given the same batches and the same random draws, and every loss term and metric the authors log is
compared after 1 update and after ``--updates``, and the updated parameters after ``--updates``.
Differences that are the authors' known defects (DESIGN §9) are listed by name with each side's value.
Speed: each side's jitted update at the ``cpu-small`` sizes (2 x 256 networks, batch 256; ``--speed-sizes
paper``: the paper's 4 x 1024 and batch 1024, for a GPU), the batches already on the device,
alternated in one process, with XLA's FLOP count per update and utilisation against one
matrix-product peak measured in the same alternation. Each side runs as its own training
loop runs it: macfw ``--steps-per-dispatch`` updates per compiled call (``train.steps_per_dispatch``,
default 10: a ``lax.scan``, the state donated), the authors' one jitted ``update`` per call; macfw's
rate at one update per call is reported beside it (``updates_per_s_single_call``).

Each agent runs in its own process unless ``--in-process`` (its memory and compiled programs slowed
the next agents' timing). Prints one line per agent and a table; ``--json`` writes ``{agent: {terms,
max_rel_err, skipped, defects, updates_per_s, updates_per_s_single_call, steps_per_dispatch,
flops_per_update, utilisation, matmul_peak_flops, speed_sizes}}``. ``--check`` exits 1
unless every agent has ``max_rel_err <= 1e-3`` and macfw's update is at least as fast as the
authors' (MAC: 1.5x).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from parity_cases.common import SPEED_SIZES, Options, ReferenceCodeError, load_reference  # noqa: E402

AGENTS = ("mac", "mopo", "mobile", "leq", "fmpc", "gciql", "nstep_sacbc", "sharsa")
MAX_REL_ERR = 1e-3
SPEEDUP = {"mac": 1.5}  # required macfw / reference update rate (others: 1.0)


def verdict(name: str, r: dict) -> list[str]:
    """What fails the acceptance for agent ``name`` (empty: it passes)."""
    bad = []
    if r["max_rel_err"] > MAX_REL_ERR:
        worst = max(r["terms"].items(), key=lambda kv: kv[1]["rel_err"])
        bad.append(f"max_rel_err {r['max_rel_err']:.2e} > {MAX_REL_ERR:g} (worst: {worst[0]})")
    ups = r.get("updates_per_s")
    if ups:
        need = SPEEDUP.get(name, 1.0)
        if ups["macfw"] < need * ups["reference"]:
            bad.append(f"updates/s {ups['macfw']:.2f} < {need:g} x the authors' {ups['reference']:.2f}")
    return bad


def run_alone(name: str, argv: list[str]) -> dict:
    """Agent ``name``'s entry, from this script run for that agent alone in a new process (the same
    flags, ``--agents name``). Measured (2026-12-07, 2-core CPU): after MOPO, MOBILE and LEQ in the same
    process, n-step SAC+BC's update timed 110 updates/s where a fresh process timed 183.

    Raises:
      RuntimeError: that process failed (its exit status; its output was printed as it ran).
    """
    import subprocess
    import tempfile

    rest, skip = [], False
    for arg in argv:  # drop --agents, --json and --check (and their values): the child gets its own
        if skip:
            skip = False
            continue
        if arg in ("--agents", "--json"):
            skip = True
            continue
        if arg.startswith(("--agents=", "--json=")) or arg == "--check":
            continue
        rest.append(arg)
    with tempfile.TemporaryDirectory(prefix="macfw-parity-") as d:
        out = Path(d) / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--agents", name, "--json", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(proc.stdout[-4000:], file=sys.stderr)
            raise RuntimeError(f"the parity case of {name!r} failed in its own process (exit {proc.returncode}): {cmd}")
        return json.loads(out.read_text())[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", required=True, help="a checkout of kwanyoungpark/MAC")
    p.add_argument("--agents", default=",".join(AGENTS), help=f"comma-separated, of {','.join(AGENTS)}")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--updates", type=int, default=10, help="updates before the second comparison (default 10)")
    p.add_argument("--no-speed", action="store_true", help="compare only; do not time the updates")
    p.add_argument("--pairs", type=int, default=5, help="alternated timing pairs (default 5)")
    p.add_argument(
        "--steps-per-dispatch",
        type=int,
        default=10,
        help="macfw's updates per compiled call when timed (train.steps_per_dispatch; default 10)",
    )
    p.add_argument(
        "--speed-sizes",
        choices=sorted(SPEED_SIZES),
        default="cpu-small",
        help="the sizes both updates are timed at: cpu-small (2 x 256, batch 256; the acceptance's, default) "
        "or paper (4 x 1024, batch 1024: for an accelerator)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 unless every agent passes the acceptance")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every agent in this process (default: each agent in its own process, so that one agent's "
        "memory and compiled programs do not slow the next one's timing)",
    )
    a = p.parse_args(argv)
    agents = [x.strip() for x in a.agents.split(",") if x.strip()]
    unknown = [x for x in agents if x not in AGENTS]
    if unknown:
        p.error(f"unknown agent(s) {unknown}; the harness covers {list(AGENTS)}")
    if a.updates < 1 or a.pairs < 1 or a.steps_per_dispatch < 1:
        p.error(
            f"--updates, --pairs and --steps-per-dispatch must be >= 1, got {a.updates}, {a.pairs} "
            f"and {a.steps_per_dispatch}"
        )
    try:
        ref = load_reference(a.reference_dir)
    except ReferenceCodeError as e:
        p.error(str(e))
    opts = Options(
        updates=a.updates,
        speed=not a.no_speed,
        pairs=a.pairs,
        steps_per_dispatch=a.steps_per_dispatch,
        speed_sizes=a.speed_sizes,
    )
    results, failures = {}, {}
    for name in agents:
        t0 = time.time()
        if a.in_process or len(agents) == 1:
            r = importlib.import_module(f"parity_cases.{name}").run(ref, opts)
        else:
            r = run_alone(name, argv if argv is not None else sys.argv[1:])
        if r.get("updates_per_s"):
            r["speed_sizes"] = a.speed_sizes
        results[name] = r
        failures[name] = verdict(name, r)
        ups = r.get("updates_per_s")
        speed = (
            (
                f", updates/s macfw {ups['macfw']:.2f} vs reference {ups['reference']:.2f} "
                f"({ups['macfw'] / ups['reference']:.2f}x)"
            )
            if ups
            else ""
        )
        print(
            f"[parity] {name}: max_rel_err {r['max_rel_err']:.2e}, skipped {sorted(r['skipped']) or 'none'}"
            f"{speed} ({time.time() - t0:.0f} s)",
            flush=True,
        )
        if a.json:  # after every agent, so a long run leaves its results so far
            a.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(
        "\n| agent | max rel. err | skipped (defects) | updates/s macfw | updates/s authors | ratio "
        "| macfw, one update per call | utilisation macfw | utilisation authors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ups, ut = r.get("updates_per_s") or {}, r.get("utilisation") or {}
        single = (r.get("updates_per_s_single_call") or {}).get("macfw")
        cells = [f"{r['max_rel_err']:.1e}", ", ".join(sorted(r["skipped"])) or "-"]
        cells += (
            [f"{ups['macfw']:.2f}", f"{ups['reference']:.2f}", f"{ups['macfw'] / ups['reference']:.2f}x"]
            if ups
            else ["-", "-", "-"]
        )
        cells += [f"{single:.2f} ({single / ups['reference']:.2f}x)" if single and ups else "-"]
        cells += [f"{ut['macfw']:.3f}", f"{ut['reference']:.3f}"] if ut else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    bad = {k: v for k, v in failures.items() if v}
    for k, v in bad.items():
        print(f"[parity] {k}: " + "; ".join(v))
    if a.json:
        print(f"[parity] wrote {a.json}")
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
