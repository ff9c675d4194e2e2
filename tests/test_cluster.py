"""The pipeline on a multi-node Ray cluster on this box (`ray.cluster_utils.Cluster`): a head that runs
no work (KubeRay's advice: `num-cpus: 0`) and worker nodes with one CPU and their own
`$CARTRIDGES_HOME` each, as machines that share no home folder (issue 18)."""

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from sample_helpers import assert_same_samples

from cartridges.registry.store import Registry
from cartridges.stages.ingest import ingest
from cartridges.stages.run_dir import RunDir
from cartridges.stages.synthesis.config import SynthesisConfig, SynthesisRunSettings
from cartridges.stages.synthesis.shards import num_shards, read_shard_stats
from cartridges.stages.synthesis.synthesize import synthesize

SMALL = {"chunk_min_tokens": 16, "chunk_max_tokens": 64, "max_message_tokens": 12, "max_answer_tokens": 12}
SYNTHESIS = SynthesisConfig(samples=12, shard_size=2, kinds={"continuation": 1, "fill_span": 1}, top_k=4, **SMALL)


class LocalCluster:
    """A head without CPUs and worker nodes added and removed by the test, each with its own home."""

    def __init__(self, root, env: dict[str, str]):
        self.root, self.nodes, self.homes, self.env = root, {}, {}, env
        ray.shutdown()  # a local Ray that an earlier test started in this process
        with self.home("head"):
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})

    @contextmanager
    def home(self, label: str) -> Iterator[None]:
        """The environment a node starts with (its raylet and workers inherit it): its own
        `$CARTRIDGES_HOME=<root>/<label>`, and the object store's endpoint and credentials."""
        changes = self.env | {"CARTRIDGES_HOME": str(self.root / label)}
        saved = {key: os.environ.get(key) for key in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value

    def add_node(self, label: str) -> str:
        """Start a worker node with its own home; returns its node id."""
        with self.home(label):
            node = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        self.homes[node.node_id] = self.root / label
        return node.node_id

    def remove_node(self, node_id: str) -> None:
        """Kill a node's processes at once (no graceful drain), as a lost machine; returns once Ray knows."""
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)
        wait_for(
            lambda: not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), 120, "Ray to see the node gone"
        )

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    from s3_server import S3_ENV

    local = LocalCluster(tmp_path_factory.mktemp("cluster"), S3_ENV | {"AWS_ENDPOINT_URL": s3_endpoint})
    local.add_node("node-a")
    local.add_node("node-b")
    yield local
    local.shutdown()


@pytest.fixture
def on_cluster(cluster, monkeypatch) -> LocalCluster:
    monkeypatch.setenv("RAY_ADDRESS", cluster.cluster.address)
    return cluster


def ingested_run(tiny, corpus, folder) -> tuple[RunDir, object]:
    run = RunDir(folder)
    record = ingest(corpus, run, tiny.tokenizer, tiny.tokenizer_fingerprint, SMALL["chunk_min_tokens"], 64)
    return run, record


def assert_same_shards(run: RunDir, expected: RunDir, count: int = num_shards(SYNTHESIS)) -> None:
    """Shard by shard the same samples (`sample_helpers`: the teacher's log-probs to float rounding)."""
    for shard in range(count):
        assert_same_samples(pq.read_table(run.shard(shard)), pq.read_table(expected.shard(shard)))


def test_synthesis_shards_come_from_two_nodes_and_equal_a_one_process_run(on_cluster, tiny, long_corpus, tmp_path):
    """Two engine actors, one per node: each shard records the node that made it, both nodes made some,
    and the samples are those a single in-process engine makes."""
    run, record = ingested_run(tiny, long_corpus, tmp_path / "cluster-run")
    settings = SynthesisRunSettings(engine="hf", executor="ray", engines=2, cpus_per_engine=1, batch_size=2)
    synthesize(run, record, tiny.ref, SYNTHESIS, settings)
    nodes = {read_shard_stats(run.shard(s)).node for s in range(num_shards(SYNTHESIS))}
    assert len(nodes) == 2 and nodes <= set(on_cluster.nodes), nodes

    alone, alone_record = ingested_run(tiny, long_corpus, tmp_path / "local-run")
    synthesize(alone, alone_record, tiny.ref, SYNTHESIS, settings.model_copy(update={"executor": "local"}))
    assert read_shard_stats(alone.shard(0)).node == ray.get_runtime_context().get_node_id()  # the driver's (head)
    assert_same_shards(run, alone)


