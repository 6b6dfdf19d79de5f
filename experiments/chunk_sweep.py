"""Success vs. action-chunk length n (MAC paper, Figure 3).

Runs MAC once per (chunk length n, seed) on one environment, each run a separate
``python -m macfw.run`` process in ``OUT/runs/n{n}-s{seed}``, then writes

* ``OUT/chunk_sweep.md``: a markdown table, one row per n: success mean +- std over seeds (%, std
  over seeds with ddof=0) and the per-seed values;
* ``OUT/chunk_sweep.png``: success (%) vs. n with std error bars.

Each run is the base Gin file (default ``gin/quickstart.gin``), then the extra ``--gin_file``s in
order, then the extra ``--gin_bindings``, then the sweep's own bindings ``CHUNK = n`` and
``train.seed = seed`` (last, so they win). Only the chunk length changes between rows: the imagined
horizon stays ``MAC.horizon`` chunks (so ``MAC.horizon * n`` environment steps), as in the Gin
ablations ``gin/ablations/chunk*.gin``.

Resumable: a run whose folder has a complete ``summary.json`` is skipped; a run stopped midway
resumes from its newest checkpoint (``macfw.run``'s own resume). A failed run is reported (its log
is ``OUT/runs/n{n}-s{seed}/run.log``) and the sweep goes on; the exit status is 1 if any failed.

Examples::

    python experiments/chunk_sweep.py --chunks 1,5,10,25 --seeds 0,1 --out runs/chunk_sweep
    python experiments/chunk_sweep.py --base gin/mac.gin --gin_file gin/envs/scene.gin \
        --gin_bindings 'train.num_steps = 200000' --chunks 1,5,10,25 --seeds 0,1,2,3 --out runs/cs_scene
    python experiments/chunk_sweep.py --base gin/smoke.gin --chunks 1,5 --seeds 0 --out /tmp/cs   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).replace(" ", "").split(",") if x]


def resolve_gin(path: str) -> str:
    """An existing Gin file as an absolute path: as given (relative to the cwd), else relative to the repo."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return str(p.resolve())
    q = REPO / path
    if q.exists():
        return str(q.resolve())
    raise FileNotFoundError(f"Gin file {path!r} not found (looked in {os.getcwd()} and {REPO}).")


def run_dir(out: Path, n: int, seed: int) -> Path:
    return out / "runs" / f"n{n}-s{seed}"


def read_summary(wd: Path) -> dict | None:
    """The run's summary.json if it is complete (has ``success``), else None."""
    f = wd / "summary.json"
    if not f.exists():
        return None
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if s.get("interrupted") or "success" not in s:
        return None
    return s


def command(args, n: int, seed: int, wd: Path) -> list[str]:
    cmd = [args.python, "-m", "macfw.run", "--gin_file", resolve_gin(args.base)]
    for f in args.gin_file:
        cmd += ["--gin_file", resolve_gin(f)]
    for b in args.gin_bindings:
        cmd += ["--gin_bindings", b]
    cmd += ["--gin_bindings", f"CHUNK = {n}", "--gin_bindings", f"train.seed = {seed}"]
    for m in args.imports:
        cmd += ["--import", m]
    return cmd + ["--workdir", str(wd)]


