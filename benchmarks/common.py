"""What every benchmark shares: the machine's description, interleaved timing, one JSON line plus a
table on stdout, and the work folders.

Timing is interleaved: every repetition runs each variant once (``calls`` times), starting from a
different variant each time, so a load spike from another user of the machine hits every
variant alike. Figures are medians over repetitions; ratios are taken between medians measured in
the same process on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "quick", "smoke")

# OpenMP threads that spin while they wait turn every parallel region into a scheduling lottery on
# a machine shared with other jobs: a tiny-preset step took 7 s with 2 spinning threads instead of
# 0.4 s (see README). Passive waiting costs little on an idle machine. It must be set before torch
# loads its OpenMP runtime, so it is set here, at import; machine() reports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def setup(threads: int = 2) -> None:
    """Offline, quiet, ``threads`` torch threads: the conditions of every figure."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("WANDB_MODE", "offline")):
        os.environ.setdefault(var, value)
    import torch

    torch.set_num_threads(threads)


def cuda_device(benchmark: str, smoke: bool):
    """The CUDA device a GPU benchmark runs on; CPU only for ``--smoke`` (checking the script),
    otherwise SystemExit naming the benchmark."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        raise SystemExit(f"{benchmark} needs a CUDA device (use --smoke to check the script on CPU)")
    return torch.device("cpu")


def machine() -> dict:
    """Where a figure was measured: CPU, cores, memory, load, date and versions."""
    import numpy
    import torch

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nproc": os.cpu_count(),
            "cpu": _cpu_model(), "mem_total_gib": round(_meminfo("MemTotal") / 2**20, 1),
            "mem_available_gib": round(_meminfo("MemAvailable") / 2**20, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo(field: str) -> int:
    """A /proc/meminfo field in KiB (0 where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------ timing

def time_interleaved(variants: dict[str, Callable[[int], object]], reps: int,
                     calls: dict[str, int] | int = 1, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per repetition.

    ``variants[name](i)`` is called ``calls`` times per repetition with i = 0, 1, ... (so a variant
    can cycle through items); its result is dropped before the next call. ``warmup`` repetitions
    (all variants, not recorded) come first.
    """
    names = list(variants)
    per_call = {n: calls if isinstance(calls, int) else calls[n] for n in names}
    out: dict[str, list[float]] = {n: [] for n in names}
    counter = dict.fromkeys(names, 0)
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = variants[name], per_call[name]
            start = time.perf_counter()
            for _ in range(n):
                fn(counter[name])
                counter[name] += 1
            elapsed = (time.perf_counter() - start) / n
            if rep >= warmup:
                out[name].append(elapsed)
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(seconds: list[float]) -> dict:
    """Per-call seconds over repetitions -> median, spread and the rate it gives."""
    med = median(seconds)
    return {"median_s": med, "min_s": min(seconds), "max_s": max(seconds), "reps": len(seconds),
            "per_s": 1.0 / med if med > 0 else float("inf")}


def profile_calls(fn: Callable[[int], object], calls: int, top: int = 12) -> list[dict]:
    """cProfile ``fn(0..calls-1)``: the ``top`` functions by own time, with their share."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        fn(i)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "own_s": v[2],
             "share": v[2] / total, "cumulative_s": v[3]} for (f, line, name), v in rows]


# ------------------------------------------------------------------------------------ output

def table(headers: list[str], rows: list[list]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))) for r in cells]
    return "\n".join([line, sep, *body])


def _cell(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def emit(benchmark: str, config: dict, results: dict, headers: list[str], rows: list[list],
         notes: list[str] = (), quiet: bool = False) -> dict:
    """Print the JSON line (benchmark, machine, config, results), then the table and notes."""
    payload = {"benchmark": benchmark, "machine": machine(), "config": config, "results": results}
    print(json.dumps(payload, default=_jsonable), flush=True)
    if not quiet:
        m = payload["machine"]
        print(f"\n{benchmark} - {m['cpu']}, {m['nproc']} cores, {m['mem_total_gib']} GiB, "
              f"load {m['loadavg_1m']}, {m['date']}")
        print(table(headers, rows))
        for note in notes:
            print(f"  {note}")
        print(flush=True)
    return payload


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# ------------------------------------------------------------------------------------ running

@dataclass(frozen=True)
class Options:
    mode: str  # full | quick | smoke
    reps: int  # repetitions per figure (>= 5 except in smoke mode)
    workdir: Path  # persistent inputs (demo cohorts), reused between runs
    quiet: bool
    threads: int = 2  # torch threads of the measuring process


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer calls per repetition (still 5 reps)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 1 repetition: checks that it runs, measures nothing")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 5)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for reusable inputs (default $UMBRELLA_BENCH_DIR or "
                        "<tmp>/umbrella-bench)")
    p.add_argument("--quiet", action="store_true", help="print the JSON line only")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return p


def options(args: argparse.Namespace) -> Options:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    reps = args.reps if args.reps is not None else {"full": 7, "quick": 5, "smoke": 1}[mode]
    if reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {reps}")
    workdir = args.workdir or Path(os.environ.get("UMBRELLA_BENCH_DIR",
                                                  Path(tempfile.gettempdir()) / "umbrella-bench"))
    return Options(mode, reps, Path(workdir), args.quiet, args.threads)


# ------------------------------------------------------------------------------------ inputs

SEX_TEXTS = ["What is the sex of this subject?", "Is this brain from a male or a female subject?",
             "male", "female"]


def prompt_encoder():
    """The offline byte-level tokenizer trained on the sex task's text, in ChatML."""
    from umbrella.data.prompts import PromptEncoder
    from umbrella.data.tokenizer import train_tokenizer
    from umbrella.task_registry import SEX

    tok = train_tokenizer(list(SEX.questions) + list(SEX.options) + SEX_TEXTS, 300)
    return PromptEncoder(tok)


def sex_record(index: int, modality: str, path, answer: str = "male", split: str = "train"):
    """One single-image sex question about ``path``."""
    from umbrella.data.records import ImageRef, Record, Turn

    return Record(id=f"r{index:05d}", images=(ImageRef(modality, Path(path)),),
                  turns=(Turn("user", "<image>\nWhat is the sex of this subject?"),
                         Turn("assistant", answer)),
                  subject_id=f"sub-{index:05d}", study="BENCH", task="sex", split=split)


def make_samples(encoder, modality: str, shape: tuple, batch: int, *, stored_order=False,
                 dtype=None, tokens: int = 216) -> list[dict]:
    """``batch`` dataset-like sex-task samples (answers alternate female / male) with seeded
    random images of ``shape`` (without the channel); ``stored_order``: (T, D, H, W) memory seen
    as (1, D, H, W, T), as the dataset hands over cached rsfMRI windows."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(batch):
        rec = sex_record(i, modality, "unused", "male" if i % 2 else "female")
        enc = encoder.encode(rec.turns, [tokens])
        if stored_order:
            image = torch.randn((shape[-1], *shape[:-1]), generator=gen).to(dtype)
            image = image.permute(1, 2, 3, 0)[None]
        else:
            image = torch.randn((1, *shape), generator=gen).to(dtype)
        ids = torch.tensor(enc.input_ids)
        out.append({"images": [(modality, image)], "input_ids": ids,
                    "attention_mask": torch.ones_like(ids), "labels": torch.tensor(enc.labels),
                    "id": rec.id})
    return out
