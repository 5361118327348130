"""Rebuild the data-budget study's report from its finished runs and print the recommendation per budget as JSON.

The study (``python -m magic_pl.zoo.budget``) writes one benchmark run per suite and budget, ``<suite>_n<n>/``
with its ``results.json``. Runs made in several sittings (the study, an extension with more recipes on the same
examples and draws, a later budget) are kept as ``<runs>/<group>/<suite>_n<n>/``; this joins them all with
:func:`magic_pl.zoo.budget.rebuild_budget_report` into ``budget.md`` / ``budget.json`` / ``budget.png`` under
``--out`` and prints :func:`~magic_pl.zoo.budget.budget_recommendations`.

``python benchmarks/budget_report.py --runs benchmarks/zoo/budget/runs --out benchmarks/zoo/budget``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="benchmarks/zoo/budget/runs",
                        help="folder of run groups: <runs>/<group>/<suite>_n<n>/results.json")
    parser.add_argument("--out", default="benchmarks/zoo/budget", help="where budget.md/json/png go")
    parser.add_argument("--reference", default="tsv_m",
                        help="the uncalibrated merge data-based merges are compared with")
    args = parser.parse_args()

    from magic_pl.zoo.budget import budget_recommendations, rebuild_budget_report

    run_dirs = sorted(str(p.parent) for p in Path(args.runs).glob("*/*_n*/results.json"))
    if not run_dirs:
        raise SystemExit(f"no runs under {args.runs!r} (expected <group>/<suite>_n<n>/results.json)")
    summary = rebuild_budget_report(run_dirs, args.out, reference=args.reference)
    print(json.dumps({"runs": run_dirs, "budgets": summary["budgets"],
                      "recommendations": budget_recommendations(summary)}, indent=1))


if __name__ == "__main__":
    main()
