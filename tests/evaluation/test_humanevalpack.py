"""HumanEvalPack loading, prompt building, stop sequences and post-processing (fast, no Ray)."""

from __future__ import annotations

import json

import pytest

from octoray.errors import UserError
from octoray.evaluation import (
    humanevalpack as hep,  # Text a model typically writes after the function: another function / a main.
)

TRAILERS = {
    "python": "\n\n\ndef check(candidate):\n    assert candidate(1)\n",
    "js": "\n\nconsole.log(f(1))\nconst g = () => { return 2 }\n",
    "java": "\n\n    public static void main(String[] args) { }\n}\n",
    "go": "\n\nfunc main() {\n    fmt.Println(1)\n}\n",
    "cpp": "\nint main(){\n    return 0;\n}\n",
    "rust": "\n\nfn helper() -> i32 { 1 }\n",
}


@pytest.fixture(scope="module")
def problems(shared_dir):
    return {lang: hep.load_problems(lang, shared_dir / "humanevalpack") for lang in hep.LANGUAGES}


def test_load_problems_every_language(problems) -> None:
    for lang, items in problems.items():
        assert len(items) == 164
        assert items[0]["task_id"] == f"{hep.TASK_ID_PREFIXES[lang]}/0"
        assert hep.language_of_task_id(items[-1]["task_id"]) == lang


def test_load_problems_errors(tmp_path, shared_dir) -> None:
    with pytest.raises(UserError, match="unknown language 'cobol'"):
        hep.load_problems("cobol", shared_dir / "humanevalpack")
    with pytest.raises(UserError, match="data directory not found"):
        hep.load_problems("python", tmp_path / "nope")
    with pytest.raises(UserError, match="missing HumanEvalPack file .*python.jsonl"):
        hep.load_problems("python", tmp_path)
    (tmp_path / "go.jsonl").write_text('{"task_id": "Go/0"}\n{oops\n')
    with pytest.raises(UserError, match=r"go.jsonl:1: not a HumanEvalPack row \(missing prompt"):
        hep.load_problems("go", tmp_path)


@pytest.mark.parametrize("language", hep.LANGUAGES)
def test_octocoder_fix_prompt(problems, language: str) -> None:
    p = problems[language][3]
    prompt = hep.fix_prompt(p, language)
    start = hep.function_start(p, language, "fix")
    assert prompt.startswith(f"Question: Fix bugs in {p['entry_point']}.\n")
    assert p["buggy_solution"] in prompt and p["test"].strip() in prompt
    assert prompt.endswith("\n\nAnswer:\n" + start.rstrip())  # only the end is stripped
    assert p["canonical_solution"] not in prompt
    if language == "rust":
        assert start.startswith("fn main(){}\n")  # the reference harness prepends a main


@pytest.mark.parametrize("language", hep.LANGUAGES)
def test_synthesize_prompt_templates(problems, language: str) -> None:
    p = problems[language][5]
    octo = hep.synthesize_prompt(p, language)
    assert octo == f"Question: {p['instruction'].strip()}\n\nAnswer:\n{p['prompt']}".strip()
    assert hep.synthesize_prompt(p, language, "instruct") == f"{p['instruction'].strip()}\n\n{p['prompt']}".strip()
    assert hep.synthesize_prompt(p, language, "continue") == p["prompt"].strip()
    with pytest.raises(UserError, match="continue"):
        hep.fix_prompt(p, language, "continue")


def test_instruct_template_puts_context_first(problems) -> None:
    p = problems["python"][0]
    prompt = hep.fix_prompt(p, "python", "instruct")
    assert prompt.index(p["buggy_solution"]) < prompt.index("Fix bugs in has_close_elements.")


def test_explain_chain_prompts(problems) -> None:
    p = problems["cpp"][2]
    describe = hep.describe_prompt(p, "cpp")
    assert f"using at most {len(p['docstring'])} characters." in describe
    assert p["canonical_solution"].strip() in describe and describe.endswith("Answer:")
    step2 = hep.explain_prompt(p, "cpp", "Returns the decimal part.")
    assert step2.startswith("Question: Write functional code in C++ according to the description.\n"
                            "Returns the decimal part.\n\nAnswer:\n")
    assert p["docstring"].strip() not in step2 and p["canonical_solution"] not in step2


def test_stop_sequences_are_per_language_and_never_grow() -> None:
    assert "\ndef" in hep.stop_sequences("python") and "\nfunc" in hep.stop_sequences("go")
    for lang in hep.LANGUAGES:
        first = hep.stop_sequences(lang)
        assert first[-1] == hep.EOS
        assert hep.stop_sequences(lang) == first  # the reference's list.extend bug grew these
    assert hep.cut_at_stop("a\nprint(1)\ndef f", hep.stop_sequences("python")) == "a"


@pytest.mark.parametrize("language", hep.LANGUAGES)
def test_extract_function_recovers_every_canonical_solution(problems, language: str) -> None:
    # A "model" that writes the canonical body then rambles on: the cut must give the body back.
    # Canonical solutions with helper functions after the main one are cut by design (the
    # reference keeps one function), so they are counted, not compared.
    whole = 0
    for p in problems[language]:
        body = "\n" + p["canonical_solution"].rstrip()
        if hep.extract_function(language, body) != body:
            continue
        whole += 1
        assert hep.extract_function(language, body + TRAILERS[language]).rstrip() == body, p["task_id"]
    assert whole >= 150


def test_is_complete() -> None:
    assert not hep.is_complete("python", "\n    x = 1\n    return x")
    assert hep.is_complete("python", "\n    return x\n\nprint(f(1))")
    assert hep.is_complete("python", "\n    return x\n<|endoftext|>")
    assert not hep.is_complete("js", "\n  if (a) {\n    return 1;\n  }\n")
    assert hep.is_complete("js", "\n  if (a) {\n    return 1;\n  }\n}")
    assert not hep.is_complete("java", "\n        return 1;\n    }\n")  # class still open
    assert hep.is_complete("java", "\n        return 1;\n    }\n}")


def test_extract_function_unclosed_java_closes_class() -> None:
    code = hep.extract_function("java", "\n        return 1;\n    }\n    public static void main(String[] a) {")
    assert code.rstrip().endswith("}") and code.count("}") == 2


def test_completion_to_code_joins_start_and_cut_completion(problems) -> None:
    p = problems["go"][0]
    code = hep.completion_to_code(p, "go", "fix", "\n" + p["canonical_solution"] + "\nfunc main() {}\n")
    assert code == p["declaration"].rstrip() + "\n" + p["canonical_solution"].rstrip()


def test_postprocess_description(problems) -> None:
    p = problems["python"][0]
    long_line = "for idx, elem in enumerate(numbers):"
    text = f"It checks pairs. {long_line} then compares.\n# trailing" + "x" * 500
    out = hep.postprocess_description(p, "python", text)
    assert len(out) <= len(p["docstring"])
    assert long_line not in out and "# trailing" not in out and out.startswith("It checks pairs.")


def test_language_of_task_id() -> None:
    assert hep.language_of_task_id("JavaScript/3") == "js"
    assert hep.language_of_task_id("CPP/163") == "cpp"
    with pytest.raises(UserError, match="not a HumanEvalPack id"):
        hep.language_of_task_id("Kotlin/1")
    json.dumps(hep.TASK_ID_PREFIXES)  # plain data, usable in configs and docs
