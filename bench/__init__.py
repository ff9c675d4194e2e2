"""The benchmarks: scripts that compare methods side by side in one run and write results.json,
tables and PNG plots (BENCHMARKS.md records each with its command). Installed as `cartridges.bench`;
run one with `python -m cartridges.bench COMMAND [--help]` (or `python bench/COMMAND.py`). Modules
that are not commands (`run_record`, `baseline_rows`, `methods_report`, `kv_storage`) are the shared
helpers, imported like any module of the package."""
