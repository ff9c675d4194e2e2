"""Whole-corpus rows (none, icl, ape) of an earlier benchmark run, reused instead of measured again.

Every run of bench/methods.py and bench/distill_sweep.py scores `none` and `icl` on each corpus
(40 minutes on a 197-question article here); the scores depend only on the model, the questions and
the scoring settings, so a later run may take them from an earlier run's results.json.
"""

import json
from pathlib import Path

from cartridges.stages.evaluation.methods.table import TABLE

WHOLE_METHODS = tuple(name for name, method in TABLE.items() if method.size == "whole")
# What a run with --answer-tokens adds to a row (stages/evaluation/evaluate.py CorpusScore)
ANSWER_FIELDS = ("answer_f1", "exact_match", "answer_contains", "per_question_f1", "answers")


def scored_rows(paths: list[Path], distractors: int, answer_tokens: int) -> list[dict]:
    """Every scored row of earlier runs (methods.py rows, distill_sweep.py baselines), each with its corpus
    and budget (None for a whole-corpus row). Only runs scored as this run scores (same distractors, same
    answer length) are read; decode and memory cost are not carried over. A run that scores no answers also
    takes the rows of a run that did, without their answer fields: gold NLL and rank accuracy are computed
    before and apart from the greedy answers, so they do not depend on the answer length."""
    found = []
    for path in paths:
        record = json.loads(path.read_text())
        earlier = record.get("args", {})
        answers_differ = answer_tokens not in (0, int(earlier.get("answer_tokens", 0)))
        if int(earlier.get("distractors", 4)) != distractors or answers_differ:
            raise SystemExit(f"{path} was scored with other --distractors/--answer-tokens: run without it")
        dropped = ANSWER_FIELDS if answer_tokens == 0 else ()
        rows = list(record.get("rows", []))  # methods.py
        for corpus, methods in record.get("baselines", {}).items():  # distill_sweep.py
            rows += [{**row, "corpus": corpus, "budget": None} for row in methods.values()]
        found += [
            {
                **{k: v for k, v in row.items() if not k.startswith(("decode_tps", "peak_rss")) and k not in dropped},
                "reused_from": str(path),
            }
            for row in rows
            if "method" in row
        ]
    return found


def earlier_rows(scored: list[dict]) -> dict[tuple[str, str], dict]:
    """(corpus, method) -> a whole-corpus row (none, icl, ape) among `scored_rows`."""
    return {
        (row["corpus"], row["method"]): row
        for row in scored
        if row.get("budget") is None and row["method"] in WHOLE_METHODS
    }


def earlier_truncated(scored: list[dict]) -> dict[tuple[str, int], dict]:
    """(corpus, budget) -> a `truncated` row among `scored_rows`: the KV of the corpus's first B tokens, which is also
    the `first_tokens` initialisation of a B-token cartridge (the same tokens, layout and positions), so a
    sweep can take its init scores from it instead of scoring them again."""
    return {
        (row["corpus"], int(row["budget"])): row
        for row in scored
        if row["method"] == "truncated" and row.get("budget") is not None
    }
