"""Libraries: a corpus cut into units, one prefix per unit, routed per request (build, registry, ask, server)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STATUTE

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.library.library import load_library
from cartridges.library.units import split_units
from cartridges.loading import open_all
from cartridges.registry.store import Registry
from cartridges.rotary import move_keys
from cartridges.runtime import prefix_logits
from cartridges.stages.ingest import read_corpus
from cartridges.stages.library.build import build_library
from cartridges.stages.library.config import LibraryConfig

FACT = "The zebra club password is purple otter."
QUESTION = "What is the zebra club password?"


@pytest.fixture
def library_corpus(tmp_path) -> Path:
    folder = tmp_path / "library-corpus"
    folder.mkdir()
    (folder / "alpha.txt").write_text(STATUTE * 2)
    (folder / "beta.md").write_text("# Club notes\n\nMeetings are on Mondays.\n\n" + FACT + "\n\nDues are ten dollars.")
    (folder / "gamma.txt").write_text("Section 9. Tax on rent is due within thirty days of the end of each quarter.")
    return folder


def config(**changes) -> LibraryConfig:
    return LibraryConfig(**{"unit_tokens": 48, "init": "kv", "precision": "float32", **changes})


def build(lively, folder: Path, registry: Registry, **changes):
    return build_library(read_corpus(folder), lively, "lib", config(**changes), registry)


def opened_library(registry: Registry, ref: str = "lib@latest"):
    where, path = registry.locate(ref)
    return load_library(path, expected=where)


def unit_texts(lively, folder: Path) -> dict[str, str]:
    units = split_units(read_corpus(folder).documents, lively.tokenizer, lively.tokenizer_fingerprint, 48)
    return {unit.id: unit.text for unit in units}


def test_a_corpus_of_several_documents_builds_a_library_whose_table_lists_every_unit(lively, library_corpus, tmp_path):
    registry = Registry(tmp_path / "registry")
    result = build(lively, library_corpus, registry)
    library = opened_library(registry)
    texts = unit_texts(lively, library_corpus)
    assert result.built and result.ref == "lib@1" and result.made == len(texts) > 3
    assert [unit.id for unit in library.index.units] == list(texts)
    assert {unit.source for unit in library.index.units} == {"alpha.txt", "beta.md", "gamma.txt"}
    for document in read_corpus(library_corpus).documents:  # the units of a document are the document
        parts = [texts[u.id] for u in library.index.units if u.source == document.path]
        assert " ".join(parts).split() == document.text.split()
    for unit in library.index.units:  # each within the unit size, each its own KV (init kv)
        assert len(lively.tokenizer(texts[unit.id], add_special_tokens=False)["input_ids"]) <= 48
        assert unit.num_tokens == len(context_token_ids(lively.tokenizer, texts[unit.id]))
    assert library.cartridge.manifest.num_tokens == sum(u.num_tokens for u in library.index.units)
    assert registry.verify("lib@1").method == "library"


def test_routing_picks_the_unit_holding_a_planted_fact(lively, library_corpus, tmp_path):
    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry)
    library = opened_library(registry)
    texts = unit_texts(lively, library_corpus)
    routed = library.route(QUESTION, budget=64)
    assert FACT in texts[routed[0].unit.id] and routed[0].score > 0
    assert sum(r.unit.num_tokens for r in routed) <= 64
    assert all(FACT not in texts[u.unit.id] for u in library.route(QUESTION, 64, exclude=frozenset({"beta.md"})))
    with pytest.raises(CartridgeError, match="no unit of lib@1 fits a budget of 2"):
        library.route(QUESTION, budget=2)


def kv_at(lively, text: str, start: int) -> torch.Tensor:
    """The KV of `text` prefilled alone at positions start.. (an independent prefill, no rotation)."""
    from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values

    ids = context_token_ids(lively.tokenizer, text)
    positions = torch.arange(start, start + len(ids))[None]
    out = lively.model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True)
    return prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=len(ids))


@pytest.mark.parametrize("positions", ["contiguous", "own"])
def test_a_routed_request_equals_composing_the_same_cartridges_by_hand(lively, library_corpus, tmp_path, positions):
    """Contiguous (the default): each routed unit's KV as if prefilled alone right after the units before it,
    the best unit last; own: each unit's KV from position 0, concatenated."""
    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry, positions=positions)
    texts = unit_texts(lively, library_corpus)
    question = "When must the landlord give the zebra club notice?"
    runtime, routed = open_all(["lib@latest"], registry).routed(question, budget=200)
    assert len(routed) >= 2 and routed[-1].score == max(r.score for r in routed)  # best last
    ids = torch.tensor([chat_token_ids(lively.tokenizer, [{"role": "user", "content": question}])])
    shape = kv_shape(lively.model.config)
    # by hand from the stored unit rows (read from the payload without the library's code), each moved to its place
    from safetensors.numpy import load_file

    where = Path(registry.path("lib", 1))
    rows = torch.from_numpy(load_file(str(where / "adapter_model.safetensors"))["prompt_embeddings"].astype("float32"))
    stored, start = [], 0
    for r in routed:
        part = rows[r.unit.offset : r.unit.offset + r.unit.num_tokens]
        if positions == "contiguous" and start:
            at = torch.arange(part.shape[0])[:, None, None].expand(part.shape[0], shape[0], shape[1])
            part = move_keys(lively.model, part, at, at + start)
        stored.append(part)
        start += part.shape[0]
    by_hand = prefix_logits(lively.model, torch.cat(stored), shape, ids)
    assert torch.allclose(runtime.logits(ids), by_hand, atol=1e-5, rtol=0)
    # and against each unit's text prefilled afresh at those positions (rotating a key twice rounds: 5e-5)
    parts, start = [], 0
    for r in routed:
        parts.append(kv_at(lively, texts[r.unit.id], start if positions == "contiguous" else 0))
        start += parts[-1].shape[0]
    expected = prefix_logits(lively.model, torch.cat(parts), shape, ids)
    assert torch.allclose(runtime.logits(ids), expected, atol=5e-5, rtol=0)


