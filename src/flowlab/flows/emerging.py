"""Emerging convolutions (Hoogeboom, van den Berg & Welling, ICML 2019, arXiv 1901.11137).

The layer, as in the reference code ``ehoogeboom/emerging`` (``model.py``, ``flow_permutation == 3``,
which calls ``conv2d/conv1x1.py:invertible_1x1_conv`` and then
``conv2d/conv2d.py:invertible_conv2D_emerging``), is, at every flow step::

    z → 1×1 invertible conv W → square autoregressive conv K₁ → its flipped mirror K₂ → + bias b

**Masks** (``get_conv_square_ar_mask(k, k, C, C)``; their layout is ``[h, w, in, out]``, ours
``[out, in, h, w]``). For an effective receptive field k (odd) let r = (k − 1)/2. The mask of K₁
zeroes the rows above and the columns left of the centre of a k×k kernel, so it keeps the
bottom-right QUADRANT of (r+1)×(r+1) taps (centre included); at the centre tap it keeps the
channel triangle ``in ≤ out`` (``get_linear_ar_mask``, diagonal included). In cross-correlation
(TF's and torch's ``conv2d``) output pixel (i, j) of K₁ therefore reads input pixels
(i + a, j + b), a, b ∈ 0..r, and at (i, j) itself only channels ≤ its own. K₂'s mask is
``mask[::-1, ::-1, ::-1, ::-1]``: the spatial flip keeps the top-left quadrant (pixels
(i − a, j − b)), the flip of both channel axes turns the centre triangle into ``in ≥ out``. The
weights of K₁ and K₂ are independent. Their ``forward_fast`` applies only the non-zero quadrant:
a (r+1)×(r+1) convolution (``w1[kcent:, kcent:]``, ``w2[:-kcent, :-kcent]``) after zero-padding
the bottom/right (K₁) or the top/left (K₂) by r — for the default ksize=3 that ``model.py`` uses,
two 2×2 convolutions. So does this module: :class:`MaskedConv` holds and applies a q×q kernel,
q = r + 1, and :class:`EmergingConv` ``(kernel_size=k)`` builds two of them with q = (k+1)/2.

**Receptive field.** K₂∘K₁ reads offsets (a − a′, b − b′) with a, a′, b, b′ ∈ 0..r, i.e. every
offset in [−r, r]²: exactly the k×k window, clipped by the zero padding at the borders (the
1×1 conv mixes no pixels).

**Log-det.** Order pixels in raster order, channels within a pixel. K₁'s Jacobian is block upper
triangular (pixel (i, j) depends only on itself and on raster-later pixels) and its diagonal
block, the centre tap, is lower triangular with diagonal d₁; K₂'s mirrors that. Hence
``log|det| = H·W·(Σ_c log|d₁_c| + Σ_c log|d₂_c|) + H·W·log|det W|`` (the bias adds nothing).

**Inverse** (exact; a vectorised wavefront substitution). To invert K₂ (pixel (i, j) depends on
(i − a, j − b)) solve the pixels in order of t = i + j; to invert K₁, in order of
t = (H−1−i) + (W−1−j). Every non-centre tap moves t by a + b ≥ 1, so all pixels on one
anti-diagonal t are solved at once, vectorised over the batch, the channels and the whole
anti-diagonal: ``H + W − 1`` steps per masked conv (1 step when q = 1), not H·W. That is also
the fewest possible for q ≥ 2: the taps (1, 0) and (0, 1) chain pixel (0, 0) to (H−1, W−1)
through H + W − 1 pixels. With the centre tap C (triangular) and the other taps K_t::

    x_p = C⁻¹ y_p − Σ_t (C⁻¹ K_t) x_{p+offset_t}

``C⁻¹`` and ``C⁻¹K_t`` are formed once per call in float64; ``C⁻¹ y`` is one matrix product over
the image; each step is one gather of the already-solved neighbours, one batched matrix product
and one copy. (The previous half-plane masks of this file needed (r+1)(H−1) + W steps each.)

**Initialisation** (``get_conv_weight_np`` with ``stable_init=True``): every kernel entry
N(0, 0.02²) plus the identity on the centre tap, so each masked conv starts at
``I + O(0.02)`` (near identity, log-det ≈ 0); the bias starts at 0; W random orthogonal.

**Differences that remain, on purpose:**

- Centre diagonal: the reference keeps it as a raw weight ``w[kcent, kcent, c, c]`` (init
  1 + N(0, 0.02²)), free to cross 0 (a singular layer, log-det −∞). Here it is
  ``sign_c · exp(clamp(log_d_c, ±7))`` (:func:`flowlab.flows.utils.bounded_log_scale`) with
  ``log_d`` initialised to ``log|1 + N(0, 0.02²)|`` and the sign fixed at its initial value (+1):
  the same initial distribution, but it can never reach 0 and the gradient is w.r.t. the log.
- Masked-out entries are not stored (q×q weights instead of masked k×k ones); they received no
  gradient in the reference either, so training is the same.
- Inverse: the reference's is ``tf.py_func`` (no gradient) calling a Cython loop on the CPU in
  float64, parallel over the batch only, pixel by pixel in raster order (reversed for K₁) and
  channel by channel (``conv2d/inverses/inverse_cython.py``, ``inverse_op_cython.pyx``; it
  rescales the weights by ``1/min|diag|`` and casts the result to float32). Here it runs on the
  input's device and in its dtype with the wavefront above and is differentiable; only the small
  weight algebra (C⁻¹, C⁻¹K_t) is float64.
- Log-det: the reference sums ``log|diag|`` in float32; here float32/float64 (:func:`exact`).
- The 1×1 conv: ``lu`` selects flowlab's LU form or the plain matrix; the reference's training
  commands use its default ``--decomposition ''``, i.e. the plain matrix (``lu=False``). Its
  log-det and inverse are computed in float64 either way.
- No dilation option (the reference has one; ``model.py`` uses dilation 1).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conv1x1 import InvertibleConv1x1
from .utils import bounded_log_scale, exact, per_sample

#: std of the initial kernel entries, as ``get_conv_weight_np`` in the reference.
INIT_STD = 0.02


def quadrant_mask(channels: int, size: int, flipped: bool = False) -> torch.Tensor:
    """[C_out, C_in, q, q] mask of a square autoregressive convolution, q = ``size``.

    Unflipped (the reference's K₁): every tap of the q×q quadrant, whose centre is tap [0, 0], is
    kept; at the centre only ``in < out`` (the diagonal is parameterised apart). Flipped (K₂): the
    same mask flipped along all four axes, as ``mask[::-1, ::-1, ::-1, ::-1]`` in the reference:
    centre tap [q−1, q−1], channels ``in > out``.
    """
    mask = torch.ones(channels, channels, size, size)
    mask[:, :, 0, 0] = torch.tril(torch.ones(channels, channels), -1)
    return mask.flip(0, 1, 2, 3) if flipped else mask


class _Schedule:
    """The wavefront order of one masked conv's inverse on an H×W image.

    ``order``: raster pixel indices in solve order; ``rank``: its inverse permutation. ``steps``:
    ``(start, stop, neighbours)`` per wavefront: the pixels ``order[start:stop]`` are solved together;
    ``neighbours`` [(stop−start)·T] holds, per pixel and non-centre tap, ``1 + rank`` of the pixel
    that tap reads, or 0 where it falls outside the image (row 0 of the solution buffer is zero).
    """

    def __init__(self, order: torch.Tensor, rank: torch.Tensor, steps: list[tuple[int, int, torch.Tensor]]):
        self.order, self.rank, self.steps = order, rank, steps


class MaskedConv(nn.Module):
    """A square autoregressive q×q convolution (q = ``kernel_size``), Emerging's building block.

    Unflipped: output (i, j) reads input pixels (i + a, j + b), a, b ∈ 0..q−1 (zero padding at the
    bottom/right), and at (i, j) itself channels ``in ≤ out``. ``flipped``: the mirror, pixels
    (i − a, j − b) (zero padding at the top/left) and channels ``in ≥ out``. Triangular Jacobian:
    log-det ``H·W·Σ_c log|d_c|`` with d the centre tap's diagonal. See the module docstring.
    """

    def __init__(self, channels: int, kernel_size: int = 2, flipped: bool = False):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size (the quadrant's side) must be an integer >= 1, got {kernel_size!r}")
        self.channels, self.kernel_size, self.flipped = channels, kernel_size, flipped
        r = kernel_size - 1
        self.centre = (r, r) if flipped else (0, 0)
        self.padding = (r, 0, r, 0) if flipped else (0, r, 0, r)  # F.pad order: left, right, top, bottom
        self.register_buffer("mask", quadrant_mask(channels, kernel_size, flipped))
        self.weight = nn.Parameter(INIT_STD * torch.randn(channels, channels, kernel_size, kernel_size))
        d = 1.0 + INIT_STD * torch.randn(channels)  # the reference's centre diagonal: 1 + N(0, 0.02²)
        self.log_d = nn.Parameter(torch.log(d.abs()))  # centre diagonal, log-magnitude
        self.register_buffer("sign_d", torch.sign(d))
        centre_eye = torch.zeros(channels, channels, kernel_size, kernel_size)
        centre_eye[:, :, self.centre[0], self.centre[1]] = torch.eye(channels)
        self.register_buffer("centre_eye", centre_eye)
        # Non-centre taps: kernel index (a, b) and the pixel offset (di, dj) it reads.
        taps = [(a, b) for a in range(kernel_size) for b in range(kernel_size) if (a, b) != self.centre]
        self.taps = [(a * kernel_size + b, (a - r, b - r) if flipped else (a, b)) for a, b in taps]
        self._schedules: dict = {}

    def diagonal(self) -> torch.Tensor:
        return self.sign_d * torch.exp(bounded_log_scale(self.log_d))

    def kernel(self) -> torch.Tensor:
        """The masked [C, C, q, q] kernel with the learned diagonal on the centre tap."""
        return self.weight * self.mask + self.centre_eye * self.diagonal().view(-1, 1, 1, 1)

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * exact(bounded_log_scale(self.log_d)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(F.pad(x, self.padding), self.kernel().to(x.dtype))
        return y, per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    # -- exact inverse by wavefront substitution --------------------------------------------
    def num_steps(self, height: int, width: int) -> int:
        """Sequential steps of the inverse: one per anti-diagonal, ``H + W − 1`` (1 when q = 1)."""
        return height + width - 1 if self.kernel_size > 1 else 1

    def _schedule(self, height: int, width: int, device: torch.device) -> _Schedule:
        key = (height, width, str(device))
        if key not in self._schedules:
            ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            ii, jj = ii.flatten(), jj.flatten()
            if self.kernel_size == 1:
                t = torch.zeros_like(ii)
            else:
                t = ii + jj if self.flipped else (height - 1 - ii) + (width - 1 - jj)
            order = torch.argsort(t, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            neighbours = []
            for _, (di, dj) in self.taps:
                ni, nj = ii[order] + di, jj[order] + dj
                inside = (ni >= 0) & (ni < height) & (nj >= 0) & (nj < width)
                index = ni.clamp(0, height - 1) * width + nj.clamp(0, width - 1)
                neighbours.append(torch.where(inside, 1 + rank[index], 0))
            neighbours = torch.stack(neighbours, 1) if neighbours else torch.zeros(order.numel(), 0, dtype=torch.long)
            bounds = torch.cumsum(torch.bincount(t), 0).tolist()
            steps, start = [], 0
            for stop in bounds:
                steps.append((start, stop, neighbours[start:stop].flatten().to(device)))
                start = stop
            self._schedules[key] = _Schedule(order.to(device), rank.to(device), steps)
        return self._schedules[key]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        kernel = self.kernel().double()
        upper = self.flipped
        centre_inv = torch.linalg.solve_triangular(kernel[:, :, self.centre[0], self.centre[1]],
                                                   torch.eye(c, dtype=torch.float64, device=kernel.device), upper=upper)
        rhs = torch.matmul(centre_inv.to(y.dtype), y.reshape(b, c, h * w))  # C⁻¹ y, [B, C, HW]
        if not self.taps:
            return rhs.view(b, c, h, w)
        taps = kernel.flatten(2)[:, :, [index for index, _ in self.taps]].permute(2, 0, 1)  # [T, C_out, C_in]
        # solved[t·C + i, o] = (C⁻¹ K_t)[o, i]: the step's product over all taps and input channels at once
        solved = (centre_inv @ taps).transpose(1, 2).reshape(-1, c).to(y.dtype)
        schedule = self._schedule(h, w, y.device)
        rhs = rhs.transpose(1, 2).index_select(1, schedule.order)  # [B, HW, C] in solve order
        x = y.new_zeros(b, 1 + h * w, c)  # row 0 stays zero: the padding every outside tap reads
        weight = solved.expand(b, -1, -1)
        for start, stop, neighbours in schedule.steps:
            known = x.index_select(1, neighbours).view(b, stop - start, -1)  # [B, n, T·C]
            x[:, 1 + start : 1 + stop] = torch.baddbmm(rhs[:, start:stop], known, weight, alpha=-1)
        x = x[:, 1:].index_select(1, schedule.rank)  # back to raster order
        return x.transpose(1, 2).reshape(b, c, h, w)


class EmergingConv(nn.Module):
    """Emerging k×k convolution: invertible 1×1 conv → square autoregressive conv → its flipped mirror → bias.

    ``kernel_size`` is the effective receptive field k (odd); each masked conv is (k+1)/2 square.
    """

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = True):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.kernel_size = kernel_size
        quadrant = (kernel_size + 1) // 2
        self.conv1x1 = InvertibleConv1x1(channels, lu=lu)
        self.first = MaskedConv(channels, quadrant, flipped=False)  # the reference's W1
        self.second = MaskedConv(channels, quadrant, flipped=True)  # W2, the flipped mirror
        self.bias = nn.Parameter(torch.zeros(channels))

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return self.conv1x1.logdet(height, width) + self.first.logdet(height, width) + self.second.logdet(height, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.conv1x1(x)
        x, ld2 = self.first(x)
        x, ld3 = self.second(x)
        return x + self.bias.to(x.dtype).view(1, -1, 1, 1), ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = y - self.bias.to(y.dtype).view(1, -1, 1, 1)
        return self.conv1x1.inverse(self.first.inverse(self.second.inverse(y)))
