"""The endpoint as real clients use it: chat, fill-in-the-middle, token prompts, log-probabilities,
sampling extras and API keys.

Fast tests check the templates, the wire format and the decoder's new settings without Ray; the
``ray`` tests share one ``octoray serve`` subprocess started with two API keys and
``max_batch_size=4 max_ongoing_requests=4`` (key=value options beside the flags), driven by the
real ``openai`` client (sync, async, streaming) and raw HTTP. Log-probabilities are checked
against a forward pass of the same model loaded in this process (fp32 on CPU).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from octoray import modeling as templates
from octoray.serving.chat_protocol import parse_chat_request
from octoray.serving.protocol import APIError, legacy_logprobs, parse_completion_request
from tests.helpers import REPO_ROOT
from tests.helpers.serve_process import serve_process
from tests.serving.test_app import _free_port, _http

KEYS = ("sk-octoray-test-one", "sk-octoray-test-two")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (StarCoder's special tokens in its tokenizer), saved as ``octoray train``
    exports it: with the OctoCoder chat template in its tokenizer config."""
    from octoray.modeling import build_demo_model, load_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "octoray").rglob("*.py"))]
    out = build_demo_model(tmp_path_factory.mktemp("api") / "model", texts, n_positions=1024)
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = templates.chat_template("octocoder")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from octoray.modeling import load_tokenizer

    return load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from octoray.modeling import load_model

    return load_model(str(model_dir)).eval()


# ------------------------------------------------------------------ templates (one source of truth)

def test_chat_templates_render_the_training_prompts(tokenizer) -> None:
    chat = lambda msgs, name: tokenizer.apply_chat_template(  # noqa: E731
        msgs, chat_template=templates.chat_template(name), tokenize=False, add_generation_prompt=True)
    question = "Fix bugs in add.\ndef add(a, b):\n    return a - b"
    assert chat([{"role": "user", "content": question}], "octocoder") == templates.octocoder_prompt(question)
    assert templates.octocoder_prompt("q") == "Question: q\n\nAnswer:\n"
    # a conversation reads like packed training examples: prompt + completion + EOS, then the next
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert chat(turns, "octocoder") == templates.octocoder_prompt("a") + "b" + tokenizer.eos_token + \
        templates.octocoder_prompt("c")
    assert chat([{"role": "system", "content": "old code"}, {"role": "user", "content": "Fix it"}],
                "commit_tags") == templates.commit_tags_prompt("old code", "Fix it")
    assert templates.commit_tags_prompt("o", "s") == "<commit_before>o<commit_msg>s<commit_after>"


def test_training_and_evaluation_prompts_agree() -> None:
    """Filter rows and HumanEvalPack prompts share the template's bytes; the reference prompts
    (bigcode-evaluation-harness: ``Question: {inp}\\n\\nAnswer:\\n{start}``, stripped) are unchanged."""
    import pyarrow as pa

    from octoray.data.filtering import add_prompts
    from octoray.evaluation.humanevalpack import render

    table = pa.table({"subject": ["Fix add"], "old_contents": ["def add(a, b): return a - b"],
                      "new_contents": ["def add(a, b): return a + b"]})
    row = add_prompts(table, "octocoder").to_pylist()[0]
    assert row["prompt"] == templates.octocoder_prompt("Fix add\ndef add(a, b): return a - b")
    assert render("octocoder", "Fix bugs in add.", "ctx", "def add(") == "Question: Fix bugs in add.\nctx\n\nAnswer:\ndef add("
    assert render("octocoder", "Explain", None, "") == "Question: Explain\n\nAnswer:"
    assert add_prompts(table, "commit_tags").to_pylist()[0]["prompt"] == templates.commit_tags_prompt(
        "def add(a, b): return a - b", "Fix add")
    assert templates.detect_template(["<commit_before>x", "<commit_before>y", "Question: oasst"]) == "commit_tags"
    assert templates.detect_template(["Question: a", "<commit_before>b"]) == "octocoder"


