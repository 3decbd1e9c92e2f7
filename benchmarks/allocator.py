"""allocator: a convolutional stem's training step with and without umbrella.runtime.retain_freed_memory.

The setting is process-wide (glibc's malloc), so each repetition starts one child process per
variant (their order alternating between repetitions); a child times ``--steps`` training steps
of the pooled convolutional stem of the learning benchmark's first stage (batch 16, 48 x 64 x 48
voxels, channels 8, 16, 32, 64, AdamW) after 3 warm-up steps, and reports the median step, the
minor page faults and the kernel time per step and its peak resident memory. Figures: medians over
repetitions; the ratio is the default's (memory returned to the kernel) step time over the kept
memory's.

Usage: python -m benchmarks.allocator [--quick | --smoke] [--reps N] [--threads N] [--steps 8]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CHILD = """
import json, resource, statistics, sys, time
import torch
from umbrella.runtime import retain_freed_memory
from umbrella.model.modeling_brain_vit import BrainPatchEmbedding
kept = retain_freed_memory()
threads, steps, batch, size = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
spec = {"in_channels": 1, "image_size": [size, size * 4 // 3, size], "patch_size": [16] * 3,
        "embed": "conv", "stem_channels": [8, 16, 32, 64], "stem_style": "pooled"}
net = BrainPatchEmbedding(64, spec, "T1")
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x = torch.randn(batch, 1, *spec["image_size"])
def step():
    loss = net(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
usage, times = resource.getrusage(resource.RUSAGE_SELF), []
for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"kept": kept, "step_s": statistics.median(times),
                  "faults_per_step": (end.ru_minflt - usage.ru_minflt) / steps,
                  "kernel_s_per_step": (end.ru_stime - usage.ru_stime) / steps,
                  "maxrss_mib": end.ru_maxrss / 1024}))
"""
VARIANTS = {"returned": "0", "kept": "1"}  # UMBRELLA_RETAIN_MEMORY of each child


def run_child(variant: str, threads: int, steps: int, batch: int, size: int) -> dict:
    env = {**os.environ, "UMBRELLA_RETAIN_MEMORY": VARIANTS[variant]}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(batch),
                          str(size)], capture_output=True, text=True, env=env, cwd=common.REPO)
    if out.returncode != 0:
        raise SystemExit(f"allocator child ({variant}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per child")
    args = p.parse_args(argv)
    opts = common.options(args)
    common.setup(opts.threads)
    batch, size, steps = (2, 24, 2) if opts.mode == "smoke" else (16, 48, args.steps)
    runs = {v: [] for v in VARIANTS}
    for rep in range(opts.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            runs[variant].append(run_child(variant, opts.threads, steps, batch, size))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in
               ("step_s", "faults_per_step", "kernel_s_per_step", "maxrss_mib")}
           for v, rs in runs.items()}
    speedup = med["returned"]["step_s"] / med["kept"]["step_s"]
    results = {"medians": med, "runs": runs, "speedup_kept_vs_returned": speedup,
               "kept_in_effect": all(r["kept"] for r in runs["kept"]),
               "targets": {"kept_at_least_1.1x_faster": {"value": speedup, "met": speedup >= 1.1}}}
    rows = [[v, f"{m['step_s'] * 1000:.0f} ms", f"{m['faults_per_step']:.0f}",
             f"{m['kernel_s_per_step']:.3f} s", f"{m['maxrss_mib']:.0f} MiB"]
            for v, m in med.items()]
    notes = [f"kept / returned: {speedup:.2f}x faster per step (medians of {opts.reps} reps, "
             f"batch {batch}, {size}^3-class volumes, {opts.threads} threads)"]
    return common.emit("allocator", {"mode": opts.mode, "reps": opts.reps, "steps": steps,
                                     "batch": batch, "threads": opts.threads}, results,
                       ["freed memory", "step", "page faults / step", "kernel time / step",
                        "peak RSS"], rows, notes, quiet=opts.quiet)


if __name__ == "__main__":
    main()
