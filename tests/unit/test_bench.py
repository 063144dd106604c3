"""The benchmark (flowlab.bench, flowlab-bench): what it records and the arithmetic behind its verdicts.

Speed is not asserted here (timing goals live in `make bench`). These tests check that the quick preset
runs end to end through the real training step and writes a complete record, that the alternating-round
ratio and the layer claims are computed as documented, that the reference Glow is an exact flow with
flowlab's log-det and bits/dim definitions, and that the bits/dim check compares like with like.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowlab.bench import suite
from flowlab.cli import bench as cli

ReferenceGlow = suite.reference_glow()


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:  # one thread: steadier on a shared machine, and the quick preset is no performance number
        code = cli.run(["--preset", "quick", "--device", "cpu", "--threads", "1", "--models",
                        "conv1x1_lu,nxn_lu,reference", "--check", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    (json_path,), (md_path,) = out.glob("bench_*.json"), out.glob("bench_*.md")
    return code, json.loads(json_path.read_text()), md_path.read_text()


def test_quick_preset_runs_end_to_end(quick_run):
    code, r, _ = quick_run
    assert code == 0 and r["complete"] and r["env"]["command"].startswith("flowlab-bench --preset quick")
    assert r["optim"] == suite.configs("conv1x1_lu", suite.PRESETS["quick"])[1]  # conf/train.yaml's defaults
    assert [(m["model"], m["plain"]) for m in r["models"]] == [
        ("conv1x1_lu", False), ("nxn_lu", False), ("conv1x1_lu", True), ("reference", False)]
    assert r["models"][2]["dtype"] == r["models"][3]["dtype"] == "float32"
    for m in r["models"]:
        assert m["params"] > 0 and _finite_positive(m["flops_per_image"]) and _finite_positive(m["peak_mib"])
        for key in ("train_images_per_s", "eval_images_per_s", "sample_images_per_s"):
            assert m[key]["q1"] <= m[key]["median"] <= m[key]["q3"] and _finite_positive(m[key]["q1"])
        assert m["sample_finite"] and m["max_reconstruction_error"] < 1e-4  # float32, exact flows
    for key, pair in (("ratio", ("conv1x1_lu", "reference")), ("sampling", ("nxn_lu", "conv1x1_lu"))):
        x = r[key]
        assert (x["a"], x["b"], x["rounds"]) == (*pair, suite.PRESETS["quick"].rounds)
        assert x["ratio"]["q1"] <= x["ratio"]["median"] <= x["ratio"]["q3"] and _finite_positive(x["ratio"]["q1"])


def test_quick_preset_markdown_holds_the_tables_and_goals(quick_run):
    _, r, text = quick_run
    assert "| model | params | coupling dtype | train img/s" in text and "| conv1x1_lu (plain) |" in text
    assert "**Training speed, `conv1x1_lu` / `reference`: " in text and "### The paper's layer claims" in text
    assert "### Goals\n\n| goal | measured | target | met |" in text
    goals = {g["goal"].split(",")[0]: g for g in r["goals"]}  # quick preset on a CPU: no CPU/GPU speed goal
    assert set(goals) == {"sampling speed", "bits/dim"}
    assert goals["sampling speed"]["value"] == r["sampling"]["ratio"]["median"]
    assert {x["layer"] for x in r["layers"]["rows"]} == set(suite.LAYERS)
    assert [c["claim"] for c in r["layers"]["claims"]][0] == "n×n conv: fewer parameters than a standard 3×3 conv"
    assert r["layers"]["claims"][0]["holds"]
    for x in r["layers"]["rows"]:
        assert ("inverse_ms" in x) == (x["layer"] != "conv3x3")
        assert x.get("inverse_error", 0) < 1e-4
    c = r["layers"]["rows"][0]["shape"][1]
    assert next(x["params"] for x in r["layers"]["rows"] if x["layer"] == "conv3x3") == c * c * 9 + c


def test_bpd_check_starts_alike_and_compares_at_the_end(quick_run):
    _, r, text = quick_run
    c = r["check"]
    assert [p["step"] for p in c["points"]] == [1, 2, 3] and c["steps"] == 3
    for p in c["points"]:
        assert 0 < p["float32"] < 20 and p["difference"] == pytest.approx(p["defaults"] - p["float32"])
        assert abs(p["difference"]) < 0.01  # same weights and batches; a few steps at warm-up learning rates
    assert c["passed"] and c["difference"] == c["points"][-1]["difference"] and "**Check PASSED**" in text


def test_ratio_summary_is_the_median_of_per_round_ratios():
    s = suite.ratio_summary([1.0, 2.0, 4.0, 1.0], [2.0, 2.0, 2.0, 3.0], batch=8)  # seconds per call of A and B
    assert s["rounds"] == 4 and s["ratio"]["median"] == pytest.approx(1.5)  # per round 2, 1, 0.5, 3
    assert (s["ratio"]["q1"], s["ratio"]["q3"]) == pytest.approx((0.875, 2.25))
    assert s["a_images_per_s"]["median"] == pytest.approx(6.0) and s["b_images_per_s"]["median"] == pytest.approx(4.0)


def test_alternate_reverses_the_order_every_round():
    calls = []
    secs = suite.alternate([lambda: calls.append("a"), lambda: calls.append("b")], rounds=3, calls=1)
    blocks = [calls[i] for i in range(0, len(calls), 3)]  # Timer.timeit: 2 warm-up calls + 1 timed call
    assert blocks == ["a", "b", "b", "a", "a", "b"] and [len(s) for s in secs] == [3, 3]


def test_claims_compare_nxn_with_conv3x3_and_emerging():
    def row(layer, params, fwd, inv=None):
        r = {"shape": [4, 12, 4, 4], "layer": layer, "params": params, "forward_ms": {"median": fwd}}
        return r if inv is None else {**r, "inverse_ms": {"median": inv}}

    out = suite.claims([row("nxn", 324, 2.0, 0.1), row("conv3x3", 1308, 1.0), row("emerging", 1332, 3.0, 0.5)])
    assert [(c["nxn"], c["other"], c["holds"]) for c in out] == [(324, 1308, True), (2.0, 1.0, False), (0.1, 0.5, True)]
    assert suite.claims([row("nxn", 324, 2.0, 0.1)]) == []


def test_configs_are_composed_from_conf():
    p = suite.PRESETS["quick"]
    cfg, optim = suite.configs("nxn_lu", p)
    assert (cfg["_target_"], cfg["permutation"], cfg["nxn_conv1x1"]) == ("flowlab.flows.Glow", "nxn", "lu")
    assert (cfg["K"], cfg["L"], cfg["hidden_channels"], cfg["image_size"], cfg["in_channels"]) == (2, 2, 16, 8, 3)
    plain = suite.configs("nxn_lu", p, plain=True)[1]
    assert optim["coupling_dtype"] == "auto" and optim["coupling_channels_last"] and optim["optimizer"]["fused"]
    assert plain["coupling_dtype"] == "float32" and not plain["coupling_channels_last"]
    assert not plain["optimizer"]["fused"]
    assert {**plain, "optimizer": optim["optimizer"], "coupling_dtype": "auto", "coupling_channels_last": True} == optim


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--models", "glowx", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--models: glowx not known" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _perturbed_double(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """ActNorm initialised on ``x``, every parameter moved off its (partly zero) initialisation, float64."""
    model.log_prob(x)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.double()


def test_reference_logdet_is_log_abs_det_jacobian_and_inverse_exact():
    torch.manual_seed(0)
    model = _perturbed_double(ReferenceGlow(in_channels=3, image_size=4, K=2, L=2, hidden_channels=8),
                              torch.rand(8, 3, 4, 4) - 0.5)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5
    zs, logdet = model.encode(x)
    assert logdet.shape == (2,) and (model.decode(zs) - x).abs().max() < 1e-10
    jac = torch.autograd.functional.jacobian(
        lambda xb: torch.cat([z.reshape(-1) for z in model.encode(xb.unsqueeze(0))[0]]), x[1], vectorize=True)
    sign, logabsdet = torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))
    assert sign != 0 and logdet[1].item() == pytest.approx(logabsdet.item(), abs=1e-8)


def test_reference_log_prob_and_bits_per_dim_definitions():
    """log_prob = prior (N(0, I) at initialisation) + logdet; bits/dim adds D·n_bits·ln 2, as flowlab's."""
    torch.manual_seed(0)
    model = ReferenceGlow(in_channels=3, image_size=8, K=2, L=2, hidden_channels=8, n_bits=5).double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    model.log_prob(x)  # ActNorm init; the zero-initialised priors stay N(0, I)
    model.eval()
    zs, logdet = model.encode(x)
    prior = sum((-0.5 * (z ** 2 + math.log(2 * math.pi))).reshape(3, -1).sum(1) for z in zs)
    assert torch.allclose(model.log_prob(x), prior + logdet)
    expected = (-(prior + logdet) / (3 * 8 * 8) + 5 * math.log(2)) / math.log(2)
    assert torch.allclose(model.bits_per_dim(x), expected)
