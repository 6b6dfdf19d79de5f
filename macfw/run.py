"""Command line: ``python -m macfw.run --gin_file F [--gin_file F2] [--gin_bindings B] --workdir DIR``.

Re-running the same command on the same DIR resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import gin

import macfw  # noqa: F401  (registers every built-in component)
import macfw.train  # noqa: F401  (registers train() with Gin)
from macfw import registry


def parse_gin(gin_files, gin_bindings) -> None:
    """Parse Gin files and bindings; an unknown component name lists the registered ones.

    Raises:
      registry.UnknownComponentError: a ``@Name`` that is not registered.
      ValueError: any other Gin error (Gin's own message, which names the line).
    """
    import os

    for f in gin_files:  # lets `include 'gin/mac.gin'` resolve from the repo and from the file's folder
        d = os.path.dirname(os.path.abspath(f))
        for path in (d, os.path.dirname(d), os.path.dirname(os.path.dirname(d))):
            gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))
    except ValueError as e:
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
                f"Fix the name, or import the module that registers it with --import.\n{msg}") from None
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m macfw.run", description=__doc__)
    p.add_argument("--gin_file", action="append", default=[], help="Gin config file (repeatable).")
    p.add_argument("--gin_bindings", action="append", default=[], help="Gin binding, e.g. 'train.num_steps = 10'.")
    p.add_argument("--workdir", required=True, help="Run folder; re-use it to resume.")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="Python module to import first (registers your own components).")
    p.add_argument("--coordinator_address", default=None, help="multi-host: jax.distributed coordinator HOST:PORT")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    args = p.parse_args(argv)
    from macfw.parallel import initialize_distributed

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if not args.gin_file:
        p.error("give at least one --gin_file (e.g. gin/quickstart.gin)")
    for mod in args.imports:
        importlib.import_module(mod)
    parse_gin(args.gin_file, args.gin_bindings)
    from macfw.train import train

    summary = train(args.workdir)
    if summary.get("interrupted"):
        print(f"[macfw] stopped by a signal at step {summary['step']} (checkpoint saved); "
              "re-run the same command to resume.", flush=True)
        return 0
    if "success" not in summary:  # non-lead process of a multi-host run
        return 0
    print(f"[macfw] done: step {summary['step']}, success {summary['success']:.3f} over {summary['episodes']} "
          f"episodes, {summary['wall_time_s']:.0f} s; summary in {args.workdir}/summary.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
