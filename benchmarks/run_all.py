"""run_all: every benchmark, one after another, each in its own process; then the targets.

Each benchmark prints its JSON line and table as it finishes; the last JSON line
(``"benchmark": "run_all"``) collects every target with its value and whether it was met.

``learning`` (issue 10's targets: the VLM against the classical reference, T1 and rsfMRI, 3 seeds)
takes about 80 of the ~95 minutes on 2 cores; ``--quick`` trains one seed of it, ``--only``
leaves it out.

Usage: python -m benchmarks.run_all [--quick | --smoke] [--reps N] [--only data_path,train_step]
                                    [--no-demo]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

BENCHMARKS = ("data_path", "loader_memory", "train_step", "collate_sampler", "patch_embed",
              "allocator", "embedding_cache", "learning")
EXTRA = {"learning": ["--part", "T1,rsfMRI"]}  # both parts of issue 10's targets


def run_one(name: str, args: list[str]) -> dict:
    """Run ``python -m benchmarks.<name> args``, relaying its output; returns its JSON line."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    proc = subprocess.Popen(cmd, cwd=common.REPO, stdout=subprocess.PIPE, text=True)
    payload = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{") and payload is None:
            payload = json.loads(line)
    if proc.wait() != 0 or payload is None:
        raise SystemExit(f"benchmark {name} failed (exit code {proc.returncode}); command: "
                         f"{' '.join(cmd)}")
    return payload


def summarize(payloads: list[dict]) -> tuple[dict, list[list]]:
    """Every target of the payloads -> ({benchmark.target: {value, met}}, table rows)."""
    targets, rows = {}, []
    for p in payloads:
        for name, t in p.get("results", {}).get("targets", {}).items():
            targets[f"{p['benchmark']}.{name}"] = t
            rows.append([p["benchmark"], name, float(t["value"]), "met" if t["met"] else "NOT met"])
    return targets, rows


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--no-demo", action="store_true",
                   help="train_step and patch_embed without their demo training")
    args = p.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    opts = common.options(args)
    shared = {"quick": ["--quick"], "smoke": ["--smoke"], "full": []}[opts.mode]
    shared += ["--reps", str(opts.reps), "--workdir", str(opts.workdir),
               "--threads", str(opts.threads)]
    shared += ["--quiet"] if opts.quiet else []
    started, payloads = time.perf_counter(), []
    for name in chosen:
        extra = ["--no-demo"] if name in ("train_step", "patch_embed") and args.no_demo else []
        extra += EXTRA.get(name, [])
        payloads.append(run_one(name, shared + extra))
    targets, rows = summarize(payloads)
    config = {"mode": opts.mode, "reps": opts.reps, "benchmarks": chosen,
              "seconds": round(time.perf_counter() - started, 1)}
    return common.emit("run_all", config, {"targets": targets}, ["benchmark", "target", "value",
                                                                 "status"], rows, (), opts.quiet)


if __name__ == "__main__":
    main()
