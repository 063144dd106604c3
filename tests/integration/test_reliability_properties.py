"""Property-based tests (hypothesis) that complement tests/unit/test_properties.py: RealNVP's exact
inverse and log-det over random shapes, widths and weights, and the checkpoint round trip
(save → ``torch.load(weights_only=True)`` → rebuild from the hyper-parameters alone) over random
model configurations and weights."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlab.flows import RealNVP
from flowlab.lit import FlowModule, load_checkpoint, module_from_checkpoint
from tests.settings import optim
from tests.unit.test_flows import brute_force_logdet

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])


@SETTINGS
@given(channels=st.integers(1, 3), L=st.integers(1, 3), K=st.integers(1, 2), hidden=st.integers(2, 8),
       mult_h=st.integers(1, 2), mult_w=st.integers(1, 2), learn_top=st.booleans(), scale=st.floats(0.0, 0.1),
       seed=st.integers(0, 2**16))
def test_realnvp_is_exactly_invertible_with_the_brute_force_log_det(channels, L, K, hidden, mult_h, mult_w,
                                                                    learn_top, scale, seed):
    torch.manual_seed(seed)
    h, w = 2 ** (L - 1) * mult_h, 2 ** (L - 1) * mult_w  # only L - 1 levels squeeze
    model = RealNVP(channels, (h, w), K=K, L=L, hidden_channels=hidden, learn_top=learn_top).double()
    x = torch.rand(3, channels, h, w, dtype=torch.float64) - 0.5
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.eval()
    zs, logdet = model.encode(x)
    assert len(zs) == L and all(torch.isfinite(z).all() for z in zs)
    assert (model.decode(zs) - x).abs().max() <= 1e-8
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten() for z in model.encode(v)[0]]), x[:1])
    assert torch.allclose(logdet[0], expected, rtol=1e-6, atol=1e-8)
    bpd = model.bits_per_dim(x)
    assert torch.isfinite(bpd).all()


MODEL = st.one_of(
    st.fixed_dictionaries({
        "_target_": st.just("flowlab.flows.Glow"), "in_channels": st.integers(1, 3), "image_size": st.just(8),
        "K": st.integers(1, 2), "L": st.integers(1, 3), "hidden_channels": st.integers(2, 8),
        "permutation": st.sampled_from(["nxn", "conv1x1", "conv1x1_lu", "reverse", "shuffle", "emerging"]),
        "nxn_conv1x1": st.sampled_from(["plain", "lu"]),  # as conf/model/permutation writes it (read for nxn)
        "coupling": st.sampled_from(["affine", "additive"]), "learn_top": st.booleans(),
        "n_bits": st.integers(1, 8)}),
    st.fixed_dictionaries({
        "_target_": st.just("flowlab.flows.RealNVP"), "in_channels": st.integers(1, 3), "image_size": st.just(8),
        "K": st.integers(1, 2), "L": st.integers(1, 3), "hidden_channels": st.integers(2, 8),
        "learn_top": st.booleans(), "n_bits": st.integers(1, 8)}),
)


@SETTINGS
@given(model=MODEL, ema=st.sampled_from([None, 0.9]), skipped=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_checkpoint_round_trip_rebuilds_the_same_model(model, ema, skipped, seed, tmp_path_factory):
    torch.manual_seed(seed)
    module = FlowModule(model, optim(ema_decay=ema, max_consecutive_skips=20), eval_seed=seed, seed=seed, use_ema=True,
                        data={"name": "random"})
    x = torch.randint(0, 2 ** model["n_bits"], (4, model["in_channels"], 8, 8), dtype=torch.uint8)
    module.train()
    module._initialize_flow(module.dequantize_train(x))  # ActNorm's data-dependent init, as on the first step
    with torch.no_grad():  # stand-in for training: every weight moves
        for p in module.flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
        if module.ema is not None:
            module.ema.update(module.flow)
    module.skipped_steps = skipped
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7}
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save(ckpt, path)

    raw = load_checkpoint(path)  # weights_only=True: plain containers and tensors only
    assert raw["hyper_parameters"]["model"] == model and raw["skipped_steps"] == skipped
    restored, _, _ = module_from_checkpoint(path)
    a, b = module.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same function: equal bits/dim under the fixed evaluation noise, with the trained and the EMA weights,
    # and a restored model is never initialised again by a training-mode pass
    index = torch.arange(len(x))
    for m in (module, restored):
        m.eval()
    with torch.no_grad():
        for flow_a, flow_b in ((module.flow, restored.flow), (module.eval_flow, restored.eval_flow)):
            xa = module.dequantize_eval(x, index)
            assert torch.equal(flow_a.bits_per_dim(xa), flow_b.bits_per_dim(restored.dequantize_eval(x, index)))
        restored.flow.train()
        restored.flow.log_prob(xa * 3 + 0.1)  # other statistics: an initialising ActNorm would move
    # (RealNVP's batch norms do move their running averages in training mode, as they should)
    moving = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in b.items() if not k.endswith(moving))