def test_a_node_lost_mid_synthesis_costs_no_shard_and_changes_no_sample(on_cluster, tiny, long_corpus, tmp_path):
    """Remove the node of a running engine after the first shards arrive: Ray replaces the engine on the
    node that is left (and one added meanwhile), finished shards are kept, the result equals a run that
    was never interrupted (the teacher's log-probs to float rounding: `sample_helpers`).

    128 shards: once the engines have started, the tiny model makes shards faster than the test polls (11 of
    128 were written before the first poll saw one on an idle box; with 16 shards, all 16 were twice written
    before it under the full suite's load, and the node was lost after the work). Ray's start-up dominates,
    so the 112 extra shards cost about 4 s here."""
    config = SYNTHESIS.model_copy(update={"samples": 256})
    run, record = ingested_run(tiny, long_corpus, tmp_path / "cluster-run")
    settings = SynthesisRunSettings(engine="hf", executor="ray", engines=2, cpus_per_engine=1, batch_size=2)
    on_cluster.add_node(f"spare-{time.monotonic_ns()}")  # the lost node's engine needs somewhere to go
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.update(summary=synthesize(run, record, tiny.ref, config, settings))
    )
    worker.start()
    first = wait_for(lambda: sorted(run.shards.glob("shard-*.parquet")), 300, "a first shard")
    victim = read_shard_stats(first[0]).node
    made_before = len(first)
    on_cluster.remove_node(victim)
    worker.join(timeout=600)
    assert "summary" in outcome, "synthesis did not finish after the node was lost"
    nodes = [read_shard_stats(run.shard(s)).node for s in range(num_shards(config))]
    assert made_before < num_shards(config) and victim in nodes and set(nodes) - {victim}, nodes

    alone, alone_record = ingested_run(tiny, long_corpus, tmp_path / "local-run")
    synthesize(alone, alone_record, tiny.ref, config, settings.model_copy(update={"executor": "local"}))
    assert_same_shards(run, alone, num_shards(config))


def test_a_build_on_two_nodes_publishes_to_s3_and_a_fresh_process_answers_from_it(
    on_cluster, cli, s3_bucket, lively_model_dir, long_corpus, cartridges_home, tmp_path
):
    """`cartridges build` with two engine actors and two Ray Train workers on a two-node cluster, its run
    folder and registry on s3://: shards and training workers on both nodes, each worker training from its
    own node's copy of the run (pulled from s3://, not the driver's disk), and `cartridges ask` in a fresh
    process with an empty home answers from s3:// alone."""
    import s3fs
    from test_object_storage import QUESTION, ask_in_fresh_process

    from cartridges.home import runs_dir
    from cartridges.loading import load

    remote = f"{s3_bucket}/registry"
    settings = ["synthesis.samples=8", "synthesis_run.executor=ray", "synthesis_run.engines=2"]
    settings += ["synthesis_run.cpus_per_engine=1", "distill_run.executor=ray", "distill_run.workers=2"]
    settings += ["distill_run.cpus_per_worker=1", f"model={lively_model_dir}", f"runs_root={s3_bucket}/runs"]
    overrides = [part for setting in settings for part in ("--set", setting)]
    code, out, err = cli("build", str(long_corpus), "--config", "tiny", *overrides, "--registry", remote)
    assert code == 0, err
    [run] = [RunDir(folder) for folder in runs_dir().iterdir()]
    shard_nodes = {read_shard_stats(shard).node for shard in sorted(run.shards.glob("shard-*.parquet"))}
    assert len(shard_nodes) == 2 and shard_nodes <= set(on_cluster.nodes), shard_nodes
    first_step = json.loads(run.metrics.read_text().splitlines()[0])
    assert len(set(first_step["nodes"])) == 2 and set(first_step["nodes"]) <= set(on_cluster.nodes), first_step
    for node in first_step["nodes"]:  # each worker read the shards from its node's own copy of the run
        copy = RunDir(on_cluster.homes[node] / "runs" / run.root.name)
        assert sorted(p.name for p in copy.shards.iterdir()) == sorted(p.name for p in run.shards.iterdir())
    stored = s3fs.S3FileSystem(skip_instance_cache=True)
    remote_run = f"{s3_bucket}/runs/{run.root.name}"
    assert stored.exists(f"{remote_run}/distill/final_prefix.safetensors") and stored.exists(
        f"{remote_run}/published.json"
    )
    assert Registry(remote).verify("legal@1").version == 1

    answered = ask_in_fresh_process(tmp_path / "fresh-home", remote, lively_model_dir)
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
    runtime = load(["legal@1"], Registry(remote), str(lively_model_dir))
    question = [{"role": "user", "content": QUESTION}]
    assert answered.stdout.strip() == runtime.generate(question, max_new_tokens=12, temperature=0.0).strip()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_the_scheduler_fires_once_on_the_cluster_and_carries_on_after_its_node_is_lost(
    on_cluster, s3_bucket, tiny_model_dir, long_corpus
):
    """A due schedule in an s3:// registry: the scheduler actor (on a worker node) builds and publishes it
    once; when its node is removed Ray restarts it on another, with its schedules and history intact, and
    it does not build again."""
    from cartridges.pipeline.scheduler import Scheduler, ensure_actor, scheduler_actor

    registry = Registry(f"{s3_bucket}/registry")
    yesterday = datetime.now(UTC) - timedelta(days=1)
    overrides = [f"model={tiny_model_dir}"]
    Scheduler(registry, builder=None, clock=lambda: yesterday).add(
        "legal", str(long_corpus), "0 3 * * *", "tiny", overrides
    )
    assert ensure_actor(registry.url) == ["legal"]
    actor = scheduler_actor(registry.url)
    first_node = ray.get(actor.node.remote())
    assert first_node in on_cluster.nodes

    def history():
        return Scheduler(registry, builder=None).history()

    [outcome] = wait_for(history, 300, "the scheduled build")
    assert (outcome.status, outcome.detail) == ("published", "legal@1"), outcome
    assert registry.verify("legal@1").version == 1

    on_cluster.remove_node(first_node)
    assert ensure_actor(registry.url) == ["legal"]
    moved_to = ray.get(scheduler_actor(registry.url).node.remote())
    assert moved_to != first_node and moved_to in on_cluster.nodes
    time.sleep(3)  # the restarted actor ticks at once: nothing is due
    assert history() == [outcome] and registry.versions("legal") == [1]
    [schedule] = Scheduler(registry, builder=None).schedules()
    assert datetime.fromisoformat(schedule.next_run) > datetime.now(UTC)
    ray.kill(actor)


