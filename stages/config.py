"""A build's config: one section per stage (what it makes) and per runner (how it runs), with the code
defaults as the tuned recipe. `pipeline/build_config.py` reads it from YAML; every stage's `run` takes it.

A config names everything that decides the cartridge (model, synthesis, distillation) and how the
work runs (engines, executors). Its fingerprint covers only the former, so running the same build
on more machines or another executor does not count as a change.
"""

import json
import os

from pydantic import AliasChoices, BaseModel, Field

from cartridges.hashing import sha256_bytes
from cartridges.settings import STRICT_SETTINGS
from cartridges.stages.distillation.config import DistillConfig, DistillRunSettings
from cartridges.stages.library.config import LibraryConfig, LibraryRunSettings
from cartridges.stages.synthesis.config import SynthesisConfig, SynthesisRunSettings


class BuildConfig(BaseModel):
    model_config = STRICT_SETTINGS

    model: str = Field(
        "default", description="'default' (embedded SmolLM2-135M-Instruct), an HF model folder or hub id"
    )
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    synthesis_run: SynthesisRunSettings = Field(default_factory=SynthesisRunSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # `training` is this section's name in configs written before it was named after its stage.
    distill_run: DistillRunSettings = Field(
        default_factory=DistillRunSettings, validation_alias=AliasChoices("distill_run", "training")
    )
    library: LibraryConfig = Field(
        default_factory=LibraryConfig,
        description="a corpus of more than library.unit_tokens tokens builds a library of per-unit cartridges",
    )
    library_run: LibraryRunSettings = Field(
        default_factory=LibraryRunSettings, description="how a library's units are made: workers, executor"
    )
    warm_start: bool = Field(
        True, description="start training from the latest published version of the same name when it fits"
    )
    reuse_samples: bool = Field(
        True, description="take the samples of unchanged chunks from the last build of the same name"
    )
    runs_root: str | None = Field(
        None,
        description="an fsspec URL (s3://bucket/runs) that keeps run folders for machines that share no disk "
        "(default: $CARTRIDGES_RUNS, else each machine's $CARTRIDGES_HOME/runs only)",
    )

    def runs_url(self) -> str | None:
        return self.runs_root or os.environ.get("CARTRIDGES_RUNS") or None

    def fingerprint(self) -> str:
        """sha256 of the settings that change the result (not of how the work is run)."""
        decisive = self.model_dump(include={"model", "synthesis", "distill", "warm_start", "reuse_samples"})
        return sha256_bytes(json.dumps(decisive, sort_keys=True).encode())