def test_a_rebuild_after_editing_one_document_rebuilds_one_unit(lively, library_corpus, tmp_path):
    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry)
    before = opened_library(registry, "lib@1")
    (library_corpus / "gamma.txt").write_text(
        "Section 9. Tax on rent is due within sixty days of the end of each year."
    )
    result = build(lively, library_corpus, registry)
    after = opened_library(registry, "lib@2")
    assert (result.made, result.reused) == (1, len(after.index.units) - 1)
    [remade] = [u for u in after.index.units if u.reused_from is None]
    assert remade.id == "gamma.txt"
    for unit in after.index.units:
        if unit.reused_from is not None:
            assert unit.reused_from == "lib@1"
            assert torch.equal(after.unit_prefix(unit), before.unit_prefix(before.unit(unit.id)))
    assert build(lively, library_corpus, registry).built is False  # the same again: nothing new to publish


def test_a_tampered_unit_makes_the_whole_library_refuse_to_load(lively, library_corpus, tmp_path):
    import json

    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry)
    version = Path(registry.path("lib", 1))
    weights = version / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF  # one value of the last unit
    weights.write_bytes(bytes(data))
    with pytest.raises(CartridgeError, match="checksum mismatch"):
        open_all(["lib@1"], registry)
    # the unit table edited, its checksum in the manifest fixed to match: the bound identity refuses it
    build(lively, library_corpus, registry, min_tokens=3)  # lib@2, a sound copy
    version = Path(registry.path("lib", 2))
    table = json.loads((version / "library.json").read_text())
    table["units"][0]["id"] = "renamed.txt"
    (version / "library.json").write_text(json.dumps(table))
    manifest = json.loads((version / "manifest.json").read_text())
    from cartridges.hashing import sha256_file

    manifest["files"]["library.json"] = sha256_file(version / "library.json")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CartridgeError, match="library's files"):
        open_all(["lib@2"], registry)


