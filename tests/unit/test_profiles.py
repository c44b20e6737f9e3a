"""Hardware profile YAMLs: every one loads, every number has a source, lookup and overrides, sanity relations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoshard.hardware_profiles import (
    FITTED_FIELDS,
    HERE,
    OPTIONAL_SPEC_FIELDS,
    SPEC_FIELDS,
    UnknownProfileError,
    load_profile,
    parse_profile,
    profile_names,
)

EXPECTED = {
    "a100_ib",
    "h100_ib",
    "h100_roce",
    "h100_efa",
    "h200_ib",
    "h800_ib",
    "b200_ib",
    "gb200_nvl72",
    "cpu_gloo",
}
FAMILIES = {"a100", "h100", "b200", "cpu", "h100_500w"}
NAMES = profile_names()
GPU_NAMES = [n for n in NAMES if load_profile(n).family != "cpu"]


def raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / f"{name}.yaml").read_text())


def test_expected_profiles_exist() -> None:
    assert EXPECTED <= set(NAMES), f"missing: {sorted(EXPECTED - set(NAMES))}"


@pytest.mark.parametrize("name", NAMES)
def test_profile_loads_with_its_file_name(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.family in FAMILIES
    assert profile.description.strip() and profile.gpu.strip()
    for key in SPEC_FIELDS + FITTED_FIELDS:
        value = getattr(profile, key)
        assert math.isfinite(value) and value > 0, f"{name}.{key} = {value}"


@pytest.mark.parametrize("name", NAMES)
def test_every_number_has_a_source(name: str) -> None:
    profile = load_profile(name)
    assert set(profile.sources) == set(SPEC_FIELDS + tuple(OPTIONAL_SPEC_FIELDS) + FITTED_FIELDS)
    for key, source in profile.sources.items():
        assert source.strip(), f"{name}.{key} has an empty source"
    assert profile.fitted_on.strip()


@pytest.mark.parametrize("name", NAMES)
def test_values_are_yaml_numbers_not_strings(name: str) -> None:
    # YAML 1.1 reads "1e9" (no dot, no exponent sign) as a string; parse_profile would hide that with float().
    data = raw(name)
    for section, keys in (("specs", SPEC_FIELDS), ("fitted", FITTED_FIELDS)):
        for key in keys:
            value = data[section][key]["value"]
            assert isinstance(value, int | float) and not isinstance(value, bool), f"{name}.{key}: {value!r}"


def test_lookup_is_case_insensitive() -> None:
    assert load_profile("H100_IB") == load_profile("h100_ib")
    assert load_profile("Cpu_Gloo").name == "cpu_gloo"


def test_unknown_name_lists_every_valid_name() -> None:
    with pytest.raises(UnknownProfileError) as info:
        load_profile("h100_infiniband")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "h100_infiniband" in message
    for name in NAMES:
        assert name in message


def test_gpu_memory_gib_overrides_only_the_memory() -> None:
    base = load_profile("h100_ib")
    override = load_profile("h100_ib", gpu_memory_gib=96)
    assert override.hbm_bytes == 96 * 2**30
    assert override.replace(hbm_bytes=base.hbm_bytes) == base


def test_non_positive_memory_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="gpu-memory-gib"):
        load_profile("h100_ib", gpu_memory_gib=0)


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text((HERE / "a100_ib.yaml").read_text())
    assert load_profile(path) == load_profile("a100_ib")


@pytest.mark.parametrize(
    ("section", "key", "entry"),
    [
        ("specs", "hbm_bytes", {"value": 85520809984}),
        ("specs", "inter_node_latency_s", {"value": 1.4e-5, "source": ""}),
        ("specs", "bf16_flops_per_s", 9.89e14),
        ("fitted", "gemm_efficiency_max", {"value": 0.72, "source": None}),
    ],
)
def test_number_without_source_is_rejected(tmp_path: Path, section: str, key: str, entry: Any) -> None:
    data = raw("h100_ib")
    data[section][key] = entry
    path = tmp_path / "no_source.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=key):
        load_profile(path)


def test_missing_field_is_rejected() -> None:
    data = raw("h100_ib")
    del data["specs"]["hbm_bw_bytes_per_s"]
    with pytest.raises(ValueError, match="hbm_bw_bytes_per_s"):
        parse_profile(data)


@pytest.mark.parametrize("name", NAMES)
def test_peaks_ordered_fp8_bf16_fp32(name: str) -> None:
    p = load_profile(name)
    assert p.fp8_flops_per_s >= p.bf16_flops_per_s >= p.fp32_flops_per_s
    assert p.peak_flops("bf16") == p.bf16_flops_per_s


@pytest.mark.parametrize("name", NAMES)
def test_topology_and_coefficients_are_plausible(name: str) -> None:
    p = load_profile(name)
    assert p.nvlink_domain_gpus >= p.gpus_per_node >= 1
    for key in (
        "gemm_efficiency_max",
        "attention_efficiency",
        "collective_efficiency_intra",
        "collective_efficiency_inter",
    ):
        assert 0 < getattr(p, key) <= 1, key
    assert p.overlap_slowdown >= 1
    assert p.intra_node_latency_s <= p.inter_node_latency_s < 1e-3


@pytest.mark.parametrize("name", GPU_NAMES)
def test_network_is_slower_than_nvlink(name: str) -> None:
    p = load_profile(name)
    assert p.inter_node_bw_bytes_per_s < p.intra_node_bw_bytes_per_s


def test_relations_between_systems() -> None:
    h100, h800, h200 = load_profile("h100_ib"), load_profile("h800_ib"), load_profile("h200_ib")
    assert h800.intra_node_bw_bytes_per_s < h100.intra_node_bw_bytes_per_s
    assert h800.bf16_flops_per_s == h100.bf16_flops_per_s
    assert h200.hbm_bytes > h100.hbm_bytes
    assert h200.hbm_bw_bytes_per_s > h100.hbm_bw_bytes_per_s
    assert h200.bf16_flops_per_s == h100.bf16_flops_per_s
    assert load_profile("h100_efa").inter_node_latency_s > h100.inter_node_latency_s
    gb200 = load_profile("gb200_nvl72")
    assert gb200.nvlink_domain_gpus == 72
    assert gb200.gpus_per_node == 4
    assert load_profile("a100_ib").fp8_flops_per_s == load_profile("a100_ib").bf16_flops_per_s
