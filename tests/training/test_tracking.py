"""Trackers: what `tracking.report_to` writes, with the per-modality losses and per-part
gradient norms beside the loss. Each runs offline into the run folder; skipped with the reason
where its package is missing (`make test` installs all three)."""

import importlib.util

import pytest

from umbrella.training.run import train

PER_PART = ("loss/T1", "grad_norm/embed_T1", "grad_norm/vision_encoder", "grad_norm/projector",
            "grad_norm/llm")


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install '.[{package}]')")


def _run(tiny_config, tracker: str):
    cfg = tiny_config("training.max_steps=2", "training.logging_steps=1",
                      f"tracking.report_to={tracker}", f"training.run_name={tracker}")
    return train(cfg, progress=False).run_dir


@_needs("tensorboard")
def test_tensorboard_gets_the_per_modality_metrics(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tiny_config, "tensorboard")
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {run_dir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", *PER_PART)} <= tags, tags
    assert len(acc.Scalars("train/loss/T1")) == 2


@_needs("wandb")
def test_wandb_offline_needs_no_account_and_each_run_gets_its_own(tiny_config, monkeypatch):
    """Two runs in one process (a notebook, a sweep): each has its own wandb run in its own
    folder (transformers leaves a wandb run open, and WANDB_DIR once set would stick)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    logs = []
    for name in ("wandb", "wandb-again"):
        cfg = tiny_config("training.max_steps=2", "training.logging_steps=1",
                          "tracking.report_to=wandb", f"training.run_name={name}")
        run_dir = train(cfg, progress=False).run_dir
        assert wandb.run is None  # finished: flushed, and not reused by the next run
        runs = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list((run_dir / "wandb").iterdir())
        logs.append((runs[0] / f"run-{runs[0].name.rsplit('-', 1)[1]}.wandb").read_bytes())
    for log in logs:  # the run's record log holds every per-part key
        assert [k for k in PER_PART if f"train/{k}".encode() not in log] == []


@_needs("mlflow")
def test_mlflow_logs_into_the_run_folder(tiny_config, monkeypatch):
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    run_dir = _run(tiny_config, "mlflow")
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("umbrella")
    (run,) = client.search_runs([experiment.experiment_id])
    assert set(PER_PART) <= set(run.data.metrics), sorted(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss/T1")) == 2
