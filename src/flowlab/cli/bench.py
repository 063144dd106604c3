"""``flowlab-bench`` (``make bench``): flowlab's real training step beside a public-style reference Glow, the
paper's layer claims, the memory table, bits/dim of the defaults against float32 (experiments/bench/README.md)."""

from __future__ import annotations

import argparse
import re
import sys

import torch

from flowlab.bench import report, suite
from flowlab.cli._config import config_dir
from flowlab.errors import ConfigError, UserError


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="flowlab-bench", description=__doc__.replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(suite.PRESETS), default="cpu", help="sizes and timing (quick: tests only)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--models", default="all", help="comma-separated models (an unknown name lists them), all or none")
    p.add_argument("--no-layers", action="store_true", help="skip the layer table and the paper's layer claims")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table (none/checkpoint/invertible)")
    p.add_argument("--check", type=int, nargs="?", const=-1, default=0, metavar="STEPS",
                   help="also run the bits/dim check for STEPS steps (bare --check: the preset's length)")
    p.add_argument("--plain", action="store_true", help="flowlab without the fast path: " + " ".join(suite.PLAIN))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (none: torch's choice)")
    p.add_argument("--out", default=".bench", help="folder for the JSON and markdown results")
    args = p.parse_args(argv)
    names = sorted(f.stem for f in (config_dir() / "model" / "permutation").glob("*.yaml")) + ["realnvp", suite.REFERENCE]
    preset = suite.PRESETS[args.preset]
    models = {"all": names, "none": []}.get(args.models, [m.strip() for m in args.models.split(",") if m.strip()])
    if unknown := [m for m in models if m not in names]:
        raise ConfigError(f"--models: {', '.join(unknown)} not known; choose from {', '.join(names)} (comma-separated)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device) or "cuda" in args.device and not torch.cuda.is_available():
        raise UserError(f"--device {args.device!r}: not a device available here; use cpu, cuda, cuda:N or auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads is not None and args.threads < 1 or args.check < -1:
        bad = f"--check {args.check}" if args.check < -1 else f"--threads {args.threads}"
        raise ConfigError(f"{bad} is not allowed: give a positive number")
    if args.threads:
        torch.set_num_threads(args.threads)
    check = preset.check_steps if args.check == -1 else args.check
    env = report.environment(device, ["flowlab-bench", *argv])
    kind = "check" if check and not models and args.no_layers and args.no_memory else "bench"
    paths = report.output_paths(args.out, f"{kind}_{preset.name}_{device.type}{'_plain' * args.plain}_{env['time_utc']}")
    result = {"schema": "flowlab-bench/2", "env": env, "preset": preset._asdict(), "plain": args.plain,
              "optim": suite.configs(suite.RATIO_MODEL, preset, args.plain)[1]}
    suite.run(preset, device, models, result, plain=args.plain, layers=not args.no_layers,
              memory=not args.no_memory, check_steps=check, on_progress=lambda r: report.write(r, paths))
    print(report.markdown(result))
    print(f"results: {paths[0]}  {paths[1]}", file=sys.stderr)
    return 0 if not result.get("check") or result["check"]["passed"] else 1


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(argv))
    except UserError as e:
        print(f"flowlab-bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