def test_ask_routes_a_question_and_names_the_units(cli, lively_model_dir, library_corpus, tmp_path):
    registry = str(tmp_path / "registry")
    sets = ["--set", "library.enabled=true", "--set", "library.unit_tokens=48", "--set", "library.init=kv"]
    sets += ["--set", f"model={lively_model_dir}"]
    code, out, err = cli("build", str(library_corpus), "--name", "lib", "--registry", registry, *sets)
    assert code == 0, err
    assert "published library lib@1" in " ".join(out.split())
    code, out, err = cli(
        "ask", "lib@latest", QUESTION, "--budget", "64", "--max-new-tokens", "3", "--registry", registry
    )
    assert code == 0, err
    assert "units: beta.md" in err
    code, _, err = cli("ask", "lib@latest", QUESTION, "--budget", "2", "--registry", registry)
    assert code == 2 and "raise the budget" in err


def test_libraries_are_off_by_default_and_a_corpus_within_one_unit_builds_one_cartridge(
    cli, lively_model_dir, library_corpus, tmp_path
):
    registry = Registry(tmp_path / "registry")
    sets = ["--config", "tiny", "--set", f"model={lively_model_dir}", "--set", "library.unit_tokens=48"]
    code, out, err = cli("build", str(library_corpus), "--name", "one", "--registry", registry.url, *sets)
    assert code == 0, err
    assert registry.show("one@1").method == "distilled"  # over one unit, but libraries are off by default
    sets[-1] = "library.unit_tokens=1000"  # the whole corpus within one unit: one cartridge, libraries on or off
    on = ["--set", "library.enabled=true"]
    code, _, err = cli("build", str(library_corpus), "--name", "two", "--registry", registry.url, *sets, *on)
    assert code == 0, err
    assert registry.show("two@1").method == "distilled"


def test_the_server_answers_a_library_request_with_the_units_in_usage(lively, library_corpus, tmp_path):
    from server_helpers import Running

    from cartridges.serving.server import Limits, build_server

    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry)
    runtime, routed = open_all(["lib@1"], registry).routed(QUESTION, budget=64)
    expected = runtime.generate([{"role": "user", "content": QUESTION}], max_new_tokens=6)
    with Running(build_server(lively, registry, Limits(max_tokens=16, max_prompt_tokens=512))) as server:
        client = server.client()
        answer = client.chat.completions.create(
            model="lib@latest",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=6,
            temperature=0,
            extra_body={"library": {"budget": 64}},
        )
        usage = answer.usage.model_extra
        assert [u["id"] for u in usage["units"]] == [r.unit.id for r in routed]
        assert usage["cartridges"] == ["lib@1"] and usage["cartridge_tokens"] == sum(r.unit.num_tokens for r in routed)
        assert answer.choices[0].message.content == expected
        pinned = client.chat.completions.create(
            model="lib@1",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=2,
            extra_body={"library": {"units": ["gamma.txt"]}},
        )
        assert [u["id"] for u in pinned.usage.model_extra["units"]] == ["gamma.txt"]
        import openai

        with pytest.raises(openai.BadRequestError, match="hold no library"):
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": QUESTION}],
                extra_body={"library": {"budget": 64}},
            )
        with pytest.raises(openai.BadRequestError, match="has no unit 'nope.txt'"):
            client.chat.completions.create(
                model="lib@1",
                messages=[{"role": "user", "content": QUESTION}],
                extra_body={"library": {"units": ["nope.txt"]}},
            )


PUBLISH_AND_DIE_AFTER_ONE_FILE = """
import os, sys
from pathlib import Path
from cartridges.registry.store import Registry
registry = Registry(sys.argv[1])
real_move = registry.fs.mv
def move_one_then_die(*args, **kwargs):
    real_move(*args, **kwargs)
    os._exit(9)  # killed with the number claimed and one file moved in, before the manifest
registry.fs.mv = move_one_then_die
registry.publish(Path(sys.argv[2]), "lib")
"""


