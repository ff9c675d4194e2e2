"""Commands that make cartridges: synthesize, distill, build."""

from pathlib import Path
from typing import Annotated

import typer

from cartridges.errors import CartridgeError
from cartridges.pipeline.cli_app import (
    ConfigOption,
    ModelOption,
    RegistryOption,
    SetOption,
    app,
    config_app,
    console,
    open_registry,
    report_skipped,
)
from cartridges.stages.records import SynthesisSummary


def _build_config(spec: str, overrides: list[str] | None, model: str | None):
    """The build config with its overrides; `--model` is `--set model=...` (as in chat, ask and eval)."""
    from cartridges.pipeline.build_config import load_build_config

    return load_build_config(spec, [*(overrides or []), *([f"model={model}"] if model else [])])


@config_app.command("show")
def config_show(
    config_spec: ConfigOption = "default",
    overrides: SetOption = None,
    model: ModelOption = None,
) -> None:
    """Print the effective build config as YAML: the code defaults, the config file over them, then --set.

    Example: cartridges config show --config my.yaml --set distill.steps=64
    """
    import yaml

    config = _build_config(config_spec, overrides, model)
    console.print(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip(),
        highlight=False,
        markup=False,
        soft_wrap=True,  # YAML: a long value wrapped by the terminal's width would no longer parse
    )


@app.command("synthesize")
def synthesize_command(
    corpus: Annotated[Path, typer.Argument(help="corpus folder (.txt .md .rst .html .pdf .json .jsonl)")],
    out: Annotated[Path, typer.Option("--out", help="run folder; rerun with the same folder to resume")],
    reuse_from: Annotated[
        Path | None, typer.Option("--reuse-from", help="earlier run folder: take its samples of unchanged chunks")
    ] = None,
    config_spec: ConfigOption = "default",
    overrides: SetOption = None,
    model: ModelOption = None,
) -> None:
    """Write self-study conversations with teacher top-k log-probabilities as Parquet shards.

    Uses the config's `synthesis` (what is made) and `synthesis_run` (how: engine, executor) sections.
    Example: cartridges synthesize legal/ --out runs/legal --set synthesis.samples=256 --set synthesis_run.engine=hf
    """
    from cartridges.models import load_model
    from cartridges.pipeline.stage_runner import StageJob, run_stages
    from cartridges.stages.ingest import read_corpus
    from cartridges.stages.run_dir import RunDir
    from cartridges.stages.run_mirror import RunMirror
    from cartridges.stages.synthesis.config import check_fits_window

    config = _build_config(config_spec, overrides, model)
    documents = read_corpus(corpus)  # a bad folder fails before the model loads
    run = RunDir(out)
    loaded = load_model(config.model)
    check_fits_window(config.synthesis, loaded.model.config.max_position_embeddings)
    previous = RunDir(reuse_from) if reuse_from else None
    records = run_stages(
        StageJob(RunMirror(run, None), loaded, config, ("ingest", "synthesize"), corpus=documents, reuse_from=previous)
    )
    ingested, summary = records.ingested, records.synthesis
    report_skipped(ingested.skipped)
    console.print(
        f"corpus: {ingested.num_documents} documents, {ingested.num_chunks} chunks, {ingested.num_tokens} tokens"
    )
    console.print(
        f"{summary.samples}/{summary.planned} samples in {out} ({', '.join(summary.engines)}; {_reuse_note(summary)}): "
        f"{summary.samples_per_second:.2f} samples/s, {summary.generated_tokens_per_second:.1f} generated tok/s\n"
        f"kinds: {summary.kinds}\nrejected and retried: {summary.rejected}"
    )


