"""Exactness of every flow layer and of Glow: inverses, brute-force log-dets, priors, bits/dim."""

import math

import pytest
import torch
import torch.nn.functional as F

from flowlab import flows
from flowlab.errors import ConfigError
from flowlab.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    CouplingNet,
    EmergingConv,
    FlowStep,
    Glow,
    InvertibleConv1x1,
    InvertibleNxNConv,
    InvertibleShift,
    MaskedConv,
    Reverse,
    Shuffle,
    Squeeze,
)

PERMUTATIONS = list(flows.PERMUTATIONS)
COUPLINGS = ["affine", "additive"]

LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "shift": lambda c: InvertibleShift(c),
    "conv1x1": lambda c: InvertibleConv1x1(c, lu=False),
    "conv1x1_lu": lambda c: InvertibleConv1x1(c, lu=True),
    "nxn": lambda c: InvertibleNxNConv(c, kernel_size=3, lu=True),
    "nxn_plain": lambda c: InvertibleNxNConv(c, kernel_size=5, lu=False),
    "reverse": lambda c: Reverse(c),
    "shuffle": lambda c: Shuffle(c),
    "masked": lambda c: MaskedConv(c, 2),
    "masked_flipped": lambda c: MaskedConv(c, 3, flipped=True),
    "emerging": lambda c: EmergingConv(c, 3),
    "affine": lambda c: AffineCoupling(c, 8),
    "additive": lambda c: AdditiveCoupling(c, 8),
    "squeeze": lambda c: Squeeze(),
}


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move every parameter off its initial value, so zero-initialised parts cannot hide errors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def prepared(model, x: torch.Tensor, scale: float = 0.05, seed: int = 1):
    """ActNorm initialised on ``x``, every parameter perturbed, eval mode: a model as tests want it."""
    model.initialize(x)
    perturb(model, scale, seed)
    return model.eval()


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at a single sample x [1, ...] via the dense autograd Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten())
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverse_and_logdet(name):
    torch.manual_seed(0)
    layer = LAYERS[name](4).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    layer(x)  # data-dependent initialisation where there is one
    perturb(layer)
    layer.eval()
    y, logdet = layer(x)
    assert logdet.shape == (3,)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10, rtol=0)
    for i in range(2):
        expected = brute_force_logdet(lambda v: layer(v)[0], x[i : i + 1])
        assert torch.allclose(logdet[i], expected, rtol=1e-6, atol=1e-9), (logdet[i], expected)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_glow_inverse_and_logdet(permutation, coupling):
    torch.manual_seed(0)
    model = Glow(in_channels=2, image_size=8, K=2, L=2, hidden_channels=16, permutation=permutation, coupling=coupling)
    model = model.double()
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64) - 0.5
    prepared(model, x)
    zs, logdet = model.encode(x)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    assert (model.decode(zs) - x).abs().max() <= 1e-8
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten() for z in model.encode(v)[0]]), x[:1])
    assert torch.allclose(logdet[0], expected, rtol=1e-6, atol=0), (logdet[0], expected)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_glow_float32_roundtrip(permutation):
    torch.manual_seed(0)
    model = Glow(3, 16, K=3, L=3, hidden_channels=32, permutation=permutation)
    x = torch.rand(4, 3, 16, 16) - 0.5
    prepared(model, x, 0.02)
    with torch.no_grad():
        zs, _ = model.encode(x)
        assert (model.decode(zs) - x).abs().max() <= 1e-4
        bpd = model.bits_per_dim(x)
    assert bpd.dtype == torch.float32 and torch.isfinite(bpd).all()


def test_shift_alpha_never_reaches_zero():
    torch.manual_seed(0)
    shift = InvertibleShift(3)
    opt = torch.optim.Adam(shift.parameters(), lr=0.5)
    x = torch.randn(8, 3, 4, 4)
    for _ in range(3000):  # push |α| → 0 as hard as Adam can
        opt.zero_grad()
        shift.alpha().abs().sum().backward()
        opt.step()
    alpha = shift.alpha()
    assert (alpha.abs() > 0).all() and torch.isfinite(alpha).all()
    y, logdet = shift(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert torch.allclose(shift.inverse(y), x, atol=1e-3, rtol=1e-3)


def test_nxn_equals_1x1_conv_with_bias():
    torch.manual_seed(0)
    for lu in (True, False):
        layer = InvertibleNxNConv(6, kernel_size=3, lu=lu).double()
        perturb(layer, 0.3)
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        w = layer.conv.weight_matrix()
        alpha, beta = layer.shift.alpha(), layer.shift.beta
        expected = F.conv2d(x, (w @ torch.diag(alpha)).view(6, 6, 1, 1), w @ beta)
        y, logdet = layer(x)
        assert torch.allclose(y, expected, atol=1e-12)
        # ... and equals the composition S then 1×1 conv, log-dets added.
        s, ld_s = layer.shift(x)
        composed, ld_w = layer.conv(s)
        assert torch.allclose(y, composed, atol=1e-12)
        assert torch.allclose(logdet, ld_s + ld_w)
        assert layer.kernel_size == 3


def test_sample_temperature_zero_is_deterministic_and_samples_finite():
    torch.manual_seed(0)
    model = Glow(1, 8, K=2, L=2, hidden_channels=16, permutation="nxn")
    x = torch.rand(8, 1, 8, 8) - 0.5
    prepared(model, x, 0.02)
    a = model.sample(3, temperature=0.0)
    torch.manual_seed(123)
    b = model.sample(3, temperature=0.0)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])  # no noise at all: every sample is the decoded prior mean
    for t in (0.0, 0.5, 1.0):
        s = model.sample(5, temperature=t)
        assert s.shape == (5, 1, 8, 8) and torch.isfinite(s).all()
    with pytest.raises(ValueError):
        model.sample(2, temperature=-1)


