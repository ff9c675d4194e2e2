"""The page at `/` of `cartridges serve`, driven in Debian's Chromium (headless) by Playwright, against a
real server on 127.0.0.1 over a registry of real builds: a distilled cartridge built twice by the
pipeline (evaluation, training curve, lineage), untrained cartridges, a library, and manifest text
carrying HTML that must show as text. `make test` installs Chromium where it is missing (`make browser`)."""

import os
import re
from pathlib import Path

import httpx
import pytest
from conftest import STATUTE
from playwright.sync_api import expect, sync_playwright
from server_helpers import Running

from cartridges.models import load_model
from cartridges.pipeline.build import build
from cartridges.pipeline.build_config import load_build_config
from cartridges.pipeline.scheduler import Scheduler
from cartridges.qa import QACorpus, Question
from cartridges.registry.store import Registry
from cartridges.serving.page import CONTENT_SECURITY_POLICY
from cartridges.serving.server import Limits, build_server
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus
from cartridges.stages.library.build import build_library
from cartridges.stages.library.config import LibraryConfig

CHROMIUM = os.environ.get("CARTRIDGES_CHROMIUM", "/usr/bin/chromium")
# Chromium on a machine without a network: no background fetches, no sandbox (root in CI), no GPU
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAYLOAD = '<img src=x onerror="window.__pwned=1">'  # a corpus folder's name: the manifest's corpus source
TITLE_PAYLOAD = "<svg onload=window.__pwned=2>"  # a library unit's title (its document's heading)
ANSWER_PAYLOAD = '<script>window.__pwned=3</script><img src=y onerror="window.__pwned=4">'
MESSAGE = "How many days notice must a landlord give?"
WAIT_MS = 60_000
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's, or set CARTRIDGES_CHROMIUM")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """A fresh tab (own storage) on a server; the test fails on any script error the page raised."""
    contexts, errors = [], []

    def opener(server: Running, bypass_csp: bool = False):
        context = browser.new_context(viewport={"width": 1500, "height": 1000}, bypass_csp=bypass_csp)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(error))
        page.set_default_timeout(WAIT_MS)
        page.goto(server.url.removesuffix("/v1") + "/")
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not errors, f"the page raised: {errors}"


def tiny_build_config(model_dir: Path):
    return load_build_config("tiny", [f"model={model_dir}", "distill.eval_samples=2", "synthesis.samples=6"])


def build_site(root: Path, lively_model_dir: Path):
    """The registry `site` serves, built under `root`; (registry, loaded model)."""
    registry = Registry(root / "registry")
    loaded = load_model(str(lively_model_dir))
    legal = root / "legal"
    legal.mkdir()
    (legal / "statute.txt").write_text(STATUTE * 3)
    qa = QACorpus(
        id="legal-qa",
        title="",
        text=STATUTE,
        questions=(Question(id="1", question=MESSAGE, answer="14 days", answer_type="duration"),),
    )
    config = tiny_build_config(lively_model_dir)
    build(legal, "legal", config, registry, qa=qa)
    (legal / "amendment.txt").write_text("Section 61. A landlord must return the deposit within thirty days. " * 6)
    build(legal, "legal", config, registry, qa=qa)
    registry.set_alias("legal@1", "stable")
    for name, folder, text in (
        ("tax", root / "tax", "Section 9. Tax on rent is due within thirty days of the end of each quarter. " * 4),
        ("shown-as-text", root / PAYLOAD, "Plain text about a harmless corpus. " * 8),
    ):
        folder.mkdir()
        (folder / "doc.txt").write_text(text)
        init_cartridge(loaded, read_corpus(folder), 12, name, root / f"{name}-artifact")
        registry.publish(root / f"{name}-artifact", name)
    library = root / "library"
    library.mkdir()
    (library / "alpha.txt").write_text(STATUTE * 2)
    (library / "beta.md").write_text(f"# {TITLE_PAYLOAD}\n\nMeetings are on Mondays. Dues are ten dollars.")
    library_config = LibraryConfig(unit_tokens=48, init="kv", precision="float32")
    build_library(read_corpus(library), loaded, "lib", library_config, registry)
    scheduler = Scheduler(registry, lambda schedule: ("published", "legal@2"))
    scheduler.add("legal", str(legal), "0 2 * * *")
    scheduler.run("legal")
    return registry, loaded