def test_a_library_build_makes_its_units_on_two_nodes_and_equals_one_made_in_one_process(
    on_cluster, cli, tiny, tiny_model_dir, long_corpus, tmp_path
):
    """`cartridges build` of a library with two workers on a two-node cluster (one CPU a node): the units
    are made on both nodes, and the published library equals one whose units were made in this process,
    unit for unit and row for row."""
    from cartridges.library.library import load_library
    from cartridges.stages.ingest import read_corpus
    from cartridges.stages.library.build import build_library
    from cartridges.stages.library.config import LibraryConfig, LibraryRunSettings

    settings = [
        f"model={tiny_model_dir}",
        "library.enabled=true",
        "library.unit_tokens=48",
        "library.precision=float32",
    ]
    settings += ["library_run.executor=ray", "library_run.workers=2", "library_run.cpus_per_worker=1"]
    overrides = [part for setting in settings for part in ("--set", setting)]
    # two free CPUs whatever the module's earlier tests left running or removed (their scheduler actor, a lost node)
    added = [on_cluster.add_node("library-a"), on_cluster.add_node("library-b")]
    try:
        code, out, err = cli(
            "build", str(long_corpus), "--name", "lib", *overrides, "--registry", str(tmp_path / "ray")
        )
    finally:
        for node in added:
            on_cluster.remove_node(node)
    assert code == 0, err
    assert "on 2 nodes" in " ".join(out.split()), out

    config = LibraryConfig(unit_tokens=48, precision="float32")
    alone = build_library(
        read_corpus(long_corpus),
        tiny,
        "alone",
        config,
        Registry(tmp_path / "here"),
        LibraryRunSettings(executor="local"),
    )
    assert alone.made_on == {"local": alone.units} and alone.units > 2

    def opened(root, ref):
        where, path = Registry(root).locate(ref)
        return load_library(path, expected=where)

    on_ray, here = opened(tmp_path / "ray", "lib@1"), opened(tmp_path / "here", "alone@1")
    assert [(u.digest, u.offset, u.num_tokens) for u in on_ray.index.units] == [
        (u.digest, u.offset, u.num_tokens) for u in here.index.units
    ]
    torch.testing.assert_close(
        on_ray.cartridge.prompt_embeddings.float(), here.cartridge.prompt_embeddings.float(), rtol=0, atol=1e-5
    )