@app.command("distill")
def distill_command(
    run_folder: Annotated[Path, typer.Argument(help="run folder made by `cartridges synthesize`")],
    name: Annotated[str, typer.Option("--name", help="registry name of the cartridge")],
    config_spec: ConfigOption = "default",
    overrides: SetOption = None,
    qa: Annotated[
        Path | None, typer.Option("--qa", help="QA file (shared/data/qa format) for gold-answer NLL during training")
    ] = None,
    qa_corpus: Annotated[str | None, typer.Option("--qa-corpus", help="corpus id inside --qa")] = None,
    model: ModelOption = None,
    registry: RegistryOption = None,
) -> None:
    """Train the cartridge on a run's synthetic conversations and publish it (resumes an interrupted run).

    Uses the config's `distill` (what is trained) and `distill_run` (how: executor, workers) sections.
    Example: cartridges distill runs/legal --name legal --set distill.num_tokens=256 --set distill.steps=200
    """
    from cartridges.models import load_model
    from cartridges.pipeline.stage_runner import StageJob, run_stages
    from cartridges.registry.names import validate_new_name
    from cartridges.stages.distillation.config import check_training_fits_window
    from cartridges.stages.run_dir import RunDir
    from cartridges.stages.run_mirror import RunMirror

    validate_new_name(name)
    reg = open_registry(registry, writing=True)
    config = _build_config(config_spec, overrides, model)
    run = RunDir(run_folder)
    if not run.synthesis_summary.is_file():
        raise CartridgeError(
            f"{run_folder} has no synthesis shards: run `cartridges synthesize CORPUS --out {run_folder}` first"
        )
    questions = _qa_corpus(qa, qa_corpus)
    loaded = load_model(config.model)
    check_training_fits_window(config.distill, loaded.model.config.max_position_embeddings)
    stages = ("distill", "evaluate", "publish")
    records = run_stages(StageJob(RunMirror(run, None), loaded, config, stages, name=name, registry=reg, qa=questions))
    published = records.published
    if records.distilled is None:
        console.print(f"nothing to do: {run_folder} was published as {published.ref}")
        return
    console.print(
        f"published [bold]{published.ref}[/bold] ({config.distill.num_tokens} tokens, method distilled): "
        f"{_headline_metrics(published.metrics)}"
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
    config_spec: ConfigOption = "default",
    overrides: SetOption = None,
    qa: Annotated[
        Path | None,
        typer.Option("--qa", help="QA file (shared/data/qa format) with held-out questions about the corpus"),
    ] = None,
    qa_corpus: Annotated[str | None, typer.Option("--qa-corpus", help="corpus id inside --qa")] = None,
    registry: RegistryOption = None,
) -> None:
    """Build a trained cartridge end to end (ingest, synthesize, distill, evaluate, publish); rerun to resume.

    A corpus of more than `library.unit_tokens` tokens builds a library instead: one cartridge per unit
    (a document or a section of one) and a router that picks units per request (`--set library.enabled=false`:
    one cartridge for any corpus).
    Example: cartridges build legal/ --name legal --set distill.steps=100
    """
    from cartridges.default_corpus import gather_license_corpus
    from cartridges.pipeline.build import build
    from cartridges.registry.names import validate_new_name
    from cartridges.stages.library.build import LibraryBuild

    validate_new_name(name)
    reg = open_registry(registry, writing=True)
    config = _build_config(config_spec, overrides, None)
    questions = _qa_corpus(qa, qa_corpus)
    result = build(
        corpus or gather_license_corpus(),
        name,
        config,
        reg,
        lambda stage: console.print(f"[bold]{stage}[/bold]"),
        questions,
    )
    if isinstance(result, LibraryBuild):
        _report_library(result)
        return
    if not result.built:
        console.print(f"nothing to do: {result.ref} is already built from this corpus and config ({result.run.root})")
        return
    ingested, synthesis = result.ingested, result.synthesis
    report_skipped(ingested.skipped)
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    console.print(
        f"published [bold]{result.ref}[/bold] from {ingested.num_documents} documents ({ingested.num_chunks} chunks, "
        f"{ingested.num_tokens} tokens): {synthesis.samples} samples {synthesis.kinds} ({_reuse_note(synthesis)}), "
        f"{result.steps} steps{_start(result)}; "
        f"{_headline_metrics(result.metrics)}\nwall time: {timing}; run folder {result.run.root}"
    )


def _report_library(result) -> None:
    said = "published" if result.built else "nothing new: already published as"
    nodes = len(result.made_on)
    where = f" on {nodes} nodes ({', '.join(map(str, result.made_on.values()))})" if nodes > 1 else ""
    console.print(
        f"{said} library [bold]{result.ref}[/bold]: {result.units} units, {result.text_tokens} text tokens in "
        f"{result.num_tokens} KV tokens ({result.made} made{where}, {result.reused} reused by digest, {result.resumed} "
        f'resumed) in {result.seconds:.0f} s; ask it with `cartridges ask {result.ref} "..."`'
    )


def _start(result) -> str:
    """Where training started: the version it warm-started from, or the init that made the prefix."""
    if result.parent:
        return f", warm-started from {result.parent}"
    return f" from the {result.init} init" if result.init else ""


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


def _reuse_note(synthesis: SynthesisSummary) -> str:
    if synthesis.reuse_refused:
        return f"nothing reused: the earlier run used {synthesis.reuse_refused}"
    return f"{synthesis.reused} reused from {synthesis.reused_from}" if synthesis.reused else "none reused"
