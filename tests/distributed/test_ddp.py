"""DDP on CPU with gloo (``trainer=ddp_cpu``: two processes, ddp_spawn) through flowlab-train itself.

One two-process run of one optimiser step is compared with a single-process computation on the same
global batch (the two processes' batches together): ActNorm's data-dependent initialisation, the
weights after the step (equal on both processes and to the single-process step, tolerance 1e-5), the
training noise (different per process), and the test bits/dim (equal to flowlab-eval in one process,
although DistributedSampler gave one test image to both processes).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import BPD_LINE, N_TEST, base_args, load, run_inprocess, write_data

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data, out, probe = write_data(root / "data"), root / "out", root / "probe"
    # float32 coupling networks: the comparison below is at round-off level (1e-6), which bfloat16 (the
    # default on GPUs and AMX CPUs) would swamp; what DDP must preserve does not depend on the dtype.
    args = base_args(data, out, "trainer=ddp_cpu", "trainer.max_steps=1", "trainer.limit_test_batches=null",
                     "optim.coupling_dtype=float32", "run_name=ddp", "+callbacks.probe._target_=tests.distributed.helpers.Probe",
                     f"+callbacks.probe.out_dir={probe}")
    code, stdout, stderr = run_inprocess("train", args)
    assert code == 0, stderr[-4000:]
    records = [torch.load(probe / f"rank{r}_fit.pt", weights_only=False) for r in range(2)]
    for r, rec in enumerate(records):
        rec["test_indices"] = torch.load(probe / f"rank{r}_test.pt", weights_only=False)
    return {"data": data, "out": out, "stdout": stdout, "records": records, "run": out / "runs" / "ddp"}




def _single_process(run_dir, records):
    """The same module from the same weights doing the first step by hand on the global batch (both processes'
    batches with their own noise): returns the weights after ActNorm's init, the gradients and the step's lr,
    and the weights after the step."""
    from flowlab.lit.module import FlowModule

    hp = load(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]
    module = FlowModule(model=hp["model"], optim=hp["optim"], eval_seed=hp["eval_seed"], seed=hp["seed"],
                        use_ema=hp["use_ema"], data=hp["data"])
    module.flow.load_state_dict(records[0]["initial"])
    xs = []
    for rec in records:
        gen = torch.Generator()
        gen.set_state(rec["noise_state"])
        module._noise_gen = gen
        xs.append(module.dequantize_train(rec["batch"]))
    x = torch.cat(xs)
    module.train()
    module._initialize_flow(x)  # no process group here: statistics of the whole global batch
    after_init = {k: v.detach().clone() for k, v in module.flow.state_dict().items()}
    opt = module.configure_optimizers()
    optimizer = opt["optimizer"] if isinstance(opt, dict) else opt
    module.flow.bits_per_dim(x).mean().backward()  # the mean over the global batch
    grads = {k: p.grad.detach().clone() for k, p in module.flow.named_parameters() if p.grad is not None}
    clip = hp["optim"].get("grad_clip")
    torch.nn.utils.clip_grad_norm_([p for p in module.flow.parameters() if p.grad is not None],
                                   float(clip) if clip else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    return after_init, grads, lr, {k: v.detach().clone() for k, v in module.flow.state_dict().items()}


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys()
    worst = max(((k, (a[k].double() - b[k].double()).abs().max().item()) for k in a if a[k].is_floating_point()),
                key=lambda kv: kv[1])
    assert worst[1] <= atol, f"{what}: {worst[0]} differs by {worst[1]:.3g}"
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


def test_two_processes_ran_with_their_own_batches_and_noise(ddp_run):
    r0, r1 = ddp_run["records"]
    assert (r0["world"], r1["world"]) == (2, 2) and (r0["rank"], r1["rank"]) == (0, 1)
    assert not torch.equal(r0["batch"], r1["batch"]), "DistributedSampler gives each process other images"
    assert r0["noise_seed"] != r1["noise_seed"], "training noise must differ per process"
    _assert_close(r0["initial"], r1["initial"], 0.0, "initial weights")


def test_actnorm_init_and_first_step_equal_single_process_on_global_batch(ddp_run):
    r0, r1 = ddp_run["records"]
    after_init, grads, lr, after_step = _single_process(ddp_run["run"], [r0, r1])
    actnorm = [k for k in after_init if k.endswith(("logs", "bias")) and "actnorm" in k.lower()]
    assert actnorm, sorted(after_init)[:10]
    for rec in (r0, r1):
        assert all(bool(v.all()) for k, v in rec["after_init"].items() if k.endswith("initialized"))
        _assert_close({k: rec["after_init"][k] for k in actnorm}, {k: after_init[k] for k in actnorm}, 1e-5,
                      f"ActNorm init on rank {rec['rank']}")
    # DDP averages the per-process gradients of the per-process mean loss: the gradient of the mean over the
    # global batch (a sum instead of a mean would double them)
    _assert_close(r0["grads"], grads, 1e-6, "averaged gradients vs single-process gradients")
    _assert_close(r0["grads"], r1["grads"], 0.0, "rank 0 vs rank 1 gradients")
    # after the step: the same weights on both processes, and as one process on the global batch
    _assert_close(r0["after_step"], r1["after_step"], 0.0, "rank 0 vs rank 1 after one step")
    moved = max((r0["after_step"][k] - r0["initial"][k]).abs().max().item()
                for k in r0["initial"] if r0["initial"][k].is_floating_point())
    assert moved > 1e-4
    # Adam's first update is lr * g / (|g| + eps): it takes the sign of g. Gradients that are zero up to
    # round-off (|g| ~ 1e-9: ActNorm biases right after their data-dependent init made the batch mean zero)
    # get a round-off sign in either computation; their update is still bounded by lr.
    params = dict(ddp_run["records"][0]["after_step"])
    n_checked = 0
    for k in grads:
        well = grads[k].abs() > 1e-6
        diff = (params[k] - after_step[k]).abs()
        assert diff[well].max().item() <= 1e-5 if well.any() else True, f"{k} differs by {diff[well].max():.3g}"
        assert diff.max().item() <= 2 * lr * (1 + 1e-6), k
        n_checked += int(well.sum())
    assert n_checked > 1000
    for k in after_step:  # buffers and parameters without gradient
        if k not in grads:
            assert torch.allclose(params[k].double(), after_step[k].double(), atol=1e-5), k
    last = load(ddp_run["run"] / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 1
    _assert_close({k[len("flow."):]: v for k, v in last["state_dict"].items() if k.startswith("flow.")},
                  r0["after_step"], 0.0, "last.ckpt")


def test_test_bpd_under_ddp_equals_single_process(ddp_run):
    seen = sorted(ddp_run["records"][0]["test_indices"] + ddp_run["records"][1]["test_indices"])
    assert len(seen) == N_TEST + 1 and sorted(set(seen)) == list(range(N_TEST)), "one image padded in twice"
    ddp_bpd = float(BPD_LINE.findall(ddp_run["stdout"])[-1])
    args = base_args(ddp_run["data"], ddp_run["out"], "trainer=cpu", "trainer.limit_test_batches=null",
                     f"ckpt_path={ddp_run['run']}", "run_name=eval_single")
    code, stdout, stderr = run_inprocess("eval", args)
    assert code == 0, stderr[-4000:]
    single = float(BPD_LINE.findall(stdout)[-1])
    assert abs(ddp_bpd - single) < 1e-5, (ddp_bpd, single)
