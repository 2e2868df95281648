"""VLLM_CPU_OMP_THREADS_BIND for vLLM's CPU workers (llmserve.engines.vllm.omp_threads_bind):
no vLLM needed."""

from __future__ import annotations

import pytest

from llmserve.engines.vllm import omp_threads_bind


@pytest.mark.parametrize("threads, ranks, cpus, bind", [
    (2, 1, [0, 1], "0,1"),            # one worker: all its threads
    (2, 1, [0, 1, 2, 3], "0,1"),      # only as many CPUs as threads
    (2, 2, [0, 1], "0|1"),            # two stages or ranks: a CPU each
    (4, 2, [0, 1, 2, 3], "0,1|2,3"),
    (3, 2, [4, 5, 6], "4,5|6"),       # the affinity's CPUs, not 0..n-1 (a cpuset)
    (2, 3, [0, 1], "0|1|0"),          # more ranks than CPUs: shared round robin
    (8, 2, [0, 1], "0|1"),            # more threads than CPUs: the CPUs there are
])
def test_each_rank_gets_its_own_cpus(threads, ranks, cpus, bind):
    assert omp_threads_bind(threads, ranks, cpus) == bind
    # vLLM reads one list per worker on this machine, and refuses any other count
    assert len(omp_threads_bind(threads, ranks, cpus).split("|")) == max(1, ranks)