def test_train_exports_the_template_of_its_data(tmp_path: Path) -> None:
    """``octoray train`` gives the exported model the chat template its SFT prompts were written in."""
    import pyarrow as pa

    from octoray.storage.stage_dirs import write_parquet_atomic
    from octoray.training.driver import trained_template
    from octoray.training.train_config import TrainConfig
    from tests.helpers.sft import write_sft

    octo = write_sft(tmp_path / "octo", n=20, oasst=5)
    assert trained_template(TrainConfig(data=str(octo), out=str(tmp_path / "r"))) == templates.chat_template("octocoder")
    tags = write_sft(tmp_path / "tags", n=1)
    rows = [{"prompt": templates.commit_tags_prompt(f"x = {i}", "Bump x"), "completion": f"x = {i + 1}"}
            for i in range(5)] + [{"prompt": templates.octocoder_prompt("hi"), "completion": "hello"}]
    write_parquet_atomic(pa.Table.from_pylist(rows), next(tags.rglob("*.parquet")))
    assert trained_template(TrainConfig(data=str(tags), out=str(tmp_path / "r"))) == \
        templates.chat_template("commit_tags")


def test_demo_tokenizer_has_starcoders_special_tokens(tokenizer) -> None:
    from octoray.modeling import SPECIAL_TOKENS

    for token in SPECIAL_TOKENS:
        ids = tokenizer(token)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token, token
    ids = tokenizer("<fim_prefix>def f():<fim_suffix>\n<fim_middle>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f():\n"


# ------------------------------------------------------------------ the wire format (fast)

def _parse(body: Any, **kwargs: Any):
    return parse_completion_request(json.dumps(body).encode(), **kwargs)


def test_prompt_forms_echo_logprobs_and_extras_parse() -> None:
    assert _parse({"prompt": [5, 6, 7]}).prompts == ((5, 6, 7),)
    assert _parse({"prompt": [[5, 6], [7]]}).prompts == ((5, 6), (7,))
    scoring = _parse({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 5})
    assert (scoring.max_tokens, scoring.echo, scoring.logprobs) == (0, True, 5)
    params = _parse({"prompt": "x", "top_k": -1, "min_p": 0.1, "repetition_penalty": 1.3, "presence_penalty": 1,
                     "frequency_penalty": -0.5, "ignore_eos": True, "min_tokens": 4, "max_tokens": 8,
                     "suffix": "\n", "guided_json": {}, "zzz": 1})
    assert params.sampling() == {"temperature": 1.0, "top_p": 1.0, "stop": (), "top_k": 0, "min_p": 0.1,
                                 "repetition_penalty": 1.3, "presence_penalty": 1.0, "frequency_penalty": -0.5,
                                 "ignore_eos": True, "min_tokens": 4}
    assert params.suffix == "\n" and params.ignored == ("guided_json", "zzz")  # logged, not refused


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 2], "suffix": "s"}, "suffix"),
    ({"prompt": "x", "suffix": "s", "echo": True}, "suffix"),
    ({"prompt": "x", "suffix": 3}, "suffix"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
])
def test_bad_completion_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        _parse(body)
    assert info.value.status == 400 and info.value.param == param


def test_chat_request_parses() -> None:
    chat = parse_chat_request(json.dumps({
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 9, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3, "n": 2,
        "stop": ["\n"], "top_k": 5, "tools": []}).encode())
    assert chat.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})
    params = chat.completion
    assert (params.max_tokens, params.logprobs, params.n, params.stop, params.top_k) == (7, 3, 2, ("\n",), 5)
    assert params.ignored == ("tools",)
    assert parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}]}').completion.max_tokens is None
    for body, param in (({}, "messages"), ({"messages": []}, "messages"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
                         "max_completion_tokens")):
        with pytest.raises(APIError) as info:
            parse_chat_request(json.dumps(body).encode())
        assert info.value.status == 400 and info.value.param == param, body


def test_legacy_logprobs_shape() -> None:
    out = legacy_logprobs([("def", None, None), (" f", -0.5, [(" f", -0.5), (" g", -1.0)]), ("()", -2.0, [])], 3)
    assert out == {"tokens": ["def", " f", "()"], "token_logprobs": [None, -0.5, -2.0],
                   "top_logprobs": [None, {" f": -0.5, " g": -1.0}, {}], "text_offset": [3, 6, 8]}


