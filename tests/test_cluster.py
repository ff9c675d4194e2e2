"""The pipeline on a multi-node Ray cluster on this box (`ray.cluster_utils.Cluster`): a head that runs
no work (KubeRay's advice: `num-cpus: 0`) and worker nodes with one CPU and their own
`$CARTRIDGES_HOME` each, as machines that share no home folder (issue 18)."""

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from cartridges.stages.distill import DistillConfig
from cartridges.stages.distill_run import DistillRunSettings, run_training
from cartridges.stages.ingest import ingest
from cartridges.stages.run_dir import RunDir
from cartridges.stages.shards import num_shards, read_shard_stats
from cartridges.stages.synthesis_config import SynthesisConfig, SynthesisRunSettings
from cartridges.stages.synthesize import synthesize

SMALL = {"chunk_min_tokens": 16, "chunk_max_tokens": 64, "max_message_tokens": 12, "max_answer_tokens": 12}
SYNTHESIS = SynthesisConfig(samples=12, shard_size=2, kinds={"continuation": 1, "fill_span": 1}, top_k=4, **SMALL)


class LocalCluster:
    """A head without CPUs and worker nodes added and removed by the test, each with its own home."""

    def __init__(self, root):
        self.root, self.nodes = root, {}
        ray.shutdown()  # a local Ray that an earlier test started in this process
        with self.home("head"):
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})

    @contextmanager
    def home(self, label: str) -> Iterator[None]:
        """`$CARTRIDGES_HOME=<root>/<label>` while a node starts: what its raylet and workers inherit."""
        saved = os.environ.get("CARTRIDGES_HOME")
        os.environ["CARTRIDGES_HOME"] = str(self.root / label)
        try:
            yield
        finally:
            if saved is None:
                del os.environ["CARTRIDGES_HOME"]
            else:
                os.environ["CARTRIDGES_HOME"] = saved

    def add_node(self, label: str) -> str:
        """Start a worker node with its own home; returns its node id."""
        with self.home(label):
            node = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        return node.node_id

    def remove_node(self, node_id: str) -> None:
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
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


def shard_tables(run: RunDir) -> list:
    return [pq.read_table(run.shard(s)).replace_schema_metadata(None) for s in range(num_shards(SYNTHESIS))]


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
    assert shard_tables(run) == shard_tables(alone)


def test_training_runs_with_one_worker_on_each_of_two_nodes(on_cluster, tiny, long_corpus, tmp_path):
    """Ray Train with 2 workers (gloo): one per node, as the run's metrics record."""
    run, record = ingested_run(tiny, long_corpus, tmp_path / "run")
    synthesize(run, record, tiny.ref, SYNTHESIS, SynthesisRunSettings(engine="hf", executor="local", batch_size=2))
    config = DistillConfig(num_tokens=8, steps=2, batch_size=2, eval_samples=0, eval_every=2, checkpoint_every=1)
    final = run_training(run, tiny, config, DistillRunSettings(executor="ray", workers=2, cpus_per_worker=1))
    assert final.is_file()
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    nodes = records[0]["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= set(on_cluster.nodes), nodes


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
