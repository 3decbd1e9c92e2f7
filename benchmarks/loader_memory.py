"""loader_memory: peak memory of a training DataLoader (2 workers) over 100 vs 1,000 subjects.

Every subject's T1 (96³) is a cache entry (float16 .npy) behind a small source file, so the loader
reads real bytes without decoding. Each measurement runs in a fresh child process (so one
measurement's heap cannot inflate the next) that builds the dataset, the modality batch
sampler, the collator and a DataLoader with 2 workers, and reads one epoch (and, separately, only
as many batches as the small dataset has: the same work over a larger index). The sizes alternate
(100, 1000, 100, ...) and the figures are medians over repetitions.

Reported per size: resident memory after imports, after the index (records + encoded prompts) is
built, and the peak during the epoch as (a) the sum of RSS over the main process and its
workers, sampled every 5 ms (shared pages counted once per process that maps them), (b) the same
for PSS (shared pages split between processes, which is what the machine actually spends), and (c)
the kernel's exact peak RSS of the main process and of the largest worker (getrusage). The
target is on the growth of (a) from 100 to 1,000 subjects.

Usage: python -m benchmarks.loader_memory [--quick | --smoke] [--reps N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

MB = 2**20


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    side: int
    batch: int
    workers: int


SIZES = {"full": Sizes(100, 1000, 96, 8, 2), "quick": Sizes(100, 1000, 96, 8, 2),
         "smoke": Sizes(8, 24, 16, 4, 2)}


def make_entries(root: Path, n: int, side: int) -> None:
    """``n`` subjects: a small source file each and its cache entry (a distinct float16 volume)."""
    import numpy as np

    from umbrella.data.cache import PreprocessCache, cache_key

    cache = PreprocessCache(root / "cache")
    params = _input(side).cache_params()
    (root / "src").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((side,) * 3, dtype=np.float32).astype(np.float16)
    for i in range(n):
        src = root / "src" / f"sub-{i:05d}_T1w.nii.gz"
        src.write_bytes(i.to_bytes(4, "little"))
        key = cache_key(src, "T1", params)
        path = cache.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, base + np.float16(i % 7))  # distinct files, one page cache entry each
        cache._write_sidecar(key, base.shape, {"source": str(src), "kind": "T1", "params": params})


def _input(side: int):
    from umbrella.data.inputs import ModalityInput
    from umbrella.data.volumes import VolumeSpec

    return ModalityInput("T1", VolumeSpec(image_size=(side,) * 3), 216)


# ------------------------------------------------------------------------------------ child

class PeakSampler(threading.Thread):
    """Samples RSS (every 5 ms) and PSS (every 50 ms) summed over this process and its children."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak_rss = self.peak_pss = 0
        self.peak_workers = 0
        self._halt = threading.Event()

    def _procs(self):
        return [self.me, *self.me.children(recursive=True)]

    def run(self) -> None:
        import psutil

        tick = 0
        while not self._halt.is_set():
            try:
                procs = self._procs()
                self.peak_workers = max(self.peak_workers, len(procs) - 1)
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
                if tick % 10 == 0:
                    self.peak_pss = max(self.peak_pss,
                                        sum(p.memory_full_info().pss for p in procs))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # a worker exited between listing and reading
            tick += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child(root: Path, n: int, side: int, batch: int, workers: int, max_batches: int = 0) -> dict:
    """One measurement: build the training data path over ``n`` subjects and read one epoch
    (or its first ``max_batches`` batches)."""
    import resource

    import psutil
    import torch
    from torch.utils.data import DataLoader

    from umbrella.data.cache import PreprocessCache
    from umbrella.data.collate import BrainCollator
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.sampling import ModalityBatchSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only receives batches
    me = psutil.Process()
    rss_start = me.memory_info().rss
    sampler_thread = PeakSampler()
    sampler_thread.start()
    enc = common.prompt_encoder()
    records = [common.sex_record(i, "T1", root / "src" / f"sub-{i:05d}_T1w.nii.gz")
               for i in range(n)]
    data = InstructionDataset(records, enc, {"T1": _input(side)},
                              cache=PreprocessCache(root / "cache"))
    rss_index = me.memory_info().rss
    sampler = ModalityBatchSampler(data.item_groups(), batch, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                        collate_fn=BrainCollator(enc.tok.pad_token_id, pad_to_multiple_of=8))
    start, seen, checksum = time.perf_counter(), 0, 0.0
    for k, out in enumerate(loader):
        seen += len(out["ids"])
        checksum += float(out["pixel_values"]["T1"][:, 0, 0, 0, 0].sum())
        if k + 1 == max_batches:
            break
    seconds = time.perf_counter() - start
    del loader, out
    sampler_thread.stop()
    torch.set_num_threads(threads)
    return {"n": n, "max_batches": max_batches, "samples": seen, "seconds": seconds, "rss_start_mb": rss_start / MB,
            "rss_after_index_mb": rss_index / MB, "index_mb": (rss_index - rss_start) / MB,
            "peak_total_rss_mb": sampler_thread.peak_rss / MB,
            "peak_total_pss_mb": sampler_thread.peak_pss / MB,
            "workers_seen": sampler_thread.peak_workers,
            "maxrss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "maxrss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "checksum": checksum}


