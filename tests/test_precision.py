"""trainer.precision bf16-mixed on a CPU learner: a sentence where the CPU has no bfloat16
instructions and would run it slower than float32, silence where it has them."""

from types import SimpleNamespace

import pytest
import torch

from kart_lightning.cli import note_slow_precision


def cpu_trainer(precision: str) -> SimpleNamespace:
    return SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device("cpu")))


@pytest.mark.parametrize("native, precision, said", [
    (False, "bf16-mixed", True), (True, "bf16-mixed", False), (False, "32-true", False),
])
def test_bfloat16_on_a_cpu_without_its_instructions_is_one_sentence_naming_32_true(
    native, precision, said, monkeypatch, caplog
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    caplog.set_level("INFO")
    note_slow_precision(cpu_trainer(precision))
    sentences = [record.getMessage() for record in caplog.records]
    if said:
        assert len(sentences) == 1 and "--trainer.precision 32-true" in sentences[0]
    else:
        assert sentences == []
