"""Commands that manage cartridges in the registry: init, ls, show, verify, alias, rm, compose, gc, model prepare."""

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
    errors,
    model_app,
    open_registry,
    report_skipped,
)


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
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="first_tokens: the first TOKENS corpus tokens' KV; select: the corpus tokens reconstruction "
            "attends to most; matched: select's keys with values fitted to the whole corpus's attention; "
            "matched_omp: keys by matching pursuit instead (one model window) (closed form, no training; "
            "docs/building.md has the measured quality and cost).",
        ),
    ] = "first_tokens",
    read_tokens: Annotated[
        int,
        typer.Option("--read-tokens", min=1, help="select/matched read about this many tokens of a longer corpus."),
    ] = 32768,
    model: ModelOption = None,
    registry: RegistryOption = None,
) -> None:
    """Build an untrained cartridge of TOKENS tokens from the corpus and publish it.

    Example: cartridges init --corpus legal/ --tokens 512 --method matched --name legal
    """
    from cartridges.default_corpus import gather_license_corpus
    from cartridges.models import load_model
    from cartridges.pipeline.runs import scratch_folder
    from cartridges.registry.names import validate_new_name
    from cartridges.stages.distillation.init.first_tokens import init_cartridge, init_source
    from cartridges.stages.ingest import read_corpus

    validate_new_name(name)
    init_source(method)  # an unknown method is refused before the registry or the model is touched
    reg = open_registry(registry, writing=True)
    documents = read_corpus(corpus or gather_license_corpus())
    report_skipped(documents.skipped)
    loaded = load_model(model)
    with scratch_folder(name) as scratch:
        built = init_cartridge(loaded, documents, tokens, name, scratch / "cartridge", method, read_tokens)
        if built.num_tokens < tokens:
            errors.print(f"[yellow]corpus has only {built.num_tokens} tokens; the cartridge uses all of them[/yellow]")
        published = reg.publish(scratch / "cartridge", name)
    console.print(
        f"published [bold]{published.label}[/bold] ({published.num_tokens} tokens, {published.kv_bytes / 2**20:.1f} MB KV) "
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
            m.label,
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
    from cartridges.artifact.manifest import Manifest
    from cartridges.registry.names import folder_of

    folder = folder_of(ref)
    console.print_json((Manifest.read(folder) if folder else open_registry(registry).show(ref)).to_json())


@app.command("verify")
def verify(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, NAME@ALIAS, or a folder (./dir, path:dir)")],
    registry: RegistryOption = None,
) -> None:
    """Check a cartridge as loading does: checksums, shapes, manifest, name and version, finite values, and
    the model it names (fingerprints, KV shape) when that model is on this machine (exit 2 on a problem).

    Example: cartridges verify legal@3
    """
    from cartridges.artifact.folder import check_against_model_files
    from cartridges.artifact.integrity import check_artifact
    from cartridges.registry.names import folder_of

    folder = folder_of(ref)
    manifest = check_artifact(folder) if folder else open_registry(registry).verify(ref)
    unchecked = check_against_model_files(manifest)
    bound = (
        "manifest bound to the payload"
        if manifest.format_version >= 2
        else "format 1: manifest not bound to the payload"
    )
    model = "the model's fingerprints and KV shape" if unchecked is None else "model not checked"
    console.print(
        f"{manifest.label if manifest.version else folder}: OK ({len(manifest.files)} files, shapes, {bound}, "
        f"finite values, {model})",
        soft_wrap=True,
    )
    if unchecked is not None:
        errors.print(f"[yellow]note: {unchecked}[/yellow]", highlight=False)


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
    latest: Annotated[bool, typer.Option("--latest", help="With a bare NAME: delete its newest version.")] = False,
    registry: RegistryOption = None,
) -> None:
    """Delete one version, named explicitly (refused while an alias points at it, unless --force).

    Example: cartridges rm legal@2
    """
    from cartridges.registry.names import folder_of, parse_ref

    if folder_of(ref) is None and "@" not in ref and not latest:
        parse_ref(ref)  # a bad name is named first
        raise CartridgeError(f"rm needs the version to delete: {ref}@N (or {ref} --latest for its newest version)")
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
    from cartridges.artifact.compose import compose
    from cartridges.loading import open_cartridge
    from cartridges.pipeline.runs import scratch_folder
    from cartridges.registry.names import validate_new_name

    validate_new_name(name)
    reg = open_registry(registry, writing=True)
    sources = [open_cartridge(ref, reg) for ref in refs]
    with scratch_folder(name) as scratch:
        compose(sources, name, scratch / "cartridge")
        published = reg.publish(scratch / "cartridge", name)
    console.print(f"published [bold]{published.label}[/bold] ({published.num_tokens} tokens) = {' + '.join(refs)}")


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
