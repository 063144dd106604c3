"""Bits/dim of constant images, level by level (flowlab-ood's `constant` set draws one random level per image).

    python experiments/ood/constant_levels.py <run dir or .ckpt> [<flowlab-ood output dir>]

Prints a markdown table: grey level, bits/dim of the all-that-level image (evaluation's dequantisation), and,
given a flowlab-ood output directory, the share of in-distribution test images the model finds less likely.
"""

import csv
import json
import sys
from pathlib import Path

import torch

from flowlab.lit.checkpoint import module_from_checkpoint

module, ckpt, path = module_from_checkpoint(sys.argv[1])
module.eval()
hp = ckpt["hyper_parameters"]["model"]
levels = [v for v in (0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 255) if v < 2**module.n_bits]
x = torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, hp["in_channels"], hp["image_size"], hp["image_size"])
with torch.inference_mode():
    bpd = module.eval_flow.bits_per_dim(module.dequantize_eval(x.contiguous(), torch.arange(len(levels)))).tolist()
test = None
if len(sys.argv) > 2:
    ood = Path(sys.argv[2])
    with open(ood / f"bpd_{json.loads((ood / 'ood.json').read_text())['in_distribution']}.csv", newline="") as f:
        test = torch.tensor([float(r["bpd"]) for r in csv.DictReader(f)])
print(f"checkpoint {path} (step {ckpt.get('global_step')})\n")
print("| level | bits/dim |" + (" test images with higher bits/dim |" if test is not None else ""))
print("|---|---|" + ("---|" if test is not None else ""))
for v, b in zip(levels, bpd):
    print(f"| {v} | {b:.3f} |" + (f" {100 * float((test > b).double().mean()):.1f}% |" if test is not None else ""))
