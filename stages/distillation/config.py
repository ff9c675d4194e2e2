"""What a distillation trains (`DistillConfig`: the cartridge's size, its start, the optimisation; the
defaults are the tuned recipe, BENCHMARKS.md) and how it runs (`DistillRunSettings`)."""

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field

from cartridges.artifact.precision import Precision
from cartridges.cluster import Executor, cpus_per_actor
from cartridges.errors import CartridgeError
from cartridges.settings import STRICT_SETTINGS


class TrainingDiverged(CartridgeError):
    """A loss, gradient or prefix value became NaN or infinite: nothing of this run may be published."""


class DistillConfig(BaseModel):
    model_config = STRICT_SETTINGS

    num_tokens: int = Field(256, ge=2, description="cartridge length P")
    init: Literal["auto", "first_tokens", "select", "matched", "matched_omp", "sampled", "summary", "random"] = Field(
        "auto",
        description="prefix initialisation: auto (for a corpus within one window of the model matched_omp up to "
        "P=256 and matched above, first_tokens for a longer corpus), the first corpus tokens' KV, the corpus KV selected by reconstruction "
        "attention (stages/evaluation/methods/select.py), those keys with values fitted to the whole corpus's attention output (stages/evaluation/methods/matched.py), keys chosen by matching pursuit on the attention mass with values fitted (matched_omp, one window), the KV of spans sampled across the corpus "
        "(stages/distillation/init/sampled.py), the KV of the model's summaries of chunks across the corpus "
        "(stages/distillation/init/summary.py), or random values",
    )
    select_max_tokens: int = Field(
        32768, ge=1, description="init 'select' reads at most about this many corpus tokens (evenly spaced segments)"
    )
    init_probes: Literal["repeat", "samples", "both"] = Field(
        "repeat",
        description="the queries a fitted block (matched, matched_omp) matches the corpus's attention for: the "
        "model repeating the corpus, the build's self-study conversations read after the whole corpus "
        "(on-policy; one window), or both (stages/evaluation/methods/sample_probes.py); trained from matched_omp "
        "on two articles, samples was 0.08-0.12 nats worse and both level at twice the start's cost (BENCHMARKS.md)",
    )
    init_probe_samples: int = Field(
        32, ge=1, description="init probes 'samples'/'both' read this many training samples (evenly spaced)"
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
    fitted_start_lr: float | None = Field(
        1e-3,
        gt=0,
        le=1,
        description="learning rate when training starts from a block whose values were fitted to the corpus's "
        "attention (matched, matched_omp; `auto` on a corpus within one window): from matched_omp, 6e-3 undid "
        "0.07-0.31 nats of the start on four articles and 1e-3 kept it (BENCHMARKS.md); null: `lr`",
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


FITTED_STARTS = ("matched", "matched_omp")  # inits whose values are fitted to the corpus's attention


def for_start(config: DistillConfig, init: str | None) -> DistillConfig:
    """The recipe training runs for a start made by `init` (`distill.init: auto` resolved): `fitted_start_lr`
    in place of `lr` for a fitted block, `config` itself for any other start."""
    if init in FITTED_STARTS and config.fitted_start_lr is not None:
        return config.model_copy(update={"lr": config.fitted_start_lr})
    return config


class DistillRunSettings(BaseModel):
    """How training runs; does not change the result beyond floating-point reduction order."""

    model_config = STRICT_SETTINGS

    executor: Executor = Field("auto", description="ray, local, or auto: Ray with RAY_ADDRESS or workers > 1")
    workers: int = Field(1, ge=1, description="Ray Train workers (gloo on CPU)")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="Ray CPUs per worker (default: this machine's cores / workers)"
    )
    use_gpu: bool | None = Field(
        None, description="one GPU per worker, NCCL (default: when the driver's machine has one; set it on a cluster)"
    )

    def on_gpu(self) -> bool:
        return torch.cuda.is_available() if self.use_gpu is None else self.use_gpu

    def worker_cpus(self) -> float:
        return cpus_per_actor(self.workers, self.cpus_per_worker)

    def worker_threads(self) -> int:
        """Ray starts a worker with OMP_NUM_THREADS = its CPUs (1 unless asked), which trains slower than
        one thread per CPU it holds (BENCHMARKS.md, the second Normans build)."""
        return self.threads or max(1, math.floor(self.worker_cpus()))


def check_training_fits_window(config: DistillConfig, window: int) -> None:
    """The student reads the prefix and then up to `max_length` tokens: both must fit the model's positions."""
    if config.num_tokens + config.max_length > window:
        raise CartridgeError(
            f"distill.num_tokens={config.num_tokens} plus distill.max_length={config.max_length} is "
            f"{config.num_tokens + config.max_length} positions, more than the model's window of {window}: "
            f"lower distill.num_tokens to {max(window - config.max_length, 0)} or less"
        )