def test_bits_per_dim_closed_form():
    """An untrained Glow with additive couplings and reverse permutations is a volume-preserving
    permutation of the input with prior N(0, I) everywhere, so bits/dim has a closed form."""
    model = Glow(3, 8, K=2, L=2, hidden_channels=8, permutation="reverse", coupling="additive", n_bits=5)
    model.eval()  # ActNorm stays the identity
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    model = model.double()
    d = 3 * 8 * 8
    log_prob = (-0.5 * math.log(2 * math.pi) - 0.5 * x**2).flatten(1).sum(1)
    expected = (-log_prob / d + 5 * math.log(2)) / math.log(2)
    assert torch.allclose(model.log_prob(x), log_prob, atol=1e-10)
    assert torch.allclose(model.bits_per_dim(x), expected, atol=1e-12)
    zero = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert model.bits_per_dim(zero).item() == pytest.approx(0.5 * math.log2(2 * math.pi) + 5, abs=1e-12)


def test_actnorm_data_dependent_init_and_saved_flag():
    torch.manual_seed(0)
    layer = ActNorm(3)
    x = torch.randn(16, 3, 4, 4) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + 1.5
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    restored = ActNorm(3)
    restored.load_state_dict(layer.state_dict())
    assert bool(restored.initialized)
    y2, _ = restored(torch.randn(16, 3, 4, 4) * 10)  # must not re-initialise on new data
    assert torch.equal(restored.logs, layer.logs) and torch.equal(restored.bias, layer.bias)


def test_actnorm_constant_channel_is_finite():
    layer = ActNorm(2)
    x = torch.zeros(4, 2, 3, 3)
    x[:, 1] = torch.randn(4, 3, 3)
    y, logdet = layer(x)
    assert torch.isfinite(layer.logs).all() and torch.isfinite(layer.bias).all()
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    model = Glow(1, 8, K=1, L=1, hidden_channels=8)
    bpd = model.bits_per_dim(torch.full((2, 1, 8, 8), -0.5))  # an all-black batch, first (init) pass
    assert torch.isfinite(bpd).all()


def test_conv1x1_inverse_cache_follows_weight_changes():
    torch.manual_seed(0)
    layer = InvertibleConv1x1(4, lu=False).eval()
    y = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        first = layer.inverse_matrix()
        assert layer.inverse_matrix() is first  # cached in eval mode
        layer.weight.add_(0.1 * torch.randn(4, 4))
        second = layer.inverse_matrix()
        assert second is not first
        assert torch.allclose(second.double() @ layer.weight.double(), torch.eye(4, dtype=torch.float64), atol=1e-6)
        x, _ = layer(layer.inverse(y))
        assert torch.allclose(x, y, atol=1e-5)
    # torch's fused Adam updates parameters without bumping their version counters: the cache
    # must still notice (found by the soak test through a growing reconstruction error).
    for lu in (False, True):
        layer = InvertibleConv1x1(4, lu=lu).eval()
        opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
        with torch.no_grad():
            layer.inverse(y)  # fills the cache
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        with torch.no_grad():
            x, _ = layer(layer.inverse(y))
        assert torch.allclose(x, y, atol=1e-5)


def test_emerging_inverse_is_a_wavefront_not_a_pixel_loop():
    layer = MaskedConv(4, kernel_size=2)  # one of the two 2×2 quadrant convs of a 3×3 Emerging conv
    schedule = layer._schedule(16, 12, torch.device("cpu"))
    assert len(schedule.steps) == 16 + 12 - 1  # one step per anti-diagonal, not H·W
    covered = torch.cat([schedule.order[start:stop] for start, stop, _ in schedule.steps])
    assert torch.equal(covered.sort().values, torch.arange(16 * 12))


