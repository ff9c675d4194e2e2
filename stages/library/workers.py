"""The units' prefixes that a library build has to make, made by workers that each load the model once:
in this process, or as Ray Data actors when there is a cluster (`RAY_ADDRESS`) or more than one worker.

A unit is a small build of its own (its text in, its prefix out), so units spread over workers like
synthesis shards do; each prefix comes back as safetensors bytes (an actor on another node shares no
disk with the driver) and the driver keeps it in the run folder as it arrives, so a killed build
resumes from the units it already has, wherever they were made.
"""

from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save as save_safetensors

from cartridges.cluster import actor_pool_rows, cpus_per_actor, node_label, runs_on_ray
from cartridges.errors import CartridgeError
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.library.units import Unit
from cartridges.models import LoadedModel, ModelRef, load_model, model_on_this_node
from cartridges.stages.library.config import LibraryConfig, LibraryRunSettings

PREFIX_KEY = "prefix"
WORKER_START_TIMEOUT_S = 600  # every worker must have started (loaded its model) by then
UNIT_FIELDS = ("id", "source", "title", "text", "num_tokens", "digest")  # a unit as a Ray Data row


def unit_prefix(loaded: LoadedModel, unit: Unit, config: LibraryConfig) -> tuple[torch.Tensor, str]:
    """The unit's prefix and what made it: its whole KV when the budget covers it, else the configured block."""
    ids = context_token_ids(loaded.tokenizer, unit.text)
    budget = config.unit_budget(unit.num_tokens)
    if config.init == "kv" or budget >= len(ids):
        return kv_prefix_of_tokens(loaded.model, ids), "kv"
    if config.init == "first_tokens":
        return kv_prefix_of_tokens(loaded.model, ids[:budget]), "first_tokens"
    from cartridges.stages.distillation.init.prefix import closed_form_prefix

    return closed_form_prefix(loaded, unit.text, config.init, budget, None), config.init


def prefix_bytes(prefix: torch.Tensor, init: str) -> bytes:
    """A unit's prefix as the run folder keeps it (float32 safetensors, what made it in the metadata)."""
    return save_safetensors({PREFIX_KEY: prefix.detach().cpu().float().contiguous()}, metadata={"init": init})


class UnitWorker:
    """Ray Data callable class: the model is loaded once per actor; each row is a unit to make."""

    def __init__(self, model: ModelRef, config_json: str):
        self.loaded = load_model(str(model_on_this_node(model)))
        self.config = LibraryConfig.model_validate_json(config_json)
        self.node = node_label()

    def __call__(self, batch: dict) -> dict:
        digests, data, inits = [], [], []
        for index in range(len(batch["digest"])):
            unit = Unit(
                **{field: str(batch[field][index]) for field in UNIT_FIELDS if field != "num_tokens"},
                num_tokens=int(batch["num_tokens"][index]),
            )
            prefix, init = unit_prefix(self.loaded, unit, self.config)
            digests.append(unit.digest)
            data.append(prefix_bytes(prefix, init))
            inits.append(init)
        return {"digest": digests, "data": data, "init": inits, "node": [self.node] * len(digests)}


def make_units(
    pending: list[Unit],
    loaded: LoadedModel,
    config: LibraryConfig,
    settings: LibraryRunSettings,
    on_made: Callable[[Unit, bytes, str, str], None],
) -> None:
    """Make the pending units' prefixes; `on_made(unit, safetensors bytes, what made it, node)` as each
    arrives (here)."""
    by_digest = {unit.digest: unit for unit in pending}
    if not runs_on_ray(settings.executor, settings.workers):
        for unit in pending:
            prefix, init = unit_prefix(loaded, unit, config)
            on_made(unit, prefix_bytes(prefix, init), init, "local")
        return
    for digest, data, init, node in _made_on_ray(pending, loaded.ref, config, settings):
        on_made(by_digest[digest], data, init, node)


def _made_on_ray(
    pending: list[Unit], model: ModelRef, config: LibraryConfig, settings: LibraryRunSettings
) -> Iterator[tuple[str, bytes, str, str]]:
    import ray

    cpus = cpus_per_actor(settings.workers, settings.cpus_per_worker)
    rows = [{field: getattr(unit, field) for field in UNIT_FIELDS} for unit in pending]
    constructor = {"model": model, "config_json": config.model_dump_json()}
    dataset = actor_pool_rows(
        rows, UnitWorker, constructor, settings.workers, cpus, settings.gpus_per_worker, WORKER_START_TIMEOUT_S, 2
    )
    try:
        for row in dataset.iter_rows():
            yield row["digest"], row["data"], row["init"], row["node"]
    except ray.exceptions.GetTimeoutError:
        raise CartridgeError(
            f"the cluster did not start {settings.workers} library worker(s) with {cpus} CPU and "
            f"{settings.gpus_per_worker} GPU each within {WORKER_START_TIMEOUT_S} s: add nodes, or lower library_run.workers or cpus_per_worker"
        ) from None
