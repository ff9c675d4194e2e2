"""Commands that make cartridges: synthesize, distill, build."""

from pathlib import Path
from typing import Annotated

import typer

from cartridges.errors import CartridgeError, first_validation_error
from cartridges.pipeline.cli_app import (
    ModelOption,
    RegistryOption,
    app,
    console,
    open_registry,
    report_skipped,
)


def _parse_kinds(text: str | None) -> dict[str, float] | None:
    """`question=2,quote=1` -> {"question": 2.0, "quote": 1.0}."""
    if not text:
        return None
    kinds = {}
    for item in text.split(","):
        name, sep, weight = item.partition("=")
        try:
            kinds[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise CartridgeError(
                f"--kinds: weight {weight!r} of {name!r} is not a number (example: question=2,quote=1)"
            ) from None
    return kinds


def _validated(model_cls, **values):
    """Build a pydantic config from CLI values; a bad value becomes one line naming the option."""
    from pydantic import ValidationError

    try:
        return model_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        where, message = first_validation_error(exc, "")
        option = "--" + where.split(".")[0].replace("_", "-") if where else "options"
        raise CartridgeError(f"{option}: {message}") from None


@app.command("synthesize")
def synthesize_command(
    corpus: Annotated[Path, typer.Argument(help="corpus folder (.txt .md .rst .html .pdf .json .jsonl)")],
    out: Annotated[Path, typer.Option("--out", help="run folder; rerun with the same folder to resume")],
    samples: Annotated[int, typer.Option("--samples", help="number of samples")] = 256,
    engine: Annotated[str, typer.Option("--engine", help="auto (vLLM if it starts, else HF), vllm or hf")] = "auto",
    model: ModelOption = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    kinds: Annotated[
        str | None, typer.Option("--kinds", help="seed kind weights, e.g. question=2,quote=1,continuation=2")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="teacher log-probabilities per token (default 20)")
    ] = None,
    max_answer_tokens: Annotated[int | None, typer.Option("--max-answer-tokens")] = None,
    chunk_min_tokens: Annotated[int | None, typer.Option("--chunk-min-tokens")] = None,
    chunk_max_tokens: Annotated[int | None, typer.Option("--chunk-max-tokens")] = None,
    shard_size: Annotated[
        int | None, typer.Option("--shard-size", help="samples per Parquet shard (unit of resume)")
    ] = None,
    engines: Annotated[int, typer.Option("--engines", help="engine actors (one per GPU on GPU nodes)")] = 1,
    executor: Annotated[
        str, typer.Option("--executor", help="ray (Ray Data; RAY_ADDRESS for a cluster) or local")
    ] = "ray",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per HF engine")] = None,
    reuse_from: Annotated[
        Path | None, typer.Option("--reuse-from", help="earlier run folder: take its samples of unchanged chunks")
    ] = None,
) -> None:
    """Write self-study conversations with teacher top-k log-probabilities as Parquet shards.

    Example: cartridges synthesize legal/ --out runs/legal --samples 256 --engine hf
    """
    from cartridges.models import load_model
    from cartridges.stages.ingest import ingest_corpus, read_corpus
    from cartridges.stages.synthesis_config import RunSettings, SynthesisConfig, check_fits_window
    from cartridges.stages.synthesize import synthesize

    config = _validated(
        SynthesisConfig,
        samples=samples,
        seed=seed,
        kinds=_parse_kinds(kinds),
        top_k=top_k,
        max_answer_tokens=max_answer_tokens,
        chunk_min_tokens=chunk_min_tokens,
        chunk_max_tokens=chunk_max_tokens,
        shard_size=shard_size,
    )
    settings = _validated(RunSettings, engine=engine, engines=engines, executor=executor, threads=threads)
    documents = read_corpus(corpus)  # a bad folder fails before the model loads
    loaded = load_model(model)
    check_fits_window(config, loaded.model.config.max_position_embeddings)
    record = ingest_corpus(
        documents, out, loaded.tokenizer, loaded.tokenizer_fingerprint, config.chunk_min_tokens, config.chunk_max_tokens
    )
    report_skipped(record["skipped"])
    console.print(
        f"corpus: {record['num_documents']} documents, {record['num_chunks']} chunks, {record['num_tokens']} tokens"
    )
    summary = synthesize(out, loaded.path, loaded.fingerprint, config, settings, reuse_from)
    console.print(
        f"{summary['samples']}/{summary['planned']} samples in {out} ({', '.join(summary['engines'])}; {_reuse_note(summary)}): "
        f"{summary['samples_per_second']:.2f} samples/s, {summary['generated_tokens_per_second']:.1f} generated tok/s\n"
        f"kinds: {summary['kinds']}\nrejected and retried: {summary['rejected']}"
    )


