"""Distill: train the cartridge's KV prefix so the model *without* the corpus matches the teacher.

The student is the frozen model with PEFT's CARTRIDGE prefix (first token frozen as attention
sink); the target is the teacher's top-k distribution over each synthetic answer, recorded with
the chunk in context. The loop below is the whole method; `distill_run.run_training` runs it in-process or
under Ray Train's `TorchTrainer` (N workers, gradients all-reduced by DDP).
"""

import json
import math
import random
import time
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import torch
from peft import get_peft_model
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from cartridges.artifact import cartridge_peft_config, kv_shape
from cartridges.atomic import write_atomically
from cartridges.cluster import node_label
from cartridges.errors import CartridgeError
from cartridges.home import runs_dir
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import ModelRef, default_device, model_on_this_node
from cartridges.precision import Precision
from cartridges.runtime import pad_token_id
from cartridges.settings import STRICT_SETTINGS
from cartridges.stages.answer_scoring import mean_answer_nll
from cartridges.stages.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, read_chunks
from cartridges.stages.records import FailureRecord
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.sampled_init import sampled_token_ids
from cartridges.stages.summary_init import summary_token_ids
from cartridges.stages.training_data import collate, distillation_loss, load_examples


class TrainingDiverged(CartridgeError):
    """A loss, gradient or prefix value became NaN or infinite: nothing of this run may be published."""


class DistillConfig(BaseModel):
    model_config = STRICT_SETTINGS

    num_tokens: int = Field(256, ge=2, description="cartridge length P")
    init: Literal["first_tokens", "select", "sampled", "summary", "random"] = Field(
        "first_tokens",
        description="prefix initialisation: the first corpus tokens' KV, the corpus KV selected by reconstruction "
        "attention (stages/kv_reconstruction.py), the KV of spans sampled across the corpus "
        "(stages/sampled_init.py), the KV of the model's summaries of chunks across the corpus "
        "(stages/summary_init.py), or random values",
    )
    select_max_tokens: int = Field(
        32768, ge=1, description="init 'select' reads at most about this many corpus tokens (evenly spaced segments)"
    )
    sample_span_tokens: int = Field(64, ge=1, description="init 'sampled' takes spans of this many corpus tokens")
    summary_tokens: int = Field(
        64, ge=1, description="init 'summary' writes one summary of at least this many tokens per summarised chunk"
    )
    steps: int = Field(
        32, ge=1, description="optimizer steps; 32 = about one epoch of the default 128 samples at batch 4"
    )
    precision: Precision = Field(
        "float32", description="how the published prefix is stored: float32 (PEFT loads it), float16, int8"
    )
    lr: float = Field(
        6e-3,
        gt=0,
        le=1,
        description="32 steps at 6e-3 scored like or better than 96 at 2e-3 on four articles (BENCHMARKS.md)",
    )
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(4, ge=1, description="global batch (split across workers)")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, description="weight of the sampled-token cross-entropy added to top-k KD")
    max_length: int = Field(512, ge=16, description="student tokens per example (chat + answer)")
    eval_every: int = Field(50, ge=1)
    eval_samples: int = Field(16, ge=0, description="synthetic samples held out for KL to the teacher")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0


