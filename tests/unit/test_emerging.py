"""Emerging convolutions as published (Hoogeboom et al. 2019, ehoogeboom/emerging): exactly a k×k
receptive field, exact log-det and inverse, and the wavefront schedule of the inverse."""

import pytest
import torch

from flowlab.flows import EmergingConv, MaskedConv
from flowlab.flows.emerging import quadrant_mask

from .test_flows import brute_force_logdet, perturb


def _perturbed(layer: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    layer = layer.double()
    perturb(layer, 0.05, seed)
    return layer.eval()


def _dependency_window(layer, channels: int, height: int, width: int, pixel: tuple[int, int]) -> set:
    """The input pixels on which output ``pixel`` (all channels) has a non-zero autograd Jacobian."""
    x = torch.randn(1, channels, height, width, dtype=torch.float64)
    i, j = pixel
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0][0, :, i, j], x)  # [C, 1, C, H, W]
    support = jac.abs().sum(dim=(0, 1, 2))  # [H, W]
    assert torch.isfinite(support).all()
    return {(a, b) for a in range(height) for b in range(width) if support[a, b] != 0}


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("pixel", [(3, 4), (0, 0), (6, 7), (0, 4), (6, 0)])
def test_receptive_field_is_exactly_the_k_by_k_window(k, pixel):
    torch.manual_seed(0)
    c, h, w = 3, 7, 8
    layer = _perturbed(EmergingConv(c, kernel_size=k, lu=True))
    r = k // 2
    i, j = pixel
    window = {(a, b) for a in range(i - r, i + r + 1) for b in range(j - r, j + r + 1) if 0 <= a < h and 0 <= b < w}
    assert _dependency_window(layer, c, h, w, pixel) == window


@pytest.mark.parametrize("q", [2, 3])
@pytest.mark.parametrize("flipped", [False, True])
def test_masked_conv_reads_one_quadrant(q, flipped):
    torch.manual_seed(0)
    c, h, w = 3, 7, 8
    layer = _perturbed(MaskedConv(c, kernel_size=q, flipped=flipped))
    i, j = 3, 4
    sign = -1 if flipped else 1
    quadrant = {(i + sign * a, j + sign * b) for a in range(q) for b in range(q)}
    assert _dependency_window(layer, c, h, w, (i, j)) == quadrant


def _reference_square_ar_mask(k: int, channels: int) -> torch.Tensor:
    """``get_conv_square_ar_mask(k, k, C, C)`` of ehoogeboom/emerging (conv2d/conv2d.py), transcribed:
    layout [h, w, in, out]; rows above and columns left of the centre zeroed; at the centre the
    linear autoregressive mask (``mask[i + 1:, i] = 0``, i.e. in <= out)."""
    left = m = (k - 1) // 2
    mask = torch.ones(k, k, channels, channels)
    mask[:left] = 0
    mask[:, :m] = 0
    linear = torch.ones(channels, channels)
    for i in range(channels):
        linear[i + 1 :, i] = 0
    mask[left, m] = linear
    return mask


