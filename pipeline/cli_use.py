"""Commands that use cartridges: chat, ask, eval."""

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cartridges.errors import CartridgeError
from cartridges.pipeline.cli_app import (
    BudgetOption,
    ModelOption,
    RegistryOption,
    app,
    console,
    errors,
    open_registry,
)
from cartridges.runtime import CartridgeRuntime


@app.command("chat")
def chat(
    refs: Annotated[list[str], typer.Argument(help="one or more cartridges or libraries (composed in order)")],
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    budget: BudgetOption = None,
    show_units: Annotated[
        bool, typer.Option("--show-units", help="print the library units each answer was given, with their scores")
    ] = False,
    registry: RegistryOption = None,
) -> None:
    """Chat in the terminal with cartridges loaded (/reset, /exit); a library routes each turn on the
    conversation's questions so far.

    Example: cartridges chat legal@latest
    """
    from cartridges.chat import chat_session
    from cartridges.loading import describe_units, open_all

    # A process started with SIGINT ignored (by a parent that ignores it: a job runner, nohup, a test
    # harness that ran training in-process) inherits that, and Python then installs no Ctrl-C handler:
    # an answer could not be stopped. A chat is interactive, so it takes Ctrl-C back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    opened = open_all(refs, open_registry(registry), model)
    route = None
    if opened.has_library:

        def route(history: list[dict[str, str]]):
            runtime, units = opened.routed(_questions(history), budget)
            return runtime, describe_units(units) if show_units else None

    runtime = None if opened.has_library else CartridgeRuntime(opened.loaded, opened.items)
    chat_session(
        runtime,
        lambda: console.input("[bold green]you> [/bold green]"),
        console,
        max_new_tokens,
        temperature,
        route=route,
        title=" + ".join(_label(item) for item in opened.items),
    )


def _questions(history: list[dict[str, str]]) -> str:
    """What a library routes a chat turn on: every user message so far, the last one last."""
    return "\n".join(m["content"] for m in history if m["role"] == "user")


def _label(item) -> str:
    from cartridges.library.library import Library

    if isinstance(item, Library):
        return f"library {item.label} ({len(item.index.units)} units)"
    return item.manifest.label


@app.command("ask")
def ask(
    ref: Annotated[str, typer.Argument(help="cartridge or library: reference or folder")],
    question: Annotated[str, typer.Argument(help="the question")],
    also: Annotated[
        list[str] | None, typer.Option("--also", help="another cartridge to compose after REF (repeatable)")
    ] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    budget: BudgetOption = None,
    registry: RegistryOption = None,
) -> None:
    """Answer one question with the cartridge loaded and print it (for scripts). A library routes the
    question to its units; which ones (with their scores) goes to stderr.

    Example: cartridges ask legal@latest "How many days notice must a landlord give?"
    """
    from cartridges.loading import describe_units, open_all

    opened = open_all([ref, *(also or [])], open_registry(registry), model)
    runtime, units = opened.routed(question, budget)
    if units:
        errors.print(describe_units(units), highlight=False, markup=False)
    print(
        runtime.generate(
            [{"role": "user", "content": question}], max_new_tokens=max_new_tokens, temperature=temperature
        )
    )


