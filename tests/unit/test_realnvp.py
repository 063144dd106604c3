"""RealNVP as published: ResNet s/t networks, batch normalisation in the flow, N(0, I) on every factored
latent, logit preprocessing. Exact inverses and brute-force log-dets in float64."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlab.errors import ConfigError
from flowlab.flows import (
    ChannelCoupling,
    CheckerboardCoupling,
    Glow,
    InvertibleBatchNorm,
    Logit,
    MultiScaleFlow,
    RealNVP,
    SplitPrior,
    StandardSplit,
)
from flowlab.flows.batchnorm import batch_mean_var

from .test_flows import brute_force_logdet, perturb

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
LOG_2PI = math.log(2 * math.pi)


def _model(L: int = 2, **kw) -> RealNVP:
    args = dict(in_channels=2, image_size=8, K=1, L=L, hidden_channels=4, num_blocks=1) | kw
    return RealNVP(**args).double()


def _trained_look(model: RealNVP, x: torch.Tensor, steps: int = 3) -> RealNVP:
    """Running averages moved by a few training-mode passes, every parameter off its initial value."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model.log_prob(x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trainable parameters only: a top prior with learn_top=False stays N(0, I)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


# ---- the whole model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, (8, 4)), (1, (4, 8))])
@pytest.mark.parametrize("learn_top", [False, True])
def test_realnvp_eval_mode_is_exactly_invertible_with_the_brute_force_log_det(shape, learn_top):
    channels, size = shape
    torch.manual_seed(0)
    model = _model(L=2, in_channels=channels, image_size=size, K=2, learn_top=learn_top)
    x = torch.rand(5, channels, *size, dtype=torch.float64) - 0.5
    _trained_look(model, x)
    zs, logdet = model.encode(x)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    assert (model.decode(zs) - x).abs().max() <= 1e-8
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten() for z in model.encode(v)[0]]), x[:1])
    assert torch.allclose(logdet[0], expected, rtol=1e-6, atol=0)


def test_a_new_realnvp_has_identity_couplings():
    """Zero-initialised s/t outputs: every coupling starts as the identity, in training mode too."""
    torch.manual_seed(0)
    model = _model(L=2, K=2)
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64) - 0.5
    seen = []

    def check(layer, inputs, output):
        seen.append(type(layer).__name__)
        assert torch.equal(output[0], inputs[0]) and torch.equal(output[1], torch.zeros_like(output[1]))

    for m in model.modules():
        if isinstance(m, (CheckerboardCoupling, ChannelCoupling)):
            m.register_forward_hook(check)
    for mode in (True, False):
        model.train(mode)
        model.log_prob(x)
    assert seen.count("CheckerboardCoupling") == 2 * 5 and seen.count("ChannelCoupling") == 2 * 2


def test_architecture_follows_the_paper():
    """3 checkerboard → squeeze → 3 channel-wise per scale, 4 checkerboard at the last; a batch norm after
    every coupling; feature maps doubling per scale and for the channel-wise couplings; no split prior."""
    model = RealNVP(3, 32, K=3, L=4, hidden_channels=32, num_blocks=4)
    names = [[type(m).__name__ for m in layers] for layers in model.levels]
    pair = lambda kind: [kind, "InvertibleBatchNorm"]  # noqa: E731
    middle = pair("CheckerboardCoupling") * 3 + ["Squeeze"] + pair("ChannelCoupling") * 3 + ["FactorOutOrder"]
    assert names[0] == ["Logit", *middle]
    assert names[1] == names[2] == middle
    assert names[3] == pair("CheckerboardCoupling") * 4
    widths = [[m.net.in_conv.v.shape[0] for m in layers if hasattr(m, "net")] for layers in model.levels]
    assert widths == [[32] * 3 + [64] * 3, [64] * 3 + [128] * 3, [128] * 3 + [256] * 3, [256] * 4]
    assert all(len(m.net.blocks) == 4 for layers in model.levels for m in layers if hasattr(m, "net"))
    assert model.latent_shapes[-1] == (24, 4, 4)  # down to 4 × 4 × c
    assert all(isinstance(s, StandardSplit) for s in model.splits)
    assert not any(isinstance(m, SplitPrior) for m in model.modules())
    assert not any(p.requires_grad for p in model.top_prior.parameters())
    assert all(m.log_gamma is None for m in model.modules() if isinstance(m, InvertibleBatchNorm))
    assert all(isinstance(s, SplitPrior) for s in Glow(1, 8, K=1, L=2, hidden_channels=4).splits)


