"""A finished distributed worker ends through finish_worker: barrier, process group destroyed,
atexit work done, output flushed, exit code kept; plain processes are left alone."""

import subprocess
import sys
import textwrap
from pathlib import Path

from umbrella.training.launch import distributed_worker, finish_worker

SRC = Path(__file__).resolve().parents[2] / "src"


def test_plain_process_is_not_a_worker_and_returns():
    assert not distributed_worker()
    assert finish_worker(0) is None  # returns: nothing to end


def _worker(tmp_path: Path, code: int) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import atexit, sys
        sys.path.insert(0, {str(SRC)!r})
        import torch.distributed as dist
        from umbrella.training.launch import distributed_worker, finish_worker
        atexit.register(lambda: open({str(tmp_path / 'atexit.txt')!r}, 'w').write('ran'))
        dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0,
                                world_size=1)
        print('worker:', distributed_worker(), end='')  # no newline: must still be flushed
        finish_worker({code})
        print('not reached')
        sys.exit(99)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def test_worker_ends_with_its_code_after_atexit_work(tmp_path):
    run = _worker(tmp_path, 0)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == "worker: True"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_worker_exit_code_is_passed_through(tmp_path):
    run = _worker(tmp_path, 3)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "not reached" not in run.stdout
