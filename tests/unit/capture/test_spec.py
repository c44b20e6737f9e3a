"""Architecture specs: validation errors name the field, unknown keys warn, defaults and style derivation."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoshard.planner.capture.spec import ModelSpec, MoESpec, TrainingSpec, load_spec, parse_spec
from autoshard.planner.errors import SpecError, UserError

REPO = Path(__file__).resolve().parents[3]
SPECS = REPO / "examples" / "specs"
CALIBRATION = Path("/work/shared/calibration/published_runs_dev.yaml")

BASE: dict[str, Any] = {
    "model": {
        "name": "t",
        "layers": 4,
        "hidden": 64,
        "ffn_hidden": 160,
        "heads": 4,
        "kv_heads": 2,
        "vocab": 256,
        "seq_len": 32,
    },
    "training": {"micro_batch": 2, "precision": "bf16"},
}
MOE = {"experts": 4, "top_k": 2, "expert_ffn_hidden": 64, "shared_experts": 1, "dense_layers_first": 1}

# One entry of calibration/published_runs_dev.yaml, copied so the test runs without the shared folder.
CALIBRATION_ENTRY = """
id: torchtitan_l31_8b_8gpu_fsdp_bf16
group: torchtitan
source: {title: pytorch/torchtitan benchmarks, table: llama3_1 8B}
model: {name: Llama 3.1 8B, layers: 32, hidden: 4096, ffn_hidden: 14336, heads: 32, kv_heads: 8,
        vocab: 128000, seq_len: 8192, moe: null, params_b: 8}
hardware: {gpu: H100, num_gpus: 8, gpus_per_node: 8}
training: {global_batch_sequences: 16, global_batch_tokens: null, micro_batch: 2, precision: bf16,
           recompute: selective}