def test_factor_out_keeps_the_diagonal_pixels_of_every_2x2_block():
    """As the reference's squeeze_2x2_ordered: (0,0) and (1,1) go on, (0,1) and (1,0) are factored out."""
    model = _model(L=2, in_channels=1)
    level = model.levels[0]
    order = level[-1]
    img = torch.arange(64, dtype=torch.float64).view(1, 1, 8, 8)
    squeezed = next(m for m in level if type(m).__name__ == "Squeeze")(img)[0]
    kept, out = model.splits[0].split(order(squeezed)[0])
    assert torch.equal(kept.flatten().sort().values, img[0, 0][(torch.arange(8).view(8, 1) + torch.arange(8)) % 2 == 0])
    assert torch.equal(out.flatten().sort().values, img[0, 0][(torch.arange(8).view(8, 1) + torch.arange(8)) % 2 == 1])
    assert torch.equal(order.inverse(order(squeezed)[0]), squeezed)


def test_every_factored_latent_is_scored_under_the_standard_normal():
    torch.manual_seed(0)
    model = _model(L=3, K=1)
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5
    _trained_look(model, x)
    zs, logdet = model.encode(x)
    by_hand = sum((-0.5 * (z**2 + LOG_2PI)).flatten(1).sum(1) for z in zs) + logdet
    assert len(zs) == 3 and torch.allclose(model.log_prob(x), by_hand, rtol=1e-12, atol=1e-9)


def test_sampling_draws_every_latent_from_the_standard_normal():
    torch.manual_seed(0)
    model = _model(L=3, K=1)
    _trained_look(model, torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5)
    zeros = [torch.zeros(2, *s, dtype=torch.float64) for s in model.latent_shapes]
    assert torch.allclose(model.sample(2, temperature=0.0), model.decode(zeros), atol=1e-12, rtol=0)
    torch.manual_seed(5)
    sample = model.sample(2, temperature=0.7)
    torch.manual_seed(5)  # the draws in decoding order: the top first, then the factored latents coarse to fine
    drawn = {i: 0.7 * torch.randn(2, *model.latent_shapes[i], dtype=torch.float64) for i in reversed(range(3))}
    assert torch.allclose(sample, model.decode([drawn[i] for i in range(3)]), atol=1e-12, rtol=0)


