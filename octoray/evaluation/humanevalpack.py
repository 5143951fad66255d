"""HumanEvalPack: problem loading, prompt templates, stop sequences and post-processing.

Tables follow bigcode-evaluation-harness ``bigcode_eval/tasks/humanevalpack.py`` (the harness
OctoPack used); where octoray deviates it says so next to the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from octoray.errors import UserError
from octoray.evaluation.config import LANGUAGES, TASKS  # noqa: F401 - the benchmark's names, for its readers
from octoray.evaluation.sandbox.programs import RUST_MAIN
from octoray.modeling import EOS, octocoder_prompt
from octoray.storage.stage_dirs import iter_jsonl

HUB_DATASET = "bigcode/humanevalpack"
_REQUIRED = ("task_id", "prompt", "declaration", "canonical_solution", "buggy_solution", "test",
             "entry_point", "docstring", "instruction")


def check_language(language: str) -> str:
    """``language`` if it is a HumanEvalPack language, else a one-line UserError."""
    if language not in LANGUAGES:
        raise UserError(f"unknown language '{language}': choose from {', '.join(LANGUAGES)}")
    return language


def load_problems(language: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The 164 HumanEvalPack problems of ``language``, as dicts in task_id order.

    ``data_dir`` None loads the hub dataset ``bigcode/humanevalpack`` via ``datasets``;
    a directory reads ``<data_dir>/<language>.jsonl`` (the layout of the hub repo's data files).
    """
    check_language(language)
    if data_dir is None:
        return _load_from_hub(language)
    path = Path(data_dir) / f"{language}.jsonl"
    if not Path(data_dir).is_dir():
        raise UserError(f"HumanEvalPack data directory not found: {data_dir}")
    if not path.is_file():
        raise UserError(f"missing HumanEvalPack file {path} (expected one <language>.jsonl per language)")
    problems = []
    for where, row in iter_jsonl(path):
        missing = [key for key in _REQUIRED if key not in row] if isinstance(row, dict) else ["all"]
        if missing:
            raise UserError(f"{where}: not a HumanEvalPack row (missing {', '.join(missing)})")
        problems.append(row)
    if not problems:
        raise UserError(f"{path} holds no problems")
    return problems


#: What to do instead of the hub, in every hub error: the flag (and key) filter, eval and pipeline share.
LOCAL_HINT = ("pass --humanevalpack-dir DIR (humanevalpack_dir=DIR) with <language>.jsonl files, "
              "e.g. --humanevalpack-dir ../shared/humanevalpack")


