import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from registry_helpers import WIDTH, fake_artifact, fake_manifest
from registry_workers import publish_one, set_aliases

from cartridges.artifact.folder import load_artifact
from cartridges.artifact.manifest import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, Manifest
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_file
from cartridges.registry.store import Registry


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
    assert reg.versions("legal") == [3] and reg.aliases("legal") == {} and reg.retired("legal") == [1, 2]
    with pytest.raises(CartridgeError, match="reserved"):
        reg.set_alias("legal@3", "latest")


def test_list_shows_aliases(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.publish(fake_artifact(tmp_path / "b"), "tax")
    reg.set_alias("tax@1", "stable")
    listing = [(e.name, e.version, e.aliases) for e in reg.list().entries]
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


@pytest.fixture(params=["folder", "s3"])
def store_root(request, tmp_path) -> str:
    """A registry root on a local folder, or on an S3-compatible server on 127.0.0.1 (real s3fs client):
    the same publish guarantees must hold on both."""
    if request.param == "folder":
        return str(tmp_path / "reg")
    return request.getfixturevalue("s3_bucket") + "/reg"


def test_concurrent_publishers_get_distinct_versions(tmp_path, store_root):
    """8 publishers in 4 processes: versions 1..8, each one publisher's own artifact, all verify."""
    sources = [fake_artifact(tmp_path / f"src{i}", payload_bytes=200_000) for i in range(8)]
    with ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn")) as pool:
        versions = list(pool.map(publish_one, [(store_root, str(s)) for s in sources]))
    assert sorted(versions) == list(range(1, 9))
    reg = Registry(store_root)
    assert reg.versions("legal") == list(range(1, 9))
    for version, source in zip(versions, sources):
        assert reg.verify(f"legal@{version}").files == Manifest.read(source).files


PUBLISH_SCRIPT = """
import sys
from pathlib import Path
from cartridges.registry.store import Registry
Registry(sys.argv[1]).publish(Path(sys.argv[2]), "legal")
print("done", flush=True)
"""


def _start_publisher(root: str, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUBLISH_SCRIPT, root, str(source)], stdout=subprocess.PIPE)


def test_killed_publisher_never_leaves_a_partial_version(tmp_path, store_root):
    """Kill publishing processes at random points: only complete, verifiable versions are listed. On an
    object store a publisher killed after taking its number leaves the number taken and unlisted."""
    on_folder = "://" not in store_root
    source = fake_artifact(tmp_path / "src", payload_bytes=40_000_000 if on_folder else 2_000_000)
    started = time.monotonic()
    assert b"done" in _start_publisher(store_root, source).communicate()[0]
    full_duration = time.monotonic() - started
    rng = random.Random(1234)
    completed = 1
    for _ in range(5):  # 20 publishers, 4 at a time, each killed at its own random moment
        procs = [_start_publisher(store_root, source) for _ in range(4)]
        timers = [threading.Timer(rng.uniform(0.0, full_duration), proc.kill) for proc in procs]
        for timer in timers:
            timer.start()
        completed += sum(b"done" in proc.communicate()[0] for proc in procs)
        for timer in timers:
            timer.cancel()
        reg = Registry(store_root)
        for version in reg.versions("legal"):
            assert reg.verify(f"legal@{version}").version == version
    reg = Registry(store_root)
    versions = reg.versions("legal")
    listing = reg.list()
    assert [entry.version for entry in listing.entries] == versions
    assert completed <= len(versions) < 21, "some kills must have interrupted a publish"
    if on_folder:
        assert versions == list(range(1, len(versions) + 1)) and not listing.skipped
    else:
        unfinished = sorted(set(reg.numbered("legal")) - set(versions))
        assert sorted(set(versions) | set(unfinished)) == list(range(1, len(versions) + len(unfinished) + 1))
        assert set(unfinished) <= set(reg.claimed("legal"))
        assert [s.path for s in listing.skipped] == [f"legal/{v}" for v in unfinished]
        assert all("claimed by a publish that has not finished" in s.reason for s in listing.skipped)


def test_a_store_without_conditional_writes_is_refused_before_anything_is_written(tmp_path):
    import fsspec

    reg = Registry(f"dir::memory://no-conditional-{time.time_ns()}")
    with pytest.raises(
        CartridgeError, match=r"dir:// offers no conditional writes .* use s3://, gs:// or a local folder"
    ):
        reg.publish(fake_artifact(tmp_path / "a"), "legal")
    assert not fsspec.filesystem("memory").exists(reg.root)