def test_api_key_flags_repeat_and_key_values_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from octoray.serving import app
    from octoray.stage_cli import parse

    cfg = parse("serve", ["m", "--api-key", "k1", "max_batch_size=4", "--api-key", "k2", "max_ongoing_requests=4",
                          "--port", "9000"], app, check_inputs=False).configs[0]
    assert (cfg.api_key, cfg.max_batch_size, cfg.max_ongoing_requests, cfg.port) == (("k1", "k2"), 4, 4, 9000)
    assert "k1" not in repr(cfg)  # a config printed in an error or a log never shows a key
    monkeypatch.setenv("OCTORAY_API_KEY", "env-key")
    monkeypatch.setattr(app, "_preflight", lambda cfg: (cfg.model, 2048))
    assert app.resolve(parse("serve", ["m"], app, check_inputs=False).configs[0]).api_key == ("env-key",)
    assert app.resolve(cfg).api_key == ("k1", "k2")  # the flag wins over the environment
    # what Ray records as the driver's entrypoint
    assert app.redact_keys(["octoray", "serve", "m", "--api-key", "k1", "--api-key=k2", "api_key=k3", "port=1"]) == \
        ["octoray", "serve", "m", "--api-key", "***", "--api-key=***", "api_key=***", "port=1"]


def test_vllm_config_maps_the_same_options() -> None:
    from octoray.errors import UserError
    from octoray.serving.app import vllm_llm_config
    from octoray.serving.config import ServeConfig

    cfg = ServeConfig(model="/m", model_name="octo", max_model_len=2048, max_batch_size=8, max_ongoing_requests=16,
                      dtype="bfloat16", min_replicas=1, max_replicas=3)
    mapped = vllm_llm_config(cfg, has_template=False)
    assert mapped["model_loading_config"] == {"model_id": "octo", "model_source": "/m"}
    assert mapped["engine_kwargs"] == {"max_model_len": 2048, "max_num_seqs": 8, "dtype": "bfloat16",
                                       "chat_template": templates.chat_template("octocoder")}
    assert mapped["deployment_config"]["max_ongoing_requests"] == 16
    assert mapped["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    assert "chat_template" not in vllm_llm_config(cfg, has_template=True)["engine_kwargs"]
    assert mapped["experimental_configs"] == {"stream_batching_interval_ms": 50.0}
    with pytest.raises(UserError, match="api_key is not enforced by engine=vllm"):
        vllm_llm_config(ServeConfig(model="/m", api_key=("k",)), has_template=True)


def test_vllm_config_is_accepted_by_ray_serve_llm() -> None:
    """Ray Serve LLM's own schema takes the mapping (ray.serve.llm imports only beside vLLM: GPU machines)."""
    pytest.importorskip("vllm", reason="ray.serve.llm needs vLLM (a GPU machine)")
    from ray.serve.llm import LLMConfig

    from octoray.serving.app import vllm_llm_config
    from octoray.serving.config import ServeConfig

    LLMConfig(**vllm_llm_config(ServeConfig(model="/m", model_name="octo", max_model_len=2048), has_template=False))


# ------------------------------------------------------------------ the decoder's new settings (torch, no Ray)

@pytest.fixture(scope="module")
def decoder(model, tokenizer):
    from octoray.serving.decoding import BatchDecoder

    return BatchDecoder(model, tokenizer)


def _seq(tokenizer, prompt: str, max_tokens: int = 12, **kwargs: Any):
    from octoray.serving.decoding import Sequence

    return Sequence(prompt_ids=tokenizer(prompt)["input_ids"], max_tokens=max_tokens, **kwargs)


def test_logit_adjustments_row_by_row() -> None:
    import torch

    from octoray.serving.decoding import Sequence, adjust_logits, truncate

    logits = torch.tensor([[3.0, 1.0, -1.0, 0.5]] * 4)
    seqs = [Sequence(prompt_ids=[1], max_tokens=8, ignore_eos=True),
            Sequence(prompt_ids=[1], max_tokens=8, min_tokens=2, token_ids=[2], generated=1),
            Sequence(prompt_ids=[1, 2], max_tokens=8, repetition_penalty=2.0),
            Sequence(prompt_ids=[0], max_tokens=8, presence_penalty=0.5, frequency_penalty=0.25,
                     token_ids=[3, 3, 1], generated=3)]
    out = adjust_logits(logits, seqs, frozenset({0}))
    assert out[0].tolist() == [float("-inf"), 1.0, -1.0, 0.5] and out[1][0] == float("-inf")
    assert out[2].tolist() == [3.0, 0.5, -2.0, 0.5]  # seen tokens: positive / 2, negative * 2
    assert out[3].tolist() == [3.0, 1.0 - 0.75, -1.0, 0.5 - 1.0]  # count * 0.25 + 0.5 if present
    assert adjust_logits(logits, [Sequence(prompt_ids=[1], max_tokens=8)] * 4, frozenset({0})) is logits
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2)
    kept = truncate(probs, [Sequence(prompt_ids=[1], max_tokens=1, top_k=2),
                            Sequence(prompt_ids=[1], max_tokens=1, min_p=0.25)])
    assert torch.allclose(kept[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(kept[1], torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)


def test_decoder_decodes_as_the_tokenizer(decoder, tokenizer) -> None:
    """The decoder's shortcut to the ``tokenizers`` backend gives ``tokenizer.decode``'s text,
    special tokens (FIM, commit tags, EOS) dropped, and is taken for the demo tokenizer."""
    import random

    assert decoder._backend is not None
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    for _ in range(200):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        assert decoder.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_nucleus_equals_the_full_sort() -> None:
    """The threshold keeps exactly the tokens the definition (sort the whole vocabulary, drop a
    token once the mass before it reaches top_p) keeps, flat rows (whose nucleus is wider than the
    top-k candidates) included; ties at the threshold all stay."""
    import torch

    from octoray.serving.decoding import nucleus

    def by_sorting(probs, top_p):
        ordered, order = probs.sort(dim=-1, descending=True)
        drop = ((ordered.cumsum(-1) - ordered) >= top_p[:, None]) & (top_p[:, None] < 1)
        return probs.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), 0.0)

    generator = torch.Generator().manual_seed(0)
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.95, 0.99, 1.0, 0.999, 0.7])
    wide = 0
    for vocab in (50, 2048, 49152):
        for scale in (0.3, 1.0, 3.0, 8.0):
            probs = torch.softmax(torch.randn(8, vocab, generator=generator) * scale, -1)
            assert torch.equal(nucleus(probs, top_p), by_sorting(probs, top_p)), (vocab, scale)
            wide += int(((probs.topk(min(64, vocab)).values.sum(-1) < top_p) & (top_p < 1)).sum())
    assert wide > 0  # the fallback was exercised too
    # tokens tied with the least likely member all stay (a sort would keep an arbitrary subset)
    tied = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]] * 2)
    assert (nucleus(tied, torch.tensor([0.4, 0.6])) > 0).tolist() == [[True, True, True, True, False]] * 2