def run_one(args, n: int, seed: int) -> tuple[str, dict | None]:
    """Run (or skip) one (n, seed); returns (status, summary)."""
    wd = run_dir(Path(args.out), n, seed)
    s = read_summary(wd)
    if s is not None:
        print(f"[chunk_sweep] n={n} seed={seed}: done before (success {s['success']:.3f}); skipped", flush=True)
        return "skipped", s
    wd.mkdir(parents=True, exist_ok=True)
    cmd = command(args, n, seed, wd)
    print(f"[chunk_sweep] n={n} seed={seed}: running -> {wd}/run.log", flush=True)
    t0 = time.time()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(wd / "run.log", "a") as log:
        log.write("$ " + " ".join(repr(c) if " " in c else c for c in cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=args.cwd, env=env)
    s = read_summary(wd)
    if rc != 0 or s is None:
        tail = (wd / "run.log").read_text(errors="replace").splitlines()[-15:]
        print(
            f"[chunk_sweep] n={n} seed={seed}: FAILED (exit {rc}) after {time.time() - t0:.0f} s; last lines of "
            f"{wd}/run.log:\n    " + "\n    ".join(tail),
            flush=True,
        )
        return "failed", None
    print(f"[chunk_sweep] n={n} seed={seed}: success {s['success']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return "ran", s


def collect(out: Path, chunks, seeds) -> dict[int, dict[int, float]]:
    """``{n: {seed: success fraction}}`` for the complete runs; warns when a run's chunk length differs."""
    res: dict[int, dict[int, float]] = {}
    for n in chunks:
        for seed in seeds:
            s = read_summary(run_dir(out, n, seed))
            if s is None:
                continue
            got = (s.get("spec") or {}).get("chunk_len")
            if got is not None and int(got) != n:
                print(
                    f"[chunk_sweep] warning: {run_dir(out, n, seed)} trained chunk_len={got}, not {n} "
                    "(a Gin file or binding overrides MAC.chunk_len?)",
                    file=sys.stderr,
                )
            res.setdefault(n, {})[seed] = float(s["success"])
    return res


def stats(values) -> tuple[float, float]:
    v = np.asarray(list(values), float) * 100.0
    return float(np.mean(v)), float(np.std(v))


def write_markdown(path: Path, res, chunks, seeds, args) -> str:
    env_name = None
    for n in res:
        for seed in res[n]:
            s = read_summary(run_dir(Path(args.out), n, seed))
            env_name = env_name or (s or {}).get("dataset")
    lines = [
        "# Success vs. action-chunk length n (MAC, paper Figure 3)",
        "",
        f"Dataset: `{env_name or '?'}`. Config: `{args.base}`"
        + "".join(f" + `{f}`" for f in args.gin_file)
        + "".join(f" + `{b}`" for b in args.gin_bindings)
        + "; per row `CHUNK = n`, `train.seed = seed`.",
        "",
        "Success in %: mean +- std over seeds (std with ddof=0), and each seed's value.",
        "",
        "| n | success (%) | seeds | per seed (%) |",
        "|---:|---:|---:|---|",
    ]
    for n in chunks:
        per = res.get(n, {})
        if not per:
            lines.append(f"| {n} | — | 0/{len(seeds)} | (no complete run) |")
            continue
        m, sd = stats(per.values())
        seeds_txt = ", ".join(f"s{k}: {v * 100:.1f}" for k, v in sorted(per.items()))
        lines.append(f"| {n} | {m:.1f} ± {sd:.1f} | {len(per)}/{len(seeds)} | {seeds_txt} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(path: Path, res, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(res)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if ns:
        ms, sds = zip(*(stats(res[n].values()) for n in ns))
        ax.errorbar(ns, ms, yerr=sds, marker="o", capsize=4)
        for n in ns:
            ax.scatter([n] * len(res[n]), [v * 100 for v in res[n].values()], s=10, color="grey", alpha=0.6, zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.minorticks_off()
    ax.set_ylim(-3, 103)
    ax.set_xlabel("action-chunk length n (environment steps)")
    ax.set_ylabel("success (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="sweep folder (runs/, chunk_sweep.md, chunk_sweep.png)")
    p.add_argument("--base", default="gin/quickstart.gin", help="base Gin file (default gin/quickstart.gin)")
    p.add_argument("--gin_file", action="append", default=[], help="extra Gin file after the base (repeatable)")
    p.add_argument("--gin_bindings", action="append", default=[], help="extra Gin binding (repeatable)")
    p.add_argument("--import", dest="imports", action="append", default=[], help="passed to macfw.run --import")
    p.add_argument("--chunks", default="1,5,10,25", help="chunk lengths n (default 1,5,10,25)")
    p.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    p.add_argument("--python", default=sys.executable, help="Python interpreter for the runs")
    p.add_argument("--cwd", default=None, help="working directory of the runs (default: this one)")
    p.add_argument("--report_only", action="store_true", help="do not run anything; tabulate the finished runs")
    args = p.parse_args(argv)
    args.chunks, args.seeds = _ints(args.chunks), _ints(args.seeds)
    if not args.chunks or not args.seeds or min(args.chunks) < 1:
        p.error("--chunks needs positive ints and --seeds at least one seed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).absolute()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in [args.base, *args.gin_file]:
        resolve_gin(f)  # fail before the first run
    failed = []
    if not args.report_only:
        for n in args.chunks:
            for seed in args.seeds:
                status, _ = run_one(args, n, seed)
                if status == "failed":
                    failed.append((n, seed))
    res = collect(out, args.chunks, args.seeds)
    text = write_markdown(out / "chunk_sweep.md", res, args.chunks, args.seeds, args)
    plot(
        out / "chunk_sweep.png",
        res,
        f"MAC success vs. chunk length ({Path(args.base).name}"
        + "".join(f" + {Path(f).name}" for f in args.gin_file)
        + ")",
    )
    print(text, flush=True)
    print(f"[chunk_sweep] wrote {out / 'chunk_sweep.md'} and {out / 'chunk_sweep.png'}", flush=True)
    if failed:
        print(
            f"[chunk_sweep] {len(failed)} run(s) failed: " + ", ".join(f"n={n} seed={s}" for n, s in failed),
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
