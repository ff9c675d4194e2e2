"""The benchmarks as a package: one command line for all of them, and the sweep's stages run through the
one wiring with configs read by the build's loader (on the tiny model: mechanics, not quality)."""

import json

import pytest
import torch
import yaml

from cartridges.bench.__main__ import COMMANDS
from cartridges.bench.__main__ import main as bench_main
from cartridges.pipeline.build_config import CONFIGS_DIR
from cartridges.stages.ingest import read_corpus


@pytest.fixture
def grad_mode_kept():
    """A benchmark's `main` turns autograd off for its process (`torch.set_grad_enabled(False)`); called
    in-process here, it must not leave the rest of the test session without gradients."""
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)


@pytest.fixture
def qa(long_corpus, tmp_path):
    """A QA file (the shared/data/qa format) of two questions about the long corpus."""
    path = tmp_path / "qa.json"
    pairs = [("When is rent due in unit 3?", "before day 4"), ("How much in unit 5?", "50 dollars")]
    questions = [{"id": str(i), "question": q, "answer": a, "answer_type": "value"} for i, (q, a) in enumerate(pairs)]
    path.write_text(
        json.dumps({"corpora": [{"id": "statute", "text": read_corpus(long_corpus).text, "questions": questions}]})
    )
    return path


def without_matplotlib(*args) -> None:
    """The benchmarks' plots need the `bench` extra (matplotlib), which `make test` does not install: it
    would add its license texts to the default corpus of the same `.venv`."""


def test_every_bench_command_is_a_module_with_a_main(capsys):
    import importlib

    for command in COMMANDS:
        assert callable(importlib.import_module(f"cartridges.bench.{command.replace('-', '_')}").main)
    assert bench_main(["no-such-bench"]) == 2
    assert "distill-sweep" in capsys.readouterr().out


def test_the_distill_sweep_trains_its_trial_on_the_build_config_it_names(
    tiny_model_dir, qa, cartridges_home, tmp_path, monkeypatch, grad_mode_kept
):
    out = tmp_path / "sweep"
    argv = ["distill-sweep", "--qa", str(qa), "--corpus-id", "statute", "--config", "tiny"]
    argv += ["--set", f"model={tiny_model_dir}", "--trial", "corpus/0.01/3/8", "--distractors", "1", "--out", str(out)]
    monkeypatch.setattr("cartridges.bench.distill_sweep.plot", without_matplotlib)
    assert bench_main(argv) == 0

    result = json.loads((out / "results.json").read_text())
    [row] = result["rows"]
    assert row["name"] == "corpus-lr0.01-s3-p8" and row["train_metrics"]["step"] == 3
    shape = ["corpus", "mix", "lr", "steps", "num_tokens", "init", "probes", "name", "init_method", "train_seconds"]
    assert list(row) == [*shape, "train_metrics", "distilled"]  # earlier sweeps' shape: trials-table reads it
    assert (row["init"]["method"], row["distilled"]["method"]) == ("init-p8", row["name"])
    tiny = yaml.safe_load((CONFIGS_DIR / "tiny.yaml").read_text())
    trained = json.loads((out / "statute" / row["name"] / "distill" / "config.json").read_text())
    assert (trained["lr"], trained["steps"], trained["num_tokens"]) == (0.01, 3, 8)  # the trial's
    assert trained["batch_size"] == tiny["distill"]["batch_size"]  # the rest: tiny.yaml's
    assert trained["max_length"] == 512  # and below it the code defaults
    synthesis = json.loads((out / "statute" / "mix-corpus" / "synthesis" / "config.json").read_text())["config"]
    assert synthesis["samples"] == tiny["synthesis"]["samples"]
    assert synthesis["kinds"] == {"quote": 1.0, "continuation": 1.0, "fill_span": 1.0}  # the mix's