@pytest.fixture(scope="module")
def site(lively_model_dir, tmp_path_factory):
    """legal@1 and legal@2 (distilled by the pipeline, the second warm-started from the first after an
    edit; alias stable -> legal@1), tax@1 (untrained, another corpus), lib@1 (a library), a
    cartridge whose corpus folder is named with HTML, and a schedule's history; served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("page")
    with pytest.MonkeyPatch.context() as patch:  # the builds' run folders; the previous value comes back
        patch.setenv("CARTRIDGES_HOME", str(root / "home"))
        registry, loaded = build_site(root, lively_model_dir)
    with Running(build_server(loaded, registry, Limits(max_tokens=64, max_prompt_tokens=512))) as server:
        yield server


def kv_loaded(manifest) -> str:
    """The page's figure for the loaded KV, computed here from the manifest's shape (float32 when loaded)."""
    size = manifest.num_tokens * manifest.num_layers * 2 * manifest.num_kv_heads * manifest.head_dim * 4
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TB"


def test_the_registry_view_lists_every_version_with_its_figures(site, open_page):
    page = open_page(site)
    registry = site.server.store.registry
    entries = registry.list().entries
    assert sorted(e.manifest.label for e in entries) == ["legal@1", "legal@2", "lib@1", "shown-as-text@1", "tax@1"]
    for entry in entries:
        m = entry.manifest
        row = page.locator(f'#registry-list tr[data-ref="{m.label}"]')
        expect(row).to_be_visible()
        cells = row.locator("td")
        expect(cells.nth(2)).to_have_text(m.method)
        expect(cells.nth(3)).to_have_text(f"{m.num_tokens:,}")
        expect(cells.nth(4)).to_have_text(m.dtype)
        expect(cells.nth(5)).to_have_text(kv_loaded(m))
        expect(cells.nth(1)).to_have_text("".join(entry.aliases))
    expect(page.locator("#registry-list")).to_contain_text("stable → @1")
    expect(page.locator("#key-form")).to_be_hidden()  # this server needs no key: the page never asks for one
    expect(page.locator("#error")).to_be_hidden()


def test_a_version_card_shows_lineage_evaluation_training_and_a_library_its_units(site, open_page):
    page = open_page(site)
    registry = site.server.store.registry
    manifest = registry.show("legal@2")
    page.get_by_role("button", name="legal@2", exact=True).click()
    card = page.locator("#registry-detail")
    expect(card.locator("h2")).to_have_text("legal@2")
    expect(card).to_contain_text(manifest.model_fingerprint)
    expect(card).to_contain_text(manifest.tokenizer_fingerprint)
    expect(card.locator(".lineage")).to_contain_text("legal@1")
    assert manifest.parent == "legal@1"
    evaluation = card.locator("table").filter(has_text="gold NLL")
    for method in ("none", "start", "cartridge"):
        row = evaluation.locator("tr").filter(has=page.locator("td", has_text=re.compile(f"^{method}$")))
        expect(row.locator("td").nth(1)).to_have_text(f"{manifest.metrics[f'qa_{method}_nll']:.3f}")
    curve = manifest.method_config["training_curve"]
    assert len(curve["step"]) == manifest.metrics["steps"]
    expect(card.locator("svg.plot polyline")).to_have_count(3)  # loss, batch KL, held-out KL
    card.get_by_role("button", name="Verify").click()
    expect(card.locator(".verify-status")).to_have_text(re.compile("^OK: "))

    page.get_by_role("button", name="lib@1", exact=True).click()
    expect(card.locator("h2")).to_have_text("lib@1")
    units = registry.local_path("lib@1") / "library.json"
    from cartridges.library.index import LibraryIndex

    for unit in LibraryIndex.read(units.parent).units:
        expect(card.locator("tr").filter(has=page.locator("td", has_text=re.compile(f"^{unit.id}$")))).to_have_count(1)


def answer_of(server: Running, model: str) -> str:
    """What the official client gets for the page's request (temperature 0)."""
    reply = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": MESSAGE}], max_tokens=24, temperature=0
    )
    return reply.choices[0].message.content


