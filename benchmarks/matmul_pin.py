"""The price of the numerics pin for matrix products: MKL's COMPATIBLE branch against its own choice (AUTO).

Run by hand, never in CI (no data needed):

    python -m benchmarks.matmul_pin [--threads 1]

MKL_CBWR=COMPATIBLE (stages/numerics.py) is what makes a matmul the same bytes on every x86-64 CPU; it runs
MKL's most portable kernels. Each branch runs in its own child process (MKL reads the variable once, at
load); the shapes are the cnn's (batch 128: its second convolution forward, its weight gradient, its input
gradient, and the head's first layer) and a square one. GFLOP/s from CPU time, so a busy machine shifts
both branches alike; the ratio is the pin's price.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {
    "conv2 forward": ((25088, 144), (144, 32)),
    "conv2 weight grad": ((32, 25088), (25088, 144)),
    "conv2 input grad": ((25088, 32), (32, 144)),
    "head (1568 -> 128)": ((128, 1568), (1568, 128)),
    "square 2048": ((2048, 2048), (2048, 2048)),
}

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(int(sys.argv[1]))
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
rates = {}
for name, (left, right) in json.loads(sys.argv[2]).items():
    a, b = torch.randn(*left), torch.randn(*right)
    a @ b
    repeats = max(3, int(2e9 / (2 * left[0] * left[1] * right[1])))
    start = cpu()
    for _ in range(repeats):
        a @ b
    rates[name] = 2 * left[0] * left[1] * right[1] * repeats / (cpu() - start) / 1e9
print(json.dumps(rates))
"""


def rates(branch: str, threads: int) -> dict[str, float]:
    """GFLOP/s per shape with MKL_CBWR=`branch`, torch loaded directly (not through `stages`, which pins)."""
    env = os.environ | {"MKL_CBWR": branch}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), json.dumps(SHAPES)], env=env, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(result.stderr)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    pinned, free = rates("COMPATIBLE", args.threads), rates("AUTO", args.threads)
    print(f"{'shape':20s} {'COMPATIBLE':>11s} {'AUTO':>8s}  GFLOP/s, {args.threads} thread(s)")
    for name in SHAPES:
        print(f"{name:20s} {pinned[name]:11.1f} {free[name]:8.1f}  AUTO/COMPATIBLE {free[name] / pinned[name]:.2f}x")


if __name__ == "__main__":
    main()
