"""The evaluate stage: gold-answer NLL (and rank accuracy) of a QA set's held-out questions with no
context, the prefix training started from and the trained one; the numbers go into the manifest.
Minutes for a hundred questions on a CPU, so it shows progress (questions scored, rate, ETA) like the
other stages."""

from dataclasses import dataclass

from safetensors.torch import load_file

from cartridges.models import LoadedModel
from cartridges.progress import ThroughputProgress
from cartridges.qa import QACorpus
from cartridges.stages.config import BuildConfig
from cartridges.stages.evaluation.contexts import Context, FixedContext
from cartridges.stages.evaluation.evaluate import score_corpus
from cartridges.stages.records import EvaluationRecord, read_record
from cartridges.stages.run_mirror import RunMirror


@dataclass(frozen=True)
class EvaluationInputs:
    model: LoadedModel
    qa: QACorpus


def run(mirror: RunMirror, inputs: EvaluationInputs, config: BuildConfig) -> EvaluationRecord:
    """Score the run's prefixes on `inputs.qa` (`evaluation.json`; kept when it is for the same QA set)."""
    run_dir, loaded, qa = mirror.local, inputs.model, inputs.qa
    if run_dir.evaluation.is_file():
        recorded = read_record(run_dir.evaluation, EvaluationRecord)
        if recorded.qa == qa.id:
            return recorded
    prefixes = {
        "none": None,
        "start": load_file(str(run_dir.init_prefix))["prefix"],
        "cartridge": load_file(str(run_dir.final_prefix))["prefix"],
    }
    metrics: dict[str, float] = {}
    with ThroughputProgress("evaluate", len(prefixes) * len(qa.questions), "questions") as progress:
        for method, prefix in prefixes.items():
            context = Context(None if prefix is None else prefix.to(loaded.model.device))
            score = score_corpus(loaded, qa, FixedContext(context), method, on_scored=progress.advance)
            metrics[f"qa_{method}_nll"] = score.nll
            if score.rank_accuracy is not None:
                metrics[f"qa_{method}_rank_accuracy"] = score.rank_accuracy
    record = EvaluationRecord(qa=qa.id, metrics=metrics)
    record.write(run_dir.evaluation)
    return record
