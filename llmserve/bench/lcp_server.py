"""llama-cpp-python's own OpenAI server (the benchmark's baseline) with llama.cpp weight
repacking chosen as llmserve chooses it: that server has no setting for it, and on CPUs
where repacking crashes (engines/cpu.py) the baseline must run too.

    python -m llmserve.bench.lcp_server [llama_cpp.server's flags]
"""

from __future__ import annotations

import os
import runpy

import llama_cpp.llama_cpp as lc

from llmserve.engines.cpu import weight_repack_enabled


def main() -> None:
    repack = weight_repack_enabled(os.environ.get("LLMSERVE_WEIGHT_REPACK", "auto"))  # type: ignore[arg-type]
    default_params = lc.llama_model_default_params

    def model_params() -> lc.llama_model_params:
        params = default_params()
        params.use_extra_bufts = repack
        return params

    lc.llama_model_default_params = model_params  # what llama_cpp.Llama reads its defaults from
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
