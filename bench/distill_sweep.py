"""Which distillation settings make the best cartridge? A sweep over seed-prompt mix, learning rate, steps and P.

For each QA corpus, every seed-prompt mix is synthesized once; each trial trains a cartridge from
one mix and is scored with the shared evaluation next to `none`, `init` (same P) and `icl`.
Trials run in the order given, corpus by corpus inside each trial, until `--deadline` seconds have
passed; results.json and results.md are rewritten after every trial, so a cut-off sweep keeps
what it finished.

    python bench/distill_sweep.py --corpus-id squad2-Normans --trial corpus/2e-2/200/256 --trial all/2e-3/200/256
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from safetensors.torch import load_file

from cartridges.bench.baseline_rows import earlier_rows, earlier_truncated, scored_rows
from cartridges.bench.run_record import record_header
from cartridges.errors import run_script
from cartridges.models import load_model
from cartridges.pipeline.build_config import load_build_config
from cartridges.pipeline.stage_runner import StageJob, run_stages
from cartridges.qa import QACorpus, load_qa_files
from cartridges.stages.config import BuildConfig
from cartridges.stages.distillation.artifact import last_logged
from cartridges.stages.evaluation.contexts import Context, FixedContext, corpus_kv
from cartridges.stages.evaluation.evaluate import CorpusScore, paired_gain, score_corpus
from cartridges.stages.evaluation.methods.sample_probes import PROBE_SOURCES
from cartridges.stages.ingest import read_corpus
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis.config import EVERY_KIND
from cartridges.stages.synthesis.seed_prompts import CORPUS_ANSWERED

MIXES = {"all": dict(EVERY_KIND), "corpus": {kind: 1.0 for kind in CORPUS_ANSWERED}}
DEFAULT_TRIALS = ["all/2e-2/200/256", "corpus/2e-2/200/256", "corpus/2e-3/200/256", "all/2e-3/200/256"]


@dataclass(frozen=True)
class Trial:
    mix: str
    lr: float
    steps: int
    num_tokens: int
    init: str = "first_tokens"
    probes: str = "repeat"  # distill.init_probes: the queries a fitted start matches

    @classmethod
    def parse(cls, spec: str) -> "Trial":
        mix, lr, steps, tokens, *init = spec.split("/")
        if mix not in MIXES:
            raise SystemExit(f"unknown mix {mix!r} in {spec!r}; known: {', '.join(MIXES)}")
        if len(init) > 1 and init[1] not in PROBE_SOURCES:
            raise SystemExit(f"unknown init probes {init[1]!r} in {spec!r}; known: {', '.join(PROBE_SOURCES)}")
        return cls(mix, float(lr), int(steps), int(tokens), *init)

    @property
    def start(self) -> str:
        """The init and, where not the repeat pass's, the probes it was fitted to (as in names)."""
        return self.init if self.probes == "repeat" else f"{self.init}-{self.probes}probes"

    @property
    def name(self) -> str:
        init = "" if self.init == "first_tokens" else f"-{self.start}"
        return f"{self.mix}-lr{self.lr:g}-s{self.steps}-p{self.num_tokens}{init}"

    @property
    def init_name(self) -> str:
        return init_name(self.start, self.num_tokens)


@dataclass(frozen=True)
class SweepSettings:
    """What every corpus of the sweep shares: the recipe trials vary (a build config, read by the same
    loader as `cartridges build`, with the command's flags as overrides) and how trials are scored."""

    config_spec: str
    overrides: tuple[str, ...]
    out: Path
    given_runs: dict[tuple[str, str], Path]  # (corpus id, mix) -> a run folder whose synthesis is taken
    distractors: int
    answer_tokens: int

    def config(self, *more: str) -> BuildConfig:
        return load_build_config(self.config_spec, [*self.overrides, *more])

    def mix_config(self, mix: str, *more: str) -> BuildConfig:
        return self.config(f"synthesis.kinds={json.dumps(MIXES[mix])}", *more)

    def trial_config(self, trial: "Trial") -> BuildConfig:
        return self.mix_config(
            trial.mix,
            f"distill.num_tokens={trial.num_tokens}",
            f"distill.init={trial.init}",
            f"distill.init_probes={trial.probes}",
            f"distill.steps={trial.steps}",
            f"distill.lr={trial.lr}",
            "distill.fitted_start_lr=null",  # the trial's lr is the one trained, whatever the start
            f"distill.eval_every={trial.steps}",
            f"distill.checkpoint_every={trial.steps}",
        )


