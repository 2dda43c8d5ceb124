"""mtt_lab.models: every architecture's shapes, and the flat-parameter view ``Functional``."""

import re

import pytest
import torch
import torch.nn.functional as F

from torch.func import functional_call

from mtt_lab.models import MODELS, AvgPool2x2, ConvNet, Functional, avg_pool_2x2, get_model, instance_norm


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_gives_logits(name):
    torch.manual_seed(0)
    for channels, size in ((1, 28), (3, 32)):
        model = get_model(name, channels, 10, size)
        x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(x)
            features = model.embed(x)
        assert logits.shape == (2, 10)
        assert torch.isfinite(logits).all()
        assert features.shape[0] == 2 and features.ndim == 2
        assert not torch.equal(logits[0], logits[1])  # the two images are told apart


@pytest.mark.parametrize("depth, size, side", [(3, 28, 4), (3, 32, 4), (1, 28, 16), (2, 32, 8), (5, 28, 1)])
def test_convnet_geometry(depth, size, side):
    model = get_model("ConvNet", 1, 10, size, width=8, depth=depth)
    first = model.features[0]
    assert isinstance(first, torch.nn.Conv2d)
    assert first.padding == ((3, 3) if size == 28 else (1, 1))  # 28 px digits are padded to 32
    assert model.classifier.in_features == 8 * side * side
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth and all(c.out_channels == 8 for c in convs)
    assert model.embed(torch.zeros(1, 1, size, size)).shape == (1, 8 * side * side)


def test_model_variants_and_overrides():
    default = get_model("ConvNet", 3, 10, 32)
    assert isinstance(default, ConvNet) and default.classifier.in_features == 128 * 16
    assert isinstance(get_model("ConvNetBN", 3, 10, 32).features[1], torch.nn.BatchNorm2d)
    assert isinstance(get_model("ConvNetNN", 3, 10, 32).features[1], torch.nn.Identity)
    assert isinstance(get_model("ConvNetMP", 3, 10, 32).features[3], torch.nn.MaxPool2d)
    assert get_model("ConvNetW16", 3, 7, 32, depth=1).classifier.weight.shape == (7, 16 * 16 * 16)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'ResNet50'"):
        get_model("ResNet50", 3, 10, 32)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        get_model("ConvNet", 3, 10, 32, norm="group")
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        get_model("ConvNet", 3, 10, 32, pooling="sum")
    with pytest.raises(ValueError, match="ConvNet takes no widht in model_kwargs; its keywords: width, depth, norm, pooling"):
        get_model("ConvNet", 3, 10, 32, widht=32)
    with pytest.raises(ValueError, match="LeNet takes no width in model_kwargs; its keywords: none"):
        get_model("LeNet", 3, 10, 32, width=32)


def test_expert_settings_with_a_bad_model_are_refused_before_any_data_is_read(monkeypatch):
    from mtt_lab import experts

    monkeypatch.setattr(experts, "load_splits", lambda *a, **k: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match="ConvNet takes no widht"):
        experts.train_experts(experts.ExpertConfig(model_kwargs={"widht": 32}), "/nonexistent/store")
    with pytest.raises(ValueError, match="image_size=16"):
        get_model("LeNet", 3, 10, 16)


def small_convnet(dtype=torch.float32, norm="instance", seed=0):
    torch.manual_seed(seed)
    return get_model("ConvNet", 3, 10, 16, width=8, depth=2, norm=norm).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_equals_module_exactly(dtype):
    model = small_convnet(dtype)
    f = Functional(model)
    assert f.num_params == sum(p.numel() for p in model.parameters())
    assert f.names == [n for n, _ in model.named_parameters()]
    x = torch.randn(4, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    theta = f.flat_params()
    assert theta.shape == (f.num_params,) and theta.dtype == dtype and not theta.requires_grad
    assert torch.equal(f(theta, x), model(x))
    # another theta gives other logits: the vector really is used
    assert not torch.allclose(f(theta * 1.1, x), model(x))


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_functional_gradient_matches_module_grads(norm):
    model = small_convnet(torch.float64, norm=norm)
    model.train()
    f = Functional(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)

    F.cross_entropy(model(x), y).backward()
    module_grad = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])

    theta = f.flat_params().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(f(theta, x), y), theta)
    assert grad.shape == theta.shape and grad.abs().sum() > 0
    torch.testing.assert_close(grad, module_grad, atol=1e-12, rtol=1e-10)


def test_unflatten_views_share_storage():
    model = small_convnet()
    f = Functional(model)
    theta = torch.arange(f.num_params, dtype=torch.float32)
    params = f.unflatten(theta)
    assert list(params) == f.names
    offset = 0
    for (name, p), view in zip(model.named_parameters(), params.values()):
        assert view.shape == p.shape
        assert view.untyped_storage().data_ptr() == theta.untyped_storage().data_ptr()
        assert view.reshape(-1)[0].item() == offset  # row-major, in named_parameters() order
        offset += p.numel()
    theta[0] = -5.0
    assert params[f.names[0]].reshape(-1)[0].item() == -5.0  # no copy