def split_examples(examples: list, eval_samples: int, seed: int) -> tuple[list, list]:
    """Hold out `eval_samples` (at most a fifth of the data) for KL to the teacher."""
    if not examples:
        raise CartridgeError(
            "no synthetic samples to train on: synthesize more (--set synthesis.samples=N) or check the filters' summary"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: min(eval_samples, len(examples) // 5)])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def batch_for_step(train: list, step: int, micro: int, config: DistillConfig, rank: int, world: int) -> list:
    """This worker's slice of the global batch for (step, micro-step); epochs reshuffle with the seed."""
    first = (step * config.grad_accum + micro) * config.batch_size
    picked = []
    for index in range(first, first + config.batch_size):
        epoch, position = divmod(index, len(train))
        order = list(range(len(train)))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        picked.append(train[order[position]])
    return picked[rank::world]


def _student(model_path: str, num_tokens: int, init_prefix: torch.Tensor, device: torch.device | None = None):
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.requires_grad_(False)
    model = get_peft_model(base, cartridge_peft_config(base.config, num_tokens))
    model.prompt_encoder["default"].load_prompt_embeddings(init_prefix)
    return model.to(device or default_device())


def _unwrap(model):
    """The PEFT model inside DDP: rank-0-only work (eval) must not run DDP's collective forward."""
    return model.module if hasattr(model, "module") else model


def _encoder(model):
    return _unwrap(model).prompt_encoder["default"]


@torch.no_grad()
def evaluate(
    model, tokenizer, held_out: list, qa_pairs: list[tuple[str, str]], pad_id: int, batch_size: int
) -> dict[str, float]:
    model.eval()
    metrics: dict[str, float] = {}
    if held_out:
        losses = []
        for start in range(0, len(held_out), batch_size):
            batch = collate(held_out[start : start + batch_size], pad_id).to(model.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            losses.append(distillation_loss(logits, batch)[1]["topk_kl"] * len(batch.input_ids))
        metrics["eval_topk_kl"] = sum(losses) / len(held_out)
    if qa_pairs:
        forward = lambda ids, mask: model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # noqa: E731
        nll = mean_answer_nll(forward, tokenizer, qa_pairs, batch_size=batch_size, pad_token_id=pad_id)
        metrics["qa_gold_nll"] = sum(nll) / len(nll)
    model.train()
    return metrics


def train_loop(loop_config: dict) -> None:
    """One worker's training loop (also the whole loop when run in-process)."""
    config = DistillConfig.model_validate(loop_config["config"])
    run = RunDir(Path(loop_config["run_dir"]))
    store_url = loop_config.get("run_url")  # the run's copy on an object store, if any
    rank, world, device = 0, 1, default_device()
    if loop_config.get("ray"):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
        if store_url:  # a worker on any node works in this node's own copy of the run, pulled from the store
            run = RunDir(runs_dir() / run.root.name)
            RunMirror(run, store_url).pull()
        elif not run.init_prefix.is_file():
            raise CartridgeError(
                f"node {node_label()} cannot see the run folder {run.root} (nodes share no disk): "
                "set runs_root (or $CARTRIDGES_RUNS) to an object store URL such as s3://bucket/runs"
            )
    mirror = RunMirror(run, store_url)
    if loop_config.get("threads"):
        torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(config.seed)
    model_path = str(model_on_this_node(ModelRef(**loop_config["model"])))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_token_id(tokenizer)
    model = _student(model_path, config.num_tokens, load_file(str(run.init_prefix))["prefix"], device)
    examples = load_examples(run.shards, tokenizer, config.max_length)
    train, held_out = split_examples(examples, config.eval_samples, config.seed)
    qa_pairs = [tuple(p) for p in loop_config.get("qa_pairs", [])]

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    start = 0
    checkpoint = latest_checkpoint(run.checkpoints)
    if checkpoint is not None:
        start, prefix, _ = load_checkpoint(checkpoint, optimizer, scheduler)
        model.prompt_encoder["default"].load_prompt_embeddings(prefix.to(device))
    nodes = [node_label()]
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node_label())
    model.train()

    log = run.metrics.open("a") if rank == 0 else None
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        step_tokens = 0
        for micro in range(config.grad_accum):
            batch = collate(batch_for_step(train, step, micro, config, rank, world), pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, stats = distillation_loss(logits, batch, config.ce_weight)
            (loss / config.grad_accum).backward()  # before any check: other workers wait in this all-reduce
            step_tokens += int(batch.attention_mask.sum()) * world
            if not math.isfinite(loss.item()):
                stop_training(mirror, step + 1, f"the loss is {loss.item()}", config)
        tokens_seen += step_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
        if not math.isfinite(grad_norm):
            stop_training(mirror, step + 1, f"the gradient norm is {grad_norm}", config)
        optimizer.step()
        scheduler.step()
        done = step + 1
        non_finite = int((~torch.isfinite(_encoder(model).weight)).sum())
        if non_finite:
            stop_training(mirror, done, f"{non_finite} prefix values are NaN or infinite after the update", config)
        if rank != 0:
            continue
        elapsed = time.perf_counter() - started
        record = {
            "step": done,
            **stats,
            "tokens": step_tokens,
            "threads": torch.get_num_threads(),
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_seen / elapsed,
            "eta_seconds": elapsed / (done - start) * (config.steps - done),
        }
        if done == start + 1:
            record["nodes"] = nodes  # the Ray node of each worker, by rank, once per (re)start
        if done % config.eval_every == 0 or done == config.steps:
            record |= evaluate(_unwrap(model), tokenizer, held_out, qa_pairs, pad_id, config.batch_size)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if loop_config.get("on_step"):
            loop_config["on_step"](record)
        if done % config.checkpoint_every == 0 or done == config.steps:
            mirror.push(
                save_checkpoint(run.checkpoints, done, _encoder(model).weight, optimizer, scheduler, {"world": world})
            )
        mirror.push(run.metrics)
    if rank == 0:
        final = _encoder(model).weight.detach().cpu().contiguous()
        write_atomically(run.final_prefix, lambda tmp: save_file({"prefix": final}, str(tmp)))
        log.close()
        mirror.push(run.final_prefix)


def stop_training(mirror: RunMirror, step: int, problem: str, config: DistillConfig) -> None:
    """Stop at the first non-finite loss, gradient or prefix, before it reaches a checkpoint.

    Checkpoints are written after these checks, so the last one on disk is good. The reason is also
    written to `failure.json`, so that the driver of a Ray Train run reports this one line rather
    than the worker group's traceback (pushed to the run's store copy, when there is one, for a driver
    on another node).
    """
    run = mirror.local
    last = latest_checkpoint(run.checkpoints)
    kept = f"the last good checkpoint ({last.name}) is kept" if last else "no checkpoint had been written"
    message = (
        f"training stopped at step {step}: {problem} (not finite); {kept} and nothing is published. "
        f"Lower distill.lr (now {config.lr:g}) or distill.max_grad_norm (now {config.max_grad_norm:g}), then build again"
    )
    FailureRecord(step=step, message=message).write(run.failure)
    mirror.push(run.failure)
    raise TrainingDiverged(message)


def check_training_fits_window(config: DistillConfig, window: int) -> None:
    """The student reads the prefix and then up to `max_length` tokens: both must fit the model's positions."""
    if config.num_tokens + config.max_length > window:
        raise CartridgeError(
            f"distill.num_tokens={config.num_tokens} plus distill.max_length={config.max_length} is "
            f"{config.num_tokens + config.max_length} positions, more than the model's window of {window}: "
            f"lower distill.num_tokens to {max(window - config.max_length, 0)} or less"
        )


def initial_prefix(loaded, run: RunDir, config: DistillConfig) -> torch.Tensor:
    """The prefix training starts from: KV of the first corpus tokens, of the tokens reconstruction attends
    to most, of spans sampled across the corpus, of the model's summaries of chunks across it, or random."""
    if config.init == "random":
        num_layers, num_kv_heads, head_dim = kv_shape(loaded.model.config)
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randn(config.num_tokens, num_layers * 2 * num_kv_heads * head_dim, generator=generator)
    text = DOCUMENT_SEPARATOR.join(pq.read_table(run.documents, columns=["text"]).column("text").to_pylist())
    if config.init == "select":
        from cartridges.stages.kv_reconstruction import selected_prefix

        return selected_prefix(loaded, text, config.num_tokens, config.select_max_tokens)
    if config.init == "sampled":
        ids = sampled_token_ids(loaded.tokenizer, text, config.num_tokens, config.sample_span_tokens, config.seed)
    elif config.init == "summary":
        chunks = [chunk.text for chunk in read_chunks(run)]
        ids = summary_token_ids(loaded, chunks, config.num_tokens, config.summary_tokens)
    else:
        ids = context_token_ids(loaded.tokenizer, text, config.num_tokens)
    return kv_prefix_of_tokens(loaded.model, ids)
