"""What `mtt-lab` says when things go wrong: every case of the reliability review, run for real.

    python benchmarks/reliability.py > /tmp/reliability.md      # about 2 minutes on 2 CPU cores

Builds a tiny store and run folder in a temporary folder, breaks them the ways a user does, runs
the command a user would, and prints a markdown table: the case, the command, its exit status and
the error line it printed (or its first line of output; temporary paths shortened to ``…``). The assertions live in
``tests/test_files.py`` and ``tests/test_cli.py``; this script is the record of what a person sees.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from PIL import Image

MTT = [sys.executable, "-m", "mtt_lab.cli"]
TINY = ["--model", "ConvNetW16", "--epochs", "3", "--device", "cpu"]
HOLD_LOCK = "import sys, time\nfrom mtt_lab.files import FolderLock\nwith FolderLock(sys.argv[1]):\n" \
            "    print('locked', flush=True); time.sleep(60)"


def distill(store, out, *extra):
    return ["distill", "--experts", str(store), "--out", str(out), "--syn-steps", "2", "--expert-epochs", "1",
            "--max-start-epoch", "2", "--iterations", "3", "--checkpoint-every", "1", "--device", "cpu", *extra]


class Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/mtt_lab_code_ran",)


def images_folder(root: Path, splits=("train", "test"), mode="L") -> Path:
    for split in splits:
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (10, 10) if mode == "L" else (10, 10, 3), dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")
    return root


def run(argv, tmp, env=None) -> tuple[int, str]:
    done = subprocess.run([*MTT, *argv], capture_output=True, text=True, env={**os.environ, **(env or {})})
    errors = [line for line in done.stderr.replace("\r", "\n").splitlines() if "error:" in line or
              line.startswith("BAD")]  # not the progress bars
    out = done.stdout.strip().splitlines()
    text = errors[0] if errors else next((line for line in out if "trajectory store" in line), out[0])
    return done.returncode, text.replace(str(tmp), "…")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="reliability-"))
    store, good = tmp / "store", tmp / "run"
    subprocess.run([*MTT, "experts", *TINY, "--experts", "2", "--out", str(store)], check=True, capture_output=True)
    subprocess.run([*MTT, *distill(store, good)], check=True, capture_output=True)
    other = tmp / "other"
    subprocess.run([*MTT, *distill(store, other)], check=True, capture_output=True)
    cases = []

    def case(name, argv, prepare=None, env=None):
        work = tmp / f"case{len(cases)}"
        shutil.copytree(store, work / "store")
        shutil.copytree(good, work / "run")
        if prepare:
            prepare(work)
        argv = [a.replace("{w}", str(work)) for a in argv]
        status, text = run(argv, tmp, env)
        cases.append((name, " ".join(argv).replace(str(tmp), "…"), status, text))

    w_store, w_run = "{w}/store", "{w}/run"
    case("truncated images.pt", ["evaluate", w_run, "--device", "cpu"],
         lambda w: (w / "run/images.pt").write_bytes((w / "run/images.pt").read_bytes()[:500]))
    case("empty images.pt", ["evaluate", w_run, "--device", "cpu"], lambda w: (w / "run/images.pt").write_bytes(b""))
    case("foreign pickle as images.pt", ["evaluate", w_run, "--device", "cpu"],
         lambda w: torch.save(Evil(), w / "run/images.pt"))
    case("truncated checkpoint.pt, --resume", distill(w_store, w_run, "--resume"),
         lambda w: (w / "run/checkpoint.pt").write_bytes((w / "run/checkpoint.pt").read_bytes()[:999]))
    case("empty expert file", distill(w_store, "{w}/new"), lambda w: (w / "store/expert_001.pt").write_bytes(b""))
    case("expert of the wrong shape", distill(w_store, "{w}/new"),
         lambda w: torch.save(torch.zeros(2, 3), w / "store/expert_001.pt"))
    case("distill into a finished run folder", distill(w_store, w_run))
    case("--resume and --overwrite together", distill(w_store, w_run, "--resume", "--overwrite"))
    case("info on a mixed run folder (images.pt of another run)", ["info", w_run],
         lambda w: shutil.copy(other / "images.pt", w / "run/images.pt"))
    case("info on an unfinished run folder", ["info", w_run], lambda w: (w / "run/images.pt").unlink())
    case("lr_img = 1e8 (divergence)", distill(w_store, "{w}/new", "--lr-img", "1e8"))
    case("lr_img = inf", distill(w_store, "{w}/new", "--lr-img", "inf"))
    case("lr_img = 1e39 (beyond float32)", distill(w_store, "{w}/new", "--lr-img", "1e39"))
    case("--checkpoint-every 0", distill(w_store, "{w}/new", "--checkpoint-every", "0"))
    case("--iterations 0", distill(w_store, "{w}/new", "--iterations", "0"))
    case("experts --lr nan", ["experts", *TINY, "--lr", "nan", "--out", "{w}/new"])
    case("--resume with a store of another model", distill("{w}/lenet", w_run, "--resume"),
         lambda w: subprocess.run([*MTT, "experts", "--model", "LeNet", "--experts", "2", "--epochs", "3",
                                   "--device", "cpu", "--out", str(w / "lenet")], check=True, capture_output=True))
    case("image folder without train/ and test/", ["experts", *TINY, "--dataset", "folder:{w}/images",
                                                   "--out", "{w}/new"],
         lambda w: images_folder(w / "images", splits=("",)))
    case("image folder with a corrupt PNG", ["experts", *TINY, "--dataset", "folder:{w}/images", "--out", "{w}/new"],
         lambda w: images_folder(w / "images").joinpath("train/a/0.png").write_bytes(b"\x89PNG broken"))
    case("missing image folder", ["experts", *TINY, "--dataset", "folder:{w}/nowhere", "--out", "{w}/new"])
    case("greyscale image folder (holdout)", ["experts", *TINY, "--experts", "1", "--dataset",
                                              "folder:{w}/images?holdout=0.34", "--out", "{w}/new"],
         lambda w: images_folder(w / "images", splits=("",)))
    case("torchvision MNIST offline", ["experts", *TINY, "--dataset", "mnist", "--out", "{w}/new"],
         env={"MTT_LAB_DATA": str(tmp / "no-data")})
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp / "locked")], stdout=subprocess.PIPE)
    (tmp / "locked").mkdir(exist_ok=True)
    holder.stdout.readline()
    case("a second writer of a store", ["experts", *TINY, "--experts", "3", "--out", str(tmp / "locked")])
    holder.kill()
    if os.geteuid() == 0:
        disk = tmp / "disk"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode == 0:
            shutil.copytree(store, disk / "store", dirs_exist_ok=True)
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(b"\0" * (free - 12 * 1024))  # 12 KiB left: less than a checkpoint
            case("disk full during distill (a full 1 MiB tmpfs)", distill(disk / "store", disk / "run"))
            subprocess.run(["umount", str(disk)], check=True)
    print("| case | command | exit | what it prints |\n| --- | --- | --- | --- |")
    for name, argv, status, text in cases:
        text = textwrap.shorten(text, 300, placeholder=" …")
        print(f"| {name} | `mtt-lab {textwrap.shorten(argv, 90, placeholder=' …')}` | {status} | {text} |")
    print(f"\ncode ran: {Path('/tmp/mtt_lab_code_ran').exists()}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # no options; --help says what it does
    main()
