"""The OpenAI-compatible server on 127.0.0.1 and a free port, driven by the official `openai` client."""

import asyncio
import concurrent.futures
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_helpers import Running, free_port

from cartridges.registry.store import Registry
from cartridges.runtime import CartridgeRuntime
from cartridges.serving.server import Limits, build_server
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

QUESTION = [{"role": "user", "content": "How many days notice must a landlord give?"}]


@pytest.fixture
def registry(lively, corpus_dir, tmp_path):
    """legal@1 (24 tokens), legal@2 (40 tokens, alias stable), tax@1 (12 tokens)."""
    reg = Registry(tmp_path / "registry")
    corpus = read_corpus(corpus_dir)
    for name, tokens in (("legal", 24), ("legal", 40), ("tax", 12)):
        folder = tmp_path / f"{name}-{tokens}"
        init_cartridge(lively, corpus, tokens, name, folder)
        reg.publish(folder, name)
    reg.set_alias("legal@2", "stable")
    return reg


@pytest.fixture
def running(lively, registry):
    with Running(build_server(lively, registry, Limits(max_tokens=64, max_prompt_tokens=512))) as server:
        yield server


def hf_answer(lively, registry, refs, max_tokens=10) -> str:
    """Independent: HF generate through the runtime behind `cartridges ask`."""
    from cartridges.loading import open_cartridge

    runtime = CartridgeRuntime(lively, [open_cartridge(ref, registry) for ref in refs])
    return runtime.generate(QUESTION, max_new_tokens=max_tokens)