def test_sampling_extras_in_the_decoder(decoder, tokenizer) -> None:
    prompt = "def add(a, b):"
    greedy = _seq(tokenizer, prompt, temperature=0.0, max_tokens=16)
    top1 = _seq(tokenizer, prompt, temperature=1.0, top_k=1, seed=3, max_tokens=16)
    min_p1 = _seq(tokenizer, prompt, temperature=1.5, min_p=1.0, seed=4, max_tokens=16)
    norepeat = _seq(tokenizer, prompt, temperature=0.0, repetition_penalty=1e6, max_tokens=16)
    long = _seq(tokenizer, prompt, temperature=1.0, seed=5, ignore_eos=True, max_tokens=40)
    decoder.generate([greedy, top1, min_p1, norepeat, long])
    assert top1.token_ids == greedy.token_ids and min_p1.token_ids == greedy.token_ids
    seen = norepeat.prompt_ids + norepeat.token_ids
    assert len(set(seen)) == len(seen)  # a huge repetition penalty: no token twice
    assert (long.generated, long.finish_reason) == (40, "length") and decoder.eos_ids.isdisjoint(long.token_ids)


def test_min_tokens_passes_over_stop_strings(decoder, tokenizer) -> None:
    """Before ``min_tokens`` a stop string does not end the sequence (vLLM's rule); after, it does."""
    prompt = "def add(a, b):"
    free = _seq(tokenizer, prompt, temperature=0.0, ignore_eos=True, max_tokens=16)
    decoder.generate([free])
    stop = free.text.strip()[:2]
    assert stop, "the model's greedy text has no visible characters to stop at"
    held = _seq(tokenizer, prompt, temperature=0.0, ignore_eos=True, max_tokens=16, stop=(stop,), min_tokens=8)
    early = _seq(tokenizer, prompt, temperature=0.0, ignore_eos=True, max_tokens=16, stop=(stop,))
    decoder.generate([held, early])
    assert early.finish_reason == "stop" and stop not in early.text and early.generated < 8
    # the same tokens as without a stop string until min_tokens, where stop strings count again
    assert held.generated >= 8 and held.token_ids == free.token_ids[:len(held.token_ids)]
    assert held.finish_reason == ("stop" if held.generated < 16 else held.finish_reason)
    assert len(held.text) > len(early.text) and free.text.startswith(held.text)


