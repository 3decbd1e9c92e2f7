"""serve_load: N concurrent asks against a local `umbrella serve` beside the same asks in-process.

    python -m benchmarks.serve_load --model RUN --data-root T1=COHORT [--n 50] [--port 8765]

Each ask names one scan under the data root (``--images``, default ``images/*_T1w.nii.gz``, the
first N sorted) with the model's first trained question. In-process: one BrainAssistant answers
them one after another (``answer()``: generation + option probabilities, what the server runs),
before and after the server phase, so the two in-process runs show the noise. Server: a
`umbrella serve` process on 127.0.0.1 gets all N at once (httpx, one connection each); the model
lock answers them in turn, so a request's latency includes its wait in the queue.

An answer is correct when the server returned 200 and the same text and option probabilities
(to 1e-6) as the in-process answer for that scan. Peak RSS: ``ru_maxrss`` of this process after
the first in-process run (python + torch + model), and the server's ``VmHWM`` after the load.
Prints one JSON line and a table; ratios are server / in-process (first run).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def percentiles(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max()), "total": float(v.sum())}


def in_process(assistant, question: str, scans: list[Path]) -> tuple[list, list[float], float]:
    answers, latencies = [], []
    start = time.perf_counter()
    for scan in scans:
        t = time.perf_counter()
        answers.append(assistant.answer(question, [("T1", scan)]))
        latencies.append(time.perf_counter() - t)
    return answers, latencies, time.perf_counter() - start


def start_server(model: str, root: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "umbrella.cli", "serve", "--model", model,
           "--data-root", f"T1={root}", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer within 2 minutes")


async def concurrent_asks(port: int, question: str, paths: list[str]) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(paths), max_keepalive_connections=len(paths))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                 timeout=1800) as client:
        async def one(path):
            t = time.perf_counter()
            r = await client.post("/api/ask", json={"question": question,
                                                    "images": [{"modality": "T1", "path": path}]})
            return r.status_code, r.json(), time.perf_counter() - t

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in paths))
        return results, time.perf_counter() - start


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agrees(status: int, body: dict, expected) -> bool:
    if status != 200 or body.get("answer") != expected.text:
        return False
    got = {o["option"]: o["prob"] for o in body.get("options") or []}
    want = expected.probs or {}
    return set(got) == set(want) and all(abs(got[k] - want[k]) < 1e-6 for k in want)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder (e.g. a demo run)")
    p.add_argument("--data-root", required=True, metavar="T1=DIR")
    p.add_argument("--images", default="images/*_T1w.nii.gz", help="glob under the data root")
    p.add_argument("--n", type=int, default=50, help="asks (default 50)")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    common.setup(args.threads)
    from umbrella.inference import BrainAssistant

    modality, _, root = args.data_root.partition("=")
    if modality != "T1" or not root:
        raise SystemExit("--data-root must be T1=DIR")
    root = Path(root).resolve()
    scans = sorted(root.glob(args.images))[:args.n]
    if len(scans) < args.n:
        raise SystemExit(f"only {len(scans)} scans match {args.images} under {root}")
    paths = [str(s.relative_to(root)) for s in scans]

    assistant = BrainAssistant(args.model)
    question = next(iter(assistant.tasks.values()))["questions"][0] if assistant.tasks \
        else "What is the sex of this subject?"
    assistant.answer(question, [("T1", scans[0])])  # warm-up, not counted
    assistant.forget(scans[0])
    expected, lat_in, wall_in = in_process(assistant, question, scans)
    rss_in = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    server = start_server(args.model, root, args.port)
    try:
        import httpx

        httpx.post(f"http://127.0.0.1:{args.port}/api/ask",  # warm-up on the same scan
                   json={"question": question, "images": [{"modality": "T1", "path": paths[0]}]},
                   timeout=600)
        results, wall_srv = asyncio.run(concurrent_asks(args.port, question, paths))
        rss_srv = vm_hwm_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for scan in scans:
        assistant.forget(scan)
    _, lat_in2, wall_in2 = in_process(assistant, question, scans)

    correct = sum(agrees(s, b, e) for (s, b, _), e in zip(results, expected, strict=True))
    lat_srv = [t for _, _, t in results]
    pin, pin2, psrv = percentiles(lat_in), percentiles(lat_in2), percentiles(lat_srv)
    results_json = {
        "n": args.n, "correct": correct, "question": question,
        "in_process": {**pin, "wall_s": wall_in, "peak_rss_mib": rss_in},
        "in_process_after": {**pin2, "wall_s": wall_in2},
        "server": {**psrv, "wall_s": wall_srv, "peak_rss_mib": rss_srv},
        "ratios": {"wall": wall_srv / wall_in, "p50": psrv["p50"] / pin["p50"],
                   "peak_rss": rss_srv / rss_in}}
    rows = [["in-process, sequential", f"{args.n}/{args.n}", pin["p50"], pin["p95"], wall_in,
             args.n / wall_in, rss_in],
            ["in-process again", "", pin2["p50"], pin2["p95"], wall_in2, args.n / wall_in2, ""],
            [f"server, {args.n} concurrent", f"{correct}/{args.n}", psrv["p50"], psrv["p95"],
             wall_srv, args.n / wall_srv, rss_srv]]
    common.emit("serve_load", {"model": args.model, "data_root": str(root), "n": args.n,
                               "port": args.port, "pid": os.getpid()}, results_json,
                ["variant", "correct", "p50 s", "p95 s", "wall s", "asks/s", "peak RSS MiB"],
                rows, [f"server / in-process: wall x{results_json['ratios']['wall']:.2f}, "
                       f"peak RSS x{results_json['ratios']['peak_rss']:.2f}",
                       "server latency includes the wait behind the model lock"],
                quiet=args.quiet)
    if correct != args.n:
        raise SystemExit(f"{args.n - correct} of {args.n} server answers differ from in-process")


if __name__ == "__main__":
    main()
