"""The distillation loop: data, forward, loss, backward, step, eval, checkpoint, in that order.

The student is the frozen model with PEFT's CARTRIDGE prefix (first token frozen as attention sink);
the target is the teacher's top-k distribution over each synthetic answer, recorded with the chunk in
context. This module is the whole method and knows nothing of where it runs: `worker` wraps it for a
process or a Ray Train worker (node-local copies, the run's mirror, DDP), and hands it `Hooks` for
what leaves the loop (step records, checkpoints, a divergence).
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import get_cosine_schedule_with_warmup

from cartridges.errors import CartridgeError
from cartridges.stages.distillation.config import DistillConfig
from cartridges.stages.distillation.training_data import collate, distillation_loss
from cartridges.stages.evaluation.answer_scoring import mean_answer_nll


@dataclass(frozen=True)
class TrainingData:
    train: list
    held_out: list  # synthetic samples for KL to the teacher
    qa_pairs: list[tuple[str, str]]  # held-out real questions for gold-answer NLL, when given
    pad_id: int


@dataclass(frozen=True)
class Hooks:
    """What the loop hands outward; the wrapper decides where each goes."""

    # (optimizer, scheduler) -> the step to start from and the prefix to load, from the last checkpoint
    resume: Callable[[torch.optim.Optimizer, object], tuple[int, torch.Tensor] | None]
    record: Callable[[dict], None]  # rank 0: one step's record
    checkpoint: Callable[[int, torch.Tensor, torch.optim.Optimizer, object], None]  # rank 0
    diverged: Callable[[int, str], None]  # raises: a non-finite value must not reach a checkpoint
    rank: int = 0
    world: int = 1
    parallel: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model  # DDP for world > 1


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


def prefix_of(model) -> torch.nn.Parameter:
    """The trained prefix (the PEFT prompt encoder's weight), also inside DDP."""
    return _unwrap(model).prompt_encoder["default"].weight


def _unwrap(model):
    """The PEFT model inside DDP: rank-0-only work (eval) must not run DDP's collective forward."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model, tokenizer, data: TrainingData, batch_size: int) -> dict[str, float]:
    model.eval()
    metrics: dict[str, float] = {}
    if data.held_out:
        losses = []
        for start in range(0, len(data.held_out), batch_size):
            batch = collate(data.held_out[start : start + batch_size], data.pad_id).to(model.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            losses.append(distillation_loss(logits, batch)[1]["topk_kl"] * len(batch.input_ids))
        metrics["eval_topk_kl"] = sum(losses) / len(data.held_out)
    if data.qa_pairs:
        forward = lambda ids, mask: model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # noqa: E731
        nll = mean_answer_nll(forward, tokenizer, data.qa_pairs, batch_size=batch_size, pad_token_id=data.pad_id)
        metrics["qa_gold_nll"] = sum(nll) / len(nll)
    model.train()
    return metrics


def train(student, tokenizer, data: TrainingData, config: DistillConfig, hooks: Hooks) -> torch.Tensor:
    """Train the student's prefix for `config.steps` (from the last checkpoint, if any); returns the prefix."""
    rank, world = hooks.rank, hooks.world
    trainable = [p for p in student.parameters() if p.requires_grad]  # the prefix only: the model is frozen
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    start = 0
    resumed = hooks.resume(optimizer, scheduler)
    if resumed is not None:
        start, prefix = resumed
        student.prompt_encoder["default"].load_prompt_embeddings(prefix.to(student.device))
    model = hooks.parallel(student)
    model.train()

    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        step_tokens = 0
        for micro in range(config.grad_accum):
            batch = collate(batch_for_step(data.train, step, micro, config, rank, world), data.pad_id)
            batch = batch.to(student.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, stats = distillation_loss(logits, batch, config.ce_weight)
            (loss / config.grad_accum).backward()  # before any check: other workers wait in this all-reduce
            step_tokens += int(batch.attention_mask.sum()) * world
            if not math.isfinite(loss.item()):
                hooks.diverged(step + 1, f"the loss is {loss.item()}")
        tokens_seen += step_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
        if not math.isfinite(grad_norm):
            hooks.diverged(step + 1, f"the gradient norm is {grad_norm}")
        optimizer.step()
        scheduler.step()
        done = step + 1
        non_finite = int((~torch.isfinite(prefix_of(model))).sum())
        if non_finite:  # checked before the checkpoint below, so the last one on disk is always good
            hooks.diverged(done, f"{non_finite} prefix values are NaN or infinite after the update")
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
        if done % config.eval_every == 0 or done == config.steps:
            record |= evaluate(_unwrap(model), tokenizer, data, config.batch_size)
        if done % config.checkpoint_every == 0 or done == config.steps:
            hooks.checkpoint(done, prefix_of(model), optimizer, scheduler)
        hooks.record(record)  # after the checkpoint: a log pushed to the store never runs ahead of it
    return prefix_of(model).detach().cpu().contiguous()
