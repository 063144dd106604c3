"""model.memory_saving (flowlab/flows/memory.py): checkpointed and invertible levels give the gradients of plain
backprop, keep less for backward, and fall back to stored activations when the reconstruction drifts."""

import copy
import logging

import pytest
import torch

from flowlab import flows
from flowlab.errors import ConfigError
from flowlab.flows import Glow, RealNVP, memory

from .test_flows import perturb

SAVING = ["checkpoint", "invertible"]


def _glow(permutation="nxn", coupling="affine", dtype=torch.float64, K=3, size=8, hidden=8, seed=0, scale=0.05, **kw):
    """A small Glow, ActNorm initialised on random data, every parameter moved off its initial value by N(0, scale²)."""
    torch.manual_seed(seed)
    model = Glow(3, size, K=K, L=2, hidden_channels=hidden, permutation=permutation, coupling=coupling, **kw).to(dtype)
    x = (torch.rand(4, 3, size, size) - 0.5).to(dtype)
    model.initialize(x)
    perturb(model, scale)
    return model.train(), x


def _grads(model, x, mode: str, coupling_dtype=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(log p(x), [∂/∂x, ∂/∂θ...]) of a training-mode pass with ``mode``; the coupling dtype only for the forward,
    as FlowModule.training_step sets it."""
    model.memory_saving = mode
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    model.set_coupling_dtype(coupling_dtype)
    try:
        log_prob = model.log_prob(x)
    finally:
        model.set_coupling_dtype(None)
    log_prob.sum().backward()
    return log_prob.detach(), [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.double().flatten() for t in a]), torch.cat([t.double().flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", SAVING)
@pytest.mark.parametrize("coupling", list(flows.COUPLINGS))
@pytest.mark.parametrize("permutation", list(flows.PERMUTATIONS))
def test_gradients_equal_plain_backprop_in_float64(permutation, coupling, mode):
    """Every permutation and coupling, the fused path and the layers' own: log p(x) and the gradients of x and of
    every parameter agree with mode none within 1e-8."""
    model, x = _glow(permutation, coupling)
    for fused in (True, False):
        model.fused = fused
        reference_lp, reference = _grads(model, x, "none")
        log_prob, grads = _grads(model, x, mode)
        torch.testing.assert_close(log_prob, reference_lp, rtol=1e-10, atol=1e-10)
        assert len(grads) == len(reference) == 1 + sum(p.requires_grad for p in model.parameters())
        assert all(g is not None for g in grads)
        for g, r in zip(grads, reference):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-8)
    if mode == "invertible":
        assert all(memory.last_drift[level[1]] < 1e-12 for level in model.levels)


@pytest.mark.parametrize("permutation", ["nxn", "conv1x1_lu", "emerging"])
def test_float32_gradients_are_as_close_to_float64_as_plain_backprop(permutation):
    """Stated float32 tolerance: checkpoint repeats the same arithmetic (equal gradients); invertible's gradients
    are within 1e-4 (relative, all gradients as one vector) of plain float32 backprop and no further from the
    float64 truth than twice plain float32's own error."""
    model, x = _glow(permutation, "affine", torch.float32, K=8, size=16, hidden=16, scale=0.02)
    truth = _grads(copy.deepcopy(model).double(), x.double(), "none")[1]
    plain = _grads(model, x, "none")[1]
    assert _relative(_grads(model, x, "checkpoint")[1], plain) < 1e-6
    inverted = _grads(model, x, "invertible")[1]
    assert _relative(inverted, plain) < 1e-4
    assert _relative(inverted, truth) <= 2 * _relative(plain, truth) + 1e-6
    assert all(0 < memory.last_drift[level[1]] < 1e-5 for level in model.levels)


def test_bf16_coupling_networks_are_recomputed_in_bf16():
    """The training step sets the coupling dtype for the forward only: recomputation in backward runs the networks
    in the forward's dtype (checkpoint: the very same arithmetic; torch would refuse a dtype mismatch)."""
    model, x = _glow("nxn", "affine", torch.float32, K=4, size=8, hidden=16, scale=0.02)
    plain = _grads(model, x, "none", torch.bfloat16)[1]
    assert _relative(plain, _grads(model, x, "none")[1]) > 1e-4  # bf16 really ran
    assert _relative(_grads(model, x, "checkpoint", torch.bfloat16)[1], plain) < 1e-6
    assert _relative(_grads(model, x, "invertible", torch.bfloat16)[1], plain) < 2e-2
    assert all(net.compute_dtype is None for net in model.modules() if isinstance(net, flows.CouplingNet))


def _ill_conditioned(model, condition: float) -> None:
    """Give every 1×1 convolution singular values spread over ``condition``: inverting it amplifies rounding."""
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, flows.InvertibleConv1x1)):
            u, s, vh = torch.linalg.svd(conv.weight.double())
            s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), s.numel(), dtype=torch.float64)
            conv.weight.copy_(u @ torch.diag(s) @ vh)