@app.command("distill")
def distill_command(
    run: Annotated[Path, typer.Argument(help="run folder made by `cartridges synthesize`")],
    name: Annotated[str, typer.Option("--name", help="registry name of the cartridge")],
    tokens: Annotated[int | None, typer.Option("--tokens", help="cartridge length P (default 256)")] = None,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    init: Annotated[str | None, typer.Option("--init", help="first_tokens, random_chunks or random")] = None,
    qa: Annotated[
        Path | None, typer.Option("--qa", help="QA file (shared/data/qa format) for gold-answer NLL during training")
    ] = None,
    qa_corpus: Annotated[str | None, typer.Option("--qa-corpus", help="corpus id inside --qa")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Ray Train workers")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="ray (Ray Train) or local")] = "ray",
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per worker (default: its CPUs, cores / workers)")
    ] = None,
    model: ModelOption = None,
    registry: RegistryOption = None,
) -> None:
    """Train the cartridge on a run's synthetic conversations and publish it (resumes an interrupted run).

    Example: cartridges distill runs/legal --name legal --tokens 256 --steps 200
    """
    from cartridges.models import load_model
    from cartridges.names import validate_name
    from cartridges.pipeline.runs import scratch_folder
    from cartridges.stages.distill import DistillConfig, check_training_fits_window
    from cartridges.stages.distill_artifact import save_distilled
    from cartridges.stages.distill_run import TrainSettings, run_training

    validate_name(name)
    reg = open_registry(registry, writing=True)
    config = _validated(DistillConfig, num_tokens=tokens, steps=steps, lr=lr, batch_size=batch_size, init=init)
    settings = _validated(TrainSettings, workers=workers, executor=executor, threads=threads)
    if not (run / "synthesis" / "shards").is_dir():
        raise CartridgeError(f"{run} has no synthesis shards: run `cartridges synthesize CORPUS --out {run}` first")
    questions = _qa_corpus(qa, qa_corpus)
    qa_pairs = [(q.question, q.answer) for q in questions.questions] if questions else []
    loaded = load_model(model)
    check_training_fits_window(config, loaded.model.config.max_position_embeddings)
    run_training(run, loaded, config, settings, qa_pairs)
    with scratch_folder(name) as scratch:
        save_distilled(loaded, run, name, config, scratch / "cartridge")
        published = reg.publish(scratch / "cartridge", name)
    metrics = _headline_metrics(published.metrics)
    console.print(
        f"published [bold]{published.label}[/bold] ({published.num_tokens} tokens, method distilled): {metrics}"
    )


@app.command("build")
def build_command(
    corpus: Annotated[
        Path | None,
        typer.Argument(
            help="corpus folder (.txt .md .rst .html .pdf .json .jsonl); default: license texts of the installed packages"
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="registry name of the cartridge")] = "legal",
    config: Annotated[
        str, typer.Option("--config", help="YAML file or shipped config: default, tiny, gpu")
    ] = "default",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="override one setting, e.g. --set distill.steps=100 (repeatable)")
    ] = None,
    qa: Annotated[
        Path | None,
        typer.Option("--qa", help="QA file (shared/data/qa format) with held-out questions about the corpus"),
    ] = None,
    qa_corpus: Annotated[str | None, typer.Option("--qa-corpus", help="corpus id inside --qa")] = None,
    registry: RegistryOption = None,
) -> None:
    """Build a trained cartridge end to end (ingest, synthesize, distill, evaluate, publish); rerun to resume.

    Example: cartridges build legal/ --name legal --set distill.steps=100
    """
    from cartridges.default_corpus import gather_license_corpus
    from cartridges.names import validate_name
    from cartridges.pipeline.build import build
    from cartridges.pipeline.build_config import load_build_config

    validate_name(name)
    reg = open_registry(registry, writing=True)
    settings = load_build_config(config, overrides or [])
    questions = _qa_corpus(qa, qa_corpus)
    result = build(
        corpus or gather_license_corpus(),
        name,
        settings,
        reg,
        lambda stage: console.print(f"[bold]{stage}[/bold]"),
        questions,
    )
    if not result.built:
        console.print(f"nothing to do: {result.ref} is already built from this corpus and config ({result.run_dir})")
        return
    report_skipped(result.summary["corpus"].get("skipped", []))
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    metrics = _headline_metrics(result.summary["metrics"])
    corpus_stats = result.summary["corpus"]
    console.print(
        f"published [bold]{result.ref}[/bold] from {corpus_stats['num_documents']} documents ({corpus_stats['num_chunks']} chunks, "
        f"{corpus_stats['num_tokens']} tokens): {result.summary['samples']} samples "
        f"{result.summary['kinds']} ({_reuse_note(result.summary['synthesis'])}), {result.summary['steps']} steps"
        f"{', warm-started from ' + result.summary['parent'] if result.summary['parent'] else ''}; {metrics}\n"
        f"wall time: {timing}; run folder {result.run_dir}"
    )


def _headline_metrics(metrics: dict[str, float]) -> str:
    """Training loss, held-out KL to the teacher and any QA numbers, on one line."""
    shown = {k: v for k, v in metrics.items() if k in ("kd", "eval_topk_kl") or k.startswith("qa_")}
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))


def _qa_corpus(qa: Path | None, corpus_id: str | None):
    from cartridges.qa import find_corpus

    if qa is None:
        if corpus_id is not None:
            raise CartridgeError("--qa-corpus needs --qa FILE (the QA set it is in)")
        return None
    if corpus_id is None:
        raise CartridgeError("--qa needs --qa-corpus ID (the corpus the questions are about)")
    return find_corpus(qa, corpus_id)


def _reuse_note(synthesis: dict) -> str:
    if synthesis.get("reuse_refused"):
        return f"nothing reused: the earlier run used {synthesis['reuse_refused']}"
    return f"{synthesis['reused']} reused from {synthesis['reused_from']}" if synthesis.get("reused") else "none reused"
