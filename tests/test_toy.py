"""The toy model that scripts/train_toy.py trains must grow an induction circuit: a
previous-token head in layer 0 and an induction head in layer 1 (Olsson et al. 2022),
judged by resid's head detectors and by the loss on a repeated sequence."""

import importlib.util
from pathlib import Path

import pytest

import resid

ROOT = Path(__file__).parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("train_toy", ROOT / "scripts" / "train_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_induction_circuit(found: dict[str, float]) -> None:
    assert found["previous_token_L0"] > 0.5, found
    assert found["induction_L1"] > 0.5, found
    assert found["loss_repeated_half"] < 0.25 * found["loss_first_half"], found


def test_training_grows_an_induction_circuit(toy_trained):
    _, found = toy_trained
    assert_induction_circuit(found)


def test_the_committed_checkpoint_has_the_circuit_too():
    committed = ROOT / "notebooks" / "toy-induction"
    if not committed.is_dir():
        pytest.skip("no committed toy checkpoint")
    assert_induction_circuit(load_script().evaluate(resid.load(committed, device="cpu")))
