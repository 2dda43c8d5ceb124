"""Every file mtt_lab reads or writes: validated reads, atomic writes, locks (mtt_lab.files, mtt_lab.runs).

The table-driven test breaks every kind of file in every way a user meets (missing, empty,
truncated, random bytes, a pickle whose unpickling would run code, a valid file of another kind)
and checks both the library's error and what ``mtt-lab`` prints: one line naming the file, what
was expected and what was found, exit status 2 (or a BAD line and status 1 for ``info``), and
never a traceback or the payload's side effect.
"""

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CLI_EXPERTS as TINY
from conftest import copy_store

from mtt_lab import files
from mtt_lab.cli import main
from mtt_lab.data import load_dataset
from mtt_lab.experts import TrajectoryStore
from mtt_lab.files import FileError, FolderLock, LineLog, atomic_write, read_torch, save_torch
from mtt_lab.runs import RunFolder


def distill_argv(store, out, iterations=2, *extra):
    return ["distill", "--experts", str(store), "--out", str(out), "--syn-steps", "2", "--expert-epochs", "1",
            "--max-start-epoch", "2", "--iterations", str(iterations), "--checkpoint-every", "1",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory, cli_store):
    """A store of two tiny experts, a finished 2-iteration run folder and a small image folder."""
    root = tmp_path_factory.mktemp("made")
    copy_store(cli_store, root / "store")
    assert main(distill_argv(root / "store", root / "run")) == 0
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / "folder" / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(i)).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / "folder" / split / c / f"{i}.png")
    return root