@app.command("eval")
def eval_command(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="none, icl, truncated, select, matched, matched-bias, matched-omp, matched-omp-bias, matched-layerwise, matched-omp-layerwise, kvzip, rag, knorm, streaming, snapkv, lingua, ape, cartridge or library (--cartridge LIBRARY --budget N: the units routed per question)",
        ),
    ] = "cartridge",
    cartridge: Annotated[
        list[str] | None, typer.Option("--cartridge", help="NAME[@VERSION] or artifact folder (repeat to compose)")
    ] = None,
    qa: Annotated[
        list[Path] | None,
        typer.Option(
            "--qa", help="QA file in the shared/data/qa format (repeatable; default: ../shared/data/qa/*.json)"
        ),
    ] = None,
    corpus_id: Annotated[
        list[str] | None,
        typer.Option("--corpus-id", help="QA corpus to score (repeatable; default: every corpus in --qa)"),
    ] = None,
    budget: Annotated[
        int | None, typer.Option("--budget", help="KV budget in tokens for truncated, rag, knorm and streaming")
    ] = None,
    distractors: Annotated[
        int,
        typer.Option("--distractors", min=0, help="other same-type gold answers each gold answer is ranked against"),
    ] = 4,
    answer_tokens: Annotated[
        int,
        typer.Option(
            "--answer-tokens", min=0, help="also generate each greedy answer (up to N tokens): token F1, exact match"
        ),
    ] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="also write the scores as JSON here")] = None,
    model: ModelOption = None,
    registry: RegistryOption = None,
) -> None:
    """Score one method (or cartridge) on real QA: gold-answer NLL per token and rank accuracy.

    Example: cartridges eval --method cartridge --cartridge sky@latest --corpus-id "squad2-Sky_(United_Kingdom)"
    """
    import json
    from dataclasses import asdict

    from cartridges.atomic import write_text_atomically
    from cartridges.qa import load_qa_files
    from cartridges.stages.evaluation.evaluate import score_corpus
    from cartridges.stages.evaluation.methods.table import METHODS, context_source

    given = ("cartridge", "library")
    if method not in (*METHODS, "library"):
        raise CartridgeError(f"--method {method!r} is not a method; known: {', '.join(METHODS)}, library")
    if method in given and not cartridge:
        raise CartridgeError(f"--method {method} needs --cartridge NAME[@VERSION] (or pick another --method)")
    if cartridge and method not in given:
        raise CartridgeError(f"--cartridge is only used with --method cartridge or library, not {method!r}")
    corpora = load_qa_files(qa, corpus_id)
    library = None
    if method == "library":
        from cartridges.library.library import Library
        from cartridges.loading import open_all

        opened = open_all(cartridge, open_registry(registry), model)
        if len(opened.items) != 1 or not isinstance(opened.items[0], Library):
            raise CartridgeError("--method library takes one --cartridge, a library")
        loaded, prefix, library = opened.loaded, None, opened.items[0]
    elif cartridge:
        from cartridges.loading import load

        runtime = load(cartridge, open_registry(registry), model)
        loaded, prefix = runtime.loaded, runtime.prefix
    else:
        from cartridges.models import load_model

        loaded, prefix = load_model(model), None
    columns = ["corpus", "method", "KV tokens", "gold NLL ± SE", "rank accuracy", "questions"]
    table = Table(*columns, *(["answer F1", "exact", "contains"] if answer_tokens else []))
    scores = []
    for corpus in corpora:
        if library is not None:
            from cartridges.stages.evaluation.methods.library import RoutedContext

            source = RoutedContext(library, budget, loaded.model)
        else:
            source = context_source(loaded, method, corpus.text, budget, cartridge=prefix)
        score = score_corpus(loaded, corpus, source, method, distractors, answer_tokens=answer_tokens)
        scores.append(score)
        accuracy = "n/a" if score.rank_accuracy is None else f"{score.rank_accuracy:.2f} ({score.ranked_questions})"
        table.add_row(
            corpus.id,
            method,
            str(score.kv_tokens),
            f"{score.nll:.3f} ± {score.nll_se:.3f}",
            accuracy,
            str(score.questions),
            *(
                [f"{score.answer_f1:.3f}", f"{score.exact_match:.2f}", f"{score.answer_contains:.2f}"]
                if answer_tokens
                else []
            ),
        )
    console.print(table)
    if out is not None:
        record = {
            "method": method,
            "budget": budget,
            "cartridges": cartridge or [],
            "model": loaded.model_id,
            "scores": [asdict(s) for s in scores],
        }
        write_text_atomically(out, json.dumps(record, indent=2))
