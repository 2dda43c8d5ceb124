"""The family registry (names and knobs checked), the protocol card, the cost meter and the results table."""

import sys
from dataclasses import replace

import pytest
import torch
from family_data import few_digits

from mtt_lab.distribution_matching import DistributionMatching
from mtt_lab.evaluate import EvalResult
from mtt_lab.family import METHODS, NAMES, Meter, ProtocolCard, Result, build, markdown_table, method_config, score
from mtt_lab.rat_bptt import RaTBPTT


@pytest.fixture(scope="module")
def digits(mnist_train):
    return few_digits(mnist_train, per_class=3)


def test_build_by_name(digits):
    dm = build("dm", digits, ipc=2, iterations=3, model_kwargs={"width": 4, "depth": 1}, device="cpu")
    assert isinstance(dm, DistributionMatching) and dm.config.ipc == 2 and dm.images.shape == (20, 1, 28, 28)
    assert isinstance(build("rat-bptt", digits, window=2, max_unroll=2, device="cpu"), RaTBPTT)
    assert sorted(METHODS) == ["dc", "dd", "dm", "rat-bptt"] and NAMES == ("mtt", "dc", "dm", "rat-bptt", "dd")


def test_unknown_names_and_knobs(digits):
    with pytest.raises(ValueError, match=r"method must be one of dc, dm, rat-bptt, dd; got 'kip'"):
        build("kip", digits)
    with pytest.raises(ValueError, match=r"method must be one of dc, dm, rat-bptt, dd; got 'mtt'"):
        build("mtt", digits)  # MTT needs a trajectory store: Distiller, not build
    with pytest.raises(ValueError, match=r"dm has no setting window; its settings: ipc, .*batch_real"):
        build("dm", digits, window=3)


def test_method_config_checks_names_knobs_and_kinds():
    assert method_config("mtt", syn_steps=3).syn_steps == 3
    assert method_config("dd", steps=2, model_kwargs={"width": 4}).model_kwargs == {"width": 4}
    with pytest.raises(ValueError, match=r"method must be one of mtt, dc, dm, rat-bptt, dd; got 'kip'"):
        method_config("kip")
    with pytest.raises(ValueError, match=r"mtt has no setting window; its settings: ipc, syn_steps"):
        method_config("mtt", window=3)
    for key, value, needle in (("window", "abc", "window must be int; got 'abc'"),
                               ("window", True, "window must be int; got True"),
                               ("batch_syn", 2.5, r"batch_syn must be int \| None; got 2.5"),
                               ("dsa", 1, "dsa must be bool; got 1")):
        with pytest.raises(ValueError, match=needle):
            method_config("rat-bptt", **{key: value})
    assert method_config("rat-bptt", lr_img=1, batch_syn=None).lr_img == 1  # an int is a fine float


def test_card_line_and_dict():
    card = ProtocolCard("DC", 10, "hard", False, True, True, "ConvNet", 32, 300, 3)
    assert card.line() == ("DC · IPC 10 · hard labels · no ZCA · DSA distill/eval yes/yes · ConvNet w32 · "
                           "300 ep · 3 runs · final epoch")
    soft = ProtocolCard("Soft labels", 1, "soft", True, None, False, "ConvNet", None, 50, 2, best_epoch_shown=True)
    assert "soft labels · ZCA · DSA distill/eval n/a/no · ConvNet · 50 ep" in soft.line()
    assert soft.line().endswith("final epoch (+ best shown)")
    assert "50 ep · 1 run · final" in replace(soft, runs=1).line()
    assert soft.as_dict()["dsa_distill"] is None
    with pytest.raises(ValueError, match=r"labels must be one of hard, soft; got 'mixed'"):
        ProtocolCard("X", 1, "mixed", False, None, True, "ConvNet", None, 1, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc")
def test_meter_sees_a_block_that_was_freed_before_it_ended():
    with Meter("cpu") as small:
        torch.ones(2**20).sum()  # 4 MiB
    with Meter("cpu") as big:
        x = torch.ones(48 * 2**20)  # 192 MiB, written, then freed inside the block
        x.sum()
        del x
    assert big.peak_bytes >= 180 * 2**20 > small.peak_bytes
    # freed memory that the allocator kept is handed back first, so a second block is not measured as free
    with Meter("cpu") as again:
        torch.ones(48 * 2**20).sum()
    assert again.peak_bytes >= 180 * 2**20
    assert big.seconds > 0


def test_meter_without_proc(monkeypatch):
    from mtt_lab import family

    monkeypatch.setattr(family, "start_peak", lambda: None)
    with Meter("cpu") as cost:
        pass
    assert cost.peak_bytes is None and cost.seconds >= 0


def test_markdown_table_rows_carry_their_card():
    card = ProtocolCard("DM", 10, "hard", False, True, True, "ConvNet", 32, 300, 3)
    rows = [Result(card, EvalResult("ConvNet", (0.9, 0.92, 0.94), 300, 0.01), 12.5, 30, 300 * 2**20),
            Result(ProtocolCard("Random", 10, "hard", False, None, True, "ConvNet", 32, 300, 3),
                   EvalResult("ConvNet", (0.8,), 300, 0.01), 0.002)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method | IPC | accuracy %")
    assert lines[2] == f"| DM | 10 | 92.0 ± 1.6 | 12.5 | 30 | 0.417 | 300 | {card.line()} |"  # 3 significant digits
    assert lines[3].startswith("| Random | 10 | 80.0 ± 0.0 | 0.002 | – | – | – | Random · IPC 10")


def test_score_reads_the_card_off_its_inputs(digits, mnist_test):
    test = few_digits(mnist_test, per_class=5)
    images, hard = digits.sample_per_class(2, torch.Generator().manual_seed(0))
    soft = torch.nn.functional.one_hot(hard, 10).float() * 0.8 + 0.02
    with Meter("cpu") as cost:
        pass
    tiny = dict(model_kwargs={"width": 4, "depth": 1}, epochs=2, runs=2)
    hard_row = score("DM", images, hard, 0.01, test, dsa_distill=True, cost=cost, iterations=7, **tiny)
    soft_row = score("Soft labels", images, soft, 0.01, test, dsa_distill=None, **tiny)
    assert hard_row.card == ProtocolCard("DM", 2, "hard", False, True, True, "ConvNet", 4, 2, 2)
    assert soft_row.card.labels == "soft" and soft_row.card.dsa_distill is None and soft_row.seconds == 0.0
    assert hard_row.iterations == 7 and hard_row.seconds == cost.seconds and len(hard_row.accuracy.accuracies) == 2
