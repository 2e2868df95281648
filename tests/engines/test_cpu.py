"""CPU flags and the weight-repack choice, without needing any particular CPU."""

from __future__ import annotations

import pytest

import os

from llmserve.engines.cpu import cpu_flags, usable_cpus, weight_repack_enabled

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse2 avx2 avx512f avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9354 32-Core Processor
flags\t\t: fpu vme sse2 avx2 avx512f avx512_vnni avx512_bf16
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp i8mm bf16
"""


def test_flags_are_read_from_x86_and_arm_cpuinfo():
    assert {"amx_tile", "avx512f"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert "amx_tile" not in cpu_flags(EPYC) and "avx2" in cpu_flags(EPYC)
    assert {"asimd", "i8mm"} <= cpu_flags(GRAVITON)
    assert cpu_flags("") == frozenset()


@pytest.mark.parametrize(("cpuinfo", "expected"), [(SAPPHIRE_RAPIDS, False), (EPYC, True),
                                                    (GRAVITON, True), ("", True)])
def test_auto_is_off_exactly_where_the_cpu_reports_amx(cpuinfo, expected):
    assert weight_repack_enabled("auto", cpu_flags(cpuinfo)) is expected


@pytest.mark.parametrize("cpuinfo", [SAPPHIRE_RAPIDS, EPYC])
def test_on_and_off_are_obeyed_whatever_the_cpu(cpuinfo):
    assert weight_repack_enabled("on", cpu_flags(cpuinfo)) is True
    assert weight_repack_enabled("off", cpu_flags(cpuinfo)) is False


def test_this_machine_resolves_auto_from_its_own_flags():
    has_amx = bool(cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"})
    assert weight_repack_enabled("auto") is not has_amx


# -- usable CPUs: affinity capped by a cgroup quota (a container's --cpus) ----------------

def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_no_cgroup_files_is_the_affinity(tmp_path):
    assert usable_cpus(tmp_path) == _affinity()


@pytest.mark.parametrize("cpu_max, cpus", [
    ("100000 100000", 1), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", None),
])
def test_cgroup_v2_quota_caps_the_count(tmp_path, cpu_max, cpus):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert usable_cpus(tmp_path) == min(_affinity(), cpus or _affinity())


@pytest.mark.parametrize("quota, cpus", [("100000", 1), ("-1", None)])
def test_cgroup_v1_quota_caps_the_count(tmp_path, quota, cpus):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == min(_affinity(), cpus or _affinity())


def test_a_quota_above_the_affinity_leaves_the_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text(f"{(_affinity() + 8) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == _affinity()


def test_unreadable_quota_is_ignored(tmp_path):
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cpus(tmp_path) == _affinity()