def test_recorded_logprobs_match_a_forward_pass(decoder, model, tokenizer) -> None:
    import torch

    from octoray.serving.decoding import prompt_logprobs

    seq = _seq(tokenizer, "class Config:\n    def", temperature=0.0, max_tokens=10, logprobs=3)
    other = _seq(tokenizer, "x", temperature=0.7, seed=1, max_tokens=10, logprobs=0)
    decoder.generate([seq, other])
    ids = seq.prompt_ids + seq.token_ids
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for k, (token, (lp, top)) in enumerate(zip(seq.token_ids, seq.sampled_logprobs)):
        at = len(seq.prompt_ids) - 1 + k
        assert lp == pytest.approx(logp[at, token].item(), abs=1e-4)
        assert [t for t, _ in top] == logp[at].topk(3).indices.tolist() and top[0][0] == token  # greedy
    assert len(other.sampled_logprobs) == other.generated and all(top == [] for _, top in other.sampled_logprobs)
    # prompt scoring: the mean of its log-probabilities is minus the model's own LM loss
    scores = prompt_logprobs(model, ids, 2)
    with torch.inference_mode():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert -sum(lp for lp, _ in scores) / len(scores) == pytest.approx(loss, abs=1e-4)


def test_fim_refused_for_a_tokenizer_without_fim_tokens(tokenizer) -> None:
    """The replica's prompt path (no Ray): FIM wraps in StarCoder's order, or a 400 naming why."""
    from transformers import PreTrainedTokenizerFast

    from octoray.modeling import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
    from octoray.serving.config import ServeConfig
    from octoray.serving.replica import CompletionServer, _has_fim_tokens

    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(): pass"] * 10, vocab_size=300, special_tokens=["<|endoftext|>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    assert _has_fim_tokens(tokenizer) and not _has_fim_tokens(plain)
    server = CompletionServer.__new__(CompletionServer)
    server.cfg, server.max_model_len = ServeConfig(model="m", model_name="m"), 1024
    server.tokenizer, server.fim = tokenizer, True
    assert server._prompt_ids("a", "b", 4) == tokenizer(f"{FIM_PREFIX}a{FIM_SUFFIX}b{FIM_MIDDLE}")["input_ids"]
    server.tokenizer, server.fim = plain, False
    with pytest.raises(APIError) as info:
        server._prompt_ids("a", "b", 4)
    assert (info.value.status, info.value.param, info.value.code) == (400, "suffix", "fim_unsupported")
    assert "<fim_prefix>" in info.value.message
    assert server._prompt_ids("a", "", 4) == plain("a")["input_ids"]  # an empty suffix: a plain completion


# ------------------------------------------------------------------ one real server with API keys (Ray Serve)

class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, model: str, session: Path) -> None:
        self.url, self.proc, self.log, self.model, self.session = url, proc, log, model, session

    def post(self, path: str, body: Any, key: str | None = KEYS[0]) -> tuple[int, Any]:
        return _authed("POST", f"{self.url}{path}", body, key)


