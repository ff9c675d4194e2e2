"""Build a library: the corpus cut into units, one prefix per unit, a BM25 router over the units' text,
published as one registry version.

The units to make go to workers (`workers.make_units`: this process, or Ray actors with a model each).
Each unit's prefix is kept in the run folder as soon as it is made
(`units/<digest>.safetensors`), so a killed build resumes where it stopped; a unit whose digest and
recipe equal one in the latest published version of the same name is taken from it instead (the
table says from which version), so a rebuild after an edit makes only the changed units.
"""

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from cartridges.artifact.folder import describe_model, load_artifact, save_artifact
from cartridges.artifact.manifest import LIBRARY_INDEX_FILE, CorpusInfo, Manifest
from cartridges.atomic import write_atomically
from cartridges.errors import CartridgeError, NotFound
from cartridges.hashing import sha256_bytes, sha256_file
from cartridges.home import runs_dir
from cartridges.kv_layout import NUM_FROZEN_TOKENS, cartridge_peft_config
from cartridges.library.index import LibraryIndex, Router, UnitRecord
from cartridges.library.library import Library, library_of
from cartridges.library.units import Unit, split_units
from cartridges.models import LoadedModel
from cartridges.progress import ThroughputProgress
from cartridges.registry.store import Registry
from cartridges.stages.ingest import Corpus
from cartridges.stages.library.config import LibraryConfig, LibraryRunSettings
from cartridges.stages.library.workers import PREFIX_KEY, make_units


@dataclass(frozen=True)
class LibraryBuild:
    ref: str
    built: bool  # False: the same library was published already
    units: int
    made: int  # units whose prefix this build computed
    made_on: dict[str, int]  # units made per node ("local": this process)
    reused: int  # units taken from an earlier version by digest
    resumed: int  # units found in the run folder from an interrupted build
    num_tokens: int  # KV tokens of all units
    text_tokens: int
    seconds: float


def corpus_tokens(loaded: LoadedModel, corpus: Corpus) -> int:
    return sum(len(loaded.tokenizer(doc.text, add_special_tokens=False)["input_ids"]) for doc in corpus.documents)


def previous_library(registry: Registry, name: str, loaded: LoadedModel) -> Library | None:
    """The latest published version of `name` when it is a library of this model (to reuse units from)."""
    try:
        where, path = registry.locate(name)
    except NotFound:
        return None
    try:
        manifest = registry.stored_manifest(*where)
        if manifest.method != "library" or manifest.model_fingerprint != loaded.fingerprint:
            return None
        return library_of(load_artifact(path, expected=where))
    except CartridgeError:  # a damaged version lends nothing: every unit is made anew
        return None


def same_library(earlier: Library, units: list[Unit], config: LibraryConfig) -> bool:
    """The latest version already is this build: the same units (by digest, in order) and routing settings."""
    index = earlier.index
    settings = (index.unit_tokens, index.default_budget, index.order, index.positions)
    return settings == (config.unit_tokens, config.default_budget, config.order, config.positions) and [
        u.digest for u in index.units
    ] == [u.digest for u in units]


def run_folder(name: str, corpus: Corpus, loaded: LoadedModel, config: LibraryConfig) -> Path:
    """Named after what decides the units' prefixes (corpus, tokenizer, recipe), so a change of routing
    settings (budget, order, positions) or of unit size resumes from the same unit files (keyed by digest)."""
    recipe = sha256_bytes(repr(sorted(config.recipe().items())).encode())
    return runs_dir() / f"{name}-library-{corpus.fingerprint(loaded.tokenizer_fingerprint)[:12]}-{recipe[:12]}"


