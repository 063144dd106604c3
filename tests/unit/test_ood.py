"""flowlab-ood's numbers (AUROC/AUPR, the typicality test), its derived sets and reshaping, and the SVHN reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowlab.cli.ood import _derived, _reshaper, auroc_aupr, bits_per_dim, typicality_test
from flowlab.data import SVHNDataModule
from flowlab.data.svhn import read_svhn_mat
from flowlab.errors import DataError
from tests.fakedata import garbage, truncate, write_svhn
from tests.settings import datamodule


# ---- AUROC / AUPR -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside, outside, auroc, aupr", [
    ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], 1.0, 1.0),  # separated: the OOD set has the higher bits/dim
    ([5.0, 6.0], [1.0, 2.0], 0.0, (1 / 3 + 2 / 4) / 2),  # the OOD set more likely: precision 1/3, then 2/4
    ([1.0, 3.0], [2.0, 4.0], 0.75, (1.0 + 2 / 3) / 2),  # ranks 4(out) 3(in) 2(out) 1(in)
    ([2.0, 2.0], [2.0, 2.0], 0.5, 0.5),  # all tied
    ([30.0, 31.0], [40.0, 50.0], 1.0, 1.0),  # large bits/dim: a sigmoid in float32 would tie them all
])
def test_auroc_and_aupr_on_hand_made_cases(inside, outside, auroc, aupr):
    got = auroc_aupr(torch.tensor(inside), torch.tensor(outside))
    assert got == pytest.approx((auroc, aupr), abs=1e-6)


def test_auroc_is_the_mann_whitney_statistic():
    gen = torch.Generator().manual_seed(0)
    inside, outside = torch.randn(300, generator=gen) + 3.5, torch.randn(200, generator=gen) + 4.0
    pairs = (outside[:, None] > inside[None, :]).double().mean() + 0.5 * (outside[:, None] == inside[None, :]).double().mean()
    assert auroc_aupr(inside, outside)[0] == pytest.approx(float(pairs), abs=1e-6)


# ---- typicality test ------------------------------------------------------------------------------------------
def test_typicality_flags_atypical_batches_on_both_sides_and_few_typical_ones():
    gen = torch.Generator().manual_seed(1)
    reference = 3.0 + torch.randn(20000, generator=gen)
    sets = {"same": 3.0 + torch.randn(5000, generator=gen),
            "higher": 4.2 + torch.randn(5000, generator=gen),
            "lower": 1.8 + torch.randn(5000, generator=gen),  # more likely than the data, yet atypical
            "few": torch.full((3,), 9.0)}
    out = typicality_test(reference, sets, m=25, bootstrap=20000, alpha=0.99, seed=0)
    assert out["entropy_bpd"] == pytest.approx(float(reference.double().mean()))
    assert out["epsilon_bpd"] == pytest.approx(2.576 / 5, rel=0.06)  # the 0.99 quantile of |N(0, 1/25)|
    assert out["sets"]["same"]["batches"] == 200 and out["sets"]["same"]["rate"] < 0.04
    assert out["sets"]["higher"]["rate"] > 0.95 and out["sets"]["lower"]["rate"] > 0.95
    assert out["sets"]["few"] == {"batches": 0, "flagged_ood": 0, "rate": None}
    assert typicality_test(reference, sets, 25, 20000, 0.99, seed=0) == out  # seeded


# ---- the score of a class-conditional model -----------------------------------------------------------------
def test_a_conditional_model_is_scored_by_its_marginal_over_the_classes():
    from flowlab.flows import Glow

    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8) - 0.5
    plain = Glow(1, 8, K=1, L=2, hidden_channels=4, permutation="reverse").eval()
    assert torch.equal(bits_per_dim(plain, x), plain.bits_per_dim(x))
    flow = Glow(1, 8, K=1, L=2, hidden_channels=4, permutation="reverse", y_condition=True, n_classes=3).eval()
    with torch.no_grad():
        for p in flow.top_prior.parameters():  # zero-initialised: make the classes differ
            p.normal_(0, 0.5)
        per_class = torch.stack([flow.bits_per_dim(x, k) for k in range(3)])  # [3, B]
        marginal = bits_per_dim(flow, x)
    # -log2 mean_y 2^(-D b_y) / D, from the per-class values in float64
    expect = -(torch.logsumexp(-per_class.double() * 64 * math.log(2), 0) - math.log(3)) / (64 * math.log(2))
    assert torch.allclose(marginal.double(), expect, atol=1e-5)
    assert (marginal <= per_class.max(0).values + 1e-5).all() and (marginal >= per_class.min(0).values - 1e-5).all()
    assert (per_class.max(0).values - per_class.min(0).values > 1e-3).all()  # the classes do differ


# ---- derived sets and reshaping ----------------------------------------------------------------------------
def test_derived_sets():
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 32, (6, 3, 8, 8), dtype=torch.uint8, generator=gen)  # 5-bit
    index = torch.arange(10, 16)
    assert torch.equal(_derived("vflip", 5, 0)(x, index), x.flip(-2))
    assert torch.equal(_derived("invert", 5, 0)(x, index), 31 - x)
    noise = _derived("noise", 5, 0)(x, index)
    assert noise.shape == x.shape and noise.dtype == torch.uint8 and int(noise.max()) <= 31
    assert torch.equal(_derived("noise", 5, 0)(x[3:], index[3:]), noise[3:])  # a function of the index alone
    assert not torch.equal(_derived("noise", 5, 1)(x, index), noise)
    const = _derived("constant", 5, 0)(x, index)
    assert const.shape == x.shape and int(const.max()) <= 31
    assert torch.equal(const, const[:, :, :1, :1].expand_as(const))
    assert len(torch.unique(const[:, 0, 0, 0])) > 1


def test_reshaper_converts_channels_and_size():
    rgb = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    rgb[:, 0] = 200
    grey = _reshaper(3, 32, 1, 28, 255)(rgb, torch.arange(2))
    assert grey.shape == (2, 1, 28, 28) and grey.dtype == torch.uint8
    assert int(grey.min()) == int(grey.max()) == round(0.299 * 200)
    back = _reshaper(1, 28, 3, 32, 255)(grey, torch.arange(2))
    assert back.shape == (2, 3, 32, 32) and int(back.min()) == int(back.max()) == round(0.299 * 200)


# ---- SVHN -------------------------------------------------------------------------------------------------------
def test_svhn_reads_the_official_mat_layout(tmp_path):
    written = write_svhn(tmp_path, n_train=30, n_test=12, seed=3)
    images, labels = read_svhn_mat(tmp_path / "test_32x32.mat")
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images, written["test"][0])
    assert np.array_equal(labels, written["test"][1] % 10) and labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(10))  # 10 -> 0

    dm = datamodule("svhn", tmp_path, batch_size=5, val_size=6, n_bits=5)
    assert isinstance(dm, SVHNDataModule) and (dm.channels, dm.image_size, dm.num_classes) == (3, 32, 10)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 12)
    x, y, index = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8 and int(x.max()) < 32
    assert torch.equal(x, torch.from_numpy(written["test"][0][:5]) >> 3)
    assert y.tolist() == (written["test"][1][:5] % 10).tolist() and index.tolist() == [0, 1, 2, 3, 4]
    assert "svhn" in dm.describe() and "test_32x32.mat" in dm.describe()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "is missing; download test_32x32.mat"),
    (truncate, "is corrupt or unreadable"),
    (garbage, "is corrupt or unreadable"),
])
def test_svhn_missing_or_damaged_files_end_in_one_line(tmp_path, damage, message):
    write_svhn(tmp_path, n_train=10, n_test=10)
    damage(tmp_path / "test_32x32.mat")
    with pytest.raises(DataError, match=message) as e:
        datamodule("svhn", tmp_path, val_size=2).setup("test")
    assert "\n" not in str(e.value) and str(tmp_path / "test_32x32.mat") in str(e.value)


def test_svhn_refuses_labels_outside_1_to_10(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(DataError, match="labels outside 1..10"):
        read_svhn_mat(tmp_path / "test_32x32.mat")