def init_name(init: str, num_tokens: int) -> str:
    """The score's name of an untrained cartridge (an init) of `num_tokens` tokens."""
    return f"init-p{num_tokens}" if init == "first_tokens" else f"init-{init}-p{num_tokens}"


@dataclass(frozen=True)
class TrialRow:
    """One trial on one corpus: a row of results.json (`as_json`, the shape earlier sweeps wrote and
    `trials-table` and `samples-curve` read)."""

    corpus: str
    trial: Trial
    train_seconds: float
    train_metrics: dict[str, float]  # the last value of each number in the training log
    init: dict  # the score of the prefix training started from (a CorpusScore as JSON)
    distilled: CorpusScore

    def as_json(self) -> dict:
        return {
            "corpus": self.corpus,
            **asdict(self.trial),
            "name": self.trial.name,
            "init_method": self.trial.init,  # asdict's "init" is replaced by the init's score below
            "train_seconds": self.train_seconds,
            "train_metrics": self.train_metrics,
            "init": self.init,
            "distilled": asdict(self.distilled),
        }


class CorpusSweep:
    """One corpus: its synthesized mixes, its baselines, and the trials trained on it."""

    def __init__(self, corpus: QACorpus, loaded, settings: SweepSettings):
        self.corpus, self.loaded, self.settings = corpus, loaded, settings
        self.root = settings.out / corpus.id
        self.corpus_dir = self.root / "corpus"
        self.corpus_dir.mkdir(parents=True, exist_ok=True)
        (self.corpus_dir / "corpus.txt").write_text(corpus.text)
        self.synthesis: dict[str, dict] = {}
        self.scores: dict[str, dict] = {}

    def score(self, name: str, prefix) -> dict:
        if name not in self.scores:
            self.scores[name] = asdict(
                score_corpus(
                    self.loaded,
                    self.corpus,
                    FixedContext(Context(prefix)),
                    name,
                    self.settings.distractors,
                    answer_tokens=self.settings.answer_tokens,
                )
            )
        return self.scores[name]

    def baselines(self, earlier: dict[tuple[str, str], dict], truncated: dict[tuple[str, int], dict]) -> None:
        """none and icl, and the first_tokens inits (`truncated` rows), from earlier runs where given."""
        for (corpus_id, budget), row in truncated.items():
            if corpus_id == self.corpus.id:
                self.scores[init_name("first_tokens", budget)] = row
        for method, prefix in (("none", lambda: None), ("icl", lambda: corpus_kv(self.loaded, self.corpus.text))):
            if (self.corpus.id, method) in earlier:
                self.scores[method] = earlier[(self.corpus.id, method)]
            else:
                self.score(method, prefix())

    def mix_run(self, mix: str) -> Path:
        """The run folder holding `mix`'s synthesis (made on first use)."""
        given = self.settings.given_runs.get((self.corpus.id, mix))
        if given is not None:
            if mix not in self.synthesis:
                self.synthesis[mix] = json.loads(RunDir(given).synthesis_summary.read_text())
            return given
        run = self.root / f"mix-{mix}"
        if mix not in self.synthesis:
            started = time.perf_counter()
            job = StageJob(
                RunMirror(RunDir(run), None),
                self.loaded,
                self.settings.mix_config(mix),
                ("ingest", "synthesize"),
                corpus=read_corpus(self.corpus_dir),
            )
            summary = run_stages(job).synthesis
            self.synthesis[mix] = summary.model_dump() | {"wall_seconds": time.perf_counter() - started}
        return run

    def run_trial(self, trial: Trial) -> TrialRow:
        source = RunDir(self.mix_run(trial.mix))
        folder = RunDir(self.root / trial.name)
        folder.root.mkdir(parents=True, exist_ok=True)
        for shared in ("documents", "chunks", "ingest_record", "synthesis"):  # the trial trains on the mix's data
            if not getattr(folder, shared).exists():
                getattr(folder, shared).symlink_to(getattr(source, shared).resolve())
        started = time.perf_counter()
        run_stages(StageJob(RunMirror(folder, None), self.loaded, self.settings.trial_config(trial), ("distill",)))
        seconds = time.perf_counter() - started
        init = self.score(trial.init_name, load_file(str(folder.init_prefix))["prefix"])
        trained = FixedContext(Context(load_file(str(folder.final_prefix))["prefix"]))
        distilled = score_corpus(
            self.loaded,
            self.corpus,
            trained,
            trial.name,
            self.settings.distractors,
            answer_tokens=self.settings.answer_tokens,
        )
        return TrialRow(self.corpus.id, trial, seconds, last_logged(folder), init, distilled)