def test_the_methods_bench_writes_typed_rows_in_the_shape_the_reports_read(
    tiny, tiny_model_dir, qa, tmp_path, monkeypatch, grad_mode_kept
):
    from dataclasses import asdict

    from cartridges.qa import find_corpus
    from cartridges.stages.evaluation.contexts import Context, FixedContext, corpus_kv
    from cartridges.stages.evaluation.evaluate import score_corpus

    out = tmp_path / "methods"
    argv = ["methods", "--qa", str(qa), "--corpus-id", "statute", "--budget", "8", "--method", "truncated"]
    argv += ["--whole-method", "none", "--skip-decode", "--distractors", "1", "--model", str(tiny_model_dir)]
    monkeypatch.setattr("cartridges.bench.methods.plot", without_matplotlib)
    assert bench_main([*argv, "--out", str(out)]) == 0

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["method"], row["budget"]) for row in rows] == [("none", None), ("truncated", 8)]
    corpus = find_corpus(qa, "statute")
    expected = score_corpus(tiny, corpus, FixedContext(Context(corpus_kv(tiny, corpus.text, 8))), "truncated", 1)
    shape = {"corpus": 0, "method": 0, "budget": 0, **asdict(expected), "build_seconds": 0, "kv_bytes": 0}
    assert list(rows[1]) == [*shape, "prefill_per_question", "recovery"]  # earlier runs' order (recovery: the report's)
    assert rows[1]["nll"] == expected.nll and rows[1]["kv_tokens"] == 8
    assert rows[1]["kv_bytes"] == corpus_kv(tiny, corpus.text, 8).numel() * 4


def test_a_sweep_given_no_teacher_flag_is_named_by_its_configs_teacher():
    """Sweeps record unset flags as 'None'; the teacher the run used is then its config's, so a run of the
    default (chunk) teacher pairs by name with runs that passed `--teacher-context chunk`."""
    from cartridges.bench.trials_table import teacher_suffix

    def result(flag, teacher=None):
        config = {"synthesis": {"teacher_context": teacher}} if teacher else None
        return {"args": {"teacher_context": flag}} | ({"config": config} if config else {})

    assert teacher_suffix(result("None", "chunk")) == ""
    assert teacher_suffix(result("None", "window")) == "-teacher-window"
    assert teacher_suffix(result("window")) == "-teacher-window"
    assert teacher_suffix(result("chunk")) == teacher_suffix(result("None")) == ""


def test_a_trial_names_the_probes_its_fitted_start_matched_and_trains_with_them():
    from pathlib import Path

    from cartridges.bench.distill_sweep import SweepSettings, Trial

    plain, on_policy = Trial.parse("corpus/1e-3/32/256/matched_omp"), Trial.parse("corpus/1e-3/32/256/matched_omp/both")
    assert (plain.name, plain.init_name) == ("corpus-lr0.001-s32-p256-matched_omp", "init-matched_omp-p256")
    assert on_policy.name == "corpus-lr0.001-s32-p256-matched_omp-bothprobes"
    assert on_policy.init_name == "init-matched_omp-bothprobes-p256"  # its untrained score is its own
    settings = SweepSettings("default", (), Path("unused"), {}, 4, 0)
    assert settings.trial_config(on_policy).distill.init_probes == "both"
    assert settings.trial_config(plain).distill.init_probes == "repeat"
    with pytest.raises(SystemExit, match="unknown init probes 'questions'"):
        Trial.parse("corpus/1e-3/32/256/matched_omp/questions")


def test_a_run_without_answers_merges_with_runs_that_have_them_and_other_scorings_do_not():
    from cartridges.bench.methods_report import scored_alike

    def run(distractors, answer_tokens):
        return {"args": {"distractors": str(distractors), "answer_tokens": str(answer_tokens)}}

    assert scored_alike([run(4, 24), run(4, 0), run(4, 24)]) == (4, 24)
    assert scored_alike([run(4, 0), run(4, 0)]) == (4, 0)
    with pytest.raises(SystemExit, match=r"answer tokens \[24, 32\]"):
        scored_alike([run(4, 24), run(4, 32)])
    with pytest.raises(SystemExit, match=r"distractors \[1, 4\]"):
        scored_alike([run(4, 0), run(1, 0)])


