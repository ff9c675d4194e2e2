"""One training worker around the pure loop (`train.train`): in this process, or as a Ray Train worker.

This is the glue the loop does not see: Ray's rank and device, a node-local copy of the run pulled
from its object store copy, the mirror that pushes step records, checkpoints and the final prefix
back, DDP, the step log, and the one-line `failure.json` a diverged run leaves for its driver.
"""

import json
from pathlib import Path

import torch
from peft import get_peft_model
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cartridges.atomic import write_atomically
from cartridges.cluster import node_label
from cartridges.errors import CartridgeError
from cartridges.home import runs_dir
from cartridges.kv_layout import cartridge_peft_config
from cartridges.models import ModelRef, default_device, model_on_this_node
from cartridges.runtime import pad_token_id
from cartridges.stages.distillation.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from cartridges.stages.distillation.config import DistillConfig, TrainingDiverged
from cartridges.stages.distillation.train import Hooks, TrainingData, split_examples, train
from cartridges.stages.distillation.training_data import load_examples
from cartridges.stages.records import FailureRecord
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror


class TrainingSpec(BaseModel):
    """Everything one worker needs, as plain data: Ray Train hands it to each worker as a dict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: DistillConfig
    run_dir: str
    model: ModelRef
    qa_pairs: list[tuple[str, str]] = []
    threads: int | None = None  # torch threads (None: torch's default)
    run_url: str | None = None  # the run's copy on an object store, if any
    on_ray: bool = False


def student(model_path: str, num_tokens: int, init_prefix: torch.Tensor, device: torch.device | None = None):
    """The frozen model with a trainable PEFT CARTRIDGE prefix, starting from `init_prefix`."""
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.requires_grad_(False)
    model = get_peft_model(base, cartridge_peft_config(base.config, num_tokens))
    model.prompt_encoder["default"].load_prompt_embeddings(init_prefix)
    return model.to(device or default_device())


def train_worker(spec_data: dict, on_step=None) -> None:
    """One worker's training (also the whole training when run in-process); Ray Train calls it with the
    dumped `TrainingSpec`. `on_step(record)`: progress, in-process only."""
    spec = TrainingSpec.model_validate(spec_data)
    config = spec.config
    run = RunDir(Path(spec.run_dir))
    rank, world, device = 0, 1, default_device()
    if spec.on_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
        if spec.run_url:  # a worker on any node works in this node's own copy of the run, pulled from the store
            run = RunDir(runs_dir() / run.root.name)
            RunMirror(run, spec.run_url).pull()
        elif not run.init_prefix.is_file():
            raise CartridgeError(
                f"node {node_label()} cannot see the run folder {run.root} (nodes share no disk): "
                "set runs_root (or $CARTRIDGES_RUNS) to an object store URL such as s3://bucket/runs"
            )
    mirror = RunMirror(run, spec.run_url)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(config.seed)
    model_path = str(model_on_this_node(spec.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = student(model_path, config.num_tokens, load_file(str(run.init_prefix))["prefix"], device)
    train_part, held_out = split_examples(
        load_examples(run.shards, tokenizer, config.max_length), config.eval_samples, config.seed
    )
    data = TrainingData(train_part, held_out, [tuple(pair) for pair in spec.qa_pairs], pad_token_id(tokenizer))
    nodes = [node_label()]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node_label())
    log = run.metrics.open("a") if rank == 0 else None

    def record(step_record: dict) -> None:
        if nodes:  # the Ray node of each worker, by rank, in the first record of each (re)start
            step_record["nodes"] = list(nodes)
            nodes.clear()
        log.write(json.dumps(step_record) + "\n")
        log.flush()
        if on_step:
            on_step(step_record)
        mirror.push(run.metrics)

    def resume(optimizer, scheduler):
        checkpoint = latest_checkpoint(run.checkpoints)
        if checkpoint is None:
            return None
        step, prefix, _ = load_checkpoint(checkpoint, optimizer, scheduler)
        return step, prefix

    def checkpoint(step: int, prefix: torch.Tensor, optimizer, scheduler) -> None:
        mirror.push(save_checkpoint(run.checkpoints, step, prefix, optimizer, scheduler, {"world": world}))

    def parallel(model):
        if world == 1:
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    hooks = Hooks(
        resume,
        record,
        checkpoint,
        lambda step, problem: stop_training(mirror, step, problem, config),
        rank,
        world,
        parallel,
    )
    try:
        final = train(model, tokenizer, data, config, hooks)
    finally:
        if log is not None:
            log.close()
    if rank == 0:
        write_atomically(run.final_prefix, lambda tmp: save_file({"prefix": final}, str(tmp)))
        mirror.push(run.final_prefix)


def stop_training(mirror: RunMirror, step: int, problem: str, config: DistillConfig) -> None:
    """Stop at the first non-finite loss, gradient or prefix, before it reaches a checkpoint.

    The reason is also written to `failure.json`, so that the driver of a Ray Train run reports this
    one line rather than the worker group's traceback (pushed to the run's store copy, when there is
    one, for a driver on another node).
    """
    run = mirror.local
    last = latest_checkpoint(run.checkpoints)
    kept = f"the last good checkpoint ({last.name}) is kept" if last else "no checkpoint had been written"
    message = (
        f"training stopped at step {step}: {problem} (not finite); {kept} and nothing is published. "
        f"Lower distill.lr (distill.fitted_start_lr from a matched block; now {config.lr:g}) or distill.max_grad_norm (now {config.max_grad_norm:g}), then build again"
    )
    FailureRecord(step=step, message=message).write(run.failure)
    mirror.push(run.failure)
    raise TrainingDiverged(message)
