"""The `cartridges` command line."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cartridges.errors import CartridgeError, first_validation_error
from cartridges.home import default_registry_url
from cartridges.registry import Registry

app = typer.Typer(
    help="Turn a corpus into a cartridge: a trained KV-cache prefix a model loads instead of the corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Manage the embedded default model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
schedule_app = typer.Typer(
    help="Nightly rebuilds on Ray; schedules and history live in the registry.", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")
console = Console()
errors = Console(stderr=True, soft_wrap=True)

RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry", help="Registry folder or fsspec URL (default: $CARTRIDGES_REGISTRY or $CARTRIDGES_HOME/registry)."
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="'default' (embedded SmolLM2-135M-Instruct), a local HF model folder, or a hub id."),
]


def open_registry(url: str | None, writing: bool = False) -> Registry:
    """The registry of --registry, $CARTRIDGES_REGISTRY or $CARTRIDGES_HOME; `writing`: refuse one that keeps nothing."""
    registry = Registry(url or os.environ.get("CARTRIDGES_REGISTRY") or default_registry_url())
    if writing and registry.is_transient:
        raise CartridgeError(
            f"--registry {registry.url} lives only inside this process: what this command writes would be gone when it exits; "
            "use a folder or an object store URL (s3://bucket/registry)"
        )
    return registry


def _report_skipped(skipped: list) -> None:
    """Files and folders of the corpus that were not read, with the reason for each."""
    if skipped:
        shown = "; ".join(
            str(item) if not isinstance(item, dict) else f"{item['path']} ({item['reason']})" for item in skipped[:8]
        )
        more = f"; and {len(skipped) - 8} more (see ingest.json in the run folder)" if len(skipped) > 8 else ""
        errors.print(f"[yellow]skipped {len(skipped)} file(s) or folder(s): {shown}{more}[/yellow]", highlight=False)


def _ref(manifest) -> str:
    return f"{manifest.name}@{manifest.version}"


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the embedded GGUF model into a cached HF folder (once).

    Example: cartridges model prepare
    """
    from cartridges.models import load_model

    loaded = load_model()
    console.print(f"model ready: {loaded.path}\nfingerprint {loaded.fingerprint}")


@app.command("init")
def init(
    corpus: Annotated[
        Path | None,
        typer.Option("--corpus", help="Corpus folder (.txt/.md). Default: license texts of the installed packages."),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=2, help="Cartridge length in tokens.")] = 256,
    name: Annotated[str, typer.Option("--name", help="Registry name of the cartridge.")] = "legal",
    model: ModelOption = None,
    registry: RegistryOption = None,
) -> None:
    """Build an untrained cartridge from the first TOKENS corpus tokens and publish it.

    Example: cartridges init --corpus legal/ --tokens 512 --name legal
    """
    from cartridges.default_corpus import gather_license_corpus
    from cartridges.models import load_model
    from cartridges.names import validate_name
    from cartridges.pipeline.runs import scratch_folder
    from cartridges.stages.ingest import read_corpus
    from cartridges.stages.initialize import init_cartridge

    validate_name(name)
    reg = open_registry(registry, writing=True)
    documents = read_corpus(corpus or gather_license_corpus())
    _report_skipped(documents.skipped)
    loaded = load_model(model)
    with scratch_folder(name) as scratch:
        built = init_cartridge(loaded, documents, tokens, name, scratch / "cartridge")
        if built.num_tokens < tokens:
            errors.print(f"[yellow]corpus has only {built.num_tokens} tokens; the cartridge uses all of them[/yellow]")
        published = reg.publish(scratch / "cartridge", name)
    console.print(
        f"published [bold]{_ref(published)}[/bold] ({published.num_tokens} tokens, {published.kv_bytes / 2**20:.1f} MB KV) "
        f"from {len(documents.documents)} documents, {published.corpus[0].num_tokens} corpus tokens"
    )


@app.command("ls")
def list_cartridges(registry: RegistryOption = None) -> None:
    """List published cartridges.

    Example: cartridges ls
    """
    reg = open_registry(registry)
    listing = reg.list()
    table = Table("ref", "aliases", "method", "tokens", "KV MB", "model", "created")
    for entry in listing.entries:
        m = entry.manifest
        table.add_row(
            _ref(m),
            ",".join(entry.aliases),
            m.method,
            str(m.num_tokens),
            f"{m.kv_bytes / 2**20:.1f}",
            m.model_id,
            m.created_at,
        )
    console.print(table if table.rows else f"no cartridges in {reg.url}")
    for skipped in listing.skipped:
        errors.print(f"[yellow]skipped {skipped.path}: {skipped.reason}[/yellow]", highlight=False)


@app.command("show")
def show(
    ref: Annotated[
        str, typer.Argument(help="NAME, NAME@VERSION, NAME@latest, NAME@ALIAS, or a folder (./dir, path:dir)")
    ],
    registry: RegistryOption = None,
) -> None:
    """Print a cartridge's manifest.

    Example: cartridges show legal@latest
    """
    from cartridges.manifest import Manifest
    from cartridges.names import folder_of

    folder = folder_of(ref)
    console.print_json((Manifest.read(folder) if folder else open_registry(registry).show(ref)).to_json())


