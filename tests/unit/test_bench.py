"""The benchmark harness (flowlab.bench, flowlab-bench): its outputs, its reference Glow, its checks.

Speed is not asserted here (timing goals live in `make bench`); these tests check that the harness
measures what it says: finite positive numbers in a complete JSON, a reference model that is an
exact flow with the same log-det definition as flowlab's Glow, and a bits/dim check whose two runs
see the same data from the same initial weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowlab.bench.data import DataStream, load_npz, structured_images
from flowlab.bench.reference import ReferenceGlow
from flowlab.bench.timing import Stats
from flowlab.cli import bench as cli
from flowlab.errors import DataError

LAYER_NAMES = {"nxn", "conv1x1", "conv1x1_lu", "emerging", "conv3x3"}


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _only(tmp_path, pattern):
    files = sorted(tmp_path.glob(pattern))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli.run(["--quick", "--device", "cpu", "--models", "nxn,conv1x1_lu,reference", "--out", str(out)])
    assert code == 0
    return out, json.loads(_only(out, "bench_*.json").read_text())


def test_quick_run_writes_complete_json(quick_run):
    _, result = quick_run
    assert result["schema"] == "flowlab-bench/1"
    assert result["env"]["torch"] == torch.__version__ and result["env"]["cpu"]
    assert result["env"]["command"].startswith("flowlab-bench --quick")
    # flowlab with the training defaults, the same model in plain float32 eager, then the reference
    assert [(m["model"], m.get("variant")) for m in result["models"]] == [
        ("nxn", None), ("conv1x1_lu", None), ("conv1x1_lu", "plain"), ("reference", None)]
    assert result["models"][1]["switches"] == result["switches"]["flowlab"] != "fp32 eager"
    assert "channels_last" in result["switches"]["flowlab"] and "fused_adam" in result["switches"]["flowlab"]
    assert result["models"][2]["switches"] == result["models"][3]["switches"] == "fp32 eager"
    sampling = result["sampling_ratio"]  # the sampling goal, timed in alternation like the training ratio
    assert (sampling["numerator"], sampling["denominator"], sampling["rounds"]) == ("nxn", "conv1x1_lu", 10)
    goal = next(g for g in result["goals"] if g["goal"].startswith("sampling speed"))
    assert goal["value"] == sampling["ratio"]["median"] and _finite_positive(goal["value"])
    for m in result["models"]:
        assert isinstance(m["params"], int) and m["params"] > 0
        for key in ("train_images_per_s", "eval_images_per_s", "sample_images_per_s"):
            stats = m[key]
            assert all(_finite_positive(stats[k]) for k in ("median", "q1", "q3", "min", "max")), (key, stats)
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
        assert _finite_positive(m["peak_memory"]["peak_mib"])
        assert _finite_positive(m["flops_per_image"])
        assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["eval_bits_per_dim"])
        assert m["sample_finite"] is True
        assert 0 <= m["max_reconstruction_error"] < 1e-4  # float32, exact flows
    ratio = result["ratio"]
    assert ratio["numerator"] == "conv1x1_lu" and ratio["denominator"] == "reference"
    rows = {(m["model"], m.get("variant")): m["train_images_per_s"]["median"] for m in result["models"]}
    assert ratio["sequential_value"] == pytest.approx(rows["conv1x1_lu", None] / rows["reference", None])
    assert ratio["plain_value"] == pytest.approx(rows["conv1x1_lu", "plain"] / rows["reference", None])
    paired = ratio["paired"]  # the goal's ratio: both models timed in alternating rounds
    assert paired["rounds"] == 10 and paired["numerator_switches"] == result["switches"]["flowlab"]
    assert ratio["value"] == paired["ratio"]["median"] and _finite_positive(ratio["value"])
    assert paired["ratio"]["q1"] <= ratio["value"] <= paired["ratio"]["q3"]


def test_quick_run_layers_and_markdown(quick_run):
    out, result = quick_run
    assert {r["layer"] for r in result["layers"]} == LAYER_NAMES
    for r in result["layers"]:
        assert _finite_positive(r["forward_ms"]["median"]) and r["params"] > 0
        if r["layer"] == "conv3x3":
            assert "inverse_ms" not in r and "logdet_ms" not in r
        else:
            assert _finite_positive(r["inverse_ms"]["median"]) and _finite_positive(r["logdet_ms"]["median"])
            assert r["inverse_error"] < 1e-4
    c, hw = result["layers"][0]["shape"][1], 9
    conv = next(r for r in result["layers"] if r["layer"] == "conv3x3")
    assert conv["params"] == c * c * hw + c
    assert any(cl["claim"].startswith("n x n conv has fewer parameters") and cl["holds"] for cl in result["claims"])
    text = _only(out, "bench_*.md").read_text()
    assert "| model | params | train img/s" in text and "| reference |" in text
    assert f"conv1x1_lu`, {result['switches']['flowlab']} / reference: " in text
    assert "| conv1x1_lu (fp32 eager) |" in text and "alternating rounds" in text


def _perturbed_double(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """ActNorm initialised on ``x``, every parameter moved off its (partly zero) initialisation, float64."""
    model.initialize(x) if hasattr(model, "initialize") else model.log_prob(x)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.double()


def _flowlab_lu_glow(**kw):
    from flowlab.flows import Glow

    return Glow(permutation="conv1x1_lu", coupling="affine", **kw)


@pytest.mark.parametrize("make", [ReferenceGlow, _flowlab_lu_glow], ids=["reference", "flowlab-conv1x1_lu"])
def test_logdet_is_log_abs_det_jacobian_and_inverse_exact(make):
    """Both models compute the same quantity: logdet = log|det dz/dx| of the whole map (brute force, float64)."""
    torch.manual_seed(0)
    model = make(in_channels=3, image_size=4, K=2, L=2, hidden_channels=8)
    model = _perturbed_double(model, torch.rand(8, 3, 4, 4) - 0.5)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5
    zs, logdet = model.encode(x)
    assert logdet.shape == (2,)
    assert (model.decode(zs) - x).abs().max() < 1e-10
    for b in range(2):
        def flat_z(xb):
            return torch.cat([z.reshape(-1) for z in model.encode(xb.unsqueeze(0))[0]])
        jac = torch.autograd.functional.jacobian(flat_z, x[b])
        sign, logabsdet = torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))
        assert sign != 0
        assert logdet[b].item() == pytest.approx(logabsdet.item(), abs=1e-8)


def test_reference_log_prob_and_bits_per_dim_definitions():
    """log_prob = prior (N(0, I) at initialisation) + logdet; bits/dim adds D·n_bits·ln 2, as in flowlab."""
    torch.manual_seed(0)
    model = ReferenceGlow(in_channels=3, image_size=8, K=2, L=2, hidden_channels=8, n_bits=5).double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    model.log_prob(x)  # ActNorm init; the zero-initialised priors stay N(0, I)
    model.eval()
    zs, logdet = model.encode(x)
    prior = sum((-0.5 * (z ** 2 + math.log(2 * math.pi))).reshape(3, -1).sum(1) for z in zs)
    assert torch.allclose(model.log_prob(x), prior + logdet)
    dims = 3 * 8 * 8
    expected = (-(prior + logdet) / dims + 5 * math.log(2)) / math.log(2)
    assert torch.allclose(model.bits_per_dim(x), expected)
    assert sum(z[0].numel() for z in zs) == dims


def test_reference_samples_and_architecture():
    model = ReferenceGlow(in_channels=3, image_size=8, K=2, L=2, hidden_channels=8)
    with torch.no_grad():
        x = model.sample(5, temperature=0.7)
    assert x.shape == (5, 3, 8, 8) and torch.isfinite(x).all()
    coupling = model.blocks[0].flows[0].coupling.net
    kinds = [type(m).__name__ for m in coupling]
    assert kinds == ["ConvActNorm", "ReLU", "ConvActNorm", "ReLU", "ZeroConv2d"]
    assert coupling[0].conv.kernel_size == (3, 3) and coupling[2].conv.kernel_size == (1, 1)


def test_check_bpd_same_data_and_init_give_identical_runs(tmp_path):
    """With no fast-path switch (--plain) the two runs are the same computation: difference exactly 0."""
    code = cli.run(["--quick", "--device", "cpu", "--plain", "--check-bpd", "3", "--check-images", "48",
                    "--check-eval-every", "2", "--out", str(tmp_path)])
    result = json.loads(_only(tmp_path, "check_*.json").read_text())
    assert code == 0 and result["passed"] and result["complete"]
    assert result["steps_done"] == 3 and [p["step"] for p in result["points"]] == [2, 3]
    assert result["difference"] == 0.0
    assert math.isfinite(result["bits_per_dim_fast"]) and 0 < result["bits_per_dim_fast"] < 20
    assert result["fast"]["curve"] == result["reference"]["curve"]
    assert "PASSED" in _only(tmp_path, "check_*.md").read_text()


def test_data_stream_is_reproducible():
    images = structured_images(40, 3, 8, torch.device("cpu"), seed=3)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 8, 8)
    assert torch.equal(images, structured_images(40, 3, 8, torch.device("cpu"), seed=3))
    assert images.float().std() > 10  # not constant
    a = DataStream(images, 4, 8, torch.device("cpu"), seed=0, eval_count=8)
    b = DataStream(images, 4, 8, torch.device("cpu"), seed=0, eval_count=8)
    assert torch.equal(a.batch(5), b.batch(5)) and not torch.equal(a.batch(5), a.batch(6))
    x = a.batch(0)
    assert x.min() >= -0.5 and x.max() < 0.5
    assert torch.equal(a.eval_x, b.eval_x) and a.eval_x.shape[0] == 8


def test_load_npz(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=arr)
    x = load_npz(tmp_path / "d.npz", 3, 8)
    assert x.shape == (5, 3, 8, 8) and torch.equal(x[1, 2], torch.from_numpy(arr[1, :, :, 2]))
    with pytest.raises(DataError, match="do not fit the preset"):
        load_npz(tmp_path / "d.npz", 3, 16)
    np.savez(tmp_path / "f.npz", x=arr.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_npz(tmp_path / "f.npz", 3, 8)
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz", 3, 8)


def test_amp_switch_maps_onto_the_models_own_switch():
    """--amp uses flowlab's set_coupling_dtype where the model has it, torch.autocast elsewhere."""
    from flowlab.bench.switches import Switches

    glow = _flowlab_lu_glow(in_channels=3, image_size=8, K=1, L=1, hidden_channels=8)
    ref = ReferenceGlow(in_channels=3, image_size=8, K=1, L=1, hidden_channels=8)
    sw = Switches(amp="bf16")
    if not callable(getattr(glow, "set_coupling_dtype", None)):
        pytest.skip("flowlab's Glow has no set_coupling_dtype")
    sw.prepare_model(glow)
    nets = [m for m in glow.modules() if hasattr(m, "compute_dtype")]
    assert nets and all(m.compute_dtype == torch.bfloat16 for m in nets)
    assert isinstance(sw.autocast(torch.device("cpu"), glow), type(Switches().autocast(torch.device("cpu"))))
    assert isinstance(sw.autocast(torch.device("cpu"), ref), torch.autocast)
    assert sw.amp_applied(glow) == "bf16 via set_coupling_dtype" and sw.amp_applied(ref) == "bf16 via torch.autocast"
    assert isinstance(Switches(amp="bf16", amp_scope="autocast").autocast(torch.device("cpu"), glow), torch.autocast)


