"""Bad input and faults, each through a real HTTP client: malformed bodies, context limits, body size,
adapter paths escaping --adapters-dir, a corrupt and a mismatched adapter beside good ones, a client that
leaves mid-stream, the API key."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest

from tests.serve.helpers import openai_client, save_adapters, save_llama, serving


@pytest.fixture(scope="module")
def root(llama_dir, llama_adapters, tmp_path_factory):
    """An adapters dir with a good adapter, a corrupt one, one made for another base, and a symlink out."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(llama_adapters / "a", root / "good")
    shutil.copytree(llama_adapters / "b", root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    other = save_llama(tmp_path_factory.mktemp("wide") / "wide", hidden=48)
    save_adapters(other, root, ["mismatched"])
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(llama_adapters / "c", outside / "c")
    (root / "escape").symlink_to(outside / "c", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root):
    with serving(llama_dir, root, app_options={"max_body_bytes": 4096}, max_loaded=4) as served:
        yield served


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_symlink_out_of_the_root_is_not_listed(client):
    assert {m.id for m in client.models.list().data} == {"llama", "good", "corrupt", "mismatched"}


def test_malformed_json_and_fields(http):
    assert "malformed JSON" in error(http.post("/v1/completions", content=b'{"model": "good", "prompt": ',
                                               headers={"content-type": "application/json"}), 400)
    assert error(http.post("/v1/completions", json={"model": "good"}), 422).startswith("prompt: Field required")
    assert error(http.post("/v1/completions", json={"model": "good", "prompt": "hi", "temprature": 0}),
                 422).startswith("temprature: Extra inputs are not permitted")
    for field, value in [("temperature", -1), ("temperature", "hot"), ("max_tokens", -1), ("top_p", 0),
                         ("max_tokens", 1e30), ("n", 17), ("stop", ["a", "b", "c", "d", "e"]), ("seed", -1),
                         ("seed", 2**64), ("stop", [""]), ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}),
                         ("logprobs", 21), ("presence_penalty", 2.5), ("top_k", -2), ("min_p", 1.5),
                         ("repetition_penalty", 0)]:
        msg = error(http.post("/v1/completions", json={"model": "good", "prompt": "hi", field: value}), 422)
        assert msg.startswith(f"{field}:"), msg
    assert error(http.post("/v1/classify", json={"model": "good", "input": "x"}), 400).startswith(
        "this server's base model is for sft")


def test_context_limits_and_body_size(client, http):
    long_prompt = " ".join(["cat"] * 70)  # 70 tokens, the context is 64
    with pytest.raises(openai.BadRequestError, match="the prompt is 70 tokens; the model's context is 64"):
        client.completions.create(model="good", prompt=long_prompt, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens=62 with a 3-token prompt passes the model's context"):
        client.completions.create(model="good", prompt="the cat sat", max_tokens=62)
    assert "over the limit of 4096 bytes" in error(http.post("/v1/completions", json={
        "model": "good", "prompt": "cat " * 2000}), 413)

    def chunked():
        yield b'{"model": "good", "prompt": "'
        for _ in range(100):
            yield b"cat " * 20
        yield b'"}'
    assert "over the limit" in error(http.post("/v1/completions", content=chunked(),
                                               headers={"content-type": "application/json"}), 413)


def test_dynamic_loads_stay_inside_adapters_dir(http, client, root):
    outside = root.parent / "elsewhere"
    for path, why in [("../good", "leads outside --adapters-dir"), ("escape", "leads outside --adapters-dir"),
                      (str(outside), "leads outside --adapters-dir"), ("nothing", "no adapter_config.json"),
                      ("x" * 3000, "cannot be opened: File name too long"), ("go\x00od", "holds a NUL character"),
                      ("~/good", "'~' is not expanded"), (str(root / "escape"), "leads outside --adapters-dir")]:
        assert why in error(http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": path}), 400)
    assert "is not allowed" in error(http.post("/v1/load_lora_adapter", json={"lora_name": "../x",
                                                                               "lora_path": "good"}), 400)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "good2", "lora_path": "good"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "good3", "lora_path": str(root / "good")})
    assert r.status_code == 200, r.text  # an absolute path inside --adapters-dir, as vLLM's clients send
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "good3"}).status_code == 200
    one = client.completions.create(model="good", prompt="the cat", max_tokens=4, temperature=0).choices[0].text
    two = client.completions.create(model="good2", prompt="the cat", max_tokens=4, temperature=0).choices[0].text
    assert one == two
    assert "already exists" in error(http.post("/v1/load_lora_adapter", json={"lora_name": "good2",
                                                                                "lora_path": "good"}), 400)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "good2"}).status_code == 200
    assert "'good2' does not exist" in error(http.post("/v1/unload_lora_adapter", json={"lora_name": "good2"}), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="good2", prompt="the cat", max_tokens=2)


def test_broken_adapters_fail_only_their_requests(client):
    for name, why in [("corrupt", "not a readable safetensors file"), ("mismatched", "has shape")]:
        with pytest.raises(openai.InternalServerError, match=f"adapter '{name}' cannot be loaded: .*{why}"):
            client.completions.create(model=name, prompt="the cat", max_tokens=2)
    r = client.completions.create(model="good", prompt="the cat", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert "safetensors" in cards["corrupt"]["error"] and cards["good"]["error"] is None


def test_client_leaving_mid_stream_frees_its_row(server, http, monkeypatch):
    url, engine = server
    step = engine._step

    def slow_step():  # a bigger model: 20 ms per token, so the 55 tokens would take over a second
        time.sleep(0.02)
        step()

    monkeypatch.setattr(engine, "_step", slow_step)
    body = {"model": "good", "prompt": "the cat", "max_tokens": 55, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: {\"id\""), first
        deadline = time.monotonic() + 10  # the first token is sent while its row joins the batch
        while engine.running() != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.running() == 1
        steps = engine.steps
    deadline = time.monotonic() + 20
    while engine.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running() == 0
    assert engine.steps - steps < 54  # dropped before running its 55 tokens


def test_api_key(llama_dir, llama_adapters):
    with serving(llama_dir, adapters={"a": llama_adapters / "a"}, app_options={"api_key": "s3cret"}) as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the static page; it sends the key with its calls
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, api_key="wrong").models.list()
        ok = openai_client(url, api_key="s3cret")
        assert ok.completions.create(model="a", prompt="hi", max_tokens=2).usage.completion_tokens == 2