class Payload:
    """Unpickling this creates the marker folder: the code execution every reader must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# kind -> (path of the file inside a copy of `made`, a valid file of another kind, how the library reads it,
#          the mtt-lab command that reads it and the status it returns)
KINDS = {
    "manifest": ("store/manifest.json", "run/config.json", lambda r: TrajectoryStore(r / "store"),
                 lambda r: distill_argv(r / "store", r / "new"), 2),
    "expert": ("store/expert_001.pt", "run/images.pt", lambda r: TrajectoryStore(r / "store")[1],
               lambda r: distill_argv(r / "store", r / "new"), 2),
    "synthetic set": ("run/images.pt", "run/checkpoint.pt", lambda r: RunFolder(r / "run").read_synthetic_set(),
                      lambda r: ["evaluate", str(r / "run"), "--epochs", "1", "--runs", "1", "--device", "cpu"], 2),
    "checkpoint": ("run/checkpoint.pt", "run/images.pt", lambda r: RunFolder(r / "run").read_checkpoint(),
                   lambda r: distill_argv(r / "store", r / "run", 3, "--resume"), 2),
    "log": ("run/log.jsonl", "store/manifest.json", lambda r: RunFolder(r / "run").read_log(min_records=2),
            lambda r: distill_argv(r / "store", r / "run", 3, "--resume"), 2),
    "config": ("run/config.json", "store/manifest.json", lambda r: RunFolder(r / "run").read_config(),
               lambda r: distill_argv(r / "store", r / "run", 3, "--resume"), 2),
    "image": ("folder/train/a/0.png", "store/manifest.json",
              lambda r: load_dataset(f"folder:{r / 'folder'}", "train"),
              lambda r: ["experts", "--dataset", f"folder:{r / 'folder'}", "--out", str(r / "new"), *TINY], 2),
}
# the expert file is also checked by `info`, which lists every problem and returns 1
INFO_KINDS = {"expert": lambda r: ["info", str(r / "store")], "synthetic set": lambda r: ["info", str(r / "run")],
              "checkpoint": lambda r: ["info", str(r / "run")], "log": lambda r: ["info", str(r / "run")],
              "config": lambda r: ["info", str(r / "run")]}

DAMAGES = ["missing", "empty", "truncated", "random bytes", "plain pickle", "torch pickle", "another kind"]


def damage(root, kind, how, marker):
    path, other, *_ = KINDS[kind]
    file = root / path
    data = file.read_bytes()
    if how == "missing" and kind == "image":  # one image less is no error; a missing folder is
        shutil.rmtree(root / "folder")
        return root / "folder"
    if how == "missing":
        file.unlink()
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        file.write_bytes(random.Random(0).randbytes(300))
    elif how == "plain pickle":
        file.write_bytes(pickle.dumps(Payload(marker)))
    elif how == "torch pickle":
        torch.save({"images": Payload(marker)}, file)
    else:
        shutil.copy(root / other, file)
    return file


def copy_of(made, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(made, root)
    return root


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_bad_file_is_one_clear_line(made, tmp_path, kind, how, capsys):
    root, marker = copy_of(made, tmp_path), tmp_path / "code_ran"
    file = damage(root, kind, how, marker)
    read, command, status = KINDS[kind][2], KINDS[kind][3], KINDS[kind][4]
    with pytest.raises(FileError) as info:
        read(root)
    message = str(info.value)
    assert "\n" not in message and str(file) in message, message
    if not (kind == "image" and how == "missing"):
        assert "expected" in message and "found" in message, message
    capsys.readouterr()
    assert main(command(root)) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(file) in err, err
    assert not (root / "new").exists()  # checked before any folder was made
    if kind in INFO_KINDS:
        assert main(INFO_KINDS[kind](root)) in (1, 2)
        err = capsys.readouterr().err
        assert str(file) in err and "Traceback" not in err, err
    assert not marker.exists()  # no code ran


def test_the_messages_say_what_was_found(made, tmp_path):
    root = copy_of(made, tmp_path)
    cases = {"empty": "an empty file (0 bytes", "truncated": "a damaged or truncated torch file",
             "random bytes": "bytes that are not a torch file", "plain pickle": "a plain Python pickle (refused unread",
             "torch pickle": "refused: unpickling them could run code", "another kind": "mtt_lab synthetic set"}
    for how, needle in cases.items():
        shutil.copy(made / "run" / "checkpoint.pt", root / "run" / "checkpoint.pt")
        damage(root, "checkpoint", how, tmp_path / "m")
        with pytest.raises(FileError, match=needle.replace("(", r"\(")):
            RunFolder(root / "run").read_checkpoint()


def test_debug_shows_the_traceback(made, tmp_path):
    root = copy_of(made, tmp_path)
    (root / "run" / "images.pt").write_bytes(b"")
    with pytest.raises(FileError):
        main(["--debug", "evaluate", str(root / "run"), "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# writing: atomic, umask, full disks


def test_atomic_write_replaces_whole_files_and_honours_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write(tmp_path / "a.bin", b"first")
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"second"))
        save_torch(tmp_path / "t.pt", torch.arange(3))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"second"
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o664  # group-readable, as the umask allows
    assert torch.equal(read_torch(tmp_path / "t.pt", "a tensor", "-"), torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "t.pt"]  # no temporary files left


def test_a_store_is_readable_by_the_group(tmp_path):
    old = os.umask(0o002)
    try:
        assert main(["experts", "--model", "ConvNetW16", "--experts", "1", "--epochs", "1", "--device", "cpu",
                     "--out", str(tmp_path / "store")]) == 0
    finally:
        os.umask(old)
    for f in (tmp_path / "store").iterdir():
        assert f.stat().st_mode & 0o060 == 0o060, f


def failing_write(error_number):
    def write(f):
        f.write(b"partial")
        raise OSError(error_number, os.strerror(error_number))
    return write


@pytest.mark.parametrize("error_number, cause", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                                 (errno.EIO, "input/output error")])
def test_a_failed_write_keeps_the_previous_file(tmp_path, error_number, cause):
    target = tmp_path / "checkpoint.pt"
    atomic_write(target, b"complete")
    with pytest.raises(FileError, match=rf"cannot write {target}: {re.escape(cause)}.*the previous checkpoint.pt is "
                                        rf"unchanged"):
        atomic_write(target, failing_write(error_number))
    assert target.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_log_append_leaves_no_half_line(tmp_path, monkeypatch):
    with LineLog(tmp_path / "log.jsonl") as log:
        log.append([{"iteration": 1}])
        real_write = os.write
        monkeypatch.setattr(files.os, "write", lambda fd, data: real_write(fd, bytes(data[:5])) and
                            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(FileError, match="cannot append to .*log.jsonl: no space left on device"):
            log.append([{"iteration": 2, "loss": 0.5}])
    assert (tmp_path / "log.jsonl").read_text() == '{"iteration": 1}\n'


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a really full disk (needs root; skipped elsewhere, where injection covers it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_named_and_nothing_is_half_written(made, tiny_disk, capsys):
    shutil.copytree(made / "store", tiny_disk / "store")
    run = tiny_disk / "run"
    # fill the disk up to 12 KiB, so the first checkpoint (tens of KiB) cannot be written
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 12 * 1024))
    assert main(distill_argv(tiny_disk / "store", run, 3)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not the progress bar
    assert len(errors) == 1 and "no space left on device (ENOSPC)" in errors[0], errors
    assert not list(run.glob(".*.tmp")) and not (run / "checkpoint.pt").exists()
    for line in (run / "log.jsonl").read_text().splitlines():
        json.loads(line)  # only whole lines


# ----------------------------------------------------------------------------------------------
# locks

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mtt_lab.files import FolderLock
    with FolderLock(sys.argv[1], "store"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileError, match=rf"store {tmp_path} is being written by another process \(PID "
                                            rf"{holder.pid}"):
            with FolderLock(tmp_path, "store"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # the dead process's lock file is still there...
    with FolderLock(tmp_path, "store"):  # ...and is taken over
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_experts_and_distill_refuse_a_folder_being_written(made, tmp_path, capsys):
    root = copy_of(made, tmp_path)
    for folder, argv in ((root / "store", ["experts", *TINY, "--experts", "3", "--out", str(root / "store")]),
                         (root / "run", distill_argv(root / "store", root / "run", 3, "--resume"))):
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            assert main(argv) == 2
            assert f"PID {holder.pid}" in capsys.readouterr().err
        finally:
            holder.kill()
            holder.wait()