def test_stats():
    s = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 4.0, 4)
    assert s.q1 == pytest.approx(1.75) and s.q3 == pytest.approx(3.25)


@pytest.mark.parametrize("args, message", [
    (["--models", "bogus"], "'bogus' is not a model"),
    (["--steps", "0"], "--steps=0 must be a positive integer"),
    (["--glow-kw", "no-equals"], "expected KEY=VALUE"),
    (["--check-bpd", "2", "--data-npz", "/nonexistent.npz"], "no such file"),
])
def test_user_errors_exit_2_with_one_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_imports_torch_only():
    """The H200 image has torch but not Hydra, OmegaConf, Lightning or W&B."""
    code = ("import sys, flowlab.cli.bench, flowlab.bench.runner, flowlab.bench.check_bpd, flowlab.bench.report\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'hydra', 'omegaconf', 'wandb', 'lightning', 'pytorch_lightning', 'torchmetrics'})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_switches_are_the_training_fast_path():
    """Without switches the benchmark times flowlab as conf/train.yaml trains it; --plain turns all of it off."""
    from flowlab.bench.switches import Switches
    from flowlab.flows.precision import bf16_is_fast

    parser, cpu = cli.build_parser(), torch.device("cpu")
    fast = cli._switches(parser.parse_args([]), cpu)
    assert fast.fused_adam and fast.channels_last and fast.amp == ("bf16" if bf16_is_fast(cpu) else "off")
    assert cli._switches(parser.parse_args(["--plain", "--amp"]), cpu) == Switches.plain()
    assert cli._switches(parser.parse_args(["--dtype", "float32", "--no-channels-last"]), cpu).amp == "off"
    assert not cli._switches(parser.parse_args(["--no-channels-last"]), cpu).channels_last

    glow = _flowlab_lu_glow(in_channels=3, image_size=8, K=2, L=1, hidden_channels=8)
    ref = ReferenceGlow(in_channels=3, image_size=8, K=1, L=1, hidden_channels=8)
    sw = Switches(amp="bf16", channels_last=True)
    assert sw.prepare_model(glow) is glow  # flowlab: the coupling networks only, the flow's stream stays NCHW
    nets = [m for m in glow.modules() if hasattr(m, "channels_last")]
    assert nets and all(m.channels_last and m.compute_dtype == torch.bfloat16 for m in nets)
    x = torch.rand(2, 3, 8, 8)
    assert sw.prepare_input(x, glow).is_contiguous()
    assert sw.prepare_input(x, ref).is_contiguous(memory_format=torch.channels_last)
    ref = sw.prepare_model(ref)
    assert ref.blocks[0].flows[0].coupling.net[0].conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_bench_defaults_match_the_training_config():
    """The benchmark cannot read Hydra configs (it runs with torch alone), so it holds its own copy of
    the training fast-path defaults; this keeps the copy equal to conf/train.yaml."""
    from pathlib import Path

    from omegaconf import OmegaConf

    optim = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "train.yaml").optim
    args = cli.build_parser().parse_args([])
    assert args.fused_adam is optim.fused
    assert args.channels_last is optim.coupling_channels_last
    assert (args.dtype, optim.coupling_dtype) == ("auto", "auto")
