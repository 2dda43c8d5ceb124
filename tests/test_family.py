"""The family registry (names and knobs checked) and the protocol card."""

import pytest
from family_data import few_digits

from mtt_lab.distribution_matching import DistributionMatching
from mtt_lab.family import METHODS, NAMES, ProtocolCard, build, method_config
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
    assert soft.as_dict()["dsa_distill"] is None
    with pytest.raises(ValueError, match=r"labels must be one of hard, soft; got 'mixed'"):
        ProtocolCard("X", 1, "mixed", False, None, True, "ConvNet", None, 1, 1)
