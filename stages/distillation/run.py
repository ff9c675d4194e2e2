"""Run the distillation loop: in this process, or under Ray Train's `TorchTrainer` (N workers, gradients
all-reduced by DDP), with progress either way; resumes from the run folder's last checkpoint."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from cartridges.atomic import write_atomically
from cartridges.cluster import init_ray, runs_on_ray
from cartridges.errors import CartridgeError
from cartridges.progress import ThroughputProgress
from cartridges.stages.distillation.checkpoints import latest_checkpoint
from cartridges.stages.distillation.config import DistillConfig, DistillRunSettings, TrainingDiverged, for_start
from cartridges.stages.distillation.init.prefix import INIT_METADATA_KEY, init_used, initial_prefix
from cartridges.stages.distillation.worker import TrainingSpec, train_worker
from cartridges.stages.records import FailureRecord, read_record
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror


def run_training(
    run: RunDir,
    loaded,
    config: DistillConfig,
    settings: DistillRunSettings,
    qa_pairs: list[tuple[str, str]] = (),
    start_from: torch.Tensor | None = None,
    mirror: RunMirror | None = None,
) -> Path:
    """Train (or resume) the prefix of the run's synthesis; returns the path of the final prefix.

    `start_from`: the prefix to start from instead of `config.init`'s (a warm start from an earlier
    version). It is written as the run's initial prefix when training first starts; a resumed run
    continues from its own checkpoints and initial prefix.
    `mirror`: the run's copy on an object store. Ray Train workers then work in copies of the run on
    their own nodes, pulled from the store, and rank 0 pushes its step records, checkpoints and final
    prefix there, which the driver pulls: no node reads another's disk.
    """
    mirror = mirror or RunMirror(run, None)
    run.distill.mkdir(parents=True, exist_ok=True)
    if run.training_config.is_file() and json.loads(run.training_config.read_text()) != config.model_dump():
        raise CartridgeError(
            f"{run.distill} holds a training with other settings: use the same settings to resume, or a new run folder"
        )
    write_atomically(run.training_config, lambda tmp: tmp.write_text(json.dumps(config.model_dump(), indent=2)))
    run.failure.unlink(missing_ok=True)
    mirror.remove(run.failure)  # an earlier attempt's, on any machine
    if not run.init_prefix.is_file():
        prefix, init = (start_from, "warm_start") if start_from is not None else initial_prefix(loaded, run, config)
        tensors, metadata = {"prefix": prefix.cpu().contiguous()}, {INIT_METADATA_KEY: init}
        write_atomically(run.init_prefix, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    on_ray = runs_on_ray(settings.executor, settings.workers)
    spec = TrainingSpec(
        config=for_start(config, init_used(run)),
        run_dir=str(run.root),
        model=loaded.ref,
        qa_pairs=list(qa_pairs),
        threads=settings.worker_threads() if on_ray else settings.threads,
        run_url=mirror.url,
        on_ray=on_ray,
    )
    done = latest_checkpoint(run.checkpoints)
    first = int(done.name.split("-")[1]) if done else 0
    with ThroughputProgress("distill", total=config.steps - first, unit="steps") as progress:
        if not on_ray:
            train_worker(spec.model_dump(), on_step=lambda record: progress.advance(1, record["tokens"]))
        else:
            mirror.push(run.distill)  # the training's config and initial prefix, for workers on other nodes
            try:
                with following_metrics(run.metrics, progress, mirror):
                    _fit_on_ray(run, spec, settings, mirror)
            finally:
                mirror.pull("distill")  # the step records, checkpoints, final prefix or failure the workers wrote
    return run.final_prefix


def _fit_on_ray(run: RunDir, spec: TrainingSpec, settings: DistillRunSettings, mirror: RunMirror) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.on_gpu(),
            resources_per_worker={"CPU": settings.worker_cpus()},
        ),
        torch_config=TorchConfig(backend="nccl" if settings.on_gpu() else "gloo"),
        run_config=RunConfig(storage_path=str(run.ray_storage.resolve()), name="train"),
    )
    try:
        trainer.fit()
    except Exception:
        mirror.pull(run.failure.relative_to(run.root).as_posix())  # written by a worker on another node
        if run.failure.is_file():  # a worker's TrainingDiverged arrives wrapped in Ray's errors
            raise TrainingDiverged(read_record(run.failure, FailureRecord).message) from None
        raise


@contextmanager
def following_metrics(
    path: Path, progress: ThroughputProgress, mirror: RunMirror | None = None, poll_seconds: float = 1.0
) -> Iterator[None]:
    """Advance `progress` from the step records a Ray Train worker appends to `path` (pulled from the
    run's object store copy when there is one), which is all the driver sees of a training that runs
    in another process (or on another node)."""
    offset = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def follow() -> None:
        nonlocal offset
        while True:
            stopping = stop.wait(poll_seconds)
            if mirror is not None:
                mirror.pull(path.relative_to(mirror.local.root).as_posix())
            if path.is_file():
                with path.open("rb") as log:
                    log.seek(offset)
                    data = log.read()
                complete = data[: data.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.splitlines():
                    progress.advance(1, json.loads(line).get("tokens", 0))
            if stopping:
                return

    follower = threading.Thread(target=follow, name="distill-progress", daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join()
