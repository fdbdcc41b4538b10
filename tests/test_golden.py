"""Behaviour preserved across restructurings: the layer's outputs and gradients and a
short training run per variant reproduce the golden file recorded before the change
(scripts/record_golden.py), bit for bit on this CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = torch.load(ROOT / "tests" / "golden" / "golden.pt")

_spec = importlib.util.spec_from_file_location("record_golden", ROOT / "scripts" / "record_golden.py")
record_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_golden)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,variant,kwargs", record_golden.LAYER_CASES, ids=[c[0] for c in record_golden.LAYER_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_layer_matches_golden(name, variant, kwargs, dtype):
    want = GOLDEN["layer"][f"{name}/{dtype}".replace("torch.", "")]
    got = record_golden.layer_case(variant, kwargs, dtype)
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        if ref is None:
            assert got[key] is None, key
        else:
            assert torch.equal(got[key], ref), f"{key}: max diff {(got[key] - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("variant", sorted(GOLDEN["train"]))
def test_training_matches_golden(variant):
    """Every number the golden run logged is logged again, unchanged (diagnostics added
    since may add keys to a row, never change one)."""
    got, want = record_golden.train_case(variant), GOLDEN["train"][variant]
    assert len(got) == len(want)
    for row, ref in zip(got, want):
        assert {k: row.get(k, "<missing>") for k in ref} == ref