parallel: {tp: 1, pp: 1, vpp: null, cp: 1, ep: 1, dp: 8, zero_stage: 3}
measured: {mfu: null}
notes: copied for tests
"""


def spec(model: dict[str, Any] | None = None, training: dict[str, Any] | None = None, **top: Any) -> dict:
    """BASE with model / training keys overridden (a None value deletes the key)."""
    data = copy.deepcopy(BASE)
    for section, changes in (("model", model or {}), ("training", training or {})):
        for key, value in changes.items():
            if value is None:
                data[section].pop(key, None)
            else:
                data[section][key] = value
    data.update(top)
    return data


def expect_error(data: Any, *fragments: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="s.yaml")
    message = str(info.value)
    assert message.startswith("s.yaml: "), message
    assert "\n" not in message, "one paragraph"
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_parse_base() -> None:
    model, training, warnings = parse_spec(BASE)
    assert model == ModelSpec(
        name="t",
        layers=4,
        hidden=64,
        ffn_hidden=160,
        heads=4,
        kv_heads=2,
        vocab=256,
        seq_len=32,
        style="llama",
    )
    assert model.head_dim == 16
    assert training == TrainingSpec(micro_batch=2, precision="bf16")
    assert warnings == []
    assert isinstance(SpecError("x"), UserError)


def test_defaults() -> None:
    model, training, _ = parse_spec(
        {"model": {"layers": 2, "hidden": 64, "ffn_hidden": 128, "heads": 4, "vocab": 10}}
    )
    assert model.kv_heads == 4 and model.seq_len == 4096 and model.tied_embeddings is False
    assert model.moe is None and model.norm_eps == 1e-5 and model.rope_theta == 500000.0
    assert model.name == "model"
    assert training == TrainingSpec()
    nulls = spec(training={"precision": None})  # absent
    nulls["model"].update(kv_heads=None, seq_len=None, moe=None, tied_embeddings=None)  # explicit null
    model, training, _ = parse_spec(nulls)
    assert model.kv_heads == 4 and model.seq_len == 4096 and training.precision is None


def test_frozen() -> None:
    model, _, _ = parse_spec(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.layers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"ffn_hidden": 256, "kv_heads": 4}, "gpt"),  # 4 x hidden, multi-head attention
        ({"ffn_hidden": 256, "kv_heads": None}, "gpt"),
        ({"ffn_hidden": 256, "kv_heads": 2}, "llama"),  # GQA
        ({"ffn_hidden": 160, "kv_heads": 4}, "llama"),  # not 4 x hidden
        ({"ffn_hidden": 160, "kv_heads": 4, "style": "GPT"}, "gpt"),  # explicit wins, any case
        ({"ffn_hidden": 256, "kv_heads": 4, "style": "llama"}, "llama"),
    ],
)
def test_style(model: dict[str, Any], expected: str) -> None:
    assert parse_spec(spec(model=model))[0].style == expected


def test_moe_parsed() -> None:
    model, _, _ = parse_spec(spec(model={"moe": MOE}))
    assert model.moe == MoESpec(**MOE)
    assert [model.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    minimal, _, _ = parse_spec(spec(model={"moe": {"experts": 8, "top_k": 2, "expert_ffn_hidden": 32}}))
    assert minimal.moe == MoESpec(experts=8, top_k=2, expert_ffn_hidden=32)


def test_ffn_hidden_optional_when_every_layer_is_moe() -> None:
    moe = dict(MOE, dense_layers_first=0)
    model, _, _ = parse_spec(spec(model={"ffn_hidden": None, "moe": moe}))
    assert model.ffn_hidden is None and model.style == "llama"
    expect_error(spec(model={"ffn_hidden": None, "moe": MOE}), "model.ffn_hidden", "missing")


@pytest.mark.parametrize("field", ["layers", "hidden", "heads", "vocab", "ffn_hidden"])
def test_missing_required(field: str) -> None:
    expect_error(spec(model={field: None}), f"model.{field}", "missing")


@pytest.mark.parametrize("field", ["experts", "top_k", "expert_ffn_hidden"])
def test_missing_required_moe(field: str) -> None:
    moe = {k: v for k, v in MOE.items() if k != field}
    expect_error(spec(model={"moe": moe}), f"model.moe.{field}", "missing")


@pytest.mark.parametrize(
    ("model", "training", "fragments"),
    [
        ({"hidden": "64"}, {}, ("model.hidden ('64')", "integer")),
        ({"layers": 4.0}, {}, ("model.layers (4.0)", "integer")),
        ({"heads": True}, {}, ("model.heads (True)", "integer")),  # bool is not an int here
        ({"layers": 0}, {}, ("model.layers (0)", "positive")),
        ({"vocab": -5}, {}, ("model.vocab (-5)", "positive")),
        ({"kv_heads": 0}, {}, ("model.kv_heads (0)", "positive")),
        ({"seq_len": 0}, {}, ("model.seq_len (0)", "positive")),
        (
            {"hidden": 4000, "heads": 48},
            {},
            ("model.hidden (4000)", "not divisible by model.heads (48)", "Fix"),
        ),
        ({"kv_heads": 3}, {}, ("model.kv_heads (3)", "model.heads (4)")),
        ({"tied_embeddings": "yes"}, {}, ("model.tied_embeddings", "true or false")),
        ({"style": "t5"}, {}, ("model.style ('t5')", "gpt, llama")),
        ({"norm_eps": 0}, {}, ("model.norm_eps", "positive")),
        ({"name": 7}, {}, ("model.name (7)", "string")),
        ({"moe": [1, 2]}, {}, ("model.moe", "mapping")),
        ({}, {"precision": "fp16"}, ("training.precision ('fp16')", "bf16, fp8")),
        ({}, {"precision": "mixed"}, ("training.precision ('mixed')",)),
        ({}, {"micro_batch": 0}, ("training.micro_batch (0)", "positive")),
        ({}, {"global_batch_sequences": "lots"}, ("training.global_batch_sequences", "integer")),
        ({}, {"seq_len": 64}, ("training.seq_len (64)", "model.seq_len (32)")),
    ],
)
def test_bad_values(model: dict[str, Any], training: dict[str, Any], fragments: tuple[str, ...]) -> None:
    expect_error(spec(model=model, training=training), *fragments)


@pytest.mark.parametrize(
    ("moe", "fragments"),
    [
        ({"top_k": 5}, ("model.moe.top_k (5)", "model.moe.experts (4)")),
        ({"top_k": 0}, ("model.moe.top_k (0)", "positive")),
        ({"dense_layers_first": 5}, ("model.moe.dense_layers_first (5)", "model.layers (4)")),
        ({"dense_layers_first": -1}, ("model.moe.dense_layers_first (-1)", "at least 0")),
        ({"shared_experts": -1}, ("model.moe.shared_experts (-1)", "at least 0")),
        ({"experts": 2.5}, ("model.moe.experts (2.5)", "integer")),
    ],
)
def test_bad_moe(moe: dict[str, Any], fragments: tuple[str, ...]) -> None:
    expect_error(spec(model={"moe": dict(MOE, **moe)}), *fragments)


def test_bad_top_level() -> None:
    expect_error([1, 2], "mapping")
    expect_error({"training": {}}, "no `model:` section")
    expect_error({"runs": []}, "no `model:` section", "one entry")
    expect_error({"model": 5}, "model must be a mapping")
    expect_error(dict(BASE, training="fast"), "training must be a mapping")


def test_unknown_keys_warn() -> None:
    moe = dict(MOE, mla=True, router_jitter=0.1)
    data = spec(
        model={"mla": True, "mtp_depth": 1, "params_b": 671, "moe": moe}, training={"recompute": "full"}
    )
    data["hardware"] = {"gpu": "H100"}
    _, _, warnings = parse_spec(data, source="s.yaml")
    assert len(warnings) == 1
    keys = "hardware model.mla model.mtp_depth model.params_b model.moe.mla model.moe.router_jitter"
    for key in [*keys.split(), "training.recompute"]:
        assert key in warnings[0], key
    assert warnings[0].startswith("s.yaml: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("BF16", "bf16"), ("bf16 + Float8 linears", "fp8"), ("MXFP8", "fp8"), ("amp_bf16 (FSDP)", "bf16")],
)
def test_precision_in_words(text: str, expected: str) -> None:
    _, training, warnings = parse_spec(spec(training={"precision": text}))
    assert training.precision == expected
    assert (warnings == []) == (text.lower() == expected)


def test_load_spec_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {layers: 4\n  hidden: [")
    with pytest.raises(SpecError, match="bad.yaml: is not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(scalar)
    hidden = tmp_path / "h.yaml"
    hidden.write_text(yaml.safe_dump(spec(model={"hidden": 4000, "heads": 48})))
    with pytest.raises(SpecError, match=r"h\.yaml: model\.hidden \(4000\) is not divisible"):
        load_spec(hidden)


def test_head_dim_given_apart_from_the_width() -> None:
    """hidden need not be heads x head_dim when head_dim is given (Qwen3-32B: 64 heads of 128 on 5,120);
    without it head_dim is hidden / heads, and a width the heads do not divide is an error."""
    model, _, _ = parse_spec(spec(model={"hidden": 4000, "heads": 48, "kv_heads": 8, "head_dim": 128}))
    assert model.head_dim == 128
    assert parse_spec(spec())[0].head_dim == 64 // 4
    with pytest.raises(SpecError, match="give model.head_dim"):
        parse_spec(spec(model={"hidden": 4000, "heads": 48}))
    for bad in (0, True, 12.5):
        with pytest.raises(SpecError, match="head_dim"):
            parse_spec(spec(model={"head_dim": bad}))


def test_load_calibration_entry(tmp_path: Path) -> None:
    path = tmp_path / "entry.yaml"
    path.write_text(CALIBRATION_ENTRY)
    model, training, warnings = load_spec(path)
    assert (model.layers, model.hidden, model.kv_heads, model.vocab, model.seq_len) == (
        32,
        4096,
        8,
        128000,
        8192,
    )
    assert model.style == "llama" and model.name == "Llama 3.1 8B"
    assert training == TrainingSpec(global_batch_sequences=16, micro_batch=2, precision="bf16")
    assert len(warnings) == 1 and "model.params_b" in warnings[0] and "training.recompute" in warnings[0]


@pytest.mark.skipif(not CALIBRATION.exists(), reason="shared calibration file not present")
def test_load_entries_of_the_shared_calibration_file(tmp_path: Path) -> None:
    runs = {run["id"]: run for run in yaml.safe_load(CALIBRATION.read_text())["runs"]}
    for run_id in ("torchtitan_l31_405b_512gpu_cp4_seq128k", "mbridge_260401_llama3p1_405b_dgxgb200_256gpu"):
        path = tmp_path / f"{run_id}.yaml"
        path.write_text(yaml.safe_dump(runs[run_id]))
        model, training, _ = load_spec(path)
        shape = (model.layers, model.hidden, model.ffn_hidden, model.heads, model.kv_heads)
        assert shape == (126, 16384, 53248, 128, 8)
        assert training.precision == "fp8"


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_specs_load(path: Path) -> None:
    assert path.read_text().startswith("#"), "each example spec opens with a comment giving its source"
    model, _, warnings = load_spec(path)
    if path.stem == "deepseek_v3_like":
        assert model.moe is not None and model.moe.experts == 256
        assert len(warnings) == 1 and "model.mla" in warnings[0]
    else:
        assert warnings == []


def test_example_styles() -> None:
    styles = {p.stem: load_spec(p)[0].style for p in SPECS.glob("*.yaml")}
    assert styles["gpt3_175b"] == styles["tiny_gpt"] == "gpt"
    assert styles["llama3_8b"] == styles["tiny_llama"] == styles["mixtral_8x7b"] == "llama"


def test_a_dense_mha_model_without_ffn_hidden_gets_gpts_4h_with_a_warning():
    """Published GPT runs (SC'21, Korthikanti, MegaScale) leave ffn_hidden null: 4 x hidden, said aloud."""
    model, _, warnings = parse_spec({"model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": None,
                                               "ffn_hidden": None, "vocab": 128}})
    assert model.ffn_hidden == 256 and model.style == "gpt"
    assert any("4 x hidden" in w for w in warnings)
    with pytest.raises(SpecError, match="ffn_hidden is missing"):  # GQA: not GPT, no guess
        parse_spec({"model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128}})
