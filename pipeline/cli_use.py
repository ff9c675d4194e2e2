"""Commands that use cartridges: chat, ask, eval."""

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cartridges.errors import CartridgeError
from cartridges.pipeline.cli_app import (
    ModelOption,
    RegistryOption,
    app,
    console,
    open_registry,
)


@app.command("chat")
def chat(
    refs: Annotated[list[str], typer.Argument(help="one or more cartridges (composed in order)")],
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    registry: RegistryOption = None,
) -> None:
    """Chat in the terminal with cartridges loaded (/reset, /exit).

    Example: cartridges chat legal@latest
    """
    from cartridges.chat import chat_session
    from cartridges.loading import load

    # A process started with SIGINT ignored (by a parent that ignores it: a job runner, nohup, a test
    # harness that ran training in-process) inherits that, and Python then installs no Ctrl-C handler:
    # an answer could not be stopped. A chat is interactive, so it takes Ctrl-C back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runtime = load(refs, open_registry(registry), model)
    chat_session(runtime, lambda: console.input("[bold green]you> [/bold green]"), console, max_new_tokens, temperature)


@app.command("ask")
def ask(
    ref: Annotated[str, typer.Argument(help="cartridge reference or folder")],
    question: Annotated[str, typer.Argument(help="the question")],
    also: Annotated[
        list[str] | None, typer.Option("--also", help="another cartridge to compose after REF (repeatable)")
    ] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    registry: RegistryOption = None,
) -> None:
    """Answer one question with the cartridge loaded and print it (for scripts).

    Example: cartridges ask legal@latest "How many days notice must a landlord give?"
    """
    from cartridges.loading import load

    runtime = load([ref, *(also or [])], open_registry(registry), model)
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
            help="none, icl, truncated, select, matched, matched-bias, matched-omp, matched-omp-bias, matched-layerwise, matched-omp-layerwise, kvzip, rag, knorm, streaming, snapkv, lingua, ape or cartridge",
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

    if method not in METHODS:
        raise CartridgeError(f"--method {method!r} is not a method; known: {', '.join(METHODS)}")
    if method == "cartridge" and not cartridge:
        raise CartridgeError("--method cartridge needs --cartridge NAME[@VERSION] (or pick another --method)")
    if cartridge and method != "cartridge":
        raise CartridgeError(f"--cartridge is only used with --method cartridge, not {method!r}")
    corpora = load_qa_files(qa, corpus_id)
    if cartridge:
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
