"""Options: one dict validated into a frozen, typed config. Unknown keys get the closest valid name; wrong
types and values name the key, what was given and what is allowed; budgets parse to bytes or fractions;
the documented environment variables override."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

import memopt
from memopt.config import (
    LayerSelection,
    MemoptConfig,
    MemoryBudget,
    ParamPolicy,
    TokenEliminationConfig,
    parse_budget,
    parse_options,
)
from memopt.errors import MemoptConfigError
from tests.errors import raises_memopt

NO_ENV: dict[str, str] = {}


def parse(options: dict[str, Any] | None) -> MemoptConfig:
    return parse_options(options, environ=NO_ENV)


def config_error(options: dict[str, Any]) -> str:
    with pytest.raises(MemoptConfigError) as info:
        parse(options)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------
# Unknown keys
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "unknown", "suggestion"), [
    ({"memory_bugdet": "1GiB"}, "memory_bugdet", "memory_budget"),
    ({"codgen": "eager"}, "codgen", "codegen"),
    ({"disable_pass": ["x"]}, "disable_pass", "disable_passes"),
    ({"adapters": {"rnak": 8}}, "adapters.rnak", "rank"),
    ({"adapters": {"target": ["q_proj"]}}, "adapters.target", "targets"),
    ({"quantize": {"double_quantization": True}}, "quantize.double_quantization", "double_quant"),
])
def test_unknown_key_names_the_closest_valid_one(options: dict[str, Any], unknown: str, suggestion: str) -> None:
    message = config_error(options)
    # The key is named whole (with its section), and the closest valid name is offered.
    assert f"unknown option '{unknown}'" in message, message
    assert f"Did you mean '{suggestion}'?" in message, message


def test_unknown_key_far_from_any_lists_the_valid_keys() -> None:
    message = config_error({"zzzzzz": 1})
    assert "Did you mean" not in message
    assert "memory_budget" in message and "codegen" in message and "disable_passes" in message


def test_options_must_be_a_dict() -> None:
    with pytest.raises(MemoptConfigError, match=r"options must be a dict, got list"):
        parse([("codegen", "eager")])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Wrong types and values: the message names the key, what was given and what is allowed
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key", "given", "allowed"), [
    ({"codegen": 3}, "codegen", "3", "'inductor', 'triton', 'eager'"),
    ({"codegen": "tvm"}, "codegen", "'tvm'", "'inductor', 'triton', 'eager'"),
    ({"strict": "yes"}, "strict", "'yes'", "True or False"),
    ({"strict": 1}, "strict", "1", "True or False"),
    ({"memory_budget": 1.5}, "memory_budget", "1.5", "[0, 1]"),
    ({"memory_budget": -0.5}, "memory_budget", "-0.5", "[0, 1]"),
    ({"memory_budget": 0}, "memory_budget", "0", "positive"),
    ({"memory_budget": -5}, "memory_budget", "-5", "positive"),
    ({"memory_budget": "12 parsecs"}, "memory_budget", "'12 parsecs'", "12GiB"),
    ({"memory_budget": "GiB"}, "memory_budget", "'GiB'", "12GiB"),
    ({"memory_budget": "0GiB"}, "memory_budget", "'0GiB'", "positive"),
    ({"memory_budget": True}, "memory_budget", "True", "fraction"),
    ({"memory_budget": [1]}, "memory_budget", "[1]", "12GiB"),
    ({"adapters": {"dropout": 1.0}}, "adapters.dropout", "1.0", "[0, 1)"),
    ({"adapters": {"dropout": -0.1}}, "adapters.dropout", "-0.1", "[0, 1)"),
    ({"adapters": {"rank": 0}}, "adapters.rank", "0", "positive int"),
    ({"adapters": {"rank": 8.0}}, "adapters.rank", "8.0", "positive int"),
    ({"adapters": {"method": "lorax"}}, "adapters.method", "'lorax'", "'lora', 'dora', 'paca'"),
    ({"adapters": {"targets": []}}, "adapters.targets", "[]", "all-linear"),
    ({"adapters": {"targets": "q_proj("}}, "adapters.targets", "'q_proj('", "all-linear"),
    ({"adapters": "lora"}, "adapters", "'lora'", "dict"),
    ({"quantize": {"weights": "nf3"}}, "quantize.weights", "'nf3'", "'nf4', 'int8'"),
    ({"quantize": {"double_quant": "yes"}}, "quantize.double_quant", "'yes'", "True or False"),
    ({"offload": "always"}, "offload", "'always'", "'auto', False and 'all'"),
    ({"compress_activations": "int4"}, "compress_activations", "'int4'", "'int8', 'fp8'"),
    ({"disable_passes": "prune_backprop"}, "disable_passes", "'prune_backprop'", "list of pass names"),
    ({"dump_dir": 5}, "dump_dir", "5", "directory path"),
    ({"token_elimination": 0.4}, "token_elimination", "0.4", "dict"),
    ({"token_elimination": {"keep_ratio": 1.5}}, "token_elimination.keep_ratio", "1.5", "(0, 1]"),
    ({"token_elimination": {"block_size": 0}}, "token_elimination.block_size", "0", "positive power of two"),
    ({"token_elimination": {"block_size": 48}}, "token_elimination.block_size", "48", "positive power of two"),
    ({"sparse_backprop": {"*.weight": {"columns": 1.5}}}, "sparse_backprop[*.weight].columns", "1.5", "(0, 1]"),
    ({"sparse_backprop": {"*.weight": {"rows": 0}}}, "sparse_backprop[*.weight].rows", "0", "positive count"),
    ({"sparse_backprop": {"*.weight": "frozn"}}, "sparse_backprop[*.weight]", "'frozn'", "'frozen'"),
    ({"sparse_backprop": {"*.weight": {"columns": 0.5, "rows": 0.5}}}, "sparse_backprop[*.weight]",
     "'rows': 0.5", "exactly one of"),
    ({"sparse_backprop": {"*": {"train": "full", "layers": "middle:2"}}}, "sparse_backprop[*].layers",
     "'middle:2'", "'last:N'"),
    ({"sparse_backprop": {"*": {"columns": 0.5, "select": "largest"}}}, "sparse_backprop[*].select",
     "'largest'", "'norm', 'random'"),
    ({"sparse_backprop": []}, "sparse_backprop", "[]", "'auto'"),
    ({"solver_time_limit_s": 0}, "solver_time_limit_s", "0", "(0, 3600]"),
    ({"solver_time_limit_s": "fast"}, "solver_time_limit_s", "'fast'", "number of seconds"),
    ({"solver_time_limit_s": True}, "solver_time_limit_s", "True", "number of seconds"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_type_or_value_is_explained(options: dict[str, Any], key: str, given: str, allowed: str) -> None:
    message = config_error(options)
    assert f"'{key}'" in message, f"key {key!r} not named: {message}"
    assert given in message, f"given value {given} not shown: {message}"
    assert allowed in message, f"allowed values {allowed!r} not shown: {message}"


def test_sparse_backprop_policies_parse_in_order_and_round_trip() -> None:
    options = {"sparse_backprop": {
        "*.mlp.down_proj.weight": {"columns": 0.25, "layers": "last:4"},
        "*.mlp.up_proj.weight": {"rows": 32, "select": "random", "seed": 3, "layers": [0, -1]},
        "*.self_attn.*": {"train": "full", "layers": {"sample": 2, "every": 10}},
        "*.bias": "full", "*": "frozen"}}
    config = parse(options).sparse_backprop
    assert config is not None and [pattern for pattern, _ in config.rules] == list(options["sparse_backprop"])
    assert config.rules[0][1] == ParamPolicy("columns", 0.25, layers=LayerSelection(last=4))
    assert config.rules[1][1] == ParamPolicy("rows", 32, "random", 3, LayerSelection(indices=(0, -1)))
    assert config.rules[2][1].layers == LayerSelection(sample=2, every=10, seed=0)
    assert parse(json.loads(json.dumps(parse(options).to_dict()))) == parse(options)
    assert parse({"sparse_backprop": "auto"}).sparse_backprop.auto  # type: ignore[union-attr]


def test_wrong_value_suggests_the_closest_choice() -> None:
    assert "Did you mean 'nf4'?" in config_error({"quantize": {"weights": "nf3"}})
    assert "Did you mean 'inductor'?" in config_error({"codegen": "inductr"})


def test_bad_option_reaches_the_user_through_torch_compile() -> None:
    torch._dynamo.reset()
    try:
        model = torch.nn.Linear(4, 2)
        compiled = torch.compile(model, backend="memopt", options={"codegen": "tvm"})
        with raises_memopt(MemoptConfigError, r"option 'codegen': got 'tvm'; allowed values are 'inductor'"):
            compiled(torch.randn(2, 4))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "nbytes"), [
    ("12GiB", 12 * 2**30),
    ("512MiB", 512 * 2**20),
    ("24GB", 24 * 10**9),
    ("1.5GiB", 3 * 2**29),
    ("64 KiB", 64 * 1024),
    (" 2gib ", 2 * 2**30),
    ("100b", 100),
    ("1TB", 10**12),
])
def test_budget_strings_parse_to_bytes(text: str, nbytes: int) -> None:
    assert parse_budget(text) == MemoryBudget(nbytes=nbytes)
    assert parse({"memory_budget": text}).memory_budget == MemoryBudget(nbytes=nbytes)


def test_budget_ints_are_bytes_and_floats_are_fractions() -> None:
    assert parse_budget(123456789) == MemoryBudget(nbytes=123456789)
    assert parse_budget(0.5) == MemoryBudget(fraction=0.5)
    assert parse_budget(1.0) == MemoryBudget(fraction=1.0)
    assert parse_budget(None) is None
    assert parse({}).memory_budget is None
    assert str(parse_budget(0.25)) == "0.25 of activations"
    assert str(parse_budget("1KiB")) == "1024 bytes"


# --------------------------------------------------------------------------------------------------------
# Values that parse
# --------------------------------------------------------------------------------------------------------


FULL = {
    "memory_budget": "12GiB",
    "codegen": "eager",
    "dump_dir": "dumps",
    "cost_profile": "h100",
    "adapters": {"method": "dora", "rank": 8, "alpha": 16, "dropout": 0.05, "use_rslora": True,
                 "targets": ["q_proj", "v_proj"], "seed": 3},
    "quantize": {"weights": "int8", "double_quant": False},
    "offload": False,
    "compress_activations": "fp8",
    "sparse_backprop": {"*.mlp.down_proj.weight": {"columns": 0.25, "layers": "last:2"}, "*.bias": "full",
                        "*": "frozen"},
    "token_elimination": {"keep_ratio": 0.4, "block_size": 64},
    "strict": True,
    "disable_passes": ["a", "b"],
}


def test_full_options_parse_into_typed_fields() -> None:
    config = parse(FULL)
    assert config.memory_budget == MemoryBudget(nbytes=12 * 2**30)
    assert (config.codegen, config.dump_dir, config.cost_profile) == ("eager", "dumps", "h100")
    assert config.adapters is not None and config.adapters.method == "dora" and config.adapters.rank == 8
    assert config.adapters.alpha == 16.0 and isinstance(config.adapters.alpha, float)
    assert config.adapters.targets == ("q_proj", "v_proj")
    assert config.quantize is not None and config.quantize.weights == "int8" and not config.quantize.double_quant
    assert config.offload is False and config.compress_activations == "fp8" and config.strict is True
    assert config.disable_passes == ("a", "b")


def test_defaults() -> None:
    config = parse(None)
    assert config == MemoptConfig() == parse({})
    assert (config.codegen, config.strict, config.offload, config.disable_passes) == ("inductor", False, "auto", ())
    assert config.adapters is None and config.quantize is None and config.dump_dir is None
    adapters = parse({"adapters": {}}).adapters
    assert adapters is not None and (adapters.method, adapters.rank, adapters.targets) == ("lora", 16, ("q_proj", "v_proj"))
    assert parse({"adapters": {"targets": "all-linear"}}).adapters.targets == "all-linear"  # type: ignore[union-attr]


def test_config_is_frozen() -> None:
    config = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.codegen = "inductor"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.adapters.rank = 64  # type: ignore[misc,union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory_budget.nbytes = 1  # type: ignore[misc,union-attr]
    assert isinstance(config.adapters.targets, tuple)  # type: ignore[union-attr]


def test_config_does_not_alias_the_users_dicts() -> None:
    options = json.loads(json.dumps(FULL))
    config = parse(options)
    options["adapters"]["targets"].append("o_proj")
    options["sparse_backprop"]["*.bias"] = "frozen"
    options["token_elimination"]["keep_ratio"] = 0.9
    assert config.adapters.targets == ("q_proj", "v_proj")  # type: ignore[union-attr]
    assert config.sparse_backprop is not None and config.sparse_backprop.rules[1] == ("*.bias", ParamPolicy("full"))
    assert config.token_elimination == TokenEliminationConfig(keep_ratio=0.4, block_size=64)


def test_nested_settings_are_read_only() -> None:
    config = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.token_elimination.keep_ratio = 1.0  # type: ignore[misc,union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sparse_backprop.rules[0][1].amount = 1.0  # type: ignore[misc,union-attr]


@pytest.mark.parametrize("value, strict", [("1", True), ("true", True), ("ON", True), ("0", False),
                                           ("false", False), ("", False)])
def test_memopt_strict_values(value: str, strict: bool) -> None:
    assert parse_options({}, environ={"MEMOPT_STRICT": value}).strict is strict


def test_memopt_strict_rejects_unclear_values() -> None:
    with pytest.raises(MemoptConfigError, match="MEMOPT_STRICT='maybe'"):
        parse_options({}, environ={"MEMOPT_STRICT": "maybe"})


def test_to_dict_is_json_and_round_trips() -> None:
    config = parse(FULL)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["memory_budget"] == 12 * 2**30
    assert data["adapters"]["targets"] == ["q_proj", "v_proj"]
    assert data["disable_passes"] == ["a", "b"]
    assert parse(data) == config
    fraction = parse({"memory_budget": 0.3})
    assert json.loads(json.dumps(fraction.to_dict()))["memory_budget"] == 0.3
    assert parse(fraction.to_dict()) == fraction
    assert parse(json.loads(json.dumps(MemoptConfig().to_dict()))) == MemoptConfig()


def test_a_config_passes_through_unchanged() -> None:
    config = parse(FULL)
    assert parse_options(config, environ=NO_ENV) is config


# --------------------------------------------------------------------------------------------------------
# Environment overrides (read when the options are parsed)
# --------------------------------------------------------------------------------------------------------


def test_env_dump_dir_applies_only_when_the_option_is_not_given() -> None:
    env = {"MEMOPT_DUMP_DIR": "from_env"}
    assert parse_options({}, environ=env).dump_dir == "from_env"
    assert parse_options({"dump_dir": "from_option"}, environ=env).dump_dir == "from_option"
    assert parse_options({}, environ={"MEMOPT_DUMP_DIR": ""}).dump_dir is None


def test_env_disable_passes_adds_to_the_option() -> None:
    env = {"MEMOPT_DISABLE_PASSES": " prune_backprop, ,fuse_dequant,inject_adapters "}
    assert parse_options({}, environ=env).disable_passes == ("prune_backprop", "fuse_dequant", "inject_adapters")
    assert parse_options({"disable_passes": ["inject_adapters", "x"]}, environ=env).disable_passes == (
        "inject_adapters", "x", "prune_backprop", "fuse_dequant")


@pytest.mark.parametrize(("value", "strict"), [("1", True), ("0", False), ("", False)])
def test_env_strict(value: str, strict: bool) -> None:
    assert parse_options({}, environ={"MEMOPT_STRICT": value}).strict is strict
    assert parse_options({"strict": True}, environ={"MEMOPT_STRICT": value}).strict is True


def test_env_applies_to_a_config_object_too() -> None:
    config = parse({"codegen": "eager"})
    overridden = parse_options(config, environ={"MEMOPT_STRICT": "1", "MEMOPT_DISABLE_PASSES": "p",
                                                "MEMOPT_DUMP_DIR": "d"})
    assert (overridden.strict, overridden.disable_passes, overridden.dump_dir) == (True, ("p",), "d")
    assert (config.strict, config.disable_passes, config.dump_dir) == (False, (), None)


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_DISABLE_PASSES", "from_process_env")
    monkeypatch.setenv("MEMOPT_STRICT", "1")
    config = parse_options({})
    assert config.disable_passes == ("from_process_env",) and config.strict is True
    assert memopt.parse_options is parse_options
