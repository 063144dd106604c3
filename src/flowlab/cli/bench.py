"""``flowlab-bench``: speed (and numerics) benchmark of flowlab's Glow against a plain reference Glow.

An argparse entry point, not Hydra: it imports torch and ``flowlab.flows`` only, so it runs on a
machine that has nothing else (the H200 image). See experiments/bench/README.md.

    flowlab-bench --preset cpu                     # make bench: the table in a few minutes on 2 cores
    flowlab-bench --preset gpu --device cuda --out experiments/bench/results
    flowlab-bench --preset cpu --plain             # flowlab's Glow in plain float32 eager too
    flowlab-bench --preset gpu --compile           # fast-path switches on top of the training defaults
    flowlab-bench --preset gpu --check-bpd 2000    # bits/dim: fast path vs float32 reference run
"""

from __future__ import annotations

import argparse
import sys

from flowlab.errors import ConfigError, UserError

DTYPE_TO_AMP = {"float32": "off", "bfloat16": "bf16", "float16": "fp16"}
DTYPES = ["auto", *DTYPE_TO_AMP]


def build_parser() -> argparse.ArgumentParser:
    from flowlab.bench.flops import H200_BF16_PEAK
    from flowlab.bench.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="flowlab-bench",
        description="Training / evaluation / sampling throughput, peak memory, reconstruction error and MFU of "
                    "flowlab's Glow (every permutation) beside a plain eager float32 reference Glow, plus per-layer "
                    "micro-benchmarks. Prints a markdown table and writes JSON + markdown to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model size and timing preset")
    g.add_argument("--quick", action="store_true", help="tiny sizes for tests (same as --preset quick)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--models", default="all",
                   help="comma-separated subset of nxn,conv1x1,conv1x1_lu,reverse,shuffle,emerging,realnvp,reference; "
                        "'all' = every available; 'none' = layer micro-benchmarks only")
    g.add_argument("--no-layers", action="store_true", help="skip the per-layer micro-benchmarks")
    g.add_argument("--steps", type=int, help="timed training steps per repetition (preset default)")
    g.add_argument("--repeats", type=int, help="timed repetitions (preset default)")
    g.add_argument("--warmup", type=int, help="untimed warm-up steps (preset default)")
    g.add_argument("--batch", type=int, help="batch size (preset default)")
    g.add_argument("--eval-repeats", type=int, help="timed evaluation / sampling calls (preset default)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr-warmup", type=int, default=200,
                   help="linear learning-rate warm-up steps (training benchmark and bits/dim check)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")

    s = p.add_argument_group(
        "fast-path switches (flowlab's Glow; the reference stays plain float32 eager). The defaults are the "
        "training defaults of conf/train.yaml (optim.fused, optim.coupling_dtype=auto, "
        "optim.coupling_channels_last), so the benchmark times flowlab the way it trains")
    s.add_argument("--plain", action="store_true",
                   help="flowlab's Glow in plain float32 eager too: float32, NCHW, unfused Adam (overrides the "
                        "switches below)")
    s.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype of the coupling networks (flowlab) or of the call via torch.autocast "
                        "(others); auto = bfloat16 where the device multiplies it natively (CUDA with bf16, "
                        "CPUs with AMX), else float32")
    s.add_argument("--amp", action="store_true", help="shorthand for --dtype bfloat16")
    s.add_argument("--amp-scope", choices=["model", "autocast"], default="model",
                   help="model: the model's own switch where it has one (flowlab's set_coupling_dtype: coupling "
                        "networks in --dtype, the flow in float32), else autocast; autocast: the whole call")
    s.add_argument("--compile", action="store_true", help="torch.compile the training / evaluation / sampling calls")
    s.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune, ...)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (flowlab: the coupling networks; others: the whole model)")
    s.add_argument("--no-tf32", action="store_true", help="IEEE float32 matmuls/convolutions on CUDA (TF32 is on by default)")
    s.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.optim.Adam(fused=True)")
    s.add_argument("--glow-kw", action="append", metavar="KEY=VALUE",
                   help="extra keyword argument for flowlab.flows.Glow (repeatable), e.g. a fast-path switch")
    s.add_argument("--reference-fast", action="store_true",
                   help="apply --dtype/--compile/--channels-last/--fused-adam to the reference too (anchor rows)")
    g.add_argument("--ratio-rounds", type=int, default=10,
                   help="rounds in which the ratio model and the reference are timed in alternation for their "
                        "speed ratio (0: take the ratio of their rows, timed one after the other)")
    s.add_argument("--no-plain-row", action="store_true",
                   help="skip the extra plain float32 eager row of the ratio model (timed by default whenever "
                        "flowlab's switches are not plain, so the table shows what the fast path adds)")

    m = p.add_argument_group("MFU")
    m.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK, help="peak FLOP/s that MFU divides by")
    m.add_argument("--mfu", action="store_true", help="report MFU on the CPU too (always reported on CUDA)")
    m.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")

    g.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, run torch.profiler over --steps training steps of each model in "
                        "--models and print the top operators by self time (tables and Chrome traces go to --out)")

    c = p.add_argument_group("bits/dim check (fast path vs float32 reference run)")
    c.add_argument("--check-bpd", type=int, metavar="STEPS",
                   help="instead of the throughput benchmark, train two copies of one model for STEPS steps and "
                        "compare their bits/dim")
    c.add_argument("--check-model", default="conv1x1_lu", help="model trained in the check")
    c.add_argument("--data-npz", help=".npz with uint8 images [N, H, W, C] (default: synthetic structured images)")
    c.add_argument("--check-images", type=int, default=20000, help="number of synthetic training images")
    c.add_argument("--check-tolerance", type=float, default=0.01, help="allowed |bits/dim difference|")
    c.add_argument("--check-eval-every", type=int, help="evaluate both runs every N steps (default: STEPS/8)")
    c.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop the check at the last evaluation point that fits (results so far are kept)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=".bench", help="folder for the JSON and markdown results (created if needed)")
    o.add_argument("--tag", default="", help="label added to the output file names")
    return p


