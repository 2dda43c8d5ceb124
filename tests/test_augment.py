"""mtt_lab.augment: DSA op groups, the Siamese property, differentiability and strategies."""

import pytest
import torch

from mtt_lab.augment import (
    DIGIT_STRATEGY,
    FULL_STRATEGY,
    OPS,
    DSAParams,
    default_strategy,
    dsa,
    parse_strategy,
    seeded_generator,
)

GROUPS = list(OPS)
LINEAR_GROUPS = ["crop", "cutout", "flip", "scale", "rotate"]  # linear in x once the parameters are drawn


def batch(shape=(8, 3, 16, 16), seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_changes_the_batch_and_keeps_its_shape(group):
    x = batch()
    out = dsa(x, group, seeded_generator(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x, atol=1e-3)
    assert torch.equal(x, batch())  # the input is not modified in place


@pytest.mark.parametrize("group, params", [
    ("flip", DSAParams(flip_prob=0.0)),
    ("cutout", DSAParams(cutout=0.0)),
    ("crop", DSAParams(crop_pad=0.0)),
    ("scale", DSAParams(scale=1.0)),
    ("rotate", DSAParams(rotate=0.0)),
    ("color", DSAParams(brightness=0.0, saturation=0.0, contrast=0.0)),
])
def test_zero_magnitude_is_identity_or_known(group, params):
    x = batch(dtype=torch.float64)
    out = dsa(x, group, seeded_generator(0), params)
    if group == "color":
        # saturation 0 turns every image grey; then contrast scales it about its mean by c ~ U(0, 1)
        grey = x.mean(dim=1, keepdim=True)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        centred = grey - mean
        c = ((out - mean) * centred).sum(dim=(1, 2, 3)) / (3 * centred.square().sum(dim=(1, 2, 3)))
        assert ((c >= 0) & (c < 1)).all() and c.std() > 0.05
        torch.testing.assert_close(out, (c.view(-1, 1, 1, 1) * centred + mean).expand_as(x), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(out, x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("group", GROUPS)
def test_same_seed_same_transform_other_seed_other_transform(group):
    x = batch()
    a = dsa(x, group, seeded_generator(5))
    b = dsa(x, group, seeded_generator(5))
    c = dsa(x, group, seeded_generator(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("group", LINEAR_GROUPS)
def test_siamese_linear_groups(group):
    # Same generator state => the same transform on two different batches of the same shape:
    # for a linear transform T, T(a + b) = T(a) + T(b) only if all three calls drew the same T.
    a, b = batch(seed=1, dtype=torch.float64), batch(seed=2, dtype=torch.float64)
    ta, tb = dsa(a, group, seeded_generator(9)), dsa(b, group, seeded_generator(9))
    torch.testing.assert_close(dsa(a + b, group, seeded_generator(9)), ta + tb, atol=1e-12, rtol=0)
    # and with another seed the identity fails (the check has teeth)
    assert not torch.allclose(dsa(a + b, group, seeded_generator(10)), ta + tb, atol=1e-3)


def test_siamese_color_is_affine():
    # brightness, saturation and contrast with fixed parameters form an affine map T(x) = Lx + t
    a, b = batch(seed=1, dtype=torch.float64), batch(seed=2, dtype=torch.float64)
    zero = torch.zeros_like(a)
    T = lambda x, seed=3: dsa(x, "color", seeded_generator(seed))  # noqa: E731
    torch.testing.assert_close(T(a + b), T(a) + T(b) - T(zero), atol=1e-12, rtol=0)
    assert not torch.allclose(T(a + b, seed=4), T(a) + T(b) - T(zero), atol=1e-3)


@pytest.mark.parametrize("group, shape", [(g, (2, 3, 5, 5)) for g in GROUPS] + [("crop", (2, 1, 6, 6))])
def test_gradcheck(group, shape):
    x = batch(shape, seed=7, dtype=torch.float64).requires_grad_()

    def transform(inp):
        return dsa(inp, group, seeded_generator(11))  # a fresh generator: the same transform every call

    assert torch.autograd.gradcheck(transform, (x,), eps=1e-6, atol=1e-5)


def shifted(x, shifts):
    """out[k, :, i, j] = x[k, :, i + dy, j + dx], zero outside: the reference crop."""
    out = torch.zeros_like(x)
    _, _, h, w = x.shape
    for k, (dx, dy) in enumerate(shifts.tolist()):
        rows = slice(max(0, -dy), min(h, h - dy))
        cols = slice(max(0, -dx), min(w, w - dx))
        src_rows = slice(rows.start + dy, rows.stop + dy)
        src_cols = slice(cols.start + dx, cols.stop + dx)
        out[k, :, rows, cols] = x[k, :, src_rows, src_cols]
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_crop_is_an_integer_shift_with_zero_fill(dtype, atol):
    x = batch((16, 3, 32, 32), seed=3, dtype=dtype) + 0.5  # no zeros of its own
    seed = 21
    out = dsa(x, "crop", seeded_generator(seed))
    # replay the draws of dsa: the group choice, then one (dx, dy) in [-4, 4] per image
    g = seeded_generator(seed)
    torch.randint(1, (1,), generator=g)
    pad = round(32 * DSAParams().crop_pad)
    shifts = torch.randint(-pad, pad + 1, (16, 2), generator=g)
    assert (shifts != 0).any(dim=1).sum() >= 12 and shifts.abs().max() == 4
    torch.testing.assert_close(out, shifted(x, shifts), atol=atol, rtol=0)


def test_cutout_zeroes_one_square_per_image():
    x = batch((8, 3, 16, 16), seed=4) + 1  # strictly positive
    out = dsa(x, "cutout", seeded_generator(2))
    side = round(16 * DSAParams().cutout)
    for k in range(8):
        hole = (out[k] == 0).all(dim=0)
        assert torch.equal(out[k][:, ~hole], x[k][:, ~hole])  # untouched elsewhere
        rows, cols = torch.nonzero(hole, as_tuple=True)
        assert 0 < hole.sum() <= side * side
        assert hole.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
        assert rows.max() - rows.min() + 1 <= side and cols.max() - cols.min() + 1 <= side


def test_flip_flips_whole_images():
    x = batch((32, 1, 6, 6), seed=5)
    out = dsa(x, "flip", seeded_generator(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is either flipped or kept
    assert 4 <= sum(flipped) <= 28  # about half, with probability 0.5 each


def test_multi_group_strategy_applies_one_group():
    x = batch()
    seen = set()
    for seed in range(12):
        out = dsa(x, "crop_cutout", seeded_generator(seed))
        crop, cutout = (torch.equal(out, dsa(x, g, seeded_generator(seed))) for g in ("crop", "cutout"))
        assert crop != cutout  # exactly one of the groups, replayed with the same draws
        seen.add("crop" if crop else "cutout")
    assert seen == {"crop", "cutout"}


def test_strategies():
    assert "flip" not in parse_strategy(default_strategy("mnist10k"))
    assert "flip" not in parse_strategy(default_strategy("svhn"))
    assert "flip" in parse_strategy(default_strategy("cifar10"))
    assert default_strategy("mnist10k") == DIGIT_STRATEGY and default_strategy("cifar100") == FULL_STRATEGY
    assert parse_strategy(FULL_STRATEGY) == ["color", "crop", "cutout", "flip", "scale", "rotate"]
    assert parse_strategy("") == [] and parse_strategy("none") == []


def test_unknown_group_is_named():
    with pytest.raises(ValueError, match="'blur'"):
        dsa(batch(), "crop_blur", seeded_generator(0))
    with pytest.raises(ValueError, match="'Crop'"):
        parse_strategy("Crop")


def test_empty_strategy_is_identity():
    x = batch()
    g = seeded_generator(0)
    assert dsa(x, "", g) is x
    assert dsa(x, "none", g) is x


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (64, 1, 28, 28)])
def test_full_strategy_on_a_batch_of_64(shape):
    x = batch(shape, seed=8)
    for seed in range(6):
        out = dsa(x, FULL_STRATEGY, seeded_generator(seed))
        assert out.shape == shape and torch.isfinite(out).all()
        assert not torch.equal(out, x)
