"""CPU flags and the weight-repack choice, without needing any particular CPU."""

from __future__ import annotations

import pytest

from llmserve.engines.cpu import cpu_flags, weight_repack_enabled

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
