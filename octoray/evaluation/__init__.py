"""HumanEvalPack evaluation: prompts and post-processing, the execution sandbox
(``execution.py``, the only module that runs untrusted code), program assembly per language
(``programs.py``) and pass@k."""