def test_drifting_level_falls_back_to_stored_activations(caplog, monkeypatch):
    """float32 1×1 convolutions with condition number 1e4: the reconstruction drifts far beyond DRIFT_LIMIT. The
    level's gradients are then those of plain backprop (not the drifted ones), the fallback is logged once, and
    later passes keep activations."""
    model, x = _glow("conv1x1", "affine", torch.float32, K=4, size=8, hidden=8, scale=0.02)
    _ill_conditioned(model, 1e4)
    plain = _grads(model, x, "none")[1]
    drifted = copy.deepcopy(model)
    monkeypatch.setattr(memory, "DRIFT_LIMIT", float("inf"))
    assert _relative(_grads(drifted, x, "invertible")[1], plain) > 1  # what the fallback saves us from
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="flowlab.flows.memory"):
        assert _relative(_grads(model, x, "invertible")[1], plain) < 1e-5
        assert all(memory.last_drift[level[1]] > memory.DRIFT_LIMIT for level in model.levels)
        assert all(level[1] in memory._stored for level in model.levels)
        calls = []
        monkeypatch.setattr(memory._InvertibleSteps, "apply", lambda *a: calls.append(a))
        assert _relative(_grads(model, x, "invertible")[1], plain) < 1e-5
        assert not calls
    warnings = [r for r in caplog.records if "keeps its activations" in r.getMessage()]
    assert len(warnings) == len(model.levels)  # once per level, not once per pass
    assert "drift" in warnings[0].getMessage()


def test_actnorm_initialises_before_any_saving():
    """A fresh model's first training pass initialises ActNorm (plainly) and gives plain backprop's gradients."""
    torch.manual_seed(0)
    fresh = Glow(3, 8, K=2, L=2, hidden_channels=8).double().train()
    x = (torch.rand(4, 3, 8, 8) - 0.5).double()
    results = {mode: _grads(copy.deepcopy(fresh), x, mode)[1] for mode in ("none", *SAVING)}
    for mode in SAVING:
        assert _relative(results[mode], results["none"]) < 1e-12


def _saved_activation_bytes(model, x, mode: str) -> int:
    """Bytes of the distinct batch-sized tensors autograd keeps for backward (saved-tensor hooks), after a forward."""
    model.memory_saving = mode
    storages = {}

    def pack(t):
        if t.dim() > 0 and t.shape[0] == x.shape[0]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.log_prob(x).sum()
    loss.backward()
    return sum(storages.values())


def test_invertible_keeps_memory_independent_of_k():
    """What a level keeps for backward: K times a step's activations (none), nothing that grows with K
    (invertible). (Checkpoint's kept inputs are held by torch.utils.checkpoint, not by saved-tensor hooks.)"""
    kept = {}
    for k in (2, 6):
        model, x = _glow(K=k, dtype=torch.float32)
        x = torch.cat([x, x[:1]])  # batch 5: tells activations from [K, C, C] weights
        kept[k] = {mode: _saved_activation_bytes(model, x, mode) for mode in ("none", "invertible")}
    assert kept[6]["none"] > 2.5 * kept[2]["none"]
    assert kept[6]["invertible"] == kept[2]["invertible"] < kept[6]["none"] / 4


def test_realnvp_checkpoint_and_refusal():
    """RealNVP: checkpointed layers give plain backprop's gradients and update the batch norms' running averages
    once; invertible is refused with one line naming the key (its batch norms invert with running averages)."""
    torch.manual_seed(0)
    model = RealNVP(2, 8, K=1, L=2, hidden_channels=4, num_blocks=1).double().train()
    x = (torch.rand(4, 2, 8, 8) * 0.9 + 0.05 - 0.5).double()
    perturb(model, 0.05)
    start = copy.deepcopy(model.state_dict())
    results, buffers = {}, {}
    for mode in ("none", "checkpoint"):
        model.load_state_dict(start)
        results[mode] = _grads(model, x, mode)[1]
        buffers[mode] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert _relative(results["checkpoint"], results["none"]) < 1e-12
    assert buffers["none"].keys() and all(torch.equal(buffers["none"][k], buffers["checkpoint"][k]) for k in buffers["none"])
    assert any(not torch.equal(buffers["none"][k], start[k]) for k in buffers["none"])
    with pytest.raises(ConfigError, match=r"model.memory_saving='invertible' is not available for RealNVP"):
        RealNVP(2, 8, K=1, L=2, hidden_channels=4, memory_saving="invertible")


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match=r"model.memory_saving='all' is unknown; allowed: none, checkpoint, invertible"):
        Glow(3, 8, K=1, L=1, hidden_channels=4, memory_saving="all")


def test_memory_table_rows():
    """The bench's memory table (quick preset): one row per K and mode, invertible keeping the least."""
    from flowlab.bench.report import memory_markdown as markdown
    from flowlab.bench.suite import memory_table

    rows = memory_table(preset="quick", ks=(2,), rounds=1, calls=1)
    assert [r["memory_saving"] for r in rows] == list(memory.MODES)
    assert all(r["step_s"] > 0 and r["peak_mib"] >= r["activation_mib"] > 0 for r in rows)
    assert rows[2]["activation_mib"] < rows[0]["activation_mib"]
    assert markdown(rows).count("\n") == 4