def _load_from_hub(language: str) -> list[dict[str, Any]]:
    from octoray.modeling import hub_unreachable, offline_mode

    try:
        import datasets
    except ImportError:
        raise UserError(f"loading HumanEvalPack from the hub needs `pip install datasets`; or {LOCAL_HINT}") from None
    # Offline mode reads the cache at once; otherwise a dead network costs ~25 s of retries.
    if not offline_mode("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        reason = hub_unreachable()
        if reason:
            raise UserError(f"cannot load {HUB_DATASET} from the hub: {reason}; {LOCAL_HINT}")
    try:
        ds = datasets.load_dataset(HUB_DATASET, language, split="test")
    except Exception as exc:  # noqa: BLE001 - offline / hub errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load {HUB_DATASET} ({language}) from the hub: {first}; {LOCAL_HINT}") from None
    return [dict(row) for row in ds]


# --------------------------------------------------------------------------------------------
# Prompts. Instructions, contexts and function starts follow the reference harness
# (bigcode-evaluation-harness, tasks/humanevalpack.py): Fix is "HumanEvalFixTests" (buggy
# function + its unit tests as context), Explain is describe-then-synthesize, Synthesize uses
# the row's ``instruction`` and the full prompt (docstring included) as function start.
# --------------------------------------------------------------------------------------------

#: Prompt templates: OctoCoder's Question/Answer (default), a plain instruct template (context,
#: instruction, then the function start) and pure continuation (Synthesize only: the function
#: start with its docstring, no instruction), as the reference harness's ``--prompt`` choices.
TEMPLATES = ("octocoder", "instruct", "continue")

#: Display names used inside instructions ("Write functional code in C++ ...").
LANGUAGE_NAMES = {"python": "Python", "js": "JavaScript", "java": "Java", "go": "Go", "cpp": "C++",
                  "rust": "Rust"}
#: task_id prefixes in the data set ("CPP/12").
TASK_ID_PREFIXES = {"python": "Python", "js": "JavaScript", "java": "Java", "go": "Go", "cpp": "CPP",
                    "rust": "Rust"}

#: Stop sequences per language, from the reference harness (which took them from CodeGeeX /
#: MultiPL-E), plus the end-of-text token. Brace languages have none: generation stops when the
#: function's braces close (see :func:`is_complete`).
STOP_SEQUENCES: dict[str, tuple[str, ...]] = {
    "python": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert", EOS),
    "js": (EOS,),
    "java": (EOS,),
    "go": ("\n//", "\nfunc main(", "struct", "\nfunc", EOS),
    "cpp": (EOS,),
    "rust": (EOS,),
}

#: Braces already open when the model starts writing: Java's function sits inside ``class Solution {``.
_OPEN_BRACES = {"java": 2, "js": 1, "go": 1, "cpp": 1, "rust": 1}


def language_of_task_id(task_id: str) -> str:
    """``"CPP/3"`` -> ``"cpp"``; a one-line UserError for an id of no HumanEvalPack language."""
    prefix = task_id.split("/", 1)[0]
    for language, name in TASK_ID_PREFIXES.items():
        if name == prefix:
            return language
    raise UserError(f"task_id '{task_id}' is not a HumanEvalPack id (like Python/0, JavaScript/3, CPP/7)")


def function_start(problem: dict[str, Any], language: str, task: str) -> str:
    """The code the model continues: the bare declaration (Fix, Explain) or the full prompt with
    its docstring (Synthesize), as the reference harness's ``get_prompt_base``."""
    if task == "synthesize":
        return problem["prompt"]  # already holds `fn main(){}` for Rust
    if language == "rust":
        return RUST_MAIN + problem["declaration"]
    return problem["declaration"]


def render(template: str, instruction: str, context: str | None, start: str) -> str:
    """One prompt from its parts, stripped at both ends as the reference harness does (a
    trailing newline would make the model's first token an unnatural split of ``\\n    ``)."""
    if template == "continue":
        if context is not None:
            raise UserError("the 'continue' template only fits the synthesize task; use octocoder or instruct")
        return start.strip()
    if context is None:
        inp = instruction
    elif template == "instruct":
        inp = context + "\n" + instruction  # context first, as in the harness's "instruct"
    else:
        inp = instruction + "\n" + context
    if template == "octocoder":
        return f"{octocoder_prompt(inp)}{start}".strip()
    if template == "instruct":
        return f"{inp}\n\n{start}".strip()
    raise UserError(f"unknown prompt template '{template}': choose from {', '.join(TEMPLATES)}")


def fix_prompt(problem: dict[str, Any], language: str, template: str = "octocoder") -> str:
    """HumanEvalFix (tests variant): fix the buggy function given it and its unit tests."""
    start = function_start(problem, language, "fix")
    context = start + problem["buggy_solution"] + "\n" + problem["test"]
    return render(template, f"Fix bugs in {problem['entry_point']}.", context, start)


def describe_prompt(problem: dict[str, Any], language: str, template: str = "octocoder") -> str:
    """Explain, step 1: describe the canonical solution in at most len(docstring) characters."""
    context = function_start(problem, language, "explain") + problem["canonical_solution"]
    instruction = ("Provide a concise natural language description of the code using at most "
                   f"{len(problem['docstring'])} characters.")
    return render(template, instruction, context, "")


def explain_prompt(problem: dict[str, Any], language: str, description: str,
                   template: str = "octocoder") -> str:
    """Explain, step 2: write the function from the model's own description alone."""
    start = function_start(problem, language, "explain")
    instruction = f"Write functional code in {LANGUAGE_NAMES[language]} according to the description."
    return render(template, instruction, description, start)


def synthesize_prompt(problem: dict[str, Any], language: str, template: str = "octocoder") -> str:
    """HumanEvalSynthesize: the row's instruction, then the function start with its docstring."""
    start = function_start(problem, language, "synthesize")
    return render(template, problem["instruction"].strip(), None, start)


def code_prompt(problem: dict[str, Any], language: str, task: str, template: str = "octocoder",
                description: str = "") -> str:
    """The prompt whose completion is code, for ``task`` (Explain needs the step-1 description)."""
    if task == "fix":
        return fix_prompt(problem, language, template)
    if task == "explain":
        return explain_prompt(problem, language, description, template)
    if task == "synthesize":
        return synthesize_prompt(problem, language, template)
    raise UserError(f"unknown task '{task}': choose from {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------------
# Post-processing: cut a completion to the one function the prompt started.
# --------------------------------------------------------------------------------------------

def stop_sequences(language: str) -> tuple[str, ...]:
    """The stop sequences for ``language`` (a fresh tuple: nothing can grow it per call)."""
    return STOP_SEQUENCES[check_language(language)]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the earliest stop sequence."""
    end = len(text)
    for stop in stops:
        pos = text.find(stop)
        if pos != -1:
            end = min(end, pos)
    return text[:end]


def is_complete(language: str, completion: str) -> bool:
    """True once a completion holds a whole function, so generation can stop early.

    Python: a stop sequence or any non-indented line; brace languages: the braces opened by the
    function start are closed (the reference harness's ``check_fn``).
    """
    if any(stop in completion for stop in stop_sequences(language)):
        return True
    if language == "python":
        return any(line.strip() and line[0] not in " \t" for line in completion.split("\n"))
    return completion.count("{") + _OPEN_BRACES[language] <= completion.count("}")


def extract_function(language: str, completion: str) -> str:
    """The completion cut at stop sequences and after the function body ends."""
    code = cut_at_stop(completion.rstrip(), stop_sequences(language))
    if language == "python":
        lines = code.split("\n")
        for i, line in enumerate(lines):
            if line.strip() and line[0] not in " \t":
                return "\n".join(lines[:i])
        return code
    depth = _OPEN_BRACES[language]
    for i, char in enumerate(code):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return code[: i + 1]
    # Never closed: keep up to the last brace (Java: drop a generated main, close the class).
    if language == "java":
        main_pos = code.find("public static void main")
        if main_pos != -1:
            code = code[:main_pos] + "}"
        if "}" in code:
            code = code[: code.rfind("}")] + "}"
        if code.count("{") - 1 == code.count("}"):
            code += "\n}"
        return code
    if "}" in code:
        code = code[: code.rfind("}")] + "}"
    return code


def completion_to_code(problem: dict[str, Any], language: str, task: str, completion: str) -> str:
    """The full function to execute: the function start plus the cut completion."""
    return function_start(problem, language, task).rstrip() + extract_function(language, completion)


def postprocess_description(problem: dict[str, Any], language: str, text: str) -> str:
    """Explain step 1's output: at most len(docstring) characters, cut at stop sequences, with
    long lines copied from the solution removed (so step 2 cannot just read the code back)."""
    text = cut_at_stop(text.strip()[: len(problem["docstring"])], stop_sequences(language)).rstrip()
    for line in problem["canonical_solution"].split("\n"):
        line = line.strip()
        if len(line) > 20 and line in text:
            text = text.replace(line, "")
    return text