def test_sampling_and_decoding_in_training_mode_leave_the_running_averages_alone():
    torch.manual_seed(0)
    model = _model(L=2)
    _trained_look(model, torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.sample(4, temperature=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_switch_leaves_realnvp_as_it_is():
    """set_coupling_dtype finds no CouplingNet in RealNVP: its ResNets run in the model's dtype."""
    torch.manual_seed(0)
    model = RealNVP(1, 8, K=1, L=2, hidden_channels=4, num_blocks=1)
    x = torch.rand(3, 1, 8, 8) - 0.5
    _trained_look(model, x)
    reference = model.bits_per_dim(x)
    model.set_coupling_dtype(torch.bfloat16, channels_last=True)
    assert torch.equal(model.bits_per_dim(x), reference)
    model.set_coupling_dtype(None)


def test_bad_arguments_raise_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.num_blocks=0"):
        RealNVP(1, 8, K=1, L=2, hidden_channels=4, num_blocks=0)
    with pytest.raises(ConfigError, match=r"model.logit_alpha=0.5"):
        RealNVP(1, 8, K=1, L=2, hidden_channels=4, logit_alpha=0.5)
    with pytest.raises(ConfigError, match=r"model.L=3: image size 6 is not divisible by 2\^2"):
        RealNVP(1, 6, K=1, L=3, hidden_channels=4)
    with pytest.raises(ConfigError, match=r"model.split_prior='nope'"):
        MultiScaleFlow(1, 8, K=1, L=1, hidden_channels=4, n_bits=8, split_prior="nope")


# ---- logit preprocessing ---------------------------------------------------------------------------------------------
def test_logit_layer_on_a_constant_image_matches_the_closed_form():
    alpha, value = 0.05, 0.3  # x = 0.3, i.e. u = 0.8
    x = torch.full((2, 3, 4, 4), value, dtype=torch.float64)
    y, logdet = Logit(alpha)(x)
    p = alpha + (1 - 2 * alpha) * (value + 0.5)  # 0.77
    assert torch.allclose(y, torch.full_like(y, math.log(p / (1 - p))), rtol=1e-14, atol=0)
    per_entry = math.log(1 - 2 * alpha) - math.log(p) - math.log(1 - p)
    assert torch.allclose(logdet, torch.full((2,), 48 * per_entry, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.allclose(Logit(alpha).inverse(y), x, rtol=0, atol=1e-14)


def test_logit_layer_log_det_matches_the_brute_force_jacobian():
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64) - 0.5
    layer = Logit(0.05)
    assert torch.allclose(layer(x)[1][:1], brute_force_logdet(lambda v: layer(v)[0], x[:1]), rtol=1e-12)


@pytest.mark.parametrize("L", [1, 2])
def test_model_bits_per_dim_of_a_constant_image_is_the_logit_closed_form(L):
    """A new RealNVP in evaluation mode with running averages (0, 1) and ε = 0 is the logit map alone
    (couplings are the identity, batch norms too), so bits/dim has a closed form."""
    alpha, value, n_bits = 0.05, -0.2, 8
    model = RealNVP(3, 8, K=2, L=L, hidden_channels=4, num_blocks=1, logit_alpha=alpha, n_bits=n_bits).double()
    for m in model.modules():
        if isinstance(m, InvertibleBatchNorm):
            m.eps = 0.0
    model.eval()
    p = alpha + (1 - 2 * alpha) * (value + 0.5)
    y = math.log(p / (1 - p))
    per_dim_log_prob = -0.5 * (y * y + LOG_2PI) + math.log(1 - 2 * alpha) - math.log(p) - math.log(1 - p)
    expected = (-per_dim_log_prob + n_bits * math.log(2)) / math.log(2)
    x = torch.full((2, 3, 8, 8), value, dtype=torch.float64)
    assert torch.allclose(model.bits_per_dim(x), torch.full((2,), expected, dtype=torch.float64), rtol=1e-12)


# ---- batch normalisation in the flow ---------------------------------------------------------------------------------
def _bn_batch(seed: int = 0, n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    return torch.randn(n, 3, 4, 5, generator=gen, dtype=torch.float64) * scale + 0.7


def _bn(affine: bool = True) -> InvertibleBatchNorm:
    layer = InvertibleBatchNorm(3, affine=affine).double()
    if affine:
        perturb(layer, 0.3)
    return layer


@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_uses_batch_statistics_in_training(affine):
    x = _bn_batch()
    layer = _bn(affine).train()
    y, logdet = layer(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    log_gamma = layer.log_gamma if affine else torch.zeros(3, dtype=torch.float64)
    beta = layer.beta if affine else torch.zeros(3, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, torch.exp(log_gamma), beta, training=True, eps=layer.eps)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(logdet, (20 * (log_gamma - 0.5 * torch.log(var + layer.eps)).sum()).expand(6))
    other = x.clone()
    other[1:] *= 2.0  # the other images change: this image's output changes with them
    assert not torch.allclose(layer(other)[0][0], y[0])


def test_batch_norm_gradients_flow_through_the_batch_statistics():
    """Gradients as PyTorch's own batch norm in training mode (statistics functions of the batch)."""
    x1, x2 = _bn_batch().requires_grad_(), _bn_batch().requires_grad_()
    w = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    (InvertibleBatchNorm(3, affine=False).double().train()(x1)[0] * w).sum().backward()
    (F.batch_norm(x2, None, None, training=True, eps=1e-4) * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_batch_norm_running_averages_follow_the_momentum():
    layer = _bn().train()
    batches = [_bn_batch(seed) for seed in (0, 1)]
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x in batches:
        layer(x)
        v, m = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v
        assert torch.allclose(layer.running_mean, mean, rtol=1e-12)
        assert torch.allclose(layer.running_var, var, rtol=1e-12)
    layer.eval()
    layer(batches[0])  # evaluation leaves them alone
    assert torch.allclose(layer.running_mean, mean, rtol=1e-12) and torch.allclose(layer.running_var, var, rtol=1e-12)


def test_batch_norm_uses_running_averages_in_evaluation():
    layer = _bn().train()
    layer(_bn_batch(3))
    layer.eval()
    x = _bn_batch()
    y, logdet = layer(x)
    other = x.clone()
    other[1:] = _bn_batch(9)[1:]
    y_other, logdet_other = layer(other)
    assert torch.equal(y_other[0], y[0]) and torch.equal(logdet_other, logdet)
    a = torch.exp(layer.log_gamma) / torch.sqrt(layer.running_var + layer.eps)
    expected = (x - layer.running_mean.view(1, 3, 1, 1)) * a.view(1, 3, 1, 1) + layer.beta.view(1, 3, 1, 1)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.inverse(y), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_log_det_matches_the_brute_force_jacobian_in_both_modes(affine):
    """Evaluation: the per-sample map. Training: the per-sample map with (μ, σ²) held at the batch's values
    (the paper's eq. 18) — the training-mode output equals that map, and its log-det is what is returned."""
    x = _bn_batch()
    layer = _bn(affine).train()
    layer(_bn_batch(4))
    y, logdet = layer(x)
    frozen = copy.deepcopy(layer).eval()
    mean, var = batch_mean_var(x)
    frozen.running_mean.copy_(mean)
    frozen.running_var.copy_(var)
    assert torch.allclose(frozen(x)[0], y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(logdet[0], brute_force_logdet(lambda v: frozen(v)[0], x[:1]), rtol=1e-10)
    layer.eval()
    y, logdet = layer(x)
    assert torch.allclose(logdet[0], brute_force_logdet(lambda v: layer(v)[0], x[:1]), rtol=1e-10)
    assert torch.allclose(layer.inverse(y), x, rtol=0, atol=1e-12)


@SETTINGS
@given(kind=st.sampled_from(["checkerboard", "channel", "batchnorm"]), channels=st.integers(1, 4),
       height=st.integers(1, 5), width=st.integers(1, 5), hidden=st.integers(1, 6), blocks=st.integers(1, 2),
       flag=st.booleans(), scale=st.floats(0.0, 0.3), seed=st.integers(0, 2**16))
def test_realnvp_layers_are_exactly_invertible_in_evaluation(kind, channels, height, width, hidden, blocks, flag,
                                                            scale, seed):
    torch.manual_seed(seed)
    if kind == "checkerboard":
        layer = CheckerboardCoupling(channels, hidden, blocks, parity=int(flag))
    elif kind == "channel":
        channels = max(channels, 2)
        layer = ChannelCoupling(channels, hidden, blocks, flip=flag)
    else:
        layer = InvertibleBatchNorm(channels, affine=flag)
    layer = layer.double()
    x = torch.randn(3, channels, height, width, dtype=torch.float64)
    layer.train()
    layer(x)  # running averages away from (0, 1)
    perturb(layer, scale, seed)
    layer.eval()
    y, logdet = layer(x)
    assert torch.allclose(layer.inverse(y), x, rtol=1e-9, atol=1e-9)
    assert torch.allclose(logdet[0], brute_force_logdet(lambda v: layer(v)[0], x[:1]), rtol=1e-6, atol=1e-8)


# ---- batch normalisation under torch.distributed ---------------------------------------------------------------------
def _global_batch() -> torch.Tensor:
    x = _bn_batch(n=8)
    return torch.cat([x[0::2], x[1::2] * 2.0 - 1.0])  # the two shards have different statistics


def _weights() -> torch.Tensor:
    return torch.randn(8, 3, 4, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = _bn(affine=True).train()
        shard = _global_batch()[4 * rank : 4 * rank + 4].clone().requires_grad_()
        y, logdet = layer(shard)
        loss = (y * _weights()[4 * rank : 4 * rank + 4]).sum() + logdet.sum()
        loss.backward()
        torch.save({"y": y.detach(), "logdet": logdet.detach(), "grad": shard.grad,
                    "gamma_grad": layer.log_gamma.grad, "state": layer.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_batch_norm_statistics_and_gradients_are_those_of_the_global_batch_under_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    layer = _bn(affine=True).train()
    x = _global_batch().requires_grad_()
    y, logdet = layer(x)
    ((y * _weights()).sum() + logdet.sum()).backward()
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.cat([r["logdet"] for r in ranks]), logdet.detach(), rtol=1e-12)
    grads = torch.cat([r["grad"] for r in ranks])
    assert grads.abs().max() > 0 and torch.allclose(grads, x.grad, rtol=1e-10, atol=1e-12)
    # each process's parameter gradient is its share; DDP's sum over processes is the global one
    assert torch.allclose(ranks[0]["gamma_grad"] + ranks[1]["gamma_grad"], layer.log_gamma.grad, rtol=1e-10)
    for r in ranks:
        for name, value in layer.state_dict().items():
            assert torch.allclose(r["state"][name], value, rtol=1e-12), name