def test_chat_plain_streaming_and_composed_equal_hf_generate(lively, registry, running):
    client = running.client()
    answer = client.chat.completions.create(model="legal@1", messages=QUESTION, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content.strip() == hf_answer(lively, registry, ["legal@1"])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.object == "chat.completion"
    assert answer.usage.completion_tokens <= 10 and answer.usage.model_extra["cartridge_tokens"] == 24
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="legal@1",
            messages=QUESTION,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    composed = client.chat.completions.create(
        model="legal@stable",
        messages=QUESTION,
        max_tokens=10,
        temperature=0,
        extra_body={"cartridges": [{"id": "tax"}]},
    )
    assert composed.choices[0].message.content.strip() == hf_answer(lively, registry, ["legal@2", "tax@1"])
    assert composed.usage.model_extra["cartridges"] == ["legal@2", "tax@1"]
    plain = client.chat.completions.create(model=lively.model_id, messages=QUESTION, max_tokens=10, temperature=0)
    assert plain.usage.model_extra["cartridge_tokens"] == 0


def test_completions_and_models(lively, running):
    client = running.client()
    done = client.completions.create(model="tax", prompt="The landlord", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tax", prompt="The landlord", max_tokens=5, temperature=0, stream=True)
    )
    assert streamed == done.choices[0].text
    ids = {m.id for m in client.models.list()}
    assert {lively.model_id, "legal@1", "legal@2", "legal@stable", "legal@latest", "legal", "tax@1", "tax"} <= ids


def test_sixteen_concurrent_requests_over_three_cartridges_and_the_plain_model_equal_each_alone(lively, running):
    models = ["legal@1", "legal@2", "tax@1", lively.model_id]
    questions = [f"Question {i}: who pays for repairs in flat {i}?" for i in range(4)]
    cases = [(model, [{"role": "user", "content": q}]) for model in models for q in questions]
    client = running.client()
    alone = [
        client.chat.completions.create(model=m, messages=q, max_tokens=12, temperature=0).choices[0].message.content
        for m, q in cases
    ]

    async def together():
        async with running.client(cls=openai.AsyncOpenAI) as concurrent:
            answers = await asyncio.gather(
                *(
                    concurrent.chat.completions.create(model=m, messages=q, max_tokens=12, temperature=0)
                    for m, q in cases
                )
            )
        return [a.choices[0].message.content for a in answers]

    assert asyncio.run(together()) == alone


def test_stop_strings_cut_the_answer_and_never_reach_the_client(running):
    client = running.client()
    full = client.chat.completions.create(model="legal@1", messages=QUESTION, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.chat.completions.create(model="legal@1", messages=QUESTION, max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="legal@1", messages=QUESTION, max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda c: c.chat.completions.create(model="nope", messages=QUESTION), 404, "no cartridge named 'nope'"),
        (lambda c: c.chat.completions.create(model="legal@9", messages=QUESTION), 404, "legal has no version 9"),
        (lambda c: c.chat.completions.create(model="../etc", messages=QUESTION), 400, "invalid"),
        (lambda c: c.chat.completions.create(model="./legal", messages=QUESTION), 400, "invalid"),
        (
            lambda c: c.chat.completions.create(model="legal", messages=QUESTION, logprobs=True),
            400,
            "unsupported parameter(s): logprobs",
        ),
        (lambda c: c.chat.completions.create(model="legal", messages=QUESTION, n=2), 400, "n: Input should be"),
        (lambda c: c.chat.completions.create(model="legal", messages=QUESTION, max_tokens=65), 400, "up to 64"),
        (lambda c: c.chat.completions.create(model="legal", messages=[]), 400, "messages"),
        (
            lambda c: c.chat.completions.create(model="legal", messages=[{"role": "user", "content": "rent " * 600}]),
            400,
            "the model reads",
        ),
        (
            lambda c: c.chat.completions.create(
                model="legal", messages=QUESTION, extra_body={"cartridges": [{"id": "tax", "source": "wandb"}]}
            ),
            400,
            "cartridges.0.source",
        ),
        (lambda c: c.chat.completions.create(model="legal", messages=QUESTION, temperature=-1), 400, "temperature"),
        (lambda c: c.completions.create(model="legal", prompt=""), 400, "the prompt is empty"),
        (lambda c: c.completions.create(model="default", prompt="", stream=True), 400, "the prompt is empty"),
        (lambda c: c.chat.completions.create(model="legal@²", messages=QUESTION), 400, "invalid reference"),
        (lambda c: c.chat.completions.create(model="legal@١", messages=QUESTION), 400, "invalid reference"),
        (
            lambda c: c.chat.completions.create(
                model="legal", messages=QUESTION, extra_body={"cartridges": [{"id": "x@𝟏"}]}
            ),
            400,
            "invalid reference",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_the_server_stays_up(running, call, status, message):
    client = running.client()
    with pytest.raises(openai.APIStatusError) as raised:
        call(client)
    assert raised.value.status_code == status, raised.value.body
    assert message in raised.value.body["message"] and set(raised.value.body) == {"message", "type", "param", "code"}
    assert client.models.list().data  # still answering


def test_malformed_bodies_are_4xx_never_5xx(running):
    url = running.url + "/chat/completions"
    bodies = [b"", b"{", b"[]", b'"text"', b"\xff\xfe\x00", json.dumps({"model": 5}).encode(), b"x" * (2 << 20)]
    bodies += [json.dumps({"model": "legal", "messages": [{"role": "robot", "content": "hi"}]}).encode()]
    bodies += [json.dumps({"model": "legal", "messages": QUESTION, "max_tokens": 10**30}).encode()]
    bodies += [json.dumps({"model": "legal", "messages": QUESTION, "temperature": 1, "seed": 10**30}).encode()]
    bodies += [json.dumps({"model": "legal", "messages": QUESTION, "stream": "yes"}).encode()]  # not a boolean
    bodies += [json.dumps({"model": "legal", "messages": QUESTION, "max_tokens": 4.0}).encode()]  # not a count
    with httpx.Client(timeout=30) as http:
        for body in bodies:
            response = http.post(url, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body[:40], response.status_code, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get(running.url.removesuffix("/v1") + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused_rather_than_serving_without_one(cli, key):
    code, _, err = cli("serve", "--api-key", key, "--port", str(free_port()))
    assert code == 2 and "--api-key is empty" in err and "Traceback" not in err


def test_api_key_on(lively, registry):
    with Running(build_server(lively, registry, Limits(), api_key="s3cret")) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("s3cret").models.list().data
        with httpx.Client() as http:  # health needs no key (load balancers probe it)
            assert http.get(server.url.removesuffix("/v1") + "/health").status_code == 200


def test_a_moved_alias_serves_the_new_version_while_a_running_request_finishes_on_the_old(
    lively, registry, running, corpus_dir, tmp_path
):
    client = running.client()
    before = client.chat.completions.create(model="legal@stable", messages=QUESTION, max_tokens=8, temperature=0)
    assert before.usage.model_extra["cartridges"] == ["legal@2"]
    stream = client.chat.completions.create(
        model="legal@stable", messages=QUESTION, max_tokens=40, temperature=0, stream=True
    )
    first = next(iter(stream))  # running on legal@2 now
    init_cartridge(lively, read_corpus(corpus_dir), 16, "legal", tmp_path / "legal-16")
    registry.publish(tmp_path / "legal-16", "legal")
    registry.set_alias("legal@3", "stable")
    after = client.chat.completions.create(model="legal@stable", messages=QUESTION, max_tokens=8, temperature=0)
    assert after.usage.model_extra["cartridges"] == ["legal@3"] and after.usage.model_extra["cartridge_tokens"] == 16
    rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    alone = client.chat.completions.create(model="legal@2", messages=QUESTION, max_tokens=40, temperature=0)
    assert (first.choices[0].delta.content or "") + rest == alone.choices[0].message.content


def test_a_cartridge_built_for_another_model_is_a_400_naming_both(
    lively, registry, running, other_tiny_model_dir, tmp_path
):
    from cartridges.models import load_model

    other = load_model(str(other_tiny_model_dir))
    init_cartridge(other, read_corpus(tmp_path / "corpus"), 12, "foreign", tmp_path / "foreign")
    registry.publish(tmp_path / "foreign", "foreign")
    with pytest.raises(openai.BadRequestError, match="was built for model"):
        running.client().chat.completions.create(model="foreign", messages=QUESTION)


class ServeCommand:
    """`cartridges serve ...` in its own process, stopped with Ctrl-C (SIGINT) at the end."""

    def __init__(self, lively_model_dir, registry, log, *options: str, startup_seconds: float = 60):
        import os
        import subprocess
        import sys

        self.port = free_port()
        command = [sys.executable, "-m", "cartridges.pipeline.cli", "serve", "--port", str(self.port), *options]
        command += ["--model", str(lively_model_dir), "--registry", str(registry.url)]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.startup_seconds = startup_seconds

    def __enter__(self):
        deadline = time.monotonic() + self.startup_seconds
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def __exit__(self, *exc):
        import signal

        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=120)


def test_cartridges_serve_binds_loopback_and_answers_the_client(lively_model_dir, registry, tmp_path):
    with ServeCommand(lively_model_dir, registry, tmp_path / "serve.log") as served:
        client = served.client()
        assert "legal@stable" in {m.id for m in client.models.list()}
        assert client.chat.completions.create(model="legal", messages=QUESTION, max_tokens=4).choices
        page = httpx.get(f"http://127.0.0.1:{served.port}/")
        assert page.status_code == 200 and "content-security-policy" in page.headers and "<main>" in page.text
    text = served.log.read_text()
    assert f"on http://127.0.0.1:{served.port}/v1" in text and "Traceback" not in text
    assert f"the page: http://127.0.0.1:{served.port}/" in " ".join(text.split())  # rich wraps lines
    with ServeCommand(lively_model_dir, registry, tmp_path / "api-only.log", "--no-ui") as served:
        assert httpx.get(f"http://127.0.0.1:{served.port}/").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{served.port}/v1/cartridges").status_code == 200


@pytest.mark.slow
def test_serve_on_ray_with_two_replicas_answers_like_one_process(lively_model_dir, registry, running, tmp_path):
    """Slow: a local Ray cluster, Serve's controller and proxy, and two replicas each loading the model."""
    cases = [(model, q) for model in ("legal@1", "tax") for q in ("Who repairs?", "When is rent due?")]
    expected = [
        running.client()
        .chat.completions.create(model=m, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0)
        .choices[0]
        .message.content
        for m, q in cases
    ]
    log = tmp_path / "serve-ray.log"
    with ServeCommand(lively_model_dir, registry, log, "--ray", "--replicas", "2", startup_seconds=300) as served:
        client = served.client()
        got = [
            client.chat.completions.create(
                model=m, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0
            )
            .choices[0]
            .message.content
            for m, q in cases
        ]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=QUESTION)
    assert got == expected, log.read_text()


def test_a_client_that_disconnects_mid_stream_frees_its_row(lively, registry):
    from cartridges.kv_layout import kv_shape
    from cartridges.serving.batch_decoder import BatchDecoder
    from cartridges.serving.cartridge_store import CartridgeStore
    from cartridges.serving.server import Server

    finished = []

    class SlowDecoder(BatchDecoder):
        """Steps of 50 ms, as a big model would take, and a record of how each row ended."""

        def _step(self):
            time.sleep(0.05)
            super()._step()

        def _finish(self, row, reason, error=None):
            finished.append(row.generation.finish_reason or reason)
            super()._finish(row, reason, error)

    decoder = SlowDecoder(lively.model, kv_shape(lively.model.config))
    server = Server(lively, CartridgeStore(registry, lively), decoder, Limits(max_tokens=64))
    with Running(server) as running:
        stream = running.client().chat.completions.create(
            model="legal@1", messages=QUESTION, max_tokens=64, temperature=0, stream=True
        )
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the first chunk announces the role
            pass
        assert decoder.running == 1
        started = time.monotonic()
        stream.close()  # the connection goes away; 64 tokens would take 3 s more
        while decoder.running:
            assert time.monotonic() - started < 2, "the row of a gone client was not freed"
            time.sleep(0.02)
    assert finished == ["cancelled"]


def test_requests_on_one_cartridge_or_composition_share_one_copy_of_its_keys_and_values(lively, registry):
    """The store hands out one tensor per version and per composition; the decoder holds one copy of each
    prefix in use, whatever the number of rows, and each row only its own tokens."""
    from cartridges.kv_layout import kv_shape
    from cartridges.layout import chat_token_ids
    from cartridges.serving.batch_decoder import BatchDecoder
    from cartridges.serving.cartridge_store import CartridgeStore
    from cartridges.serving.generation import Generation, Sampling

    store = CartridgeStore(registry, lively)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # requests that arrive together for a new version
        first_wave = list(pool.map(lambda _: store.prefix(["legal@1"])[1], range(8)))
    legal = first_wave[0]
    assert all(prefix is legal for prefix in first_wave)
    _, composed, _ = store.prefix(["legal@1", "tax@1"])
    assert store.prefix(["legal@1", "tax@1"])[1] is composed and store.prefix(["legal"])[1] is not legal
    assert store.prefix(["tax@1", "legal@1"])[1] is not composed
    assert composed.shape[0] == 24 + 12
    shape = kv_shape(lively.model.config)
    layers, heads, dim = shape
    token_bytes = 2 * layers * heads * dim * 4
    decoder = BatchDecoder(lively.model, shape, max_batch=16)
    prompt = chat_token_ids(lively.tokenizer, QUESTION)
    try:
        rows = [decoder.submit(Generation(p, prompt, Sampling(400), frozenset())) for p in [legal] * 6 + [composed] * 6]
        streams = [row.tokens(timeout=60) for row in rows]
        for stream in streams:
            next(stream)  # every row has its prompt and a first token
        assert decoder.prefix_bytes == (24 + 36) * token_bytes  # each prefix once, not once per row
        assert decoder.held_bytes >= decoder.prefix_bytes + 12 * (len(prompt) + 1) * token_bytes
        for row in rows:
            row.cancel()
        for stream in streams:
            list(stream)
        while decoder.running:
            time.sleep(0.01)
        assert decoder.held_bytes == 0 and not decoder._shared
    finally:
        decoder.close()


@pytest.fixture
def uvicorn_errors():
    """What uvicorn logs as errors while the test runs (a traceback of the app is logged there)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def raw_exchange(port: int, request: bytes, wait: float = 30.0) -> bytes:
    """Send `request` on a fresh connection and read until the server closes it or `wait` seconds pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(request)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
                conn.settimeout(1.0)  # the answer has begun: the rest comes at once, or the connection stays open
        except TimeoutError:
            pass
        return received


def test_a_reference_with_digits_of_another_script_is_a_400_and_the_connection_keeps_serving(running):
    """`legal@²` was a 500 and reset the next request on the same keep-alive connection."""
    url = running.url + "/chat/completions"
    with httpx.Client(timeout=60) as http:
        for model in ("legal@²", "legal@١", "legal@𝟏"):
            response = http.post(url, json={"model": model, "messages": QUESTION, "max_tokens": 2})
            assert response.status_code == 400 and "invalid reference" in response.json()["error"]["message"]
        after = http.post(url, json={"model": "legal@1", "messages": QUESTION, "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["cartridges"] == ["legal@1"]


def test_errors_name_cartridges_not_the_servers_paths(running, registry):
    client = running.client()
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=QUESTION)
    weights = registry.root + "/tax/1/adapter_model.safetensors"
    with open(weights, "r+b") as damaged:  # the checksum no longer matches: a 400 that names the file
        damaged.seek(-4, 2)
        damaged.write(b"\0\0\0\1")
    with pytest.raises(openai.BadRequestError) as damaged_error:
        client.chat.completions.create(model="tax", messages=QUESTION)
    for message in (raised.value.body["message"], damaged_error.value.body["message"]):
        assert registry.root not in message and str(registry.root).lstrip("/") not in message
    assert "registry:tax/1/adapter_model.safetensors: checksum mismatch" in damaged_error.value.body["message"]


def test_a_version_removed_while_a_request_loads_it_is_a_404(lively, registry, monkeypatch):
    """`rm` racing requests gave four 500s (FileNotFoundError) in 320: removed between resolving and reading."""
    real_locate = registry.locate

    def locate_then_lose(reference):
        found = real_locate(reference)
        registry.remove(reference)
        return found

    monkeypatch.setattr(registry, "locate", locate_then_lose)
    with Running(build_server(lively, registry, Limits(max_tokens=8))) as server:
        with pytest.raises(openai.NotFoundError, match="tax@1 was removed"):
            server.client().chat.completions.create(model="tax@1", messages=QUESTION)
        monkeypatch.setattr(registry, "locate", real_locate)
        assert server.client().chat.completions.create(model="legal@1", messages=QUESTION, max_tokens=2).choices


def test_a_client_gone_mid_body_leaves_no_traceback_and_a_stalled_body_is_cut(lively, registry, uvicorn_errors):
    limits = Limits(max_tokens=8, body_seconds=1.0)
    with Running(build_server(lively, registry, limits)) as server:
        head = "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        partial = (head + "content-length: 1000\r\n\r\n").encode() + b'{"model": "legal",'
        for _ in range(20):  # each client leaves with 982 bytes unsent
            with socket.create_connection(("127.0.0.1", server.port)) as conn:
                conn.sendall(partial)
        started = time.monotonic()
        answer = raw_exchange(server.port, partial, wait=30)  # stays: cut after body_seconds
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
        assert time.monotonic() - started < 15
        assert server.client().chat.completions.create(model="legal", messages=QUESTION, max_tokens=2).choices
    assert [record.getMessage() for record in uvicorn_errors] == []


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_api_key_variable_is_refused(cli, monkeypatch, value):
    monkeypatch.setenv("CARTRIDGES_API_KEY", value)
    code, _, err = cli("serve", "--port", str(free_port()))
    assert code == 2 and "CARTRIDGES_API_KEY is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["pickle", "truncated", "another-layer-count", "int8-scale-3e38"])
def test_a_damaged_or_forged_artifact_is_a_400_and_the_server_keeps_serving(running, registry, damage):
    """Checksums and the bound manifest made to agree, as a faulty writer would: each was a 500 (or empty
    answers with a 200 for the infinite prefix) before issue 36."""
    import io

    from registry_helpers import forge
    from safetensors.torch import load_file

    folder = Path(registry.root) / "tax" / "1"
    weights = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    if damage == "pickle":
        buffer = io.BytesIO()
        torch.save({"prompt_embeddings": weights}, buffer)
        forge(folder, raw=buffer.getvalue())
    elif damage == "truncated":
        forge(folder, raw=(folder / "adapter_model.safetensors").read_bytes()[:100])
    elif damage == "another-layer-count":
        manifest = json.loads((folder / "manifest.json").read_text())
        forge(
            folder,
            {"prompt_embeddings": weights[:, : weights.shape[1] // manifest["num_layers"]].contiguous()},
            num_layers=1,
        )
    else:
        values = torch.full_like(weights, 127, dtype=torch.int8)
        forge(
            folder,
            {"prompt_embeddings": values, "prompt_embeddings_scale": torch.full(weights.shape[1:], 3e38)},
            dtype="int8",
        )
    client = running.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tax@1", messages=QUESTION, max_tokens=2)
    expected = {
        "pickle": "registry:tax/1/adapter_model.safetensors: not a readable safetensors file",
        "truncated": "registry:tax/1/adapter_model.safetensors: not a readable safetensors file",
        "another-layer-count": "cartridge tax@1 holds keys and values for 1 layers",
        "int8-scale-3e38": "registry:tax/1: 1536 of 1536 prefix values are NaN or infinite as loaded",
    }[damage]
    assert raised.value.body["message"].startswith(expected), raised.value.body
    assert client.chat.completions.create(model="legal@1", messages=QUESTION, max_tokens=2).choices


def test_streamed_and_whole_answers_are_the_openai_types_on_the_wire(running):
    """Every event of a stream parses as the OpenAI SDK's chunk type, the role first and the reason last;
    the whole answers parse as theirs (the server builds them from typed models, not dict literals)."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = {"model": "legal", "messages": QUESTION, "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=60) as http:
        raw = http.post(running.url + "/chat/completions", json=body).text
        events = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
        assert json.loads(events[-3])["choices"][0]["delta"] == {} and chunks[-1].usage.completion_tokens == 4
        assert len({chunk.id for chunk in chunks}) == 1
        whole = http.post(running.url + "/chat/completions", json={**body, "stream": False}).text
        assert ChatCompletion.model_validate_json(whole).choices[0].message.role == "assistant"
        text = http.post(running.url + "/completions", json={"model": "legal", "prompt": "Rent", "max_tokens": 3})
        assert Completion.model_validate_json(text.text).usage.completion_tokens == 3