# ------------------------------------------------------------------------------------ parent

def _measure(root: Path, n: int, s: Sizes, max_batches: int, in_process: bool = False) -> dict:
    if in_process:  # tests: correctness only (the memory figures then include the caller's heap)
        return child(root, n, s.side, s.batch, s.workers, max_batches)
    cmd = [sys.executable, "-m", "benchmarks.loader_memory", "--child", str(root), str(n),
           str(s.side), str(s.batch), str(s.workers), str(max_batches)]
    done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loader_memory child (n={n}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


KEYS = ("peak_total_rss_mb", "peak_total_pss_mb", "maxrss_main_mb", "maxrss_worker_mb",
        "rss_after_index_mb", "index_mb", "seconds")
LABELS = (("peak RSS, main + workers", "peak_total_rss_mb"),
          ("peak PSS, main + workers", "peak_total_pss_mb"),
          ("peak RSS main (kernel)", "maxrss_main_mb"),
          ("peak RSS largest worker (kernel)", "maxrss_worker_mb"),
          ("RSS after the index is built", "rss_after_index_mb"),
          ("tokenizer + index (records, prompts)", "index_mb"))


def _compare(runs: dict[int, list[dict]], small: int, large: int) -> dict:
    med = {n: {k: common.median([r[k] for r in rs]) for k in KEYS} for n, rs in runs.items()}
    return {"median": {str(n): v for n, v in med.items()},
            "growth_mb": {k: med[large][k] - med[small][k] for k in KEYS[:-1]},
            # None where the small run's figure is 0: the sampler thread never caught a reading
            # (a short smoke epoch on a loaded machine), or no worker had ended yet
            "ratio_large_over_small": {k: med[large][k] / med[small][k] if med[small][k] > 0
                                       else None for k in KEYS[:4]},
            "runs": {str(n): rs for n, rs in runs.items()}}


def run(opts: common.Options, in_process: bool = False) -> dict:
    common.setup(opts.threads)
    s = SIZES[opts.mode]
    same_work = -(-s.small // s.batch)
    modes = {"full epoch": 0, f"first {same_work} batches": same_work}
    runs = {m: {s.small: [], s.large: []} for m in modes}
    with tempfile.TemporaryDirectory(prefix="umbrella-bench-loader-") as tmp:
        make_entries(Path(tmp), s.large, s.side)
        for rep in range(opts.reps):
            order = (s.small, s.large) if rep % 2 == 0 else (s.large, s.small)
            for mode, max_batches in modes.items():
                for n in order:
                    runs[mode][n].append(_measure(Path(tmp), n, s, max_batches, in_process))
    results = {m: _compare(r, s.small, s.large) for m, r in runs.items()}
    epoch = results["full epoch"]
    growth = epoch["growth_mb"]["peak_total_rss_mb"]
    results["every_sample_read_by_workers"] = all(
        r["samples"] == r["n"] and r["workers_seen"] >= s.workers
        for rs in runs["full epoch"].values() for r in rs)
    results["targets"] = {"rss_growth_below_50mb": {"value": growth, "met": growth < 50}}
    rows = []
    for mode in modes:
        med, g = results[mode]["median"], results[mode]["growth_mb"]
        for label, k in LABELS:
            rows.append([mode, label, med[str(s.small)][k], med[str(s.large)][k], g[k],
                         med[str(s.large)][k] / med[str(s.small)][k]])
    notes = [f"{s.workers} workers, batch {s.batch}, T1 {s.side}³ float16 entries; "
             f"reps={opts.reps} (fresh process each), median",
             f"every sample read through the workers: {results['every_sample_read_by_workers']}",
             f"target rss_growth_below_50mb (full epoch, peak RSS main + workers): {growth:.1f} MB"
             f" -> {'met' if growth < 50 else 'NOT met'}"]
    return common.emit("loader_memory", {"mode": opts.mode, "reps": opts.reps, **vars(s)}, results,
                       ["read", "MB", f"{s.small} subjects", f"{s.large} subjects", "growth",
                        "ratio"], rows, notes, opts.quiet)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        root, n, side, batch, workers, max_batches = argv[1:7]
        common.setup(threads=1)
        print(json.dumps(child(Path(root), int(n), int(side), int(batch), int(workers),
                               int(max_batches))))
        return None
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    return run(common.options(args))


if __name__ == "__main__":
    main()