@pytest.mark.parametrize("k", [1, 3, 5])
def test_masks_are_the_references(k):
    """Our q×q masks (plus the separately parameterised diagonal) are the non-zero quadrant of the
    reference's k×k mask and of its four-axis flip ``mask[::-1, ::-1, ::-1, ::-1]``."""
    c, r = 3, k // 2
    for flipped in (False, True):
        ref = _reference_square_ar_mask(k, c)
        if flipped:
            ref = ref.flip(0, 1, 2, 3)
        ref = ref.permute(3, 2, 0, 1)  # -> [out, in, h, w]
        layer = MaskedConv(c, kernel_size=r + 1, flipped=flipped)
        ours = quadrant_mask(c, r + 1, flipped) + (layer.centre_eye != 0).float()  # + the diagonal
        kept = ref[:, :, :r + 1, :r + 1] if flipped else ref[:, :, r:, r:]
        assert torch.equal(ours, kept)
        assert ref.sum() == kept.sum()  # nothing outside the quadrant
    centre = quadrant_mask(c, 2)[:, :, 0, 0]  # [out, in]: channels in < out
    assert torch.equal(centre, torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(quadrant_mask(c, 2, flipped=True)[:, :, 1, 1], centre.T)  # in > out


@pytest.mark.parametrize("k, q", [(1, 1), (3, 2), (5, 3), (7, 4)])
def test_quadrant_size(k, q):
    layer = EmergingConv(4, kernel_size=k)
    assert layer.first.kernel_size == layer.second.kernel_size == q
    assert layer.first.weight.shape == (4, 4, q, q) and not layer.first.flipped and layer.second.flipped


@pytest.mark.parametrize("bad", [0, 2, 4, -3, 3.0])
def test_even_or_bad_kernel_sizes_raise(bad):
    with pytest.raises(ValueError, match="kernel_size"):
        EmergingConv(4, kernel_size=bad)


def test_initialisation_is_near_identity():
    """The reference's stable init: kernel entries N(0, 0.02²) plus the identity at the centre."""
    torch.manual_seed(0)
    layer = EmergingConv(8, kernel_size=3)
    for masked in (layer.first, layer.second):
        kernel = masked.kernel()
        ci, cj = masked.centre
        centre = kernel[:, :, ci, cj]
        assert (centre.diagonal() - 1).abs().max() < 0.1 and (centre.diagonal() > 0).all()
        off = kernel.clone()
        off[:, :, ci, cj] -= torch.diag(centre.diagonal())
        assert 0.005 < float(off[off != 0].detach().std()) < 0.04
    assert torch.equal(layer.bias, torch.zeros(8))
    x = torch.randn(2, 8, 6, 6)
    y, logdet = layer(x)
    assert logdet.abs().max() < 0.05 * 6 * 6 * 8 * 2  # ~ H·W·Σ log(1 + N(0, 0.02²)) per masked conv


LAYERS = {
    "masked_q2": lambda c: MaskedConv(c, kernel_size=2),
    "masked_q3_flipped": lambda c: MaskedConv(c, kernel_size=3, flipped=True),
    "masked_q1": lambda c: MaskedConv(c, kernel_size=1, flipped=True),
    "emerging_k3": lambda c: EmergingConv(c, kernel_size=3, lu=True),
    "emerging_k5_plain": lambda c: EmergingConv(c, kernel_size=5, lu=False),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_is_the_brute_force_one_and_inverse_is_exact(name):
    torch.manual_seed(0)
    layer = _perturbed(LAYERS[name](4))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    y, logdet = layer(x)
    assert logdet.shape == (3,) and logdet.dtype == torch.float64
    assert torch.allclose(logdet[0], brute_force_logdet(lambda v: layer(v)[0], x[:1]), rtol=1e-6, atol=0)
    assert (layer.inverse(y) - x).abs().max() <= 1e-10


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float32_roundtrip(name):
    torch.manual_seed(0)
    layer = LAYERS[name](12)
    perturb(layer, 0.02)
    x = torch.randn(4, 12, 16, 16)
    with torch.no_grad():
        y, logdet = layer(x)
        assert logdet.dtype == torch.float32 and torch.isfinite(logdet).all()
        assert (layer.inverse(y) - x).abs().max() <= 1e-4


@pytest.mark.parametrize("q, flipped", [(1, False), (2, False), (2, True), (3, True), (4, False)])
@pytest.mark.parametrize("h, w", [(1, 1), (1, 5), (16, 12), (7, 3)])
def test_inverse_schedule_is_one_wavefront_per_antidiagonal(q, flipped, h, w):
    layer = MaskedConv(3, kernel_size=q, flipped=flipped)
    schedule = layer._schedule(h, w, torch.device("cpu"))
    assert len(schedule.steps) == (h + w - 1 if q > 1 else 1)
    # the steps partition the pixels: every pixel solved exactly once
    assert [s[0] for s in schedule.steps] == [0] + [s[1] for s in schedule.steps[:-1]]
    assert schedule.steps[-1][1] == h * w
    assert torch.equal(schedule.order.sort().values, torch.arange(h * w))
    assert torch.equal(schedule.order[schedule.rank], torch.arange(h * w))
    # a step reads only pixels solved in earlier steps (or the zero padding, slot 0)
    for start, stop, neighbours in schedule.steps:
        assert neighbours.numel() == (stop - start) * (q * q - 1)
        assert (neighbours <= start).all()
    # and the neighbours are the right pixels: a flipped tap (a, b) reads (i - (q-1) + a, j - (q-1) + b)
    i, j = h // 2, w // 2
    position = int(schedule.rank[i * w + j])
    step = next(s for s in schedule.steps if s[0] <= position < s[1])
    row = step[2].view(step[1] - step[0], -1)[position - step[0]]
    for (_, (di, dj)), slot in zip(layer.taps, row.tolist()):
        inside = 0 <= i + di < h and 0 <= j + dj < w
        assert slot == (1 + int(schedule.rank[(i + di) * w + (j + dj)]) if inside else 0)


def test_inverse_keeps_gradients():
    """The inverse is differentiable (sampling with gradients, e.g. for a reconstruction loss)."""
    torch.manual_seed(0)
    layer = _perturbed(EmergingConv(3, kernel_size=3))
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer.inverse(v), (y,))
    layer.inverse(y).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