def _authed(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode()
    return status, json.loads(text) if text.startswith("{") else text


@pytest.fixture(scope="module")
def server(model_dir: Path, ray_local, tmp_path_factory: pytest.TempPathFactory):
    """``octoray serve MODEL --api-key K1 --api-key K2 max_batch_size=4 max_ongoing_requests=4``."""
    port = _free_port()
    log = tmp_path_factory.mktemp("api-log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "OCTORAY_API_KEY"}
    url = f"http://127.0.0.1:{port}/v1"
    with serve_process(model_dir, port, ray_local.get_runtime_context().gcs_address, log,
                       lambda: _authed("GET", f"{url}/models", key=KEYS[1])[0] == 200,
                       ("--api-key", KEYS[0], "max_batch_size=4", "--api-key", KEYS[1], "max_ongoing_requests=4",
                        "batch_wait_timeout_s=0.02", "app_name=octoray-api"), env=env) as proc:
        from ray._private.worker import global_worker

        session = Path(global_worker.node.get_session_dir_path())
        yield Server(url, proc, log, str(model_dir), session)


@pytest.mark.ray
def test_every_v1_route_needs_a_key_and_health_does_not(server: Server) -> None:
    from openai import AuthenticationError, OpenAI

    for method, path, body in (("GET", "/models", None), ("POST", "/completions", {"prompt": "x"}),
                               ("POST", "/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("POST", "/no/such/route", {})):
        for key in (None, "sk-wrong", KEYS[0][:-1]):
            status, answer = _authed(method, server.url + path, body, key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, key, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
    status, _ = _http("GET", server.url.removesuffix("/v1") + "/healthz")
    assert status == 200
    for key in KEYS:
        assert _authed("GET", f"{server.url}/models", key=key)[0] == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()


@pytest.mark.ray
def test_chat_plain_streamed_and_async_with_the_openai_client(server: Server, tokenizer) -> None:
    from openai import AsyncOpenAI, OpenAI

    client = OpenAI(base_url=server.url, api_key=KEYS[1], max_retries=0)
    question = "Write a function that adds two numbers."
    messages = [{"role": "user", "content": question}]
    result = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    choice = result.choices[0]
    assert result.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop") and 0 < result.usage.completion_tokens <= 10
    # the chat template was applied: the same tokens and text as the OctoCoder prompt on /v1/completions
    prompt = templates.octocoder_prompt(question)
    assert result.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0)
    assert choice.message.content == plain.choices[0].text
    stream = client.chat.completions.create(model=server.model, messages=messages, max_completion_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == \
        result.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    async def concurrently() -> list[Any]:
        client = AsyncOpenAI(base_url=server.url, api_key=KEYS[0], max_retries=0)
        calls = [client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, n=2,
                                                temperature=1.0, seed=s, stop=["\n\n"]) for s in (1, 2, 1)]
        return await asyncio.gather(*calls)

    one, two, again = asyncio.run(concurrently())
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]  # seeded
    assert [c.index for c in two.choices] == [0, 1] and one.choices[0].message.content != one.choices[1].message.content


@pytest.mark.ray
def test_chat_logprobs_and_malformed_chat(server: Server, model, tokenizer) -> None:
    import torch

    status, body = server.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 5, "temperature": 0, "logprobs": True,
                                                     "top_logprobs": 2})
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    from openai import OpenAI

    stream = OpenAI(base_url=server.url, api_key=KEYS[0], max_retries=0).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-6)
    ids = tokenizer(templates.octocoder_prompt("hi"))["input_ids"]
    generated = tokenizer(body["choices"][0]["message"]["content"])["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + generated])).logits[0].float(), -1)
    for k, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(logp[len(ids) - 1 + k].max().item(), abs=1e-4)  # greedy: the best
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["bytes"] == list(entry["token"].encode())
    for request, param in (({"messages": "hi"}, "messages"),
                           ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                           ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
                           ({"messages": [{"role": "user", "content": "x" * 5000}]}, "prompt")):
        status, answer = server.post("/chat/completions", request)
        assert status == 400 and answer["error"]["param"] == param, answer
    status, answer = server.post("/chat/completions", b"{nope")
    assert status == 400 and answer["error"]["code"] == "invalid_json"


@pytest.mark.ray
def test_fim_token_prompts_and_echo(server: Server, tokenizer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key=KEYS[0], max_retries=0)
    fim = client.completions.create(model=server.model, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))",
                                    max_tokens=8, temperature=0)
    wrapped = "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))<fim_middle>"
    same = client.completions.create(model=server.model, prompt=wrapped, max_tokens=8, temperature=0)
    assert fim.choices[0].text == same.choices[0].text
    assert fim.usage.prompt_tokens == len(tokenizer(wrapped)["input_ids"])
    # token prompts: one list of ids, a list of lists; echo gives back their detokenisation
    ids = tokenizer("for i in range(3):")["input_ids"]
    text = client.completions.create(model=server.model, prompt="for i in range(3):", max_tokens=6, temperature=0)
    one = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert one.choices[0].text == "for i in range(3):" + text.choices[0].text
    many = client.completions.create(model=server.model, prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == text.choices[0].text
    status, answer = server.post("/completions", {"prompt": [len(tokenizer) + 5], "max_tokens": 2})
    assert status == 400 and answer["error"]["param"] == "prompt" and "vocabulary" in answer["error"]["message"]
    # streamed echo: the prompt first, then the completion
    status, raw = server.post("/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": True,
                                               "stream": True})
    pieces = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in raw.split("\n\n")[:-2] if e]
    assert status == 200 and "".join(pieces) == one.choices[0].text