@app.command("verify")
def verify(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, NAME@ALIAS, or a folder (./dir, path:dir)")],
    registry: RegistryOption = None,
) -> None:
    """Check a cartridge as loading does: checksums, shapes, manifest, name and version, finite values (exit 2 on a problem).

    Example: cartridges verify legal@3
    """
    from cartridges.integrity import check_artifact
    from cartridges.names import folder_of

    folder = folder_of(ref)
    manifest = check_artifact(folder) if folder else open_registry(registry).verify(ref)
    bound = (
        "manifest bound to the payload"
        if manifest.format_version >= 2
        else "format 1: manifest not bound to the payload"
    )
    console.print(
        f"{_ref(manifest) if manifest.version else folder}: OK ({len(manifest.files)} files, shapes, {bound}, finite values)"
    )


@app.command("alias")
def alias(
    ref: Annotated[str, typer.Argument(help="the version to point at, e.g. legal@3")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="alias name, e.g. stable")],
    remove: Annotated[bool, typer.Option("--remove", help="Delete the alias instead.")] = False,
    registry: RegistryOption = None,
) -> None:
    """Point an alias (e.g. `stable`) at a version, or remove it.

    Example: cartridges alias legal@3 stable
    """
    reg = open_registry(registry, writing=True)
    if remove:
        reg.remove_alias(ref.partition("@")[0], alias_name)
        console.print(f"removed alias {alias_name}")
        return
    name, version = reg.set_alias(ref, alias_name)
    console.print(f"{name}@{alias_name} -> {name}@{version}")


@app.command("rm")
def remove(
    ref: Annotated[str, typer.Argument(help="the version to delete, e.g. legal@2")],
    force: Annotated[bool, typer.Option("--force", help="Also delete aliases pointing at it.")] = False,
    registry: RegistryOption = None,
) -> None:
    """Delete one version (refused while an alias points at it, unless --force).

    Example: cartridges rm legal@2
    """
    name, version = open_registry(registry, writing=True).remove(ref, force=force)
    console.print(f"removed {name}@{version}")


@app.command("compose")
def compose_command(
    refs: Annotated[list[str], typer.Argument(help="two or more cartridges, in order")],
    name: Annotated[str, typer.Option("--name", help="Registry name of the composed cartridge.")],
    registry: RegistryOption = None,
) -> None:
    """Publish several cartridges concatenated along the sequence as one cartridge.

    Example: cartridges compose legal@latest tax@stable --name legal-tax
    """
    from cartridges.compose import compose
    from cartridges.loading import open_cartridge
    from cartridges.names import validate_name
    from cartridges.pipeline.runs import scratch_folder

    validate_name(name)
    reg = open_registry(registry, writing=True)
    sources = [open_cartridge(ref, reg) for ref in refs]
    with scratch_folder(name) as scratch:
        compose(sources, name, scratch / "cartridge")
        published = reg.publish(scratch / "cartridge", name)
    console.print(f"published [bold]{_ref(published)}[/bold] ({published.num_tokens} tokens) = {' + '.join(refs)}")


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
    from cartridges.stages.synthesize import RunSettings, SynthesisConfig, check_fits_window, synthesize

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
    _report_skipped(record["skipped"])
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
    from cartridges.stages.distill import (
        DistillConfig,
        TrainSettings,
        check_training_fits_window,
        run_training,
        save_distilled,
    )

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
        f"published [bold]{_ref(published)}[/bold] ({published.num_tokens} tokens, method distilled): {metrics}"
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
    _report_skipped(result.summary["corpus"].get("skipped", []))
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


def _scheduler(registry: str | None, writing: bool = False):
    from cartridges.pipeline.scheduler import Scheduler, build_schedule

    reg = open_registry(registry, writing)
    return Scheduler(reg, build_schedule(reg.url))


@schedule_app.command("add")
def schedule_add(
    corpus: Annotated[Path, typer.Argument(help="corpus folder to rebuild from")],
    name: Annotated[str, typer.Option("--name", help="registry name of the cartridge")],
    cron: Annotated[str, typer.Option("--cron", help="cron expression, UTC")] = "0 2 * * *",
    config: Annotated[
        str, typer.Option("--config", help="YAML file or shipped config: default, tiny, gpu")
    ] = "default",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override one setting (repeatable)")] = None,
    registry: RegistryOption = None,
) -> None:
    """Rebuild a cartridge at cron times (replaces a schedule of the same name).

    Example: cartridges schedule add legal/ --name legal --cron "0 2 * * *"
    """
    from cartridges.pipeline.build_config import load_build_config

    if not corpus.is_dir():
        raise CartridgeError(f"corpus folder {corpus} does not exist: pass a folder of documents")
    load_build_config(config, overrides or [])  # a bad config fails now, not at 2 a.m.
    scheduler = _scheduler(registry, writing=True)
    schedule = scheduler.add(name, str(corpus.resolve()), cron, config, overrides or [])
    console.print(f"scheduled {schedule.name}: {schedule.cron} (next {schedule.next_run})")
    if os.environ.get("RAY_ADDRESS"):
        from cartridges.pipeline.scheduler import ensure_actor

        ensure_actor(scheduler.registry.url)
        console.print("the scheduler actor is running on the Ray cluster")
    else:
        console.print(
            "start the scheduler on a Ray cluster to run it: ray start --head; RAY_ADDRESS=auto cartridges schedule start"
        )


