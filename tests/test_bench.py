"""Smoke tests of ``hyperconn bench``: tiny sizes, one round, no timing assertions."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hyperconn import bench
from hyperconn.bench import Case, main, measure_memory, paired_ratio, render_markdown, write_report
from hyperconn.bench import layer as layer_bench
from hyperconn.bench import peers

TINY_LAYER = ["--streams", "2", "--dims", "8", "--batch", "1", "--seq", "4",
              "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet"]
TINY_MODEL = ["--layers", "1", "--dim", "16", "--heads", "2", "--seq", "8", "--batch", "1", "--vocab", "32",
              "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet", "--device", "cpu"]
HAS_PEER = importlib.util.find_spec("hyper_connections") is not None


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_layer_json_report(tmp_path):
    out = tmp_path / "layer.json"
    assert main(["layer", *TINY_LAYER, "--device", "cpu", "--no-target", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "layer"
    cases = {r["case"] for r in report["records"]}
    assert {"residual", "hc", "mhc", "isohc", "hybrid", "harmonized", "mhc+recompute"} <= cases
    assert ("peer-mhcv2" in cases) == HAS_PEER and ("peer-mhc" in cases) == HAS_PEER
    assert "peer-mhcv2+triton" not in cases  # CUDA only
    meta = report["meta"]
    assert meta["command"].startswith("hyperconn bench layer")
    assert meta["machine"]["torch"] == torch.__version__ and meta["machine"]["cpu_cores"] >= 1
    for r in report["records"]:
        assert r["median_s"] > 0 and len(r["samples_s"]) == 1
        assert r["activation_bytes"] is not None and r["peak_bytes"] is not None and r["peak_bytes"] >= 0
    res = next(r for r in report["records"] if r["case"] == "residual")
    assert res["x_residual"] == pytest.approx(1.0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_layer_markdown_with_target(tmp_path):
    out = tmp_path / "layer.md"
    args = ["layer", "--streams", "4", "--dims", "512", "--batch", "1", "--seq", "2", "--repeats", "1",
            "--warmup", "0", "--cases", "residual", "mhc", "mhc+recompute", "peer-mhcv2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert text.startswith("# hyperconn bench layer")
    assert "- machine:" in text and "- date:" in text and "- command: `hyperconn bench layer" in text
    assert "## Summary: ours mhc" in text
    if HAS_PEER:
        assert "## Target: n=4, C=512" in text


def test_layer_without_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(layer_bench, "peer_status", lambda: (False, "peer rows skipped: not installed"))
    out = tmp_path / "nopeer.json"
    assert main(["layer", *TINY_LAYER, "--no-target", "--device", "cpu", "--no-memory", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not any(r["case"].startswith("peer-") for r in report["records"])
    assert "peer rows skipped: not installed" in report["notes"]
    assert all(r["speedup_vs_mhcv2"] is None for r in report["records"])  # nan → null in JSON


@pytest.mark.skipif(not HAS_PEER, reason="hyper-connections not installed")
@pytest.mark.parametrize("kind", ["mhc", "mhcv2"])
def test_peer_case_shapes(kind):
    case = peers.peer_case(kind, 8, 2, 3, 5, device=torch.device("cpu"))
    out = case.forward()
    assert tuple(out.shape) == peers.peer_input_shape(kind, 3, 5, 2, 8)
    case.backward(out)


def test_peer_status_reports():
    ok, note = peers.peer_status()
    assert ok == HAS_PEER and isinstance(note, str) and note


def test_model_smoke(tmp_path):
    out = tmp_path / "model.md"
    assert main(["model", *TINY_MODEL, "--variants", "mhc", "isohc", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# hyperconn bench model")
    for name in ("residual", "mhc", "isohc", "residual+recompute", "mhc+recompute"):
        assert f"| {name} |" in text


def test_model_json_no_recompute(tmp_path):
    out = tmp_path / "model.json"
    assert main(["model", *TINY_MODEL, "--variants", "hc", "--no-recompute", "--no-memory", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["records"]] == ["residual", "hc"]
    assert report["summary"]["mhc_overhead"] is None


@pytest.mark.parametrize("argv", [[], ["nope"], ["layer", "--repeats", "0"], ["layer", "--bogus"],
                                  ["model", "--variants", "nope"], ["layer", "--cases", "nope", "--quiet"],
                                  ["layer", "--streams", "0", "--quiet"], ["model", "--dim", "15", "--quiet"]])
def test_usage_errors(argv, capsys):
    assert main(argv) == 2


def test_help(capsys):
    assert main(["--help"]) == 0
    assert main(["layer", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_helpers(tmp_path):
    times = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 2.0]}
    assert paired_ratio(times, "a", "b") == 3.0
    assert paired_ratio(times, "a", "missing") != paired_ratio(times, "a", "missing")  # nan
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    case = Case("lin", forward=lambda: lin(x), backward=lambda out: out.sum().backward())
    mem = measure_memory(case, torch.device("cpu"))
    assert mem["activation_bytes"] >= 0 and mem["peak_bytes"] >= 0
    report = {"kind": "layer", "meta": bench.meta(["layer"], torch.device("cpu"), {"k": 1}),
              "tables": [{"title": "t", "columns": ["a", "b"], "rows": [["x", "1"]]}], "notes": ["n"]}
    report["meta"]["machine"]["load_avg_end"] = None
    md = render_markdown(report)
    assert "| a | b |" in md and "| x | 1 |" in md
    path = write_report(report, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["kind"] == "layer"


def test_cli_dispatch(tmp_path):
    cli = pytest.importorskip("hyperconn.cli")
    if "bench" not in getattr(cli, "COMMANDS", {}):
        pytest.skip("hyperconn CLI has no bench command yet")
    out = tmp_path / "cli.json"
    assert cli.main(["bench", "layer", *TINY_LAYER, "--no-target", "--no-memory", "--cases", "residual", "mhc",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["command"].startswith("hyperconn bench layer")


def test_layer_case_suffixes(tmp_path):
    """``+torch`` and ``+recompute`` combine; the record says which kernels ran."""
    out = tmp_path / "layer.json"
    assert main(["layer", *TINY_LAYER, "--no-target", "--no-memory", "--device", "cpu",
                 "--cases", "residual", "mhc+torch", "hc+recompute+torch", "--out", str(out)]) == 0
    recs = {r["case"]: r for r in json.loads(out.read_text())["records"]}
    assert recs["mhc+torch"]["kernels"] == "torch" and not recs["mhc+torch"]["recompute"]
    assert recs["hc+recompute+torch"]["recompute"] and recs["hc+recompute+torch"]["variant"] == "hc"
    with pytest.raises(bench.UsageError, match="mhc\\+fast"):
        layer_bench.parse_case("mhc+fast")
    with pytest.raises(bench.UsageError):
        layer_bench.parse_case("mhc+torch+torch")


def test_model_stream_dtype_setting(tmp_path):
    out = tmp_path / "model.json"
    assert main(["model", *TINY_MODEL, "--variants", "mhc", "--no-recompute", "--no-memory",
                 "--stream-dtype", "bfloat16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["settings"]["stream_dtype"] == "bfloat16"
    assert all("streams=bfloat16" in r["config"] for r in report["records"])
