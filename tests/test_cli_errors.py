"""Bad inputs end in one line naming the argument (exit 2), and leave nothing behind."""

from __future__ import annotations

import json

import pytest

from hyperconn.train import train
from test_cli import TINY, run_main
from test_train import tiny


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hyperconn {command}: error:"), lines[0]
    return lines[0]


@pytest.fixture
def corpora(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "short.txt").write_bytes(b"tiny")
    return tmp_path


@pytest.mark.parametrize("paths, flag, words", [
    ("missing.txt", "--data-paths", "does not exist"),
    ("empty.txt", "--data-paths", "empty"),
    ("emptydir", "--data-paths", "no file found"),
    ("*.nomatch", "--data-paths", "matches no file"),
    ("short.txt", "--model.seq-len", "longer than the longest document"),
])
def test_corpus_problems_are_one_line_and_leave_no_run_dir(corpora, capsys, paths, flag, words):
    # Before: a traceback, and an empty run directory was left behind.
    out_dir = corpora / "run"
    code, _, err = run_main(["train", "--out-dir", str(out_dir), *TINY, "--task", "bytes",
                             "--data-paths", str(corpora / paths), "--steps", "2"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and flag in line and words in line
    assert not out_dir.exists()


def test_unwritable_cache_is_one_line_naming_the_variable(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("HYPERCONN_CACHE", str(blocker / "cache"))  # below a file: cannot be created
    code, _, err = run_main(["train", "--out-dir", str(tmp_path / "run"), *TINY, "--task", "bytes",
                             "--steps", "2"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and "HYPERCONN_CACHE" in line


@pytest.mark.parametrize("command", ["train", "compare"])
def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys, command):
    target = tmp_path / "file"
    target.write_text("x")
    argv = (["train", "--out-dir", str(target), *TINY, "--steps", "2"] if command == "train"
            else ["compare", "--preset", "smoke", "--out", str(target), "--quiet"])
    code, _, err = run_main(argv, capsys)
    line = one_error_line(err, command)
    assert code == 2 and ("--out-dir" if command == "train" else "--out") in line and "not a directory" in line


def test_report_errors_name_the_argument(tmp_path, capsys):
    train(tiny(tmp_path / "run", steps=2))
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_main(["report", str(tmp_path / "run"), "--out", str(target)], capsys)
    assert code == 2 and "--out" in one_error_line(err, "report")
    code, _, err = run_main(["report", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "dirs:" in one_error_line(err, "report")  # nothing to report
    assert not (tmp_path / "nowhere").exists()
    # Before: an unreadable config.json silently labelled the variant by the directory name.
    (tmp_path / "run" / "config.json").write_text("{not json")
    code, _, err = run_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")], capsys)
    line = one_error_line(err, "report")
    assert code == 1 and "config.json cannot be read" in line


def test_step_that_cannot_fit_in_memory_fails_early_with_the_estimate(tmp_path, capsys):
    code, _, err = run_main(["train", "--out-dir", str(tmp_path / "run"), *TINY, "--batch-size", "2000000",
                             "--model.seq-len", "4096", "--steps", "1"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and "--batch-size" in line and "GiB" in line
    assert not (tmp_path / "run").exists()


def test_memory_estimate_is_a_lower_bound_of_a_real_step():
    import torch
    from hyperconn.models import GPT
    from hyperconn.train.memory import step_activation_bytes

    cfg = tiny("unused", variant="mhc", batch_size=8)
    model = GPT(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.model.seq_len))
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().logsumexp(-1).sum()
    assert step_activation_bytes(cfg) <= saved


def test_lock_holder_is_named_in_the_cli_line(tmp_path, capsys):
    from hyperconn.train.run_dir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        code, _, err = run_main(["train", "--out-dir", str(run), *TINY, "--steps", "2"], capsys)
        holder = json.loads((run / ".lock.json").read_text())
    line = one_error_line(err, "train")
    assert code == 2 and "--out-dir" in line and f"pid {holder['pid']}" in line
