"""openai/glow's switches (edge-bias padding, ActNorm log-scale factor) and the n×n conv's inner 1×1 form."""

import pytest
import torch
import torch.nn.functional as F

from flowlab.errors import ConfigError
from flowlab.flows import ActNorm, Glow, InvertibleNxNConv
from flowlab.flows.coupling import CouplingNet, conv_same
from tests.settings import run_settings
from tests.unit.test_flows import brute_force_logdet, prepared


def test_edge_bias_is_glows_add_edge_padding():
    """openai/glow pads with zeros, appends a channel that is 1 in the padding and 0 inside, and
    runs a VALID convolution; conv_same computes that as a conv plus a fixed edge map."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for k in (3, 5):
        weight = torch.randn(4, 4, k, k, dtype=torch.float64)
        bias = torch.randn(4, dtype=torch.float64)
        p = k // 2
        padded = F.pad(x, (p, p, p, p))
        edge = torch.ones(2, 1, 5 + 2 * p, 7 + 2 * p, dtype=torch.float64)
        edge[:, :, p:-p, p:-p] = 0
        expected = F.conv2d(torch.cat([padded, edge], dim=1), weight, bias)
        assert torch.allclose(conv_same(x, weight, bias, edge_bias=True), expected, atol=1e-12)
    # without it: a plain zero-padded convolution
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert torch.allclose(conv_same(x, weight), F.conv2d(x, weight, padding=1))


def test_edge_bias_makes_the_border_visible_to_the_coupling_network():
    torch.manual_seed(0)
    net = CouplingNet(2, 4, 8, edge_bias=True)
    assert net.conv1.weight.shape[1] == 3 and net.out.conv.weight.shape[1] == 9
    net(torch.zeros(1, 2, 6, 6))  # data-dependent init
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = net.eval()(torch.zeros(1, 2, 6, 6))
    # a constant (zero) image: without the edge channel interior and border would see the same
    # zero padding pattern only at the border; the edge channel makes border outputs differ
    assert not torch.allclose(out[..., 0, 0], out[..., 3, 3])


def test_actnorm_logscale_factor_reparameterises_the_same_map():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4) * 3 + 1
    plain, scaled = ActNorm(3), ActNorm(3, logscale_factor=3.0)
    y1, ld1 = plain(x)
    y3, ld3 = scaled(x)
    assert torch.allclose(y1, y3, atol=1e-5) and torch.allclose(ld1, ld3, atol=1e-4)
    assert torch.allclose(scaled.logs * 3, plain.logs, atol=1e-6)  # stored as s / 3
    assert torch.allclose(y3.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y3.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # the gradient w.r.t. the stored parameter is 3x that w.r.t. s: Adam moves s 3x faster
    (y3.square().sum() + ld3.sum()).backward()
    (y1.square().sum() + ld1.sum()).backward()
    assert torch.allclose(scaled.logs.grad, 3 * plain.logs.grad, rtol=1e-4)


@pytest.mark.parametrize("inner", ["plain", "lu"])
def test_nxn_inner_conv1x1_form(inner):
    model = Glow(2, 8, K=2, L=1, hidden_channels=8, permutation="nxn", nxn_conv1x1=inner)
    layers = [m for m in model.modules() if isinstance(m, InvertibleNxNConv)]
    assert len(layers) == 2 and all(m.conv.lu == (inner == "lu") for m in layers)


@pytest.mark.parametrize("options", [
    {"edge_bias": True, "actnorm_logscale_factor": 3.0},
    {"permutation": "nxn", "nxn_conv1x1": "lu", "edge_bias": True},
    {"permutation": "conv1x1", "actnorm_logscale_factor": 3.0, "coupling": "additive"},
])
def test_glow_with_options_is_exact(options):
    torch.manual_seed(0)
    options = {"permutation": "nxn", **options}
    model = Glow(in_channels=2, image_size=8, K=2, L=2, hidden_channels=16, **options).double()
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64) - 0.5
    prepared(model, x)
    zs, logdet = model.encode(x)
    assert (model.decode(zs) - x).abs().max() <= 1e-8
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten() for z in model.encode(v)[0]]), x[:1])
    assert torch.allclose(logdet[0], expected, rtol=1e-6, atol=0)
    # the edge channel reaches the split prior too
    if options.get("edge_bias"):
        assert model.splits[0].conv.conv.weight.shape[1] == model.splits[0].keep + 1


@pytest.mark.parametrize("bad", [{"nxn_conv1x1": "qr"}, {"edge_bias": "yes"}, {"actnorm_logscale_factor": 0}])
def test_bad_options_name_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"model.{key}"):
        Glow(2, 8, K=1, L=1, hidden_channels=8, **bad)


def test_an_nxn_checkpoint_from_before_the_switch_loads_with_its_lu_conv():
    """Checkpoints written before nxn_conv1x1 existed hold an LU 1×1 conv inside the n×n conv."""
    from flowlab.lit.module import FlowModule

    model = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 1, "L": 1,
             "hidden_channels": 4, "permutation": "nxn", "nxn_conv1x1": "lu"}
    old = FlowModule(model, {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}}, **run_settings())
    old_model = {k: v for k, v in model.items() if k != "nxn_conv1x1"}
    checkpoint = {"hyper_parameters": {**old.hparams, "model": old_model}, "state_dict": old.state_dict()}
    restored = FlowModule.from_checkpoint(checkpoint)
    assert restored.hparams.model["nxn_conv1x1"] == "lu"
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in old.state_dict().items())
