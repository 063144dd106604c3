"""Glow's class-conditional top prior (flows.multiscale.ConditionalTopPrior) and the class-conditional models built on it."""

import math

import pytest
import torch
from torch.nn import functional as F

from flowlab.errors import ConfigError
from flowlab.flows import PERMUTATIONS, ConditionalTopPrior, Glow, RealNVP
from flowlab.flows.multiscale import gaussian_log_prob
from tests.settings import run_settings

N_CLASSES = 5


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _closed_form(prior: ConditionalTopPrior, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ log N(z; m_c + a_c(y), exp(s_c + b_c(y))²) by hand, [a | b] = (W one_hot(y) + bias) · exp(3 · logs)."""
    c = z.shape[1]
    lin = prior.y_emb
    h = (F.one_hot(y, prior.n_classes).double() @ lin.linear.weight.T + lin.linear.bias) * torch.exp(3 * lin.logs)
    mean = prior.mean.view(1, c, 1, 1) + h[:, :c, None, None]
    logs = prior.logs.view(1, c, 1, 1) + h[:, c:, None, None]
    var = torch.exp(2 * logs)
    return (-0.5 * math.log(2 * math.pi) - logs - (z - mean) ** 2 / (2 * var)).sum(dim=(1, 2, 3))


def test_conditional_prior_log_prob_matches_the_closed_form():
    prior = ConditionalTopPrior(3, N_CLASSES).double()
    _randomise(prior)
    z = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2])
    got = gaussian_log_prob(z, *prior(z.shape, y))
    assert torch.allclose(got, _closed_form(prior, z, y), rtol=1e-12, atol=1e-12)
    # the classes matter: another class gives another density
    assert not torch.allclose(got, gaussian_log_prob(z, *prior(z.shape, (y + 1) % N_CLASSES)))
    # the classifier: a linear map of the mean over positions, scaled by exp(3 · logs)
    c = prior.classifier
    expected = (z.mean(dim=(2, 3)) @ c.linear.weight.T + c.linear.bias) * torch.exp(3 * c.logs)
    assert torch.allclose(prior.logits(z), expected, rtol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: Glow(1, 8, K=2, L=2, hidden_channels=8, y_condition=True, n_classes=N_CLASSES),
    lambda: RealNVP(1, 8, K=1, L=2, hidden_channels=4, num_blocks=1, y_condition=True, n_classes=N_CLASSES),
], ids=["glow", "realnvp"])
def test_model_log_prob_given_y_is_the_closed_form_top_term(make):
    """log p(x|y) − log p(x|y') is the difference of the closed-form top priors (everything else is shared)."""
    torch.manual_seed(0)
    model = make().double().eval()
    _randomise(model.top_prior, seed=1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5
    y, y2 = torch.tensor([0, 1, 4]), torch.tensor([3, 3, 0])
    z_top = model.encode(x)[0][-1]
    by_hand = _closed_form(model.top_prior, z_top, y) - _closed_form(model.top_prior, z_top, y2)
    assert torch.allclose(model.log_prob(x, y) - model.log_prob(x, y2), by_hand, rtol=1e-10, atol=1e-10)
    bpd = model.bits_per_dim(x, y)
    assert torch.allclose(bpd, (-model.log_prob(x, y) / 64 + 8 * math.log(2)) / math.log(2), rtol=1e-12)


@pytest.mark.parametrize("learn_top", [True, False])
def test_a_new_conditional_model_equals_the_unconditional_one(learn_top):
    """Zero-initialised linear maps: at initialisation p(x|y) = p(x) for every y, and samples are the same."""
    torch.manual_seed(3)
    plain = Glow(1, 8, K=2, L=2, hidden_channels=8, learn_top=learn_top).double()
    torch.manual_seed(3)
    cond = Glow(1, 8, K=2, L=2, hidden_channels=8, learn_top=learn_top, y_condition=True, n_classes=N_CLASSES).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5
    plain.initialize(x)
    cond.initialize(x)
    for y in range(N_CLASSES):
        assert torch.equal(cond.log_prob(x, torch.full((4,), y)), plain.log_prob(x))
    assert torch.equal(cond.bits_and_logits(x, torch.arange(4))[1], torch.zeros(4, N_CLASSES, dtype=torch.float64))
    torch.manual_seed(7)
    a = plain.sample(3, temperature=0.7)
    torch.manual_seed(7)
    assert torch.equal(cond.sample(3, temperature=0.7, y=2), a)


def test_y_is_required_by_a_conditional_model_and_refused_by_an_unconditional_one():
    cond = Glow(1, 8, K=1, L=2, hidden_channels=4, y_condition=True, n_classes=N_CLASSES)
    plain = Glow(1, 8, K=1, L=2, hidden_channels=4)
    x = torch.rand(2, 1, 8, 8) - 0.5
    for call in (lambda: cond.log_prob(x), lambda: cond.bits_per_dim(x), lambda: cond.sample(2)):
        with pytest.raises(ValueError, match=r"class-conditional .*give the class labels y"):
            call()
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.log_prob(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.sample(2, y=1)
    with pytest.raises(ValueError, match="2 class labels"):
        cond.log_prob(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="y=5 is not a class"):
        cond.sample(2, y=N_CLASSES)


def test_the_conditional_switches_are_checked():
    with pytest.raises(ConfigError, match=r"model.y_condition=true needs class labels.*model.n_classes=None"):
        Glow(1, 8, K=1, L=2, hidden_channels=4, y_condition=True)
    with pytest.raises(ConfigError, match=r"model.n_classes=1 is not allowed"):
        RealNVP(1, 8, K=1, L=2, hidden_channels=4, y_condition=True, n_classes=1)
    with pytest.raises(ConfigError, match=r"model.y_weight=-0.1 is not allowed"):
        Glow(1, 8, K=1, L=2, hidden_channels=4, y_condition=True, n_classes=3, y_weight=-0.1)
    with pytest.raises(ConfigError, match=r"model.y_condition='yes'"):
        Glow(1, 8, K=1, L=2, hidden_channels=4, y_condition="yes", n_classes=3)
    # y_weight = 0: no classifier (openai/glow builds y_logits only for weight_y > 0)
    model = Glow(1, 8, K=1, L=2, hidden_channels=4, y_condition=True, n_classes=3, y_weight=0.0)
    assert model.top_prior.classifier is None
    assert model.bits_and_logits(torch.zeros(2, 1, 8, 8), torch.tensor([0, 2]))[1] is None


BUILDS = {**{p: lambda p=p: Glow(2, 8, K=2, L=2, hidden_channels=8, permutation=p, y_condition=True,
                                  n_classes=N_CLASSES) for p in PERMUTATIONS},
          "nxn_lu": lambda: Glow(2, 8, K=2, L=2, hidden_channels=8, nxn_conv1x1="lu", y_condition=True,
                                 n_classes=N_CLASSES),
          "realnvp": lambda: RealNVP(2, 8, K=1, L=2, hidden_channels=4, num_blocks=1, y_condition=True,
                                     n_classes=N_CLASSES)}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_permutation_and_realnvp_build_encode_decode_sample_and_train_with_y(name):
    torch.manual_seed(0)
    model = BUILDS[name]()
    x = torch.rand(4, 2, 8, 8) - 0.5
    y = torch.tensor([0, 1, 2, 4])
    model.initialize(x)
    bpd, logits = model.bits_and_logits(x, y)
    loss = bpd.mean() + model.y_weight * F.cross_entropy(logits, y) / math.log(2)
    loss.backward()
    assert torch.isfinite(bpd).all() and logits.shape == (4, N_CLASSES)
    # the class embedding and the classifier both learn
    assert model.top_prior.y_emb.linear.weight.grad.abs().sum() > 0
    assert model.top_prior.classifier.linear.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        zs, _ = model.encode(x)
        assert torch.allclose(model.decode(zs), x, atol=1e-4)
        assert torch.isfinite(model.log_prob(x, y)).all()
        s = model.sample(3, temperature=0.7, y=torch.tensor([0, 3, 4]))
    assert s.shape == (3, 2, 8, 8) and torch.isfinite(s).all()


# ---- training: Glow's objective, the metric names, the data ------------------------------------------------------
def _module(y_weight: float = 0.01):
    from flowlab.lit.module import FlowModule
    from tests.settings import optim

    model = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 1, "L": 2, "hidden_channels": 4,
             "y_condition": True, "n_classes": N_CLASSES, "y_weight": y_weight}
    return FlowModule(model=model, optim=optim(), **run_settings())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_training_loss_is_bits_x_plus_y_weight_times_bits_y():
    """openai/glow: loss = bits_x + weight_y · bits_y, bits_x the bits/dim of x given y, bits_y = cross-entropy / ln 2
    per image (bits, not divided by the dimensions)."""
    torch.manual_seed(0)
    module = _module(y_weight=0.3)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 4, 4])
    xd = module.dequantize_train(x)
    module.dequantize_train = lambda _: xd
    module.flow.initialize(xd)
    _randomise(module.flow.top_prior, seed=2)
    loss = module.training_step((x, y, torch.arange(4)), 0)
    bits_x = module.flow.bits_per_dim(xd, y).mean()
    logits = module.flow.top_prior.logits(module.flow.encode(xd)[0][-1])
    bits_y = F.cross_entropy(logits, y) / math.log(2)
    assert bits_y > 0.1
    assert torch.allclose(loss, bits_x + 0.3 * bits_y, rtol=1e-6)
    assert (module.bpd_name, module.classifies) == ("bpd_cond", True)
    assert _module(y_weight=0.0).classifies is False


def test_data_configs_state_their_classes_and_the_data_checks_them(tmp_path):
    from flowlab.cli._build import check_data_fits_model
    from tests.settings import datamodule

    assert datamodule("cifar10", tmp_path, n_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match=r"data.n_classes=5 does not match cifar10, which has labels of 10 classes"):
        datamodule("cifar10", tmp_path, n_classes=5)
    with pytest.raises(ConfigError, match=r"data.n_classes=10 does not match celebahq256, which has no labels"):
        datamodule("celebahq256", tmp_path, n_classes=10)
    assert datamodule("imagenet32_chrabaszcz", tmp_path, n_classes=1000).num_classes == 1000
    png = datamodule("imagenet32", tmp_path, n_classes=None)
    assert png.num_classes == 1
    # a class-conditional checkpoint refuses data without labels, or with another number of classes
    model_hp = {"in_channels": 3, "image_size": 32, "n_bits": 8, "y_condition": True, "n_classes": 10}
    with pytest.raises(ConfigError, match=r"class-conditional over 10 classes but data=imagenet32 has no labels"):
        check_data_fits_model(png, model_hp, "checkpoint x")
    check_data_fits_model(datamodule("cifar10", tmp_path), model_hp, "checkpoint x")
    check_data_fits_model(png, {**model_hp, "y_condition": False}, "checkpoint x")