def test_the_paired_table_is_each_rows_per_question_difference_from_the_named_method():
    from cartridges.bench.methods_report import paired_table

    def row(method, budget, nlls):
        return {"corpus": "c", "method": method, "budget": budget, "nll": sum(nlls) / 3, "per_question_nll": nlls}

    rows = [row("icl", None, [1.0, 2.0, 3.0]), row("select", 8, [2.0, 2.0, 5.0]), row("matched", 8, [1.0, 2.0, 2.0])]
    rows.append(row("select", 16, [1.0, 1.0, 1.0]))
    lines = paired_table(rows, ["select", "icl"])
    # matched - select at B=8: [-1, 0, -3], mean -4/3, SE = sd / sqrt(3) with sd of (-1, 0, -3) = 1.5275
    assert lines[-2] == "| c | matched | 8 | 1.667 | -1.333 ± 0.882 | -0.333 ± 0.333 |"
    assert lines[-1] == "| c | select | 16 | 1.000 |  | -1.000 ± 0.577 |"  # itself: no cell; icl at any budget


def test_a_recovery_line_averages_only_the_corpora_measured_at_every_budget():
    from cartridges.bench.methods_report import recovery_by_budget

    def row(corpus, method, budget, recovery):
        return {"corpus": corpus, "method": method, "budget": budget, "kv_tokens": budget, "recovery": recovery}

    rows = [row("a", "matched", 256, 0.5), row("b", "matched", 256, 0.9), row("a", "matched", 1024, 0.8)]
    rows += [row("a", "select", 256, 0.1), row("b", "select", 256, None)]
    assert recovery_by_budget(rows, "matched") == {256: [0.5], 1024: [0.8]}  # b has no 1,024 row
    assert recovery_by_budget(rows, "select") == {256: [0.1]}
    assert recovery_by_budget(rows, "kvzip") == {}


def test_a_sweeps_trained_cartridges_become_plot_rows_with_their_recovery_and_build_seconds():
    from cartridges.bench.methods_report import trained_rows

    sweep = {
        "baselines": {"c": {"none": {"nll": 6.0}, "icl": {"nll": 4.0}}, "d": {"none": {"nll": 5.0}}},
        "rows": [
            {"corpus": "c", "init_method": "matched", "lr": 0.001, "num_tokens": 1024, "distilled": {"nll": 4.5}},
            {"corpus": "d", "init_method": "matched", "lr": 0.001, "num_tokens": 1024, "distilled": {"nll": 4.5}},
        ],
    }
    sweep["rows"][0]["train_seconds"] = 350.0
    older = {"corpus": "c", "lr": 0.006, "num_tokens": 256, "init": {"method": "init-select-p256"}}
    older_default = {"corpus": "c", "lr": 0.006, "num_tokens": 256, "init": {"method": "truncated"}}
    older_p1024 = {"corpus": "c", "lr": 0.006, "num_tokens": 1024, "init": {"method": "init-p1024"}}
    before_the_field = {"baselines": sweep["baselines"], "rows": [older, older_default, older_p1024]}
    for row in before_the_field["rows"]:
        row["distilled"] = {"nll": 5.0}
    assert [r["method"] for r in trained_rows([before_the_field])] == [
        "trained from select, lr 0.006",
        "trained from first_tokens, lr 0.006",
        "trained from first_tokens, lr 0.006",
    ]
    rows = trained_rows([sweep])
    assert rows == [
        {
            "corpus": "c",
            "method": "trained from matched, lr 0.001",
            "budget": 1024,
            "kv_tokens": 1024,
            "recovery": 0.75,  # (6.0 - 4.5) / (6.0 - 4.0); d has no icl to measure against
            "build_seconds": 350.0,
        }
    ]


