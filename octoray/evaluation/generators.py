"""Sample generators for ``octoray eval --generator``: hf, endpoint, oracle and file.

Every generator turns the selected problems into sample rows
``{task_id, language, task, sample_idx, prompt, completion, description, code}``:
``completion`` is the raw text after the prompt, ``code`` the full function handed to the
sandbox (function start + completion cut to the function), ``description`` Explain's step-1
output. The two model generators (``hf:``, ``endpoint:``) share one driver,
:func:`model_samples`, and differ only in how they turn prompts into completions.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from octoray.errors import UserError
from octoray.evaluation import humanevalpack as hep
from octoray.evaluation.config import ORACLES, EvalConfig, parse_generator
from octoray.storage.stage_dirs import iter_jsonl

#: One sample row, as written to samples.parquet.
Sample = dict[str, Any]
#: Problems selected for the run: language -> problems in data-set order.
Problems = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Request:
    """Ask a model for ``n`` completions of ``prompt``.

    ``language`` set means the completion is code: generation may stop as soon as the function
    is whole. ``stops`` are cut-off strings (the server or the stopping criterion honours them).
    """

    prompt: str
    n: int
    stops: tuple[str, ...]
    language: str | None = None


#: A backend: requests in, ``n`` raw completions per request out (same order).
Backend = Callable[[Sequence[Request]], list[list[str]]]


def generate(cfg: EvalConfig, problems: Problems, all_problems: Problems) -> list[Sample]:
    """Sample rows for every selected problem x task, from the generator ``cfg.generator``.

    ``all_problems`` (before ``--limit``) lets the file generator tell a row outside the slice
    (skipped) from a task_id that does not exist (an error).
    """
    kind, arg = parse_generator(cfg.generator)
    if kind == "oracle":
        return oracle_samples(problems, cfg.tasks, ORACLES[arg], cfg.template)
    if kind == "file":
        return file_samples(Path(arg), problems, all_problems, cfg.tasks, cfg.template)
    backend = hf_backend(arg, cfg) if kind == "hf" else endpoint_backend(arg, cfg)
    return model_samples(backend, problems, cfg.tasks, cfg.n_samples, cfg.template)


# --------------------------------------------------------------------------------------------
# Oracle and file generators
# --------------------------------------------------------------------------------------------

def oracle_samples(problems: Problems, tasks: Sequence[str], field: str, template: str) -> list[Sample]:
    """One sample per problem and task whose code is ``declaration + <field>`` (a known answer:
    canonical passes, buggy fails), to check the harness and toolchains end to end."""
    rows = []
    for language, items in problems.items():
        for problem in items:
            for task in tasks:
                description = problem["docstring"] if task == "explain" else ""
                rows.append(_row(problem, language, task, 0, hep.code_prompt(problem, language, task, template, description),
                                 problem[field], problem["declaration"] + problem[field], description))
    return rows


def file_samples(path: Path, problems: Problems, all_problems: Problems, tasks: Sequence[str],
                 template: str) -> list[Sample]:
    """Samples from a JSONL file of ``{task_id, task, completion}`` rows generated elsewhere.

    ``completion`` is the text the model wrote after the prompt (a leading copy of the function
    start is tolerated); an Explain row may carry its ``description``. Rows of tasks, languages
    or problems outside this run are skipped; samples of one problem and task are numbered in
    file order.
    """
    if not path.is_file():
        raise UserError(f"samples file not found: {path}")
    selected = {(lang, p["task_id"]): p for lang, items in problems.items() for p in items}
    known = {p["task_id"] for items in all_problems.values() for p in items}
    counters: dict[tuple[str, str], int] = {}
    rows = []
    for where, item in iter_jsonl(path):
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object with task_id, task, completion")
        for key in ("task_id", "task", "completion"):
            if not isinstance(item.get(key), str):
                raise UserError(f"{where}: '{key}' must be a string (rows are {{task_id, task, completion}})")
        task, task_id = item["task"], item["task_id"]
        if task not in hep.TASKS:
            raise UserError(f"{where}: unknown task '{task}' (choose from {', '.join(hep.TASKS)})")
        try:
            language = hep.language_of_task_id(task_id)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if language in all_problems and task_id not in known:
            raise UserError(f"{where}: no problem '{task_id}' in HumanEvalPack")
        problem = selected.get((language, task_id))
        if problem is None or task not in tasks:
            continue
        description = str(item.get("description") or "")
        completion = _strip_echoed_start(item["completion"], hep.function_start(problem, language, task))
        idx = counters.get((task_id, task), 0)
        counters[(task_id, task)] = idx + 1
        rows.append(_row(problem, language, task, idx,
                         hep.code_prompt(problem, language, task, template, description), completion,
                         hep.completion_to_code(problem, language, task, completion), description))
    if not rows:
        raise UserError(f"{path} holds no samples for the selected tasks and languages")
    return rows


def _strip_echoed_start(completion: str, start: str) -> str:
    # Harnesses often store prompt-start + generation; keep only what follows the start.
    head = start.strip()
    stripped = completion.lstrip()
    if head and stripped.startswith(head):
        return stripped[len(head):]
    return completion


def _row(problem: dict[str, Any], language: str, task: str, idx: int, prompt: str, completion: str,
         code: str, description: str = "") -> Sample:
    return {"task_id": problem["task_id"], "language": language, "task": task, "sample_idx": idx,
            "prompt": prompt, "completion": completion, "description": description, "code": code}


# --------------------------------------------------------------------------------------------
# Model generators: one driver, two backends
# --------------------------------------------------------------------------------------------

def model_samples(backend: Backend, problems: Problems, tasks: Sequence[str], n_samples: int,
                  template: str) -> list[Sample]:
    """Prompt a model for every problem x task: ``n_samples`` completions each.

    Explain is a chain: step 1 asks for ``n_samples`` descriptions of the canonical solution,
    step 2 asks for one program per description, written from the description alone.
    """
    pairs = [(lang, p) for lang, items in problems.items() for p in items]
    descriptions: dict[str, list[str]] = {}
    if "explain" in tasks:
        requests = [Request(hep.describe_prompt(p, lang, template), n_samples, hep.stop_sequences(lang))
                    for lang, p in pairs]
        for (lang, p), texts in zip(pairs, backend(requests)):
            descriptions[p["task_id"]] = [hep.postprocess_description(p, lang, t) for t in texts]

    keys: list[tuple[str, dict[str, Any], str, str]] = []  # (language, problem, task, description)
    requests = []
    for task in tasks:
        for lang, p in pairs:
            if task == "explain":
                for description in descriptions[p["task_id"]]:
                    keys.append((lang, p, task, description))
                    requests.append(Request(hep.explain_prompt(p, lang, description, template), 1,
                                            hep.stop_sequences(lang), lang))
            else:
                keys.append((lang, p, task, ""))
                requests.append(Request(hep.code_prompt(p, lang, task, template), n_samples,
                                        hep.stop_sequences(lang), lang))
    rows = []
    counters: dict[tuple[str, str], int] = {}
    for (lang, p, task, description), request, texts in zip(keys, requests, backend(requests)):
        for text in texts:
            idx = counters.get((p["task_id"], task), 0)
            counters[(p["task_id"], task)] = idx + 1
            rows.append(_row(p, lang, task, idx, request.prompt, text,
                             hep.completion_to_code(p, lang, task, text), description))
    return rows


def endpoint_backend(base_url: str, cfg: EvalConfig) -> Backend:
    """Completions from an OpenAI-compatible server (``POST {base_url}/completions``).

    At most ``cfg.concurrency`` requests are in flight; connection errors, timeouts, 429 and
    5xx are retried ``cfg.retries`` times with exponential backoff and jitter. A server that
    returns fewer than ``n`` choices is asked again for the rest.
    """
    import requests as http
    from tqdm import tqdm

    url = base_url.rstrip("/") + "/completions"
    session = http.Session()
    model = cfg.endpoint_model or _first_model(session, base_url, cfg.request_timeout_s)

    def post(payload: dict[str, Any]) -> list[str]:
        last = ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (1 + random.random()))
            try:
                response = session.post(url, json=payload, timeout=cfg.request_timeout_s)
            except (http.ConnectionError, http.Timeout) as exc:
                last = type(exc).__name__
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise UserError(f"endpoint {url} rejected a request: HTTP {response.status_code} "
                                f"{response.text.strip()[:200]!r}")
            try:
                choices = sorted(response.json()["choices"], key=lambda c: c.get("index", 0))
                return [str(c["text"]) for c in choices]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"endpoint {url} did not answer like /v1/completions "
                                f"(no choices[].text): {response.text.strip()[:200]!r}") from None
        raise UserError(f"endpoint {url} failed after {cfg.retries + 1} tries (last: {last}); is the server up?")

    def complete(request: Request) -> list[str]:
        texts: list[str] = []
        while len(texts) < request.n:
            got = post({"model": model, "prompt": request.prompt, "n": request.n - len(texts),
                        "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                        "top_p": cfg.top_p, "stop": list(request.stops)})
            if not got:
                raise UserError(f"endpoint {url} returned no choices")
            texts += got
        return texts[: request.n]

    def backend(requests: Sequence[Request]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in requests]
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            futures = {pool.submit(complete, r): i for i, r in enumerate(requests)}
            for future in tqdm(as_completed(futures), total=len(futures), desc="generate (endpoint)", unit="prompt"):
                out[futures[future]] = future.result()
        return out

    return backend


def _first_model(session: Any, base_url: str, timeout: float) -> str:
    # OpenAI-style servers require a model name; ask the server which it serves.
    try:
        response = session.get(base_url.rstrip("/") + "/models", timeout=min(timeout, 30))
        data = response.json().get("data") or []
        if response.status_code == 200 and data and data[0].get("id"):
            return str(data[0]["id"])
    except Exception:  # noqa: BLE001 - /models is optional; any failure means "no name offered"
        pass
    return "default"


def hf_backend(model: str, cfg: EvalConfig) -> Backend:
    """Completions from a Hugging Face causal LM, by Ray Data batch inference on an actor pool.

    Each request is expanded to ``n`` rows (one sampled sequence each); rows are sorted by prompt
    length so a batch pads little, and each pool actor holds one copy of the model.
    """

    def backend(requests: Sequence[Request]) -> list[list[str]]:
        import ray
        from ray.data import ActorPoolStrategy

        rows = [{"rid": i, "prompt": r.prompt, "stops": json.dumps(r.stops), "language": r.language or ""}
                for i, r in enumerate(requests) for _ in range(r.n)]
        rows.sort(key=lambda row: len(row["prompt"]))
        ds = ray.data.from_items(rows).map_batches(
            _HFGenerator,
            fn_constructor_kwargs={"model": model, "cfg": _hf_settings(cfg)},
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.gen_actors),
            num_cpus=cfg.gen_num_cpus,
            num_gpus=cfg.gen_num_gpus,
        )
        out: list[list[str]] = [[] for _ in requests]
        for row in ds.iter_rows():
            out[int(row["rid"])].append(str(row["completion"]))
        return out

    return backend


def _hf_settings(cfg: EvalConfig) -> dict[str, Any]:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_length": cfg.max_length,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


class _HFGenerator:
    """Ray Data actor: loads the model once, then samples one completion per row of a batch."""

    def __init__(self, model: str, cfg: dict[str, Any]) -> None:
        import torch

        from octoray.modeling import load_model, load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_model(model, dtype=dtype).to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", None) or cfg["max_length"]
        self.max_length = min(cfg["max_length"], positions)
        torch.manual_seed(cfg["seed"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        prompts = [str(p) for p in batch["prompt"]]
        max_new = min(self.cfg["max_new_tokens"], self.max_length - 1)
        # Keep the end of an over-long prompt: the function start the model must continue is there.
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length - max_new).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        stop = _StopWhenDone(self.tokenizer, prompt_len, [str(x) for x in batch["language"]],
                             [tuple(json.loads(s)) for s in batch["stops"]])
        sample = self.cfg["temperature"] > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_new, do_sample=sample,
                temperature=self.cfg["temperature"] if sample else None,
                top_p=self.cfg["top_p"] if sample else None,
                stopping_criteria=[stop], pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        return {"rid": batch["rid"], "completion": texts}


class _StopWhenDone:
    """Per-sequence stopping: a stop sequence appeared or (for code) the function is whole.

    Without it every sequence of a brace language would run to ``max_new_tokens``: those
    languages have no stop words; the reference harness stops on closed braces instead.
    (A plain callable: ``generate`` only calls it, and subclassing transformers'
    ``StoppingCriteria`` here would import transformers with this module.)
    """

    def __init__(self, tokenizer: Any, prompt_len: int, languages: list[str],
                 stops: list[tuple[str, ...]]) -> None:
        self.tokenizer, self.prompt_len, self.languages, self.stops = tokenizer, prompt_len, languages, stops

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [any(s in t for s in stops) or bool(lang and hep.is_complete(lang, t))
                for t, lang, stops in zip(texts, self.languages, self.stops)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
