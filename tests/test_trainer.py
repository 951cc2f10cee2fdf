"""Hugging Face ``Trainer`` with memopt, the documented way (``model.compile(backend="memopt")`` before
``Trainer(model=model)``), and ``MEMOPT_OPTIONS``: the options of a backend given by name only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import memopt
from memopt.config import parse_options
from memopt.errors import MemoptConfigError
from tests.models import tiny_llama

OPTIONS: dict[str, Any] = {"adapters": {"method": "lora", "rank": 4, "targets": "all-linear"},
                           "memory_budget": 0.5, "codegen": "eager"}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path: Path, compile_with_memopt: bool) -> list[float]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = memopt.prepare(tiny_llama(), OPTIONS)
    if compile_with_memopt:
        model.compile(backend="memopt")            # options from MEMOPT_OPTIONS
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_trains_with_memopt_and_its_options_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = tmp_path / "dump"
    (tmp_path / "options.json").write_text(json.dumps({**OPTIONS, "dump_dir": str(dump)}))
    monkeypatch.setenv("MEMOPT_OPTIONS", str(tmp_path / "options.json"))
    expected = _train(tmp_path, compile_with_memopt=False)
    losses = _train(tmp_path, compile_with_memopt=True)
    assert len(losses) == len(expected) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # The budget came from the environment: the step was scheduled under it.
    (schedule,) = dump.glob("*/schedule.json")
    data = json.loads(schedule.read_text())
    assert data["budget"] == "0.5 of activations" and data["feasible"]
    assert data["peak_bytes"] <= data["budget_bytes"] < data["baseline_peak_bytes"]


def test_memopt_options_inline_json_and_its_errors() -> None:
    config = parse_options(None, {"MEMOPT_OPTIONS": '{"memory_budget": "1GiB", "codegen": "eager"}'})
    assert config.memory_budget is not None and config.memory_budget.nbytes == 2**30
    assert config.codegen == "eager"
    # Options passed in code win, even empty ones.
    assert parse_options({}, {"MEMOPT_OPTIONS": '{"codegen": "eager"}'}).codegen == "inductor"
    for text, must_mention in [
        ('{"memory_budgt": 1}', "did you mean 'memory_budget'"),
        ('{"codegen": "fast"}', "codegen"),
        ("{oops", "not valid JSON"),
        ("[1, 2]", "JSON list"),
        ("/nowhere/options.json", "cannot read it"),
    ]:
        with pytest.raises(MemoptConfigError) as info:
            parse_options(None, {"MEMOPT_OPTIONS": text})
        assert "MEMOPT_OPTIONS" in str(info.value) and must_mention.lower() in str(info.value).lower(), \
            str(info.value)