def test_the_library_bench_scores_every_method_on_the_whole_collection(
    lively_model_dir, tmp_path, monkeypatch, grad_mode_kept
):
    """Two corpora become one collection and one library; the rows pair up per question, the library's
    router finds each question's corpus, and the control never does."""
    qa = tmp_path / "qa.json"
    corpora = [
        {
            "id": "rent",
            "text": "Section 1. Rent is due on the first day. " * 6,
            "questions": [
                {"id": "r", "question": "When is rent due?", "answer": "the first day", "answer_type": "value"}
            ],
        },
        {
            "id": "tax",
            "text": "Section 9. Tax on rent is due each quarter. " * 6,
            "questions": [
                {"id": "t", "question": "When is tax due?", "answer": "each quarter", "answer_type": "value"}
            ],
        },
    ]
    qa.write_text(json.dumps({"corpora": corpora}))
    out = tmp_path / "library"
    argv = [
        "library",
        "--qa",
        str(qa),
        "--suite",
        "tiny",
        "--budget",
        "40",
        "--per-corpus",
        "1",
        "--answer-tokens",
        "2",
    ]
    argv += ["--set", "unit_tokens=32", "--set", "init=kv", "--model", str(lively_model_dir), "--out", str(out)]
    monkeypatch.setattr("cartridges.bench.library.plot", without_matplotlib)
    assert bench_main(argv) == 0
    record = json.loads((out / "tiny" / "results.json").read_text())
    rows = {(row["method"], row["budget"]): row for row in record["rows"]}
    assert set(rows) == {(m, None) for m in ("none", "oracle", "oracle-units")} | {
        (m, 40) for m in ("library", "rag", "truncated", "control")
    }
    assert rows[("library", 40)]["hit_rate"] == 1.0 and rows[("control", 40)]["hit_rate"] == 0.0
    assert rows[("none", None)]["recovery"] == 0 and rows[("oracle", None)]["recovery"] == pytest.approx(1)
    assert 0 < rows[("library", 40)]["kv_tokens"] <= 40


def test_composing_all_of_a_documents_units_in_document_is_the_document_read_at_once(lively, tmp_path):
    """`bench/library_composition.py`'s ways, against prefills computed here: a document's units cut from its
    whole prefill and composed in order are that prefill; a document's first unit is the same in-document and
    after a shared BOS; `one-sink` drops one row per unit after the first."""
    from cartridges.bench.library_composition import Compositions
    from cartridges.kv_prefix import kv_prefix_of_tokens
    from cartridges.layout import context_token_ids
    from cartridges.library.library import load_library
    from cartridges.library.units import split_units
    from cartridges.registry.store import Registry
    from cartridges.stages.library.build import build_library
    from cartridges.stages.library.config import LibraryConfig

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "rent.txt").write_text("Section 1. Rent is due on the first day.\n\n" * 8)
    (folder / "tax.txt").write_text("Section 9. Tax on rent is due each quarter.\n\n" * 3)
    config = LibraryConfig(unit_tokens=32, init="kv", precision="float32")
    registry = Registry(tmp_path / "registry")
    built = build_library(read_corpus(folder), lively, "lib", config, registry)
    where, path = registry.locate(built.ref)
    library = load_library(path, expected=where)
    units = split_units(read_corpus(folder).documents, lively.tokenizer, lively.tokenizer_fingerprint, 32)
    texts = {u.id: u.text for u in units}
    lively.tokenizer.bos_token = "<|im_start|>"  # as SmolLM2's (the tiny tokenizer has none; it adds none to text)
    compositions = Compositions(lively, library, texts, segment=4096)
    rent = [u.id for u in library.index.units if u.source == "rent.txt"]
    assert len(rent) > 2

    bos = lively.tokenizer.bos_token_id
    whole = [bos] + [t for unit_id in rent for t in context_token_ids(lively.tokenizer, texts[unit_id])]
    torch.testing.assert_close(
        compositions.block("in-document", rent), kv_prefix_of_tokens(lively.model, whole), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        compositions.block("in-document", rent[:1]), compositions.block("shared-sink", rent[:1]), rtol=0, atol=1e-5
    )
    library_rows = compositions.block("library", rent).shape[0]
    assert compositions.block("one-sink", rent).shape[0] == library_rows - (len(rent) - 1)
    assert library_rows == sum(len(context_token_ids(lively.tokenizer, texts[u])) for u in rent)