def test_bad_sizes_and_names_raise_valueerror_naming_them():
    with pytest.raises(ValueError, match=r"28 is not divisible by 2\^3"):
        Glow(1, 28, K=2, L=3, hidden_channels=8)
    with pytest.raises(ConfigError, match="permutation"):
        Glow(1, 8, K=1, L=1, hidden_channels=8, permutation="nope")
    with pytest.raises(ConfigError, match="n_bits"):
        Glow(1, 8, K=1, L=1, hidden_channels=8, n_bits=9)
    model = Glow(3, 8, K=1, L=1, hidden_channels=8)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\].*\[2, 1, 8, 8\]"):
        model.log_prob(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("L", [1, 2, 3])
def test_realnvp_inverse_and_logdet(L):
    from flowlab.flows import RealNVP

    torch.manual_seed(0)
    model = RealNVP(in_channels=2, image_size=8, K=2, L=L, hidden_channels=16, num_blocks=2).double()
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64) - 0.5
    prepared(model, x)  # one training-mode pass moves the batch norms' running averages; evaluation mode
    zs, logdet = model.encode(x)
    assert len(zs) == L and [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    assert (model.decode(zs) - x).abs().max() <= 1e-8
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten() for z in model.encode(v)[0]]), x[:1])
    assert torch.allclose(logdet[0], expected, rtol=1e-6, atol=0)
    assert torch.isfinite(model.bits_per_dim(x)).all()
    for t in (0.0, 0.7):
        assert torch.isfinite(model.sample(3, temperature=t)).all()


def test_realnvp_has_no_learned_channel_mixing():
    from flowlab.flows import RealNVP

    model = RealNVP(1, 28, K=3, L=3, hidden_channels=8, num_blocks=1)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"CheckerboardCoupling", "ChannelCoupling", "ResNet", "InvertibleBatchNorm", "Logit"} <= kinds
    assert not kinds & {"InvertibleConv1x1", "InvertibleNxNConv", "EmergingConv", "Shuffle", "Reverse",
                        "ActNorm", "CouplingNet", "SplitPrior"}
    with pytest.raises(ConfigError, match=r"model.L=4: image size 28 is not divisible by 2\^3 .*at most 3"):
        RealNVP(1, 28, K=3, L=4, hidden_channels=8)


def test_bf16_coupling_networks_keep_the_flow_exact():
    """The mixed-precision fast path: coupling networks in bfloat16, everything else float32.
    The map stays exactly invertible (the network sees the same input both ways) and bits/dim
    moves only by the networks' rounding."""
    torch.manual_seed(0)
    model = Glow(3, 16, K=2, L=2, hidden_channels=32, permutation="nxn")
    x = torch.rand(4, 3, 16, 16) - 0.5
    prepared(model, x, 0.02)
    reference = model.bits_per_dim(x)
    model.set_coupling_dtype(torch.bfloat16, channels_last=True)
    with torch.no_grad():
        zs, logdet = model.encode(x)
        assert logdet.dtype == torch.float32 and all(z.dtype == torch.float32 for z in zs)
        assert (model.decode(zs) - x).abs().max() <= 1e-5
        fast = model.bits_per_dim(x)
    assert (fast - reference).abs().max() < 0.02


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("training", [True, False])
def test_fused_levels_equal_the_plain_layers(permutation, coupling, training):
    """``Glow.fused`` (flows/fused.py: each level's ActNorm + 1×1 / n×n conv composed at once) gives the
    same log-density and gradients as every layer's own forward (``fused = False``)."""
    from flowlab.flows import fused

    torch.manual_seed(0)
    model = Glow(3, 8, K=3, L=2, hidden_channels=8, permutation=permutation, coupling=coupling).double()
    x = (torch.rand(4, 3, 8, 8) - 0.5).double()
    prepared(model, x)
    model.train(training)
    steps = [layer for layer in model.levels[0] if isinstance(layer, FlowStep)]
    assert fused.applies(steps) == (permutation in ("nxn", "conv1x1", "conv1x1_lu"))

    def run(flag):
        model.zero_grad()
        model.fused = flag
        log_prob = model.log_prob(x)
        log_prob.sum().backward()
        return log_prob.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (fast, fast_grads), (plain, plain_grads) = run(True), run(False)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-10)
    assert len(fast_grads) == len(plain_grads) > 0
    for g_fast, g_plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-10)


def test_channels_last_coupling_network_is_the_same_map():
    """``channels_last`` changes the memory layout of the coupling network, not what it computes."""
    torch.manual_seed(0)
    net = CouplingNet(6, 12, 32)
    x = torch.randn(4, 6, 8, 8, requires_grad=True)
    net(x)  # ActNorm initialisation
    perturb(net)
    outputs = []
    for channels_last in (False, True):
        net.channels_last = channels_last
        y = net(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x, *net.parameters()])
        outputs.append((y.detach(), grads))
    (y0, g0), (y1, g1) = outputs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sums in another order