@pytest.mark.ray
def test_logprobs_and_prompt_scoring_match_a_forward_pass(server: Server, model, tokenizer) -> None:
    import torch

    prompt = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    status, body = server.post("/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == prompt and body["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    for k in range(1, len(ids)):
        assert lp["token_logprobs"][k] == pytest.approx(logp[k - 1, ids[k]].item(), abs=1e-4)
        assert max(lp["top_logprobs"][k].values()) == pytest.approx(logp[k - 1].max().item(), abs=1e-4)
    assert "".join(lp["tokens"]) == prompt and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    # generated tokens: greedy, so each is the model's best; the offsets continue after the echo
    status, body = server.post("/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True,
                                                "logprobs": 1})
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + body["usage"]["completion_tokens"] - (
        body["choices"][0]["finish_reason"] == "stop")
    assert lp["text_offset"][len(ids)] == len(prompt) and "".join(lp["tokens"]) == body["choices"][0]["text"]
    # streamed: each chunk carries the records of the tokens its text completes; all of them
    # together are the unstreamed answer's, offsets included (greedy, so the same tokens)
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key=KEYS[0], max_retries=0)
    for echo in (False, True):
        plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                          logprobs=2, echo=echo, extra_body={"ignore_eos": True})
        chunks = [c.choices[0] for c in client.completions.create(
            model=server.model, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, echo=echo, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        assert "".join(c.text for c in chunks) == plain.choices[0].text
        joined = {key: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, key)]
                  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        want = plain.choices[0].logprobs
        assert joined["tokens"] == want.tokens and joined["text_offset"] == want.text_offset
        assert joined["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-6)
        assert [sorted(t) for t in joined["top_logprobs"][1:]] == [sorted(t) for t in want.top_logprobs[1:]]


@pytest.mark.ray
def test_sampling_options_and_unknown_fields(server: Server) -> None:
    base = {"prompt": "import os\n", "max_tokens": 12}
    greedy = server.post("/completions", {**base, "temperature": 0})[1]["choices"][0]["text"]
    for extra in ({"top_k": 1, "seed": 3}, {"min_p": 1.0, "temperature": 1.5, "seed": 4}):
        status, body = server.post("/completions", {**base, **extra})
        assert status == 200 and body["choices"][0]["text"] == greedy, extra
    status, body = server.post("/completions", {**base, "max_tokens": 30, "ignore_eos": True, "min_tokens": 30,
                                                "seed": 1})
    assert body["usage"]["completion_tokens"] == 30 and body["choices"][0]["finish_reason"] == "length"
    penalised = [server.post("/completions", {**base, "temperature": 0, key: value})[1]["choices"][0]["text"]
                 for key, value in (("repetition_penalty", 1e6), ("presence_penalty", 2.0), ("frequency_penalty", 2.0))]
    assert penalised[0] != greedy  # the tiny random model's greedy text repeats itself; the penalty forbids it
    status, body = server.post("/completions", {**base, "temperature": 0, "guided_regex": "x+", "mirostat": 1})
    assert status == 200 and body["choices"][0]["text"] == greedy  # ignored, not refused
    status, body = server.post("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                     "tools": [], "top_k": 3, "repetition_penalty": 1.1})
    assert status == 200, body
    deadline = time.monotonic() + 10  # worker output reaches its log file asynchronously
    while "ignoring unknown request fields: guided_regex, mirostat" not in _session_logs(server):
        assert time.monotonic() < deadline, "the replica did not log the ignored fields"
        time.sleep(0.5)


def _session_logs(server: Server) -> str:
    """Every log file of the Ray session (replicas' own logs and their workers' stdout/stderr)."""
    return "".join(p.read_text(errors="replace") for p in (server.session / "logs").rglob("*")
                   if p.is_file() and p.suffix in (".log", ".err", ".out") and p.stat().st_size < 50_000_000)


@pytest.mark.ray
def test_keys_never_logged_and_ctrl_c(server: Server) -> None:
    """Last test of the module: stops the shared server, then no log of Ray's session or the
    server names a key."""
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=90) == 0, server.log.read_text()[-3000:]
    from ray.util.state import list_jobs

    logs = server.log.read_text() + _session_logs(server)
    logs += " ".join(str(job.entrypoint) for job in list_jobs())  # Ray records each driver's command line
    assert "Bearer" not in server.log.read_text()
    for key in KEYS:
        assert key not in logs, key