def _switches(args, device):
    from flowlab.bench.switches import Switches, parse_glow_kwargs
    from flowlab.flows.precision import bf16_is_fast

    if args.amp and args.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--amp (bfloat16) contradicts --dtype {args.dtype}; give one of them")
    if args.plain:
        return Switches.plain(tf32=not args.no_tf32)
    if args.amp:
        amp = "bf16"
    elif args.dtype == "auto":
        amp = "bf16" if bf16_is_fast(device) else "off"
    else:
        amp = DTYPE_TO_AMP[args.dtype]
    return Switches(amp=amp, amp_scope=args.amp_scope, compile=args.compile, compile_mode=args.compile_mode,
                    channels_last=args.channels_last, tf32=not args.no_tf32, fused_adam=args.fused_adam,
                    glow_kwargs=parse_glow_kwargs(args.glow_kw))


def _stem(kind: str, preset: str, device, switches, tag: str, timestamp: str) -> str:
    label = "" if switches.is_plain else "_" + "".join(ch if ch.isalnum() else "-" for ch in switches.label())
    stamp = timestamp.replace(":", "").replace("-", "").replace("+0000", "").replace("T", "-")[:15]
    return f"{kind}_{preset}_{device.type}{label}{('_' + tag) if tag else ''}_{stamp}"


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from flowlab.bench import report
    from flowlab.bench.env import environment
    from flowlab.bench.model_bench import log
    from flowlab.bench.models import parse_models
    from flowlab.bench.presets import get_preset
    from flowlab.bench.runner import BenchConfig, resolve_device
    from flowlab.bench.runner import run as run_bench

    if args.ratio_rounds < 0:
        raise ConfigError(f"--ratio-rounds {args.ratio_rounds}: must be at least 0")
    if args.lr <= 0 or args.lr_warmup < 0:
        raise ConfigError(f"--lr {args.lr} must be positive and --lr-warmup {args.lr_warmup} at least 0")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    preset = get_preset("quick" if args.quick else args.preset, steps=args.steps, repeats=args.repeats,
                        warmup=args.warmup, batch=args.batch, eval_repeats=args.eval_repeats)
    device = resolve_device(args.device)
    switches = _switches(args, device)
    full_argv = ["flowlab-bench", *(sys.argv[1:] if argv is None else argv)]

    if args.check_bpd is not None:
        from flowlab.bench.check_bpd import check_bpd

        env = environment(device, full_argv)
        json_path, md_path = report.output_paths(args.out, _stem("check", preset.name, device, switches, args.tag,
                                                                 env["timestamp_utc"]))

        def save(partial: dict) -> None:
            partial = {**partial, "env": env, "preset": preset.to_dict()}
            report.write(partial, json_path, md_path, report.markdown_check(partial))

        parse_models(args.check_model)  # validates the name
        result = check_bpd(preset, device, switches, args.check_bpd, model_name=args.check_model,
                           data_npz=args.data_npz, n_images=args.check_images, lr=args.lr,
                           warmup_steps=args.lr_warmup, eval_every=args.check_eval_every,
                           tolerance=args.check_tolerance, seed=args.seed, time_budget_s=args.time_budget,
                           on_progress=save, log=log)
        save(result)
        print(report.markdown_check({**result, "env": env, "preset": preset.to_dict()}))
        print(f"results: {json_path}  {md_path}", file=sys.stderr)
        return 0 if result["passed"] else 1

    models = [] if args.models.strip() == "none" else parse_models(args.models)
    if args.profile:
        from pathlib import Path

        from flowlab.bench.env import hardware_line
        from flowlab.bench.profile import profile_training

        env = environment(device, full_argv)
        stem = _stem("profile", preset.name, device, switches, args.tag, env["timestamp_utc"])
        print(f"# {hardware_line(env)}\n# command: {env['command']}\n")
        for name in models:
            print(profile_training(name, preset, device, switches, steps=args.steps or 3, warmup=preset.warmup,
                                   out_dir=Path(args.out), stem=stem, lr=args.lr, seed=args.seed))
        print(f"profiles: {Path(args.out) / stem}_*.txt and *.trace.json", file=sys.stderr)
        return 0
    config = BenchConfig(preset=preset, device=device, models=models, switches=switches,
                         reference_fast=args.reference_fast, plain_row=not args.no_plain_row,
                         paired_rounds=args.ratio_rounds,
                         layers=not args.no_layers, lr=args.lr,
                         lr_warmup=args.lr_warmup, seed=args.seed,
                         peak_flops=args.peak_flops, report_mfu=True if args.mfu else None,
                         count_flops=not args.no_flops, argv=full_argv)
    paths: list = []

    def save(partial: dict) -> None:
        if not paths:
            paths.extend(report.output_paths(args.out, _stem("bench", preset.name, device, switches, args.tag,
                                                             partial["env"]["timestamp_utc"])))
        report.write(partial, paths[0], paths[1], report.markdown(partial))

    result = run_bench(config, on_progress=save)
    save(result)
    json_path, md_path = paths
    print(report.markdown(result))
    print(f"results: {json_path}  {md_path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UserError as e:
        print(f"flowlab-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