def test_a_streamed_answer_in_the_playground_equals_the_openai_clients(site, open_page):
    page = open_page(site)
    page.get_by_role("link", name="Playground").click()
    page.locator("#play-model").fill("legal@2")
    page.locator("#play-max-tokens").fill("24")
    page.locator("#play-message").fill(MESSAGE)
    page.get_by_role("button", name="Send").click()
    usage = page.locator("#play-transcript .usage")
    expect(usage).to_contain_text("cartridges: legal@2")
    expect(usage).to_contain_text("first token")
    answer = page.locator("#play-transcript .answer.assistant").text_content()
    assert answer == answer_of(site, "legal@2") and answer


def test_compare_shows_two_cartridges_answering_differently_side_by_side(site, open_page):
    page = open_page(site)
    page.get_by_role("link", name="Compare").click()
    columns = page.locator("#compare-columns .column")
    expect(columns).to_have_count(2)
    columns.nth(0).locator(".compare-model").fill("legal@2")
    columns.nth(1).locator(".compare-model").fill("tax@1")
    page.locator("#compare-max-tokens").fill("24")
    page.locator("#compare-message").fill(MESSAGE)
    page.get_by_role("button", name="Send to all").click()
    for index in range(2):
        expect(columns.nth(index)).to_have_attribute("data-done", "true")
    answers = [columns.nth(i).locator(".answer").text_content() for i in range(2)]
    assert answers == [answer_of(site, "legal@2"), answer_of(site, "tax@1")]
    assert answers[0] != answers[1]
    expect(columns.nth(1).locator(".usage")).to_contain_text("cartridges: tax@1")


def test_html_in_a_manifest_or_an_answer_shows_as_text_and_runs_nothing(site, open_page):
    page = open_page(site, bypass_csp=True)  # the page's own rendering, without the CSP's second line of defence
    page.get_by_role("button", name="shown-as-text@1", exact=True).click()
    card = page.locator("#registry-detail")
    expect(card).to_contain_text(PAYLOAD)
    page.get_by_role("button", name="lib@1", exact=True).click()
    expect(card).to_contain_text(TITLE_PAYLOAD)

    def answer_with_html(route):  # the server's answer, as a model that writes HTML would stream it
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": ANSWER_PAYLOAD[:20]}}]},
            {"choices": [{"index": 0, "delta": {"content": ANSWER_PAYLOAD[20:]}, "finish_reason": "stop"}]},
        ]
        import json

        body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + "data: [DONE]\r\n\r\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", answer_with_html)
    page.get_by_role("link", name="Playground").click()
    page.locator("#play-message").fill("Write some HTML")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#play-transcript .answer.assistant")).to_have_text(ANSWER_PAYLOAD)
    page.wait_for_timeout(300)  # an onerror of a (wrongly) created image would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main svg[onload], main script").count() == 0


def test_the_page_forbids_inline_script(site, open_page):
    headers = httpx.get(site.url.removesuffix("/v1") + "/").headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    page = open_page(site)
    ran = page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
        " document.body.append(s); return window.__inline === 1 }"
    )
    assert ran is False


def test_schedules_show_with_their_history(site, open_page):
    page = open_page(site)
    page.get_by_role("link", name="Schedules").click()
    expect(page.locator("#schedules-list")).to_contain_text("0 2 * * *")
    history = page.locator("#schedules-history tbody tr")
    expect(history).to_have_count(1)
    expect(history.locator("td").nth(3)).to_have_text("published")
    expect(history.locator("td").nth(4)).to_have_text("legal@2")


