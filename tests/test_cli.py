"""The mtt-lab command line: experts -> info -> distill (with resume) -> evaluate, and quickstart."""

import argparse
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import CLI_EXPERTS as TINY
from conftest import copy_store

from mtt_lab import cli, course
from mtt_lab.cli import main


@pytest.fixture(scope="module")
def store_dir(cli_store):
    """``mtt-lab experts TINY`` (made once per test run, see conftest): read, never written."""
    return cli_store


def distill_args(store_dir, out, iterations, *extra):
    return ["distill", "--experts", str(store_dir), "--out", str(out), "--syn-steps", "3", "--expert-epochs", "1",
            "--max-start-epoch", "2", "--iterations", str(iterations), "--checkpoint-every", "2", "--device", "cpu",
            *extra]


def test_experts_and_info(store_dir, capsys):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert len(manifest["experts"]) == 2 and manifest["model"]["name"] == "ConvNetW16"
    assert main(["info", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 experts x 3 epochs" in out and "all files OK" in out
    assert "protocol: experts · all of mnist10k's training split · hard labels · no ZCA · DSA in training yes" in out


def test_info_names_a_corrupt_file(store_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in store_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "expert_001.pt").read_bytes()
    (broken / "expert_001.pt").write_bytes(data[: len(data) // 2])
    assert main(["info", str(broken)]) == 1
    assert "expert_001.pt" in capsys.readouterr().err


def test_distill_resume_matches_an_uninterrupted_run(store_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(distill_args(store_dir, straight, 6)) == 0
    assert main(distill_args(store_dir, resumed, 4)) == 0  # as if killed after 4 iterations...
    assert main(distill_args(store_dir, resumed, 6, "--resume")) == 0  # ...and resumed to 6
    a = torch.load(straight / "images.pt", weights_only=True)
    b = torch.load(resumed / "images.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"]) and a["syn_lr"] == b["syn_lr"]
    log_a = (straight / "log.jsonl").read_text().splitlines()
    log_b = (resumed / "log.jsonl").read_text().splitlines()
    assert len(log_a) == len(log_b) == 6
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in log_a] == [strip(x) for x in log_b]
    assert (straight / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_a_run_and_a_baseline(store_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(distill_args(store_dir, run, 2)) == 0
    assert main(["evaluate", str(run), "--models", "ConvNetW16", "LeNet", "--epochs", "3", "--runs", "2",
                 "--device", "cpu"]) == 0
    rows = json.loads((run / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["ConvNetW16", "LeNet"]
    assert all(len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 1 for r in rows)
    assert [(r["card"]["method"], r["card"]["ipc"], r["card"]["labels"], r["card"]["dsa_distill"], r["card"]["epochs"],
             r["card"]["runs"]) for r in rows] == [("mtt", 1, "hard", True, 3, 2)] * 2
    out = capsys.readouterr().out
    assert "protocol: mtt · IPC 1 · hard labels · no ZCA · DSA distill/eval yes/yes · LeNet · 3 ep · 2 runs" in out
    assert main(["evaluate", "--baseline", "random", "--ipc", "2", "--models", "ConvNetW16", "--epochs", "2",
                 "--runs", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ConvNetW16:" in out and "protocol: random · IPC 2 · hard labels · no ZCA · DSA distill/eval n/a/yes" in out


NO_NOTEBOOK_PACKAGES = """
import sys
for name in ("plotly", "ipywidgets", "anywidget", "IPython", "jupyterlab"):
    sys.modules[name] = None  # `import name` now raises ImportError, as without the notebooks extra
from mtt_lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_command_line_needs_no_notebook_packages(store_dir, tmp_path):
    """`pip install mtt_lab` (no extras) runs every step of the command line: the grid.png of a run
    comes from mtt_lab.images (Pillow), never from plotly."""
    run = tmp_path / "run"
    for argv in (distill_args(store_dir, run, 1),
                 ["evaluate", str(run), "--models", "ConvNetW16", "--epochs", "1", "--runs", "1", "--device", "cpu"],
                 ["info", str(run)]):
        done = subprocess.run([sys.executable, "-c", NO_NOTEBOOK_PACKAGES, *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / "eval.json").is_file()


@pytest.mark.parametrize("baseline, labels", [("herding", "hard"), ("k-center", "hard"), ("soft-labels", "soft")])
def test_baselines_made_with_an_expert(store_dir, baseline, labels, capsys):
    assert main(["evaluate", "--baseline", baseline, "--experts", str(store_dir), "--models", "ConvNetW16",
                 "--epochs", "1", "--runs", "1", "--device", "cpu"]) == 0
    assert f"protocol: {baseline} · IPC 1 · {labels} labels · no ZCA · DSA distill/eval n/a/yes · ConvNetW16 · 1 ep" \
        in capsys.readouterr().out


# every method through the CLI, at tiny sizes: --set for its knobs, one run-folder format
FAMILY = {"dc": ["--set", "batch_real=4"], "dm": ["--set", "batch_real=8"],
          "rat-bptt": ["--set", "window=2", "--set", "max_unroll=3", "--set", "batch_real=16"],
          "dd": ["--set", "steps=2", "--set", "batch_real=16"]}


def method_args(method, store_dir, out, iterations, *extra):
    if method == "mtt":
        return distill_args(store_dir, out, iterations, *extra)
    return ["distill", "--method", method, "--out", str(out), "--iterations", str(iterations), "--checkpoint-every",
            "2", "--device", "cpu", "--set", "model_kwargs={'width': 4, 'depth': 1}", *FAMILY[method], *extra]


@pytest.mark.parametrize("method", ["mtt", *FAMILY])
def test_every_method_resumes_exactly(method, store_dir, tmp_path, capsys):
    """2 iterations, then --resume to 4, gives the images, lr and log of 4 straight iterations."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(method_args(method, store_dir, straight, 4)) == 0
    assert main(method_args(method, store_dir, resumed, 2)) == 0
    assert main(["distill", "--out", str(resumed), "--iterations", "4", "--resume", "--device", "cpu",
                 *(["--experts", str(store_dir)] if method == "mtt" else [])]) == 0
    a = torch.load(straight / "images.pt", weights_only=True)
    b = torch.load(resumed / "images.pt", weights_only=True)
    assert a["method"] == b["method"] == method and b["iteration"] == 4
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert a["syn_lr"] == b["syn_lr"]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    log_a, log_b = ((run / "log.jsonl").read_text().splitlines() for run in (straight, resumed))
    assert len(log_a) == 4 and [strip(x) for x in log_a] == [strip(x) for x in log_b]
    config = json.loads((resumed / "config.json").read_text())
    assert config["method"] == method and (config["experts"] is None) == (method != "mtt")
    assert (resumed / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["info", str(resumed)]) == 0
    assert "all files OK" in capsys.readouterr().out
    assert main(method_args(method, store_dir, resumed, 2)) == 2  # a second run into the folder is refused
    other = "dm" if method != "dm" else "dd"
    assert main(["distill", "--method", other, "--out", str(resumed), "--resume", "--device", "cpu"]) == 2
    assert f"holds a {method} run; resume it with --method {method}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["experts", "--dataset", "nope", "--out", "x"], "'nope'"),
    (["experts", "--experts", "0", "--out", "x"], "num_experts must be >= 1, got 0"),
    (["distill", "--experts", "/nonexistent/store", "--out", "x"], "/nonexistent/store"),
    (["evaluate", "/nonexistent/run"], "/nonexistent/run"),
    (["distill", "--method", "kip", "--out", "x"], "method must be one of mtt, dc, dm, rat-bptt, dd; got 'kip'"),
    (["distill", "--out", "x"], "--method mtt matches expert trajectories: it needs --experts STORE"),
    (["distill", "--method", "rat-bptt", "--set", "window=5", "--set", "max_unroll=3", "--out", "x"],
     "window W=5 is longer than the unroll length max_unroll=3"),
    (["distill", "--method", "dm", "--ipc", "5000", "--out", "x"],
     "ipc=5000 real images per class requested, but the smallest class of mnist10k has only"),
    (["distill", "--method", "dm", "--syn-steps", "3", "--out", "x"], "dm has no setting syn_steps; its settings: ipc"),
    (["distill", "--method", "dd", "--set", "steps", "--out", "x"], "--set 'steps': expected KEY=VALUE"),
    (["distill", "--method", "dd", "--set", "steps=two", "--out", "x"], "steps must be int; got 'two'"),
    (["distill", "--method", "dd", "--experts", "somewhere", "--out", "x"], "drop --experts (only mtt uses it)"),
    (["evaluate", "--baseline", "soft-labels"], "--baseline soft-labels needs --experts STORE (an expert labels"),
    (["evaluate", "--baseline", "herding"], "--baseline herding needs --experts STORE"),
    (["evaluate", "--baseline", "best"], "--baseline must be one of random, herding, k-center, soft-labels, full"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_distill_rejects_a_start_epoch_beyond_the_trajectories(store_dir, tmp_path, capsys):
    argv = distill_args(store_dir, tmp_path / "r", 2)
    argv[argv.index("--max-start-epoch") + 1] = "5"
    assert main(argv) == 2
    assert "beyond the 3 epochs" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "mtt_lab.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("experts", "distill", "evaluate", "info", "quickstart"):
        assert command in out.stdout


@pytest.mark.slow
def test_quickstart_writes_its_summary_and_grid(tmp_path, quick_experts, monkeypatch, capsys):
    """The README's demo on a tiny budget: every step and file, not the accuracy. The demo's claim
    (MTT at IPC 1 clearly beats the random real images it starts from) is asserted by notebook 00,
    which runs the same preset with the same seed. The demo's experts are the course's quick
    experts, so the run reuses them (``OUT/experts`` is complete: ``train_experts`` resumes it with
    nothing to do)."""
    copy_store(quick_experts, tmp_path / "experts")
    monkeypatch.setattr(course, "QUICK", replace(course.QUICK, iterations=5, eval_epochs=20, eval_runs=1))
    assert main(["quickstart", "--out", str(tmp_path), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"random_acc", "mtt_acc", "expert_acc", "cards", "seconds"}
    assert summary["preset"]["iterations"] == 5 and len(summary["mtt_acc"]) == len(summary["random_acc"]) == 1
    assert summary["cards"]["mtt"]["method"] == "MTT" and summary["cards"]["random"]["dsa_distill"] is None
    assert summary["cards"]["mtt"]["epochs"] == 20 and summary["cards"]["experts"]["runs"] == 2
    assert all(0 <= a <= 1 for a in summary["random_acc"] + summary["mtt_acc"])
    assert min(summary["expert_acc"]) > 0.8
    assert (tmp_path / "run" / "grid.png").is_file() and (tmp_path / "run" / "images.pt").is_file()
    out = capsys.readouterr().out
    for row in ("Random real, IPC 1", "MTT distilled, IPC 1", "Experts (all 8,000 images)"):
        assert row in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["distill"]["seed"] == 0
    # --seed reaches the experts too: a seed-1 demo refuses to reuse the seed-0 experts in OUT
    assert main(["quickstart", "--out", str(tmp_path), "--device", "cpu", "--seed", "1"]) == 2
    assert "the same settings" in capsys.readouterr().err  # the seed-0 store, refused for seed 1


def test_every_option_of_every_command_explains_itself():
    """``--help``: each option has a text, and a default appears once (none printed as None)."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"mtt-lab {name} {action.option_strings or action.dest}: no help text"
        text = sub.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
    assert "``" not in parser.format_help()


def test_kd_and_dlb_write_run_folders(store_dir, tmp_path, capsys):
    small = ["--per-class", "5", "--epochs", "1", "--runs", "1", "--device", "cpu"]
    assert main(["dlb", "--noise", "0.2", *small, "--out", str(tmp_path / "dlb")]) == 0
    assert main(["kd", "--teacher-store", str(store_dir), *small, "--out", str(tmp_path / "kd")]) == 0
    for run in ("dlb", "kd"):
        results = json.loads((tmp_path / run / "results.json").read_text())
        rows = [r for r in results.values() if isinstance(r, dict) and "accuracies" in r]
        assert len(rows) >= 2 and all(0 <= a <= 1 for r in rows for a in r["accuracies"])
        assert {r["card"]["labels"] for r in rows} == {"hard", "soft"} and all(r["card"]["ipc"] == 5 for r in rows)
        assert json.loads((tmp_path / run / "config.json").read_text())["runs"] == 1
    assert "results.json" in capsys.readouterr().out


def test_every_command_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["evaluate", "/nonexistent/run"]) == 2
    assert calls == [True]


# ----------------------------------------------------------------------------------------------
# run folders are protected, values and sources are checked before any work


def test_a_run_folder_needs_resume_or_overwrite(store_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(distill_args(store_dir, run, 2)) == 0
    (run / "eval.json").write_text("[]")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    assert main(distill_args(store_dir, run, 2)) == 2
    assert "is not empty: it holds another run; continue that run with --resume, replace it with --overwrite" \
        in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # untouched
    assert main(distill_args(store_dir, run, 2, "--overwrite", "--seed", "1")) == 0
    assert not (run / "eval.json").exists()  # nothing of the old run is left to mix with the new one
    assert main(["info", str(run)]) == 0
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main(distill_args(store_dir, run, 2, "--overwrite", "--resume"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(distill_args(store_dir, other, 2)) == 2
    assert "holds other files" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, needle", [
    ("--lr-img", "inf", "lr_img must be a finite number > 0"),
    ("--lr-img", "1e39", "at most 3.4e+38 (the largest float32), got 1e+39"),
    ("--lr-teacher", "nan", "lr_teacher must be a finite number > 0"),
    ("--lr-lr", "-1", "lr_lr must be a finite number >= 0"),
    ("--iterations", "0", "iterations must be >= 1, got 0"),
    ("--checkpoint-every", "0", "checkpoint_every must be an integer >= 1"),
    ("--pixel-limit", "inf", "pixel_limit must be a finite number > 0"),
])
def test_bad_distill_values_are_refused_before_any_folder(store_dir, tmp_path, capsys, flag, value, needle):
    argv = distill_args(store_dir, tmp_path / "run", 2)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
])
def test_bad_expert_values_are_refused_before_any_folder(tmp_path, capsys, argv, needle):
    assert main(["experts", *TINY, *argv, "--out", str(tmp_path / "store")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_an_offline_torchvision_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTT_LAB_DATA", str(tmp_path / "data"))
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    monkeypatch.setattr(tv_utils, "download_url", no_network)
    assert main(["experts", "--dataset", "mnist", "--out", str(tmp_path / "store"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'mnist'" in err and "mnist10k" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


ONE = ["--experts", "1", "--epochs", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def zca_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "zca"
    assert main(["experts", "--model", "ConvNetW16", *ONE, "--zca", "--out", str(out)]) == 0
    return out


def test_resume_checks_the_store(store_dir, zca_store, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(distill_args(store_dir, run, 2)) == 0
    lenet = tmp_path / "lenet"
    assert main(["experts", "--model", "LeNet", *ONE, "--out", str(lenet)]) == 0
    assert main(distill_args(lenet, run, 3, "--resume")) == 2
    err = capsys.readouterr().err
    assert "was distilled from 2 ConvNetW16 experts x 3 epochs on mnist10k" in err and "of another model" in err
    assert main(distill_args(zca_store, run, 3, "--resume")) == 2
    assert "trained with other settings" in capsys.readouterr().err
    from PIL import Image  # a store of another dataset: 12 tiny greyscale images in two classes

    for split, n in (("train", 4), ("test", 2)):
        for c in "ab":
            (tmp_path / "pics" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 40 * i + 100 * (c == "b")).save(tmp_path / "pics" / split / c / f"{i}.png")
    pics = tmp_path / "pics_store"
    assert main(["experts", "--model", "ConvNetW16", *ONE, "--dataset", f"folder:{tmp_path / 'pics'}",
                 "--out", str(pics)]) == 0
    assert main(distill_args(pics, run, 3, "--resume")) == 2
    assert f"holds 1 ConvNetW16 experts x 3 epochs on folder:{tmp_path / 'pics'}" in capsys.readouterr().err
    assert main(["info", str(run)]) == 0  # the refused resumes changed nothing


def test_zca_travels_with_the_synthetic_set(zca_store, tmp_path, monkeypatch):
    store, run = zca_store, tmp_path / "run"
    assert main(distill_args(store, run, 2)) == 0
    assert torch.load(run / "images.pt", weights_only=True)["zca"] is True
    seen = []
    real = cli.load_splits
    monkeypatch.setattr(cli, "load_splits", lambda name, **kw: seen.append((name, kw["zca"])) or real(name, **kw))
    assert main(["evaluate", str(run), "--models", "ConvNetW16", "--epochs", "2", "--runs", "1",
                 "--device", "cpu"]) == 0
    assert seen == [("mnist10k", True)]  # the test images are whitened like the distilled ones
    assert json.loads((run / "eval.json").read_text())[0]["mean"] > 0.1


def test_info_reports_mixed_and_unfinished_run_folders(store_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(distill_args(store_dir, a, 2)) == 0
    assert main(distill_args(store_dir, b, 2)) == 0
    (b / "images.pt").write_bytes((a / "images.pt").read_bytes())  # a mixed folder
    capsys.readouterr()
    assert main(["info", str(b)]) == 1
    assert "belongs to another run" in capsys.readouterr().err
    (b / "images.pt").unlink()  # a half-written one
    assert main(["info", str(b)]) == 1
    assert "images.pt: missing, the run is unfinished" in capsys.readouterr().err
    assert main(distill_args(store_dir, b, 2, "--resume")) == 0  # and --resume finishes it
    assert main(["info", str(b)]) == 0


def test_a_diverging_run_stops_with_the_cause(store_dir, tmp_path, capsys):
    assert main(distill_args(store_dir, tmp_path / "run", 20, "--lr-img", "1e12")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "the synthetic pixels reached" in err[0] and "lr_img = 1e+12 is too high" in err[0]
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) < 20 and all(abs(json.loads(line)["pixel_max"]) < 1e3 for line in log[:-1] or ["{\"pixel_max\": 0}"])
