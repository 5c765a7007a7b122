"""The native extensions are built, load, and report how they were built.

``fedrac_kernels._cpu`` is always built (setup.py); it must import, expose the ABI constants of
csrc/include/fedrac_kernels.h, and report its compiler, OpenMP, instruction-set level and a
self-check that floating-point contraction is off (the bit-exactness contract). ``_cuda`` is built
only where nvcc exists; when it is there it must at least import (no GPU needed for that).
"""
from __future__ import annotations

import glob
import importlib
import os
import re

import pytest

import fedrac_kernels

PKG = os.path.dirname(os.path.abspath(fedrac_kernels.__file__))
HEADER = os.path.join(os.path.dirname(PKG), "csrc", "include", "fedrac_kernels.h")


def _header_defines() -> dict:
    with open(HEADER) as f:
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (FK_\w+) (\d+)", f.read())}


def test_cpu_extension_loads_and_reports_build_info():
    _cpu = importlib.import_module("fedrac_kernels._cpu")
    info = _cpu.build_info()
    assert info["fp_contract_off"] is True, "the CPU kernels were built with FP contraction (FMA) on"
    assert info["openmp"] >= 201307, f"OpenMP missing or too old: {info['openmp']}"
    assert info["cplusplus"] >= 201703
    assert info["compiler"]
    assert info["isa"] in _cpu.supported_isas()
    assert info["isa_detected"] == _cpu.supported_isas()[-1]


def test_cpu_extension_matches_the_abi_header():
    _cpu = importlib.import_module("fedrac_kernels._cpu")
    d = _header_defines()
    assert (_cpu.F32, _cpu.BF16, _cpu.F16) == (d["FK_F32"], d["FK_BF16"], d["FK_F16"])
    assert (_cpu.KEY_F32, _cpu.KEY_F64, _cpu.KEY_I32, _cpu.KEY_I64) == (
        d["FK_KEY_F32"], d["FK_KEY_F64"], d["FK_KEY_I32"], d["FK_KEY_I64"])
    for name in ("dense", "structured", "compact", "frequency_update", "stable_argsort", "nested_masks"):
        assert callable(getattr(_cpu, name)), name


def test_cpu_backend_is_available_and_listed():
    from fedrac_kernels.backends import cpu

    ok, why = cpu.available()
    assert ok, why
    assert "OpenMP" in why
    assert "cpu" in fedrac_kernels.available_backends()
    assert fedrac_kernels.backend_report()["cpu"].startswith("ok")


def test_isa_can_be_forced_and_restored():
    _cpu = importlib.import_module("fedrac_kernels._cpu")
    prev = _cpu.set_isa("base")
    try:
        assert _cpu.get_isa() == "base"
        assert _cpu.build_info()["isa"] == "base"
    finally:
        _cpu.set_isa(prev)
    assert _cpu.get_isa() == prev
    with pytest.raises(ValueError):
        _cpu.set_isa("sse9")


def test_native_errors_raise_with_the_message():
    import torch

    _cpu = importlib.import_module("fedrac_kernels._cpu")
    keys, order = torch.zeros(5), torch.empty(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="key_dtype"):
        _cpu.stable_argsort(keys.data_ptr(), 99, order.data_ptr(), 5, 1)
    with pytest.raises(ValueError, match="fk_cpu_dense: dtype"):
        _cpu.dense((0, 0, 7, [], 0, 0, 0, 0, 0, 0, 0, 0), None, 1)


def test_cuda_extension_imports_when_built():
    built = glob.glob(os.path.join(PKG, "_cuda*.so")) + glob.glob(os.path.join(PKG, "_cuda*.pyd"))
    if not built:
        pytest.skip("fedrac_kernels._cuda not built here (no nvcc, or FEDRAC_BUILD_CUDA=0)")
    importlib.import_module("fedrac_kernels._cuda")
