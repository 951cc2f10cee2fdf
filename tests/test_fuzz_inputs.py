"""The public surface against random and malformed input (hypothesis): ``options`` (passed or through
``MEMOPT_OPTIONS``), device profile files and adapter files either load or raise a ``MemoptError`` whose
message names what was wrong; nothing else escapes (no KeyError, TypeError, AttributeError, ...)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memopt.config import MemoptConfig, parse_options
from memopt.cost_model.profile import DeviceProfile, load_profile, profile_to_json
from memopt.errors import MemoptError

KEYS = ["memory_budget", "codegen", "dump_dir", "dump_node_times", "cost_profile", "force_profile", "adapters",
        "quantize", "offload", "host_memory", "compress_activations", "solver_time_limit_s", "sparse_backprop",
        "token_elimination", "chunk_sequence", "strict", "disable_passes", "memory_budgt", "verify"]
SUBKEYS = ["method", "rank", "alpha", "dropout", "targets", "weights", "double_quant", "keep_ratio", "block_size",
           "start_layer", "chunks", "min_tokens", "logits", "use_rslora", "seed", "columns", "layers"]

# JSON-like values, biased to the kinds options take: numbers at and around the edges, size strings,
# names, lists and nested objects with real and misspelled keys.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 0.0, 0.5, 1.0, 1.5, 1e-12]),
    st.sampled_from(["12GiB", "0.5", "-1GiB", "GiB", "nf4", "int8", "fp8", "lora", "dora", "all-linear", "eager",
                     "inductor", "auto", "all", "drop", "keep", "cpu", "h100", "", "first:2", "last:-1"]),
    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(SUBKEYS) | st.text(max_size=6), inner, max_size=4)), max_leaves=8)
options = st.dictionaries(st.sampled_from(KEYS), values, max_size=5)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(options)
def test_any_options_parse_or_say_what_is_wrong(opts: dict[str, Any]) -> None:
    try:
        config = parse_options(opts, environ={})
    except MemoptError as err:
        message = str(err)
        assert message and any(key in message for key in opts), (opts, message)
    else:
        assert isinstance(config, MemoptConfig)


@FUZZ
@given(options)
def test_the_same_options_through_the_environment(opts: dict[str, Any]) -> None:
    try:
        text = json.dumps(opts, allow_nan=False)
    except ValueError:
        return                                  # not JSON: the environment cannot hold it
    try:
        config = parse_options(None, environ={"MEMOPT_OPTIONS": text})
    except MemoptError as err:
        assert "MEMOPT_OPTIONS" in str(err)
    else:
        assert config == parse_options(opts, environ={})


def _profile_data() -> dict[str, Any]:
    return json.loads(profile_to_json(load_profile("h100")))


@FUZZ
@given(st.sampled_from(sorted(_profile_data())), values, st.booleans())
def test_damaged_profiles_load_or_name_the_field(field: str, value: Any, drop: bool) -> None:
    data = _profile_data()
    if drop:
        del data[field]
    else:
        data[field] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_text(json.dumps(data))
        try:
            profile = load_profile(path)
        except MemoptError as err:
            assert str(path) in str(err) and (field in str(err) or "format_version" in str(err)), str(err)
        else:
            assert isinstance(profile, DeviceProfile)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_profile(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_bytes(content)
        with pytest.raises(MemoptError):
            load_profile(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]), st.binary(max_size=300))
def test_damaged_adapter_files_are_a_memopt_error(name: str, content: bytes) -> None:
    import torch

    import memopt
    from tests.models import tiny_llama

    options = {"adapters": {"method": "lora", "rank": 2, "targets": ["q_proj"]}}
    torch.manual_seed(0)
    model = memopt.prepare(tiny_llama(layers=1, hidden=32), options)
    with tempfile.TemporaryDirectory() as folder:
        memopt.save_adapters(model, folder)
        (Path(folder) / name).write_bytes(content)
        try:
            memopt.load_adapters(memopt.prepare(tiny_llama(layers=1, hidden=32), options), folder)
        except MemoptError as err:
            assert name in str(err) or folder in str(err), str(err)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example("target_modules", 5, False)
@example("r", "4", False)
@example("lora_alpha", None, True)
@example("peft_type", ["LORA"], False)
@given(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "use_dora", "use_rslora",
                        "bias", "rank_pattern"]), values, st.booleans())
def test_adapter_configs_with_damaged_fields_load_or_name_the_file(field: str, value: Any, drop: bool) -> None:
    import torch

    import memopt
    from tests.models import tiny_llama

    options = {"adapters": {"method": "lora", "rank": 2, "targets": ["q_proj"]}}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        memopt.save_adapters(memopt.prepare(tiny_llama(layers=1, hidden=32), options), folder)
        path = Path(folder) / "adapter_config.json"
        meta = json.loads(path.read_text())
        if drop:
            meta.pop(field, None)
        else:
            meta[field] = value
        path.write_text(json.dumps(meta))
        try:
            memopt.load_adapters(tiny_llama(layers=1, hidden=32), folder)
        except MemoptError as err:
            assert folder in str(err), str(err)