@schedule_app.command("start")
def schedule_start(registry: RegistryOption = None) -> None:
    """Start the cluster's scheduler actor (detached, named; a no-op when it runs).

    Example: RAY_ADDRESS=auto cartridges schedule start
    """
    from cartridges.pipeline.scheduler import ensure_actor

    if not os.environ.get("RAY_ADDRESS"):
        raise CartridgeError("the scheduler needs a running Ray cluster: `ray start --head`, then set RAY_ADDRESS=auto")
    names = ensure_actor(open_registry(registry).url)
    console.print(f"scheduler running ({names})")


@schedule_app.command("list")
def schedule_list(registry: RegistryOption = None) -> None:
    """Every schedule, its next time and its last outcome.

    Example: cartridges schedule list
    """
    scheduler = _scheduler(registry)
    last = {h.name: h for h in scheduler.history()}
    table = Table("name", "corpus", "cron", "next run (UTC)", "last outcome")
    for s in scheduler.schedules():
        outcome = last.get(s.name)
        table.add_row(s.name, s.corpus, s.cron, s.next_run, f"{outcome.status} {outcome.finished}" if outcome else "")
    console.print(table)


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="schedule name")], registry: RegistryOption = None
) -> None:
    """Stop rebuilding NAME (its cartridges stay).

    Example: cartridges schedule remove legal
    """
    _scheduler(registry, writing=True).remove(name)
    console.print(f"removed schedule {name}")


@schedule_app.command("run-now")
def schedule_run_now(
    name: Annotated[str, typer.Argument(help="schedule name")], registry: RegistryOption = None
) -> None:
    """Build a schedule now, in this process, and record the outcome.

    Example: cartridges schedule run-now legal
    """
    outcome = _scheduler(registry, writing=True).run(name)
    if outcome is None:
        raise CartridgeError(f"a build of {name} is already running")
    console.print(f"{name}: {outcome.status} ({outcome.detail})")
    if outcome.status == "failed":
        raise typer.Exit(1)


@schedule_app.command("history")
def schedule_history(
    name: Annotated[str | None, typer.Argument(help="only this schedule")] = None, registry: RegistryOption = None
) -> None:
    """Past scheduled builds, oldest first.

    Example: cartridges schedule history legal
    """
    table = Table("name", "started", "finished", "status", "detail")
    for h in _scheduler(registry).history(name):
        table.add_row(h.name, h.started, h.finished, h.status, h.detail)
    console.print(table)


@app.command("eval")
def eval_command(
    method: Annotated[
        str, typer.Option("--method", help="none, icl, truncated, rag, knorm, streaming or cartridge")
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
    from cartridges.stages.contexts import METHODS, context_source
    from cartridges.stages.evaluate import score_corpus

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
    table = Table("corpus", "method", "KV tokens", "gold NLL ± SE", "rank accuracy", "questions")
    scores = []
    for corpus in corpora:
        source = context_source(loaded, method, corpus.text, budget, cartridge=prefix)
        score = score_corpus(loaded, corpus, source, method, distractors)
        scores.append(score)
        accuracy = "n/a" if score.rank_accuracy is None else f"{score.rank_accuracy:.2f} ({score.ranked_questions})"
        table.add_row(
            corpus.id,
            method,
            str(score.kv_tokens),
            f"{score.nll:.3f} ± {score.nll_se:.3f}",
            accuracy,
            str(score.questions),
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


@app.command("gc")
def garbage_collect(
    older_than: Annotated[
        str, typer.Option("--older-than", help="only what has not changed for this long: 90s, 30m, 1h, 2d")
    ] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, remove nothing")] = False,
    registry: RegistryOption = None,
) -> None:
    """Remove what killed or finished work left behind: unfinished uploads, scratch folders, copies kept by published builds.

    Never touches a build that is running or can resume, nor the samples the next build reuses.
    Example: cartridges gc --older-than 1h --dry-run
    """
    from cartridges.pipeline.gc import collect_garbage, parse_age

    removed = collect_garbage(open_registry(registry, writing=not dry_run), parse_age(older_than), dry_run)
    for item in removed:
        console.print(
            f"{'would remove' if dry_run else 'removed'} {item.path} ({item.reason}, {item.bytes / 2**20:.1f} MB)",
            highlight=False,
        )
    total = sum(item.bytes for item in removed) / 2**20
    console.print(
        f"{len(removed)} item(s), {total:.1f} MB {'would be freed' if dry_run else 'freed'}"
        if removed
        else "nothing to remove"
    )


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2; Ctrl-C one line and 130."""
    if not sys.stderr.isatty():  # tqdm bars (the one-time GGUF conversion) are carriage-return noise in a log
        os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # sub-second weight loading; the bars only add noise
    try:
        app()
    except CartridgeError as exc:
        errors.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