# ---- issue 14: integrity -------------------------------------------------------------------


def rewrite_payload(folder: Path, prefix: torch.Tensor) -> None:
    """Replace an artifact's tensor and re-checksum it, keeping the bound manifest: only deeper checks can catch this."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = folder / ADAPTER_WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"prompt_embeddings": prefix}, str(weights), metadata=metadata)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][ADAPTER_WEIGHTS_FILE] = sha256_file(weights)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_publish_refuses_a_non_finite_prefix_and_writes_nothing(tmp_path):
    source = fake_artifact(tmp_path / "a")
    prefix = torch.randn(4, WIDTH)
    prefix[2, 5] = float("nan")
    rewrite_payload(source, prefix)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(CartridgeError, match="1 of 512 prefix values are NaN or infinite"):
        reg.publish(source, "legal")
    assert not (tmp_path / "reg").exists()


def test_saving_a_non_finite_prefix_is_refused(tmp_path):
    prefix = torch.randn(4, WIDTH)
    prefix[0, 0] = float("inf")
    with pytest.raises(CartridgeError, match="refusing to save cartridge legal: 1 of 512"):
        fake_artifact(tmp_path / "a", prefix=prefix)
    assert not (tmp_path / "a").exists()


def test_manifests_are_strict_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        fake_manifest().model_copy(update={"metrics": {"kd": float("nan")}}).to_json()
    with pytest.raises(Exception, match="finite number"):
        Manifest.model_validate(fake_manifest().model_dump() | {"metrics": {"kd": float("inf")}})
    folder = fake_artifact(tmp_path / "a")
    text = (folder / MANIFEST_FILE).read_text()
    assert "NaN" not in text and json.loads(text)["format_version"] == 2
    (folder / MANIFEST_FILE).write_text(text.replace('"metrics": {}', '"metrics": {"kd": NaN}'))
    with pytest.raises(CartridgeError, match="not valid JSON .*NaN is not JSON"):
        Manifest.read(folder)


def test_a_removed_version_number_is_never_reused(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i in range(5):
        reg.publish(fake_artifact(tmp_path / f"a{i}"), "c1")
    reg.remove("c1@5")
    assert reg.publish(fake_artifact(tmp_path / "b"), "c1").version == 6
    assert reg.versions("c1") == [1, 2, 3, 4, 6] and reg.retired("c1") == [5]
    with pytest.raises(CartridgeError, match="c1@5 was removed"):
        reg.resolve("c1@5")
    for version in (1, 2, 3, 4, 6):
        reg.remove(f"c1@{version}")
    with pytest.raises(CartridgeError, match="c1 has no versions left: .*removed"):
        reg.resolve("c1")
    assert reg.publish(fake_artifact(tmp_path / "c"), "c1").version == 7


def test_a_removed_version_number_is_never_reused_on_an_object_store(tmp_path):
    reg = Registry(f"memory://retire-{time.time_ns()}")
    for i in range(2):
        reg.publish(fake_artifact(tmp_path / f"a{i}"), "c1")
    reg.remove("c1@2")
    assert reg.publish(fake_artifact(tmp_path / "b"), "c1").version == 3
    assert reg.versions("c1") == [1, 3]


def test_the_empty_name_error_does_not_contradict_itself(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "c1")
    reg.publish(fake_artifact(tmp_path / "b"), "legal")
    reg.remove("legal@1")
    with pytest.raises(CartridgeError) as error:
        reg.resolve("legal")
    assert "legal has no versions left: @1 was removed" in str(error.value) and "available" not in str(error.value)
    with pytest.raises(CartridgeError, match=r"no cartridge named 'tax' .*\(available: c1\)"):
        reg.resolve("tax")


def test_concurrent_alias_writes_from_several_processes_are_all_kept(tmp_path):
    root = str(tmp_path / "reg")
    reg = Registry(root)
    for i in range(3):
        reg.publish(fake_artifact(tmp_path / f"a{i}"), "legal")
    with ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(set_aliases, [(root, worker, 40) for worker in range(4)]))
    aliases = Registry(root).aliases("legal")
    assert len(aliases) == 160
    assert all(aliases[f"w{w}-{i}"] == 1 + (w + i) % 3 for w in range(4) for i in range(40))


def test_an_older_registrys_aliases_file_is_read_and_migrated(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i in range(2):
        reg.publish(fake_artifact(tmp_path / f"a{i}"), "legal")
    (tmp_path / "reg" / "legal" / "aliases.json").write_text(json.dumps({"stable": 1, "old": 2}))
    assert reg.resolve("legal@stable") == ("legal", 1)
    reg.set_alias("legal@2", "stable")
    assert reg.aliases("legal") == {"stable": 2, "old": 2}
    assert not (tmp_path / "reg" / "legal" / "aliases.json").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "aliases.json").write_text("{broken"), r"aliases.json is damaged"),
        (
            lambda d: (d / "aliases" / "stable.json").write_text('{"version": "two"}'),
            "alias 'stable' does not hold a version number",
        ),
    ],
)
def test_corrupt_aliases_are_one_line_errors(tmp_path, damage, message):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.set_alias("legal@1", "stable")
    damage(tmp_path / "reg" / "legal")
    with pytest.raises(CartridgeError, match=message):
        reg.resolve("legal@stable")


def test_a_dangling_alias_says_how_to_fix_it(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.publish(fake_artifact(tmp_path / "b"), "legal")
    (tmp_path / "reg" / "legal" / "aliases").mkdir()
    (tmp_path / "reg" / "legal" / "aliases" / "stable.json").write_text('{"version": 9}')
    with pytest.raises(CartridgeError, match=r"alias legal@stable points at legal@9, which no longer exists"):
        reg.resolve("legal@stable")


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest | changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_tokens": 3}, "does not match the manifest"),
        ({"model_fingerprint": "f" * 64}, r"manifest field\(s\) model_fingerprint differ"),
        ({"corpus": []}, r"manifest field\(s\) corpus differ"),
        ({"name": "other", "version": 77}, "manifest says other@77 but it is stored as legal@1"),
        ({"version": 2}, "stored as legal@1"),
    ],
)
def test_verify_checks_the_manifest_as_loading_does(tmp_path, changes, message):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    _edit_manifest(tmp_path / "reg" / "legal" / "1", **changes)
    with pytest.raises(CartridgeError, match=message):
        reg.verify("legal@1")


def test_verify_finds_non_finite_values_behind_valid_checksums(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    prefix = torch.randn(4, WIDTH)
    prefix[:, :10] = float("-inf")
    rewrite_payload(tmp_path / "reg" / "legal" / "1", prefix)
    with pytest.raises(CartridgeError, match="40 of 512 prefix values are NaN or infinite"):
        reg.verify("legal@1")


def test_verify_checks_the_adapter_config_against_the_manifest(tmp_path):
    from cartridges.artifact.manifest import ADAPTER_CONFIG_FILE

    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    folder = tmp_path / "reg" / "legal" / "1"
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config | {"num_virtual_tokens": 5}))
    _edit_manifest(
        folder,
        files=json.loads((folder / MANIFEST_FILE).read_text())["files"]
        | {ADAPTER_CONFIG_FILE: sha256_file(folder / ADAPTER_CONFIG_FILE)},
    )
    with pytest.raises(
        CartridgeError, match="adapter_config.json does not match the manifest .num_virtual_tokens 5 vs 4"
    ):
        reg.verify("legal@1")


def test_one_bad_entry_does_not_break_the_listing(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    reg.publish(fake_artifact(tmp_path / "b"), "newer")
    reg.publish(fake_artifact(tmp_path / "c"), "tax")
    (tmp_path / "reg" / "lost+found").mkdir()
    (tmp_path / "reg" / "legal" / "7").mkdir()
    _edit_manifest(tmp_path / "reg" / "newer" / "1", format_version=99)
    shutil.copytree(tmp_path / "reg" / "tax" / "1", tmp_path / "reg" / "tax" / "2")  # copied by hand
    listing = reg.list()
    assert [(e.name, e.version) for e in listing.entries] == [("legal", 1), ("tax", 1)]
    reasons = {s.path: s.reason for s in listing.skipped}
    assert set(reasons) == {"lost+found", "legal/7", "newer/1", "tax/2"}
    assert "not a cartridge name" in reasons["lost+found"] and "no manifest.json" in reasons["legal/7"]
    assert "format v99 is newer" in reasons["newer/1"] and "its manifest names tax@1, not tax@2" in reasons["tax/2"]


def test_folders_named_with_other_scripts_digits_are_listed_as_skipped_not_versions(tmp_path):
    """`str.isdigit` took '²' and '١' for versions: `int('²')` broke ls, show, verify and init."""
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_artifact(tmp_path / "a"), "legal")
    for odd in ("²", "١", "𝟏", "007x"):
        shutil.copytree(tmp_path / "reg" / "legal" / "1", tmp_path / "reg" / "legal" / odd)
    listing = reg.list()
    assert [(e.name, e.version) for e in listing.entries] == [("legal", 1)]
    assert {s.path: s.reason for s in listing.skipped} == {
        f"legal/{odd}": "not a version (versions are numbers of ASCII digits)" for odd in ("²", "١", "𝟏", "007x")
    }
    assert reg.resolve("legal") == ("legal", 1) and reg.verify("legal@1").version == 1
    assert reg.publish(fake_artifact(tmp_path / "b"), "legal").version == 2


def test_the_name_default_is_reserved_for_the_bare_model(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(CartridgeError, match="'default' is reserved"):
        reg.publish(fake_artifact(tmp_path / "a"), "default")
    assert not (tmp_path / "reg" / "default").exists()


def test_messages_about_many_versions_stay_one_short_line(tmp_path):
    reg = Registry(tmp_path / "reg")
    for version in range(1, 41):
        (tmp_path / "reg" / "legal" / str(version)).mkdir(parents=True)
        (tmp_path / "reg" / "legal" / str(version) / "retired.json").write_text(json.dumps({"version": version}))
    with pytest.raises(CartridgeError) as raised:
        reg.resolve("legal")
    assert str(raised.value) == (
        "legal has no versions left: @1, @2, @3, ... (34 more) ..., @38, @39, @40 were removed "
        "(numbers are never reused); publish a new one"
    )


def test_a_remote_registry_never_serves_a_stale_copy(tmp_path, cartridges_home):
    """The cache is keyed by the manifest's digest, and the remote manifest is read on every resolve."""
    from cartridges.artifact.manifest import manifest_digest

    url = f"memory://stale-{time.time_ns()}"
    reg = Registry(url)
    reg.publish(fake_artifact(tmp_path / "a"), "rem")
    first = load_artifact(reg.local_path("rem@1"))
    # Another writer replaces rem@1 on the remote behind the registry's back (an older tool, a hand edit).
    replacement = fake_artifact(tmp_path / "b", name="rem")
    manifest = json.loads((replacement / MANIFEST_FILE).read_text()) | {"version": 1}
    for file in (ADAPTER_WEIGHTS_FILE, "adapter_config.json"):
        reg.fs.put_file(str(replacement / file), reg.path("rem", 1, file))
    reg.fs.pipe_file(reg.path("rem", 1, MANIFEST_FILE), json.dumps(manifest).encode())
    assert reg.show("rem@1").files == manifest["files"]
    second = load_artifact(reg.local_path("rem@1"))
    assert second.manifest.files == manifest["files"] and not torch.equal(
        first.prompt_embeddings, second.prompt_embeddings
    )
    assert reg.verify("rem@1").files == manifest["files"]
    # Tampering with the remote payload after the download: the cached copy still matches its manifest,
    # and verify reads the remote bytes again and sees it.
    data = bytearray(reg.fs.cat_file(reg.path("rem", 1, ADAPTER_WEIGHTS_FILE)))
    data[-1] ^= 0xFF
    reg.fs.pipe_file(reg.path("rem", 1, ADAPTER_WEIGHTS_FILE), bytes(data))
    with pytest.raises(CartridgeError, match="checksum mismatch"):
        reg.verify("rem@1")
    assert torch.equal(load_artifact(reg.local_path("rem@1")).prompt_embeddings, second.prompt_embeddings)
    assert sorted(p.name for p in (cartridges_home / "cache" / "artifacts").iterdir()) == sorted(
        {manifest_digest(json.dumps(manifest).encode()), reg.local_path("rem@1").name} | {first.path.name}
    )