def test_wrong_shape_theta_is_rejected():
    f = Functional(small_convnet())
    P = f.num_params
    for bad in (torch.zeros(P - 1), torch.zeros(1, P), torch.zeros(P + 3)):
        with pytest.raises(ValueError, match=re.escape(f"shape [{P}], got {list(bad.shape)}")):
            f.unflatten(bad)
    with pytest.raises(ValueError):
        f(torch.zeros(P - 1), torch.zeros(1, 3, 16, 16))


def test_load_into_round_trip():
    source = small_convnet(seed=0)
    f = Functional(source)
    theta = torch.randn(f.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = small_convnet(seed=1)
    assert f.load_into(theta, target) is target
    assert torch.equal(Functional(target).flat_params(), theta.float())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(target(x), f(theta.float(), x))
    # the default target is the wrapped module; the source theta is not touched by later edits
    before = f.flat_params()
    assert f.load_into(theta * 0) is source and f.flat_params().abs().sum() == 0
    assert not torch.equal(before, f.flat_params())


def test_batchnorm_functional_in_train_mode():
    model = small_convnet(norm="batch")
    model.train()
    f = Functional(model)
    bn = model.features[1]
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 + 1
    theta = f.flat_params().requires_grad_()
    out = f(theta, x)
    # the Functional never writes to the module: its running statistics stay as they were
    assert torch.equal(bn.running_mean, running_mean) and torch.equal(bn.running_var, running_var)
    assert int(bn.num_batches_tracked) == 0
    # train mode normalises with batch statistics: same as the module in train mode
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)
    assert not torch.equal(bn.running_mean, running_mean)  # while the module itself does update them
    (grad,) = torch.autograd.grad(out.square().mean(), theta)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # eval mode uses the module's running statistics
    model.eval()
    torch.testing.assert_close(f(theta.detach(), x), model(x), atol=1e-6, rtol=1e-6)


def test_instance_norm_equals_group_norm_to_second_order():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(instance_norm(x, w, b), F.group_norm(x, 4, w, b), atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(instance_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))
    # a third derivative must raise, not come out wrong
    y = instance_norm(x, w, b)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    torch.autograd.grad(gx.pow(2).sum(), x)  # the second derivative: fine
    with pytest.raises(RuntimeError, match="twice, not three times"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (1, 2, 5, 4)])
def test_avg_pool_2x2_equals_avg_pool2d_to_any_order(shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(avg_pool_2x2(x), F.avg_pool2d(x, 2), atol=1e-15, rtol=0)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))
    # a nonlinear function of the pooled values: first, second and third derivatives agree
    w = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64, generator=g)
    v = torch.randn(*shape, dtype=torch.float64, generator=g)

    def derivatives(pool):
        value = torch.tanh(pool(x.sin()) * w).pow(2).sum()
        (d1,) = torch.autograd.grad(value, x, create_graph=True)
        (d2,) = torch.autograd.grad((d1 * v).sum(), x, create_graph=True)
        (d3,) = torch.autograd.grad((d2 * v).sum(), x)
        return d1, d2, d3

    for ours, reference in zip(derivatives(avg_pool_2x2), derivatives(lambda t: F.avg_pool2d(t, 2))):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-9)


def test_convnet_pooling_layer_is_avg_pool_2x2_and_matches_pytorch():
    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 10, 28, width=4).double()
    assert sum(isinstance(layer, AvgPool2x2) for layer in model.features) == 3
    plain = get_model("ConvNet", 1, 10, 28, width=4).double()
    plain.load_state_dict(model.state_dict())
    plain.features = torch.nn.Sequential(*[torch.nn.AvgPool2d(2) if isinstance(layer, AvgPool2x2) else layer
                                           for layer in plain.features])
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"pooling": "max"}, {"norm": "none"}])
def test_functional_convnet_path_matches_functional_call_to_second_order(kwargs):
    """The hand-run ConvNet gives the Hessian-vector products that functional_call gives."""
    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 10, 12, width=4, depth=2, **kwargs).double()
    f = Functional(model)
    assert f._convnet_layers is not None  # the fast path is the one under test
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 12, 12, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (5,), generator=g)
    direction = torch.randn(f.num_params, dtype=torch.float64, generator=g)

    def second_order(forward):
        theta = f.flat_params().requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(forward(theta, x), y), theta, create_graph=True)
        return torch.autograd.grad(grad @ direction, [theta, x])  # H v and d(g . v)/dx

    def plain(theta, images):
        return functional_call(model, f.unflatten(theta), (images,))

    for ours, reference in zip(second_order(f), second_order(plain)):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-9)


def test_functional_leaves_other_models_to_functional_call():
    for norm in ("batch", "layer"):
        assert Functional(get_model("ConvNet", 1, 10, 28, width=4, norm=norm))._convnet_layers is None
    assert Functional(get_model("LeNet", 1, 10, 28))._convnet_layers is None
