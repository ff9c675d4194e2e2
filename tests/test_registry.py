import json
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from registry_helpers import fake_artifact

from cartridges.errors import CartridgeError
from cartridges.manifest import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE
from cartridges.registry import Registry


def test_publish_assigns_increasing_versions_and_resolves(tmp_path):
    reg = Registry(tmp_path / "reg")
    first = reg.publish(fake_artifact(tmp_path / "a"), "legal")
    second = reg.publish(fake_artifact(tmp_path / "b"), "legal")
    assert (first.version, second.version) == (1, 2)
    assert reg.resolve("legal") == ("legal", 2)
    assert reg.resolve("legal@latest") == ("legal", 2)
    assert reg.resolve("legal@1") == ("legal", 1)
    stored = json.loads((tmp_path / "reg" / "legal" / "1" / MANIFEST_FILE).read_text())
    assert stored["version"] == 1 and stored["name"] == "legal"
    assert reg.show("legal@1").files == first.files


def test_publish_renames_to_registry_name(tmp_path):
    reg = Registry(tmp_path / "reg")
    published = reg.publish(fake_artifact(tmp_path / "a", name="draft"), "final")
    assert published.name == "final" and reg.show("final").name == "final"


def test_aliases_and_guarded_remove(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.publish(fake_artifact(tmp_path / f"a{i}"), "legal")
    assert reg.set_alias("legal@2", "stable") == ("legal", 2)
    assert reg.resolve("legal@stable") == ("legal", 2)
    with pytest.raises(CartridgeError, match="aliased as stable"):
        reg.remove("legal@2")
    assert reg.remove("legal@1") == ("legal", 1)
    assert reg.versions("legal") == [2, 3]
    reg.remove("legal@stable", force=True)
    assert reg.versions("legal") == [3] and reg.aliases("legal") == {}
    with pytest.raises(CartridgeError, match="reserved"):
        reg.set_alias("legal@3", "latest")


def test_list_shows_aliases(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.publish(fake_artifact(tmp_path / "b"), "tax")
    reg.set_alias("tax@1", "stable")
    listing = [(e.name, e.version, e.aliases) for e in reg.list()]
    assert listing == [("legal", 1, ()), ("tax", 1, ("stable",))]


@pytest.mark.parametrize(
    "ref, message",
    [
        ("missing", "no cartridge named 'missing'.*available: legal"),
        ("legal@7", "no version 7 .*versions: 1"),
        ("legal@prod", "no alias 'prod'"),
        ("../etc", "invalid cartridge name"),
        ("le gal", "invalid cartridge name"),
        ("a/b", "invalid cartridge name"),
    ],
)
def test_resolve_errors_name_the_problem(tmp_path, ref, message):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    with pytest.raises(CartridgeError, match=message):
        reg.resolve(ref)


@pytest.mark.parametrize("bad", ["a/b", "..", "../x", "has space", "UPPER", ""])
def test_publish_rejects_bad_names_and_writes_nothing(tmp_path, bad):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(CartridgeError, match="invalid cartridge name"):
        reg.publish(fake_artifact(tmp_path / "a"), bad)
    assert not (tmp_path / "reg").exists()


def test_verify_detects_tampered_tensor(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    assert reg.verify("legal@1").version == 1
    weights = tmp_path / "reg" / "legal" / "1" / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CartridgeError, match="checksum mismatch"):
        reg.verify("legal@1")


def test_memory_registry_round_trip(tmp_path):
    reg = Registry(f"memory://reg-{time.time_ns()}")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.publish(fake_artifact(tmp_path / "b"), "legal")
    reg.set_alias("legal@1", "stable")
    assert reg.resolve("legal@stable") == ("legal", 1)
    local = reg.local_path("legal@2")
    assert (local / MANIFEST_FILE).is_file()
    assert reg.verify("legal@2").version == 2


def _publish_one(args: tuple[str, str]) -> int:
    root, source = args
    return Registry(root).publish(Path(source), "legal").version


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    sources = [str(fake_artifact(tmp_path / f"src{i}", payload_bytes=200_000)) for i in range(8)]
    root = str(tmp_path / "reg")
    with ProcessPoolExecutor(max_workers=4) as pool:
        versions = list(pool.map(_publish_one, [(root, s) for s in sources]))
    assert sorted(versions) == list(range(1, 9))
    reg = Registry(root)
    assert reg.versions("legal") == list(range(1, 9))
    for version in range(1, 9):
        reg.verify(f"legal@{version}")


PUBLISH_SCRIPT = """
import sys
from pathlib import Path
from cartridges.registry import Registry
Registry(sys.argv[1]).publish(Path(sys.argv[2]), "legal")
print("done", flush=True)
"""


def _start_publisher(root: Path, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUBLISH_SCRIPT, str(root), str(source)], stdout=subprocess.PIPE)


def test_killed_publisher_never_leaves_a_partial_version(tmp_path):
    """Kill publishing processes at random points: only complete, verifiable versions are listed."""
    source = fake_artifact(tmp_path / "src", payload_bytes=40_000_000)
    root = tmp_path / "reg"
    started = time.monotonic()
    assert b"done" in _start_publisher(root, source).communicate()[0]
    full_duration = time.monotonic() - started
    rng = random.Random(1234)
    completed = 1
    for _ in range(20):
        proc = _start_publisher(root, source)
        time.sleep(rng.uniform(0.0, full_duration))
        proc.kill()
        completed += b"done" in proc.communicate()[0]
        reg = Registry(root)
        for version in reg.versions("legal"):
            assert reg.verify(f"legal@{version}").version == version
    versions = Registry(root).versions("legal")
    assert versions == list(range(1, len(versions) + 1))
    assert completed <= len(versions) < 21, "some kills must have interrupted a publish"