@pytest.fixture
def small_registry(lively, corpus_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    corpus = read_corpus(corpus_dir)
    for tokens in (12, 16):
        init_cartridge(lively, corpus, tokens, "notes", tmp_path / f"notes-{tokens}")
        registry.publish(tmp_path / f"notes-{tokens}", "notes")
    return registry


def test_a_wrong_key_shows_the_servers_error_and_the_right_one_opens_the_registry(lively, small_registry, open_page):
    with Running(build_server(lively, small_registry, Limits(max_tokens=8), api_key="s3cret")) as server:
        page = open_page(server)
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("missing or wrong API key")
        page.locator("#key-input").fill("wrong")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_have_text(re.compile("^missing or wrong API key"))
        expect(page.locator("#key-form")).to_be_visible()
        page.locator("#key-input").fill("s3cret")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator('#registry-list tr[data-ref="notes@2"]')).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        assert httpx.get(f"{server.url}/cartridges").status_code == 401  # the data, not the page, needs the key


def test_the_page_keeps_working_when_a_version_is_removed_while_it_is_open(lively, small_registry, open_page):
    with Running(build_server(lively, small_registry, Limits(max_tokens=8))) as server:
        page = open_page(server)
        expect(page.locator('#registry-list tr[data-ref="notes@1"]')).to_be_visible()
        small_registry.remove("notes@1")
        page.get_by_role("button", name="notes@1", exact=True).click()
        expect(page.locator('#registry-list tr[data-ref="notes@1"]')).to_have_count(0)  # the list was reloaded
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("notes@1")
        page.get_by_role("button", name="notes@2", exact=True).click()
        expect(page.locator("#registry-detail h2")).to_have_text("notes@2")
        expect(page.locator("#error")).to_be_hidden()
        page.get_by_role("link", name="Playground").click()
        page.locator("#play-max-tokens").fill("8")
        page.locator("#play-model").fill("notes@1")
        page.locator("#play-message").fill(MESSAGE)
        page.get_by_role("button", name="Send").click()
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("notes@1")
        page.locator("#play-model").fill("notes@2")
        page.locator("#play-message").fill(MESSAGE)
        page.get_by_role("button", name="Send").click()
        expect(page.locator("#play-transcript .usage").last).to_contain_text("cartridges: notes@2")


def test_the_registry_endpoints_answer_scripts_in_json_with_openai_shaped_errors(site, small_registry, lively):
    base = site.url
    listing = httpx.get(f"{base}/cartridges").json()
    assert [group["name"] for group in listing["data"]] == ["legal", "lib", "shown-as-text", "tax"]
    legal = listing["data"][0]
    assert legal["aliases"] == {"stable": 1} and [v["ref"] for v in legal["versions"]] == ["legal@2", "legal@1"]
    card = httpx.get(f"{base}/cartridges/legal@stable").json()
    assert card["ref"] == "legal@1" and card["manifest"] == site.server.store.registry.show("legal@1").model_dump()
    missing = httpx.get(f"{base}/cartridges/legal@9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{base}/cartridges/Bad!Name").status_code == 400
    assert httpx.get(f"{base}/cartridges/tax@1/verify").json()["ok"] is True

    weights = small_registry.local_path("notes@2") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with Running(build_server(lively, small_registry, Limits(max_tokens=8)), page=False) as server:
        checked = httpx.get(f"{server.url}/cartridges/notes@2/verify").json()
        assert checked["ok"] is False and "checksum" in checked["message"]
        assert str(small_registry.root) not in checked["message"]  # a client never sees the server's paths
        assert httpx.get(f"{server.url}/cartridges").status_code == 200
        assert httpx.get(server.url.removesuffix("/v1") + "/").status_code == 404  # --no-ui: the API only