def report(result: dict) -> str:
    """results.md from results.json's content (so a finished sweep can be re-rendered)."""
    recipe = result.get("config", {})  # the effective config (runs before it was recorded: the flags)
    teacher = recipe.get("synthesis", {}).get("teacher_context") or result["args"].get("teacher_context", "chunk")
    batch = recipe.get("distill", {}).get("batch_size") or result["args"]["batch_size"]
    lines = [f"Distillation sweep, batch {batch}, the teacher reads its {teacher}", ""]
    for corpus_id, scores in result["baselines"].items():
        none, icl = scores.get("none"), scores.get("icl")
        if none is None or icl is None:
            continue
        made = ", ".join(
            f"{mix}: {s['samples']} samples ({'/'.join(s['engines'])})"
            for mix, s in result["synthesis"][corpus_id].items()
        )
        lines += [
            f"`{corpus_id}`: none {none['nll']:.3f} (rank {none['rank_accuracy']:.2f}), icl {icl['nll']:.3f} "
            f"(rank {icl['rank_accuracy']:.2f}), headroom {none['nll'] - icl['nll']:.3f}; synthesis {made}",
            "",
            "| trial | init NLL | distilled NLL ± SE | gain over init (paired) | gap to icl (paired) | rank acc (init / distilled) | recovery | held-out KL | train s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in result["rows"] if r["corpus"] == corpus_id):
            init, dist = row["init"], row["distilled"]
            recovery = (none["nll"] - dist["nll"]) / (none["nll"] - icl["nll"])
            gain, gain_se = paired_gain(init["per_question_nll"], dist["per_question_nll"])
            gap, gap_se = paired_gain(dist["per_question_nll"], icl["per_question_nll"])  # distilled minus icl
            lines.append(
                f"| {row['name']} | {init['nll']:.3f} | {dist['nll']:.3f} ± {dist['nll_se']:.3f} | {gain:.3f} ± {gain_se:.3f} | {gap:.3f} ± {gap_se:.3f} | "
                f"{init['rank_accuracy']:.2f} / {dist['rank_accuracy']:.2f} | {recovery:.2f} | "
                f"{row['train_metrics'].get('eval_topk_kl', float('nan')):.3f} | {row['train_seconds']:.0f} |"
            )
        lines.append("")
        lines += answer_lines(result, corpus_id, icl)
    if result.get("against"):
        lines += [
            f"Paired against the earlier trials in {', '.join(result.get('against_files') or [result['args']['against']])}:",
            "",
            "| corpus | trial | init NLL earlier / here | distilled NLL earlier / here | here - earlier (paired) | rank acc earlier / here |",
            "|---|---|---|---|---|---|",
        ]
        for c in result["against"]:
            lines.append(
                f"| {c['corpus']} | {c['name']} | {c['init'][0]:.3f} / {c['init'][1]:.3f} | {c['nll'][0]:.3f} / {c['nll'][1]:.3f} | "
                f"{c['difference']:+.3f} ± {c['difference_se']:.3f} | {c['rank_accuracy'][0]:.2f} / {c['rank_accuracy'][1]:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def answer_lines(result: dict, corpus_id: str, icl: dict) -> list[str]:
    """With --answer-tokens: what a user reads from each trial (greedy answers' token F1 and containment),
    paired per question with its init and with `icl` (F1; containment as means)."""
    rows = [r for r in result["rows"] if r["corpus"] == corpus_id and r["distilled"].get("per_question_f1")]
    if not rows or not icl.get("per_question_f1"):
        return []
    lines = [
        f"Answers of up to {result['args']['answer_tokens']} tokens on `{corpus_id}`: icl F1 {icl['answer_f1']:.3f}, "
        f"contains {icl['answer_contains']:.2f}",
        "",
        "| trial | F1 init / distilled | F1 distilled - init (paired) | F1 distilled - icl (paired) | contains init / distilled |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        init, dist = row["init"], row["distilled"]
        gain = "{:+.3f} ± {:.3f}".format(*paired_gain(dist["per_question_f1"], init["per_question_f1"]))  # dist - init
        gap = "{:+.3f} ± {:.3f}".format(*paired_gain(dist["per_question_f1"], icl["per_question_f1"]))  # dist - icl
        lines.append(
            f"| {row['name']} | {init['answer_f1']:.3f} / {dist['answer_f1']:.3f} | {gain} | {gap} | "
            f"{init['answer_contains']:.2f} / {dist['answer_contains']:.2f} |"
        )
    return [*lines, ""]


def compared(rows: list[dict], against: list[Path], against_trial: str | None = None) -> list[dict]:
    """Each trial beside the earlier sweeps' trial of the same corpus and name (or named `against_trial`,
    e.g. today's default recipe against a cheaper one), paired per question; a later file's trial of the
    same corpus and name stands in for an earlier file's."""
    earlier = {(r["corpus"], r["name"]): r for path in against for r in json.loads(path.read_text())["rows"]}
    out = []
    for row in rows:
        before = earlier.get((row["corpus"], against_trial or row["name"]))
        if before is None:
            continue
        here, there = row["distilled"], before["distilled"]
        difference, se = paired_gain(here["per_question_nll"], there["per_question_nll"])  # here minus there
        out.append(
            {
                "corpus": row["corpus"],
                "name": row["name"] if before["name"] == row["name"] else f"{before['name']} -> {row['name']}",
                "init": (before["init"]["nll"], row["init"]["nll"]),
                "nll": (there["nll"], here["nll"]),
                "difference": difference,
                "difference_se": se,
                "rank_accuracy": (there["rank_accuracy"], here["rank_accuracy"]),
            }
        )
    return out


def plot(result: dict, path: Path) -> None:
    """Recovery of the none-to-icl gap against P, init and distilled, one line per corpus and mix/lr/steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for row in result["rows"]:
        base = result["baselines"][row["corpus"]]
        headroom = base["none"]["nll"] - base["icl"]["nll"]
        recovery = [(base["none"]["nll"] - row[kind]["nll"]) / headroom for kind in ("init", "distilled")]
        series.setdefault((row["corpus"], f"{row['mix']} lr{row['lr']:g} {row['steps']} steps"), []).append(
            (row["num_tokens"], *recovery)
        )
    for (corpus, setting), points in sorted(series.items()):
        points.sort()
        line = ax.plot(
            [p[0] for p in points], [p[2] for p in points], marker="o", label=f"distilled, {corpus}, {setting}"
        )[0]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="x",
            linestyle=":",
            color=line.get_color(),
            label=f"init, {corpus}",
        )
    ax.axhline(1.0, color="#888", linestyle="--", label="icl")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cartridge tokens P")
    ax.set_ylabel("recovery of the none-to-icl NLL gap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _given_run(spec: str) -> tuple[tuple[str, str], Path]:
    corpus_id, _, rest = spec.partition("=")
    mix, _, folder = rest.partition("=")
    if mix not in MIXES or not RunDir(Path(folder)).synthesis_summary.is_file():
        raise SystemExit(
            f"--synthesis-run {spec!r}: expected CORPUS_ID=MIX=DIR with MIX in {', '.join(MIXES)} and a finished synthesis in DIR"
        )
    return (corpus_id, mix), Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-id", action="append", default=None, help="QA corpus id (repeatable)")
    parser.add_argument(
        "--qa", type=Path, action="append", default=None, help="QA file (repeatable; default: shared/data/qa)"
    )
    parser.add_argument(
        "--trial",
        action="append",
        default=None,
        help="mix/lr/steps/P[/init[/probes]], e.g. corpus/2e-2/200/256, corpus/2e-3/96/256/select or "
        "corpus/1e-3/32/256/matched_omp/both (probes: the queries a fitted start matches; repeatable)",
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        action="append",
        default=[],
        help="results.json of an earlier run (same questions): its none/icl scores, and its truncated rows as the "
        "first_tokens inits of the same P, are reused (repeatable)",
    )
    parser.add_argument(
        "--synthesis-run",
        action="append",
        default=[],
        metavar="CORPUS_ID=MIX=DIR",
        help="train on DIR's synthesis (a build's run folder) instead of synthesizing that corpus's mix (repeatable)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        help="results.json of an earlier sweep on the same questions: each trial is paired with the earlier trial of "
        "the same name (e.g. the same recipe with another --teacher-context); repeatable (one file per few corpora)",
    )
    parser.add_argument(
        "--against-trial",
        default=None,
        metavar="NAME",
        help="with --against: pair every trial with the earlier trial of this name (e.g. corpus-lr0.002-s96-p256)",
    )
    parser.add_argument(
        "--config", default="default", help="the build config trials start from (as `cartridges build`)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)"
    )
    parser.add_argument("--samples", type=int, default=None, help="synthetic samples per mix (default: the config's)")
    parser.add_argument(
        "--teacher-context",
        choices=["chunk", "window"],
        default=None,
        help="what the teacher reads: the sample's chunk, or the corpus up to the model's window (default: the config's)",
    )
    parser.add_argument("--chunk-max-tokens", type=int, default=None, help="largest chunk (default: the config's)")
    parser.add_argument("--engine", default="hf")
    parser.add_argument("--engine-batch", type=int, default=None, help="HF engine batch size (default: the config's)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the config's)")
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=0,
        help="also score greedy answers of up to N tokens (token F1, exact match)",
    )
    parser.add_argument("--seed", type=int, default=None, help="synthesis and training seed (default: the config's)")
    parser.add_argument("--model", default=None, help="the model (default: the config's)")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="start no trial after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "distill-sweep")
    parser.add_argument("--results", type=Path, default=None, help="folder for results.json/.md (default: --out)")
    args = parser.parse_args()
    flags = {
        "synthesis.samples": args.samples,
        "synthesis.teacher_context": args.teacher_context,
        "synthesis.chunk_max_tokens": args.chunk_max_tokens,
        "synthesis.shard_size": args.shard_size,
        "synthesis.seed": args.seed,
        "synthesis_run.engine": args.engine,
        "synthesis_run.batch_size": args.engine_batch,
        "distill.batch_size": args.batch_size,
        "distill.seed": args.seed,
        "model": args.model,
    }
    overrides = (
        *args.set,
        *(f"{key}={value}" for key, value in flags.items() if value is not None),
        "synthesis_run.executor=local",
        "distill_run.executor=local",
    )
    settings = SweepSettings(
        args.config,
        overrides,
        args.out,
        dict(_given_run(spec) for spec in args.synthesis_run),
        args.distractors,
        args.answer_tokens,
    )
    base = settings.config()  # a bad flag or --set fails here, before any work
    results = args.results or args.out
    results.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    header = record_header(vars(args)) | {"config": base.model_dump(mode="json")}
    wanted = list(dict.fromkeys(args.corpus_id or ["squad2-Sky_(United_Kingdom)", "squad2-Normans"]))
    corpora = {c.id: c for c in load_qa_files(args.qa, wanted)}
    trials = [Trial.parse(spec) for spec in args.trial or DEFAULT_TRIALS]
    loaded = load_model(base.model)
    args.out.mkdir(parents=True, exist_ok=True)
    sweeps = [CorpusSweep(corpora[cid], loaded, settings) for cid in wanted]
    rows: list[dict] = []
    scored = scored_rows(args.baselines, args.distractors, args.answer_tokens)
    earlier, truncated = earlier_rows(scored), earlier_truncated(scored)
    for sweep in sweeps:
        sweep.baselines(earlier, truncated)
    for trial in trials:
        for sweep in sweeps:
            if time.perf_counter() - started > args.deadline:
                print(f"deadline reached: skipping {trial.name} on {sweep.corpus.id}", flush=True)
                continue
            rows.append(sweep.run_trial(trial).as_json())
            result = {
                **header,
                "rows": rows,
                "against": compared(rows, args.against, args.against_trial),
                "against_files": [str(path) for path in args.against],
                "baselines": {s.corpus.id: s.scores for s in sweeps},
                "synthesis": {s.corpus.id: s.synthesis for s in sweeps},
                "elapsed_seconds": time.perf_counter() - started,
            }
            (results / "results.json").write_text(json.dumps(result, indent=2))
            (results / "results.md").write_text(report(result))
            plot(result, results / "recovery_vs_tokens.png")
            print(report(result), flush=True)


if __name__ == "__main__":
    run_script(main)