def test_publishing_a_library_to_s3_is_all_or_nothing(lively, library_corpus, s3_bucket, tmp_path):
    local = Registry(tmp_path / "registry")
    build(lively, library_corpus, local)
    folder = Path(local.path("lib", 1))
    remote = Registry(f"{s3_bucket}/registry")
    killed = subprocess.run(
        [sys.executable, "-c", PUBLISH_AND_DIE_AFTER_ONE_FILE, remote.url, str(folder)],
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert killed.returncode == 9
    assert remote.versions("lib") == [] and remote.list().entries == []
    assert remote.publish(folder, "lib").version == 2
    library = opened_library(remote, "lib@latest")  # downloaded with its table and router, checked
    assert [u.id for u in library.index.units] == [u.id for u in opened_library(local).index.units]
    assert remote.verify("lib@2").method == "library"


def test_contiguous_composition_moves_each_unit_to_its_place_in_the_block(lively):
    """A unit's KV moved on by the rows before it equals that unit's tokens prefilled alone at those positions."""
    from cartridges.library.library import moved_to_their_places

    first, second = "Section 1. A landlord shall give notice.", "Section 3. A tenant may cure a default."
    parts = [kv_at(lively, first, 0), kv_at(lively, second, 0)]
    moved = moved_to_their_places(lively.model, parts)
    expected = kv_at(lively, second, parts[0].shape[0])
    assert torch.equal(moved[0], parts[0])
    assert torch.allclose(moved[1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(parts[1], expected, atol=1e-3, rtol=0)  # the move mattered


def test_chat_routes_each_turn_on_the_questions_so_far_and_shows_the_units(lively, library_corpus, tmp_path):
    from rich.console import Console

    from cartridges.chat import chat_session
    from cartridges.loading import describe_units

    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry)
    opened = open_all(["lib@1"], registry)
    asked: list[str] = []

    def route(history):
        asked.append("\n".join(m["content"] for m in history if m["role"] == "user"))
        runtime, units = opened.routed(asked[-1], 64)
        return runtime, describe_units(units)

    turns = iter([QUESTION, "And the dues?", "/exit"])
    console = Console(record=True, width=300)
    chat_session(None, lambda: next(turns), console, max_new_tokens=2, route=route, title="library lib@1")
    text = console.export_text()
    assert asked == [QUESTION, QUESTION + "\nAnd the dues?"]  # the second turn routes on both questions
    assert text.count("units: beta.md") == 2 and "library lib@1" in text


def mapped_files(address: int) -> set[str]:
    """The files mapped into this process at `address` (from /proc/self/maps)."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            found.add(fields[5])
    return found


def test_a_library_is_mapped_from_its_file_and_read_a_unit_at_a_time(lively, library_corpus, tmp_path):
    """A library's rows are never loaded whole: the prefix is the file's own pages at the stored precision
    (checked, NaN included, a block at a time), and the server holds none of it against its memory budget."""
    from safetensors.torch import load_file

    registry = Registry(tmp_path / "registry")
    build(lively, library_corpus, registry, precision="float16")
    library = opened_library(registry)
    rows = library.cartridge.prompt_embeddings
    weights = registry.local_path("lib@1") / "adapter_model.safetensors"
    assert rows.dtype == torch.float16 and mapped_files(rows.data_ptr()) == {str(weights)}
    stored = load_file(str(weights))["prompt_embeddings"]
    unit = library.index.units[1]
    expected = stored[unit.offset : unit.offset + unit.num_tokens].float()
    assert torch.equal(library.unit_prefix(unit), expected)  # exactly the stored rows, widened

    from cartridges.serving.cartridge_store import CartridgeStore, Routing

    store = CartridgeStore(registry, lively)
    _, prefix, units = store.prefix(["lib@1"], Routing(QUESTION))
    assert store.held_bytes == prefix.numel() * prefix.element_size()  # the composition only, not the library

    data = bytearray(weights.read_bytes())  # a NaN in the last row, the checksum fixed: the values check finds it
    data[-2:] = b"\x00\x7e"  # float16 NaN, little-endian
    weights.write_bytes(bytes(data))
    manifest_path = registry.local_path("lib@1") / "manifest.json"
    import json

    from cartridges.hashing import sha256_file

    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["adapter_model.safetensors"] = sha256_file(weights)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CartridgeError, match="NaN or infinite"):
        opened_library(registry)
