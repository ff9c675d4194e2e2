"""Whole-corpus rows (none, icl, ape) of an earlier benchmark run, reused instead of measured again.

Every run of bench/methods.py and bench/distill_sweep.py scores `none` and `icl` on each corpus
(40 minutes on a 197-question article here); the scores depend only on the model, the questions and
the scoring settings, so a later run may take them from an earlier run's results.json.
"""

import json
from pathlib import Path

WHOLE_METHODS = ("none", "icl", "ape")


def earlier_rows(paths: list[Path], distractors: int, answer_tokens: int) -> dict[tuple[str, str], dict]:
    """(corpus, method) -> a whole-corpus row of an earlier run. Only rows scored as this run scores
    (same distractors, same answer length) are taken; decode and memory cost are not carried over."""
    found = {}
    for path in paths:
        record = json.loads(path.read_text())
        earlier = record.get("args", {})
        if int(earlier.get("distractors", 4)) != distractors or int(earlier.get("answer_tokens", 0)) != answer_tokens:
            raise SystemExit(f"{path} was scored with other --distractors/--answer-tokens: run without it")
        rows = list(record.get("rows", []))  # methods.py
        for corpus, methods in record.get("baselines", {}).items():  # distill_sweep.py
            rows += [{**row, "corpus": corpus, "budget": None} for row in methods.values()]
        for row in rows:
            if row.get("budget") is None and row.get("method") in WHOLE_METHODS:
                found[(row["corpus"], row["method"])] = {
                    **{k: v for k, v in row.items() if not k.startswith(("decode_tps", "peak_rss"))},
                    "reused_from": str(path),
                }
    return found
