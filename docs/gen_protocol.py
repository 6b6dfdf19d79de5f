"""The paper's two tables, cell by cell, as Markdown: the body of docs/protocol.md.

Read from :mod:`macfw.protocol` (``TABLES``, ``PAPER``, ``cell_settings``), which
``experiments/compare.py --protocol`` runs and ``tests/test_protocol.py`` checks. The page's source
holds the marker ``<!-- generated: protocol -->``; the MkDocs hook (``docs/hooks.py``) replaces it at
every build. ``python docs/gen_protocol.py`` prints the same Markdown.
"""

from __future__ import annotations

import warnings


def _value(v) -> str:
    return repr(v)


def markdown() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from macfw import protocol as P

    lines = []
    for name, t in P.TABLES.items():
        lines += [
            f"## `--protocol {name}`: {t.title}",
            "",
            f"- environments: {', '.join(f'`{e}`' for e in t.envs)}",
            f"- agents: {', '.join(f'`{a}`' for a in t.agents)}",
            f"- tasks {', '.join(map(str, t.tasks))}; seeds {', '.join(map(str, t.seeds))}; "
            f"{t.eval_episodes} evaluation episodes per task and seed; {t.gradient_steps:,} gradient steps; "
            f"{t.dataset} datasets; task mode `{t.mode}`",
            "",
            "Each cell: the bindings by which it differs from its agent's Gin file (method settings; at the "
            "paper budget the budget and data settings below come on top), and the paper's figure "
            "(success %, mean ± std where the paper gives it).",
            "",
            "| agent | " + " | ".join(f"`{e}`" for e in t.envs) + " |",
            "|---" * (len(t.envs) + 1) + "|",
        ]
        for a in t.agents:
            row = []
            for e in t.envs:
                s = P.cell_settings(t, a, e, paper_budget=False)
                text = "<br>".join(
                    f"`{x.binding} = {_value(x.value)}`" for x in s if x.binding != "OGBenchDataset.task_mode"
                )
                paper = P.PAPER.get((a, t.mode), {}).get(e)
                if paper is not None:
                    m, sd = paper
                    text += ("<br>" if text else "") + f"paper: **{m}{'' if sd is None else f' ± {sd}'}**"
                row.append(text or "–")
            lines.append(f"| `{a}` | " + " | ".join(row) + " |")
        lines += [
            "",
            "Settings and where each comes from:",
            "",
            "| binding | value | agents | environments | paper budget only | source |",
            "|---|---|---|---|---|---|",
        ]
        for rule in t.rules:
            for s in rule.settings:
                lines.append(
                    f"| `{s.binding}` | `{_value(s.value)}` | {', '.join(rule.agents) if rule.agents else 'all'} | "
                    f"{', '.join(rule.envs) if rule.envs else 'all'} | {'yes' if rule.paper_budget_only else 'no'} | "
                    f"{s.source.replace('|', '/')} |"
                )
        lines.append("")
    lines += ["Sources: " + "; ".join(f"{k} = `{v}`" for k, v in P.SOURCES.items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
