"""lm-evaluation-harness itself, offline, against ``lorakit serve``: two local tasks written by the test (one
multiple-choice, one generation) scored by ``local-completions`` over HTTP give the same per-sample
log-likelihoods and the same generations as ``--model hf --model_args pretrained=BASE,peft=ADAPTER`` (PEFT
loading lorakit's adapter, no server); ``local-chat-completions`` runs the generation task through the chat
template and matches ``hf`` with ``apply_chat_template``.

The multiple-choice task makes lm-eval send what it always sends for log-likelihoods: ``echo: true,
logprobs: 1, max_tokens: 1`` with several token-id prompts per request.
"""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("peft")

# the tiny word-level tokenizer knows only these words (tests/train/helpers_tokenizer.py)
MC = [
    {"q": "the cat sat on a", "choices": ["mat", "dog ran", "city centre"], "label": 0},
    {"q": "what is two plus two ? it is", "choices": ["four", "two", "hi there"], "label": 0},
    {"q": "a dog", "choices": ["ran", "sat on a mat", "coffee shop"], "label": 0},
    {"q": "say", "choices": ["hi", "hi there", "what"], "label": 1},
    {"q": "the Vaults pub is near the", "choices": ["city centre", "river", "cat"], "label": 0},
]
GEN = [
    {"q": "the cat sat", "a": "on a mat"},
    {"q": "say hi", "a": "hi there"},
    {"q": "what is two plus two ?", "a": "it is four"},
    {"q": "name : The Vaults", "a": "pub"},
]
GEN_TOKENS = 6

TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC_YAML = TASKS + """\
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = TASKS + """\
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: {tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two task YAMLs over local JSONL files and a TaskManager that indexes only them (lm-eval's own 14,000
    task files take about a minute to index)."""
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("lmeval_tasks")
    for name, rows in (("mc", MC), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "lk_mc.yaml").write_text(MC_YAML.format(name="lk_mc", data=d / "mc.jsonl"))
    (d / "lk_gen.yaml").write_text(GEN_YAML.format(name="lk_gen", data=d / "gen.jsonl", tokens=GEN_TOKENS))
    return TaskManager(include_path=str(d), include_defaults=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def evaluate(tasks, names, model, model_args, **kw) -> dict[str, list[dict]]:
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, task_manager=tasks,
                                  log_samples=True, **kw)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}


def loglikelihoods(samples: list[dict]) -> list[float]:
    return [ll for s in samples for (ll, _greedy) in s["filtered_resps"]]


def generations(samples: list[dict]) -> list[str]:
    return [s["filtered_resps"][0] for s in samples]


@pytest.fixture(scope="module")
def reference(tasks, llama_dir, llama_adapters):
    """lm-eval's own ``hf`` model: transformers + PEFT loading adapter ``a``, float32, no server."""
    args = f"pretrained={llama_dir},peft={llama_adapters / 'a'},dtype=float32"
    plain = evaluate(tasks, ["lk_mc", "lk_gen"], "hf", args, batch_size=4, device="cpu")
    chat = evaluate(tasks, ["lk_gen"], "hf", args, batch_size=4, device="cpu", apply_chat_template=True)
    return plain, chat


def test_local_completions_match_offline_hf_with_peft(tasks, server, reference, llama_dir):
    want, _ = reference
    # batch_size=3: lm-eval sends 3 token-id prompts per request; 15 (context, choice) pairs -> 5 requests
    args = (f"model=a,base_url={server.url}/v1/completions,tokenizer={llama_dir},tokenizer_backend=huggingface,"
            "tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=60")
    got = evaluate(tasks, ["lk_mc", "lk_gen"], "local-completions", args, batch_size=3)

    want_ll, got_ll = loglikelihoods(want["lk_mc"]), loglikelihoods(got["lk_mc"])
    assert len(got_ll) == sum(len(r["choices"]) for r in MC)
    # float32 on both sides; the server pads rows of different lengths into one batch, which moves the
    # sums by ~1e-6 per token: 1e-3 (the bound) is far above that and far below a wrong token
    diff = max(abs(a - b) for a, b in zip(want_ll, got_ll, strict=True))
    print(f"largest log-likelihood difference, server vs offline hf+peft: {diff:.2e}")
    assert diff < 1e-3
    assert len({round(x, 3) for x in want_ll}) > len(MC)  # the choices really differ in likelihood
    assert generations(got["lk_gen"]) == generations(want["lk_gen"])
    assert all(len(g.split()) == GEN_TOKENS for g in generations(want["lk_gen"]))  # never stopped early


def test_local_completions_with_the_servers_remote_tokenizer(tasks, server, reference):
    """``tokenizer_backend=auto``: lm-eval probes ``/tokenizer_info`` and ``/tokenize`` and, finding them,
    tokenizes through the server (``/tokenize``, ``/detokenize``) instead of a local tokenizer."""
    from lm_eval.utils import check_remote_tokenizer_support

    assert check_remote_tokenizer_support(server.url + "/v1/completions")
    want, _ = reference
    args = f"model=a,base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1,timeout=60"
    got = evaluate(tasks, ["lk_mc"], "local-completions", args, batch_size=5)
    diff = max(abs(a - b) for a, b in zip(loglikelihoods(want["lk_mc"]), loglikelihoods(got["lk_mc"]),
                                          strict=True))
    assert diff < 1e-3


def test_local_chat_completions_generation_matches_offline_chat(tasks, server, reference):
    _, want = reference
    args = f"model=a,base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1,timeout=60"
    got = evaluate(tasks, ["lk_gen"], "local-chat-completions", args, apply_chat_template=True)
    assert generations(got["lk_gen"]) == generations(want["lk_gen"])
    # real continuations (one stops at the task's "." stop sequence), each its own
    assert sum(len(g.split()) for g in generations(want["lk_gen"])) >= 3 * GEN_TOKENS
    assert len(set(generations(want["lk_gen"]))) == len(GEN)
