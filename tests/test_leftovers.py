"""Nothing is left behind: a publish keeps no second copy, a failed command leaves no folder, and
`cartridges gc` removes what killed or finished work left (never a running or resumable build)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock
from registry_helpers import fake_artifact

from cartridges.registry.store import Registry


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def age(path: Path, seconds: float) -> None:
    """Make everything under `path` look `seconds` old."""
    stamp = time.time() - seconds
    for item in [path, *path.rglob("*")]:
        os.utime(item, (stamp, stamp))


def test_init_and_compose_keep_no_copy_outside_the_registry(
    cli, tiny_model_dir, corpus_dir, second_corpus_dir, cartridges_home
):
    assert (
        cli("init", "--corpus", str(corpus_dir), "--tokens", "16", "--name", "legal", "--model", str(tiny_model_dir))[0]
        == 0
    )
    assert (
        cli(
            "init", "--corpus", str(second_corpus_dir), "--tokens", "8", "--name", "tax", "--model", str(tiny_model_dir)
        )[0]
        == 0
    )
    assert cli("compose", "legal@1", "tax@1", "--name", "both")[0] == 0
    outside = [f for f in files_under(cartridges_home) if not f.startswith(("registry/", "fingerprints/"))]
    assert outside == []
    assert sorted(p.name for p in cartridges_home.iterdir()) == ["fingerprints", "registry"]


def test_a_build_keeps_no_artifact_copy_once_published(cli, tiny_model_dir, long_corpus, cartridges_home):
    assert (
        cli("build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}")[0]
        == 0
    )
    [run] = (cartridges_home / "runs").iterdir()
    assert (run / "published.json").is_file() and not (run / "distill" / "artifact").exists()


def test_a_build_killed_after_publishing_finds_its_version_instead_of_publishing_a_twin(
    tiny_model_dir, long_corpus, cartridges_home, monkeypatch
):
    from cartridges.pipeline.build import build
    from cartridges.pipeline.build_config import load_build_config
    from cartridges.stages import records as records_module  # where published.json is written (PublishedRecord)

    registry = Registry(cartridges_home / "registry")
    config = load_build_config("tiny", [f"model={tiny_model_dir}"])

    real_write = records_module.write_text_atomically

    def killed_at_the_record(path, text):
        if path.name == "published.json":
            raise KeyboardInterrupt  # the process dies between the publish and its record
        return real_write(path, text)

    monkeypatch.setattr(records_module, "write_text_atomically", killed_at_the_record)
    with pytest.raises(KeyboardInterrupt):
        build(long_corpus, "legal", config, registry)
    assert registry.versions("legal") == [1]
    monkeypatch.setattr(records_module, "write_text_atomically", real_write)
    result = build(long_corpus, "legal", config, registry)
    assert result.ref == "legal@1" and registry.versions("legal") == [1]


PUBLISH_AND_DIE = """
import os, sys
from pathlib import Path
from cartridges.registry.store import Registry
registry = Registry(sys.argv[1])
original = registry._commit
def die(staging, target):
    os._exit(9)  # killed after the upload, before the version appears
registry._commit = die
registry.publish(Path(sys.argv[2]), "legal")
"""


def test_gc_removes_a_killed_publishers_upload_and_nothing_else(tmp_path, cartridges_home):
    from cartridges.pipeline.gc import collect_garbage, parse_age

    registry = Registry(cartridges_home / "registry")
    registry.publish(fake_artifact(tmp_path / "a"), "legal")
    source = fake_artifact(tmp_path / "b", payload_bytes=400_000)
    killed = subprocess.run(
        [sys.executable, "-c", PUBLISH_AND_DIE, registry.url, str(source)],
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert killed.returncode == 9
    [upload] = (cartridges_home / "registry" / ".staging").iterdir()
    assert len(files_under(upload)) == 3
    assert collect_garbage(registry, parse_age("1h")) == []  # too young: it may be a live upload
    age(upload, 7200)
    [removal] = collect_garbage(registry, parse_age("1h"))
    assert removal.path.endswith(upload.name) and not upload.exists()
    assert registry.versions("legal") == [1] and registry.verify("legal@1").version == 1


def test_gc_cleans_runs_but_never_a_running_or_resumable_build(tmp_path, cartridges_home):
    from cartridges.pipeline.gc import collect_garbage

    registry = Registry(cartridges_home / "registry")
    runs = cartridges_home / "runs"
    published = runs / "legal-aaaaaaaaaaaa-bbbbbbbbbbbb"
    for part in ("distill/artifact", "distill/checkpoints/step-000002", "distill/ray", "synthesis/shards"):
        (published / part).mkdir(parents=True)
        (published / part / "data").write_bytes(b"x" * 1000)
    (published / "published.json").write_text(json.dumps({"ref": "legal@1"}))
    (published / "build.lock").touch()
    unfinished = runs / "legal-cccccccccccc-bbbbbbbbbbbb"
    (unfinished / "synthesis" / "shards").mkdir(parents=True)
    (unfinished / "synthesis" / "shards" / "shard-00000.parquet").write_bytes(b"x")
    (unfinished / "build.lock").touch()
    running = runs / "legal-dddddddddddd-bbbbbbbbbbbb"
    running.mkdir()
    (running / "build.lock").touch()
    empty = runs / "legal-eeeeeeeeeeee-bbbbbbbbbbbb"
    empty.mkdir()
    (empty / "build.lock").touch()
    legacy = runs / "legal-20261127T010203Z-abc123"
    (legacy / "cartridge").mkdir(parents=True)
    (legacy / "cartridge" / "adapter_model.safetensors").write_bytes(b"x" * 5000)
    scratch = cartridges_home / "tmp" / "legal-xyz"
    scratch.mkdir(parents=True)
    (scratch / "partial").write_bytes(b"x" * 10)
    for folder in (runs, scratch.parent):
        age(folder, 7200)
    lock = FileLock(running / "build.lock")
    lock.acquire()
    try:
        preview = collect_garbage(registry, 3600, dry_run=True)
        assert {Path(r.path) for r in preview} == {
            published / "distill/artifact",
            published / "distill/checkpoints",
            published / "distill/ray",
            empty,
            legacy,
            scratch,
        }
        assert published.joinpath("distill/artifact").exists() and legacy.exists()  # a dry run removes nothing
        removed = collect_garbage(registry, 3600)
    finally:
        lock.release()
    assert {Path(r.path) for r in removed} == {Path(r.path) for r in preview}
    assert sum(r.bytes for r in removed) == 3000 + 5000 + 10
    assert files_under(published) == ["build.lock", "published.json", "synthesis/shards/data"]
    assert (
        unfinished.exists() and running.exists() and not empty.exists() and not legacy.exists() and not scratch.exists()
    )


def test_gc_on_the_command_line(cli, cartridges_home):
    scratch = cartridges_home / "tmp" / "legal-xyz"
    scratch.mkdir(parents=True)
    (scratch / "partial").write_bytes(b"x" * 2048)
    age(scratch, 100)
    code, out, _ = cli("gc", "--older-than", "1m", "--dry-run")
    assert code == 0 and "would remove" in out and scratch.exists()
    code, out, _ = cli("gc", "--older-than", "1m")
    assert code == 0 and "1 item(s)" in out and not scratch.exists()
    assert cli("gc")[1].strip() == "nothing to remove"


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1.5h", 5400)]
)
def test_ages(text, seconds):
    from cartridges.pipeline.gc import parse_age

    assert parse_age(text) == seconds