def build_library(
    corpus: Corpus,
    loaded: LoadedModel,
    name: str,
    config: LibraryConfig,
    registry: Registry,
    settings: LibraryRunSettings | None = None,
) -> LibraryBuild:
    started = time.perf_counter()
    window = loaded.model.config.max_position_embeddings
    if config.unit_tokens >= window:
        raise CartridgeError(
            f"library.unit_tokens is {config.unit_tokens}, but {loaded.model_id} reads {window} positions: "
            f"set it below that (--set library.unit_tokens={window // 4})"
        )
    units = split_units(corpus.documents, loaded.tokenizer, loaded.tokenizer_fingerprint, config.unit_tokens)
    folder = run_folder(name, corpus, loaded, config)
    kept = folder / "units"
    kept.mkdir(parents=True, exist_ok=True)
    earlier = previous_library(registry, name, loaded)
    reusable = {}
    if earlier is not None and earlier.cartridge.manifest.method_config.get("recipe") == config.recipe():
        if same_library(earlier, units, config):
            return LibraryBuild(
                ref=earlier.label,
                built=False,
                units=len(units),
                made=0,
                made_on={},
                reused=0,
                resumed=0,
                num_tokens=earlier.cartridge.manifest.num_tokens,
                text_tokens=sum(unit.num_tokens for unit in units),
                seconds=time.perf_counter() - started,
            )
        reusable = {unit.digest: unit for unit in earlier.index.units}
    pending = [u for u in units if u.digest not in reusable and not (kept / f"{u.digest}.safetensors").is_file()]
    stored_dtype = torch.float16 if config.precision == "float16" else torch.float32
    made: dict[str, tuple[torch.Tensor, str]] = {}  # digest: the prefix this build made (stored precision), its init
    made_on: Counter[str] = Counter()  # units made per node
    if pending:
        with ThroughputProgress(f"library {name}: making units", len(pending), "units") as progress:

            def keep(unit: Unit, data: bytes, init: str, node: str) -> None:
                write_atomically(kept / f"{unit.digest}.safetensors", lambda tmp: tmp.write_bytes(data))
                made[unit.digest] = (load_safetensors(data)[PREFIX_KEY].to(stored_dtype), init)
                made_on[node] += 1
                progress.advance(1, unit.num_tokens)

            make_units(pending, loaded, config, settings or LibraryRunSettings(), keep)
    prefixes, records = [], []
    reused = resumed = 0
    offset = 0
    for unit in units:
        source = None
        if unit.digest in reusable:
            old = reusable[unit.digest]
            prefix, init, source = earlier.unit_prefix(old).clone(), old.init, earlier.label
            reused += 1
        elif unit.digest in made:
            prefix, init = made.pop(unit.digest)  # held once: `joined` lets each prefix go as it copies it
        else:
            with safe_open(str(kept / f"{unit.digest}.safetensors"), framework="pt") as stored:
                prefix, init = stored.get_tensor(PREFIX_KEY), (stored.metadata() or {}).get("init", config.init)
            resumed += 1
        prefixes.append(prefix.to(stored_dtype))  # the library's precision: a 105k-token library is 2.4 GB at fp16
        records.append(
            UnitRecord(
                id=unit.id,
                source=unit.source,
                title=unit.title,
                digest=unit.digest,
                text_tokens=unit.num_tokens,
                offset=offset,
                num_tokens=prefix.shape[0],
                init=init,
                reused_from=source,
            )
        )
        offset += prefix.shape[0]
    index = LibraryIndex(
        unit_tokens=config.unit_tokens,
        default_budget=config.default_budget,
        order=config.order,
        positions=config.positions,
        units=records,
    )
    router = Router.build([unit.router_text() for unit in units])
    artifact = folder / f"artifact-{sha256_bytes(index.to_json().encode())[:12]}"
    manifest = library_manifest(loaded, corpus, name, config, offset, len(units))
    if not artifact.exists():
        rows = joined(prefixes)
        save_artifact(
            artifact,
            rows,
            cartridge_peft_config(loaded.model.config, offset, NUM_FROZEN_TOKENS),
            manifest,
            lambda where: write_index(where, index, router),
        )
    found = registry.find_published(name, artifact)
    published = found or registry.publish(artifact, name)
    return LibraryBuild(
        ref=published.label,
        built=found is None,
        units=len(units),
        made=sum(made_on.values()),
        made_on=dict(made_on),
        reused=reused,
        resumed=resumed,
        num_tokens=offset,
        text_tokens=sum(unit.num_tokens for unit in units),
        seconds=time.perf_counter() - started,
    )


def joined(prefixes: list[torch.Tensor]) -> torch.Tensor:
    """The units' rows as one tensor, each unit's own tensor let go as it is copied in (emptying the list):
    the peak is the rows once plus one unit, not twice the rows as with `torch.cat`."""
    first = prefixes[0]
    rows = torch.empty(sum(p.shape[0] for p in prefixes), first.shape[1], dtype=first.dtype)
    offset = 0
    for index in range(len(prefixes)):
        part = prefixes[index]
        prefixes[index] = None
        rows[offset : offset + part.shape[0]] = part
        offset += part.shape[0]
    prefixes.clear()
    return rows


def write_index(folder: Path, index: LibraryIndex, router: Router) -> dict[str, str]:
    """The library's own files into `folder`; their sha256 by name."""
    (folder / LIBRARY_INDEX_FILE).write_text(index.to_json())
    router.save(folder)
    from cartridges.artifact.manifest import LIBRARY_FILES

    return {file: sha256_file(folder / file) for file in LIBRARY_FILES}


def library_manifest(
    loaded: LoadedModel, corpus: Corpus, name: str, config: LibraryConfig, num_tokens: int, units: int
) -> Manifest:
    if num_tokens < 1:
        raise CartridgeError("a library needs at least one unit")
    return Manifest(
        name=name,
        **describe_model(loaded),
        num_tokens=num_tokens,
        num_frozen_tokens=NUM_FROZEN_TOKENS,
        dtype=config.precision,
        corpus=[
            CorpusInfo(
                fingerprint=corpus.fingerprint(loaded.tokenizer_fingerprint),
                num_documents=len(corpus.documents),
                num_tokens=corpus_tokens(loaded, corpus),
                source=str(corpus.root),
            )
        ],
        method="library",
        method_config={"units": units, "recipe": config.recipe(), **config.model_dump(exclude={"enabled"})},
    )
