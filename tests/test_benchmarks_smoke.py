"""Every benchmark runs its smallest configuration and gives consistent results (no timing asserts).

The benchmarks live in ``benchmarks/`` at the repository root (not installed), so the root is put
on ``sys.path`` here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    allocator,
    collate_sampler,
    common,
    data_path,
    embedding_cache,
    gpu_step,
    loader_memory,
    patch_embed,
    run_all,
    train_step,
)


@pytest.fixture(scope="module")
def opts(tmp_path_factory):
    """Smoke options, run on one torch thread: torch was loaded before benchmarks.common could
    make OpenMP wait passively, and spinning threads crawl on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield common.Options("smoke", 1, tmp_path_factory.mktemp("bench-work"), quiet=True, threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def payloads():
    return []


def _json_line(capsys) -> dict:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_gpu_step_smoke_runs_every_variant(opts, capsys):
    import torch

    out = gpu_step.run(opts, batch=2)
    assert _json_line(capsys)["benchmark"] == "gpu_step"
    res = out["results"]["step"]
    precisions = ("fp32", "bf16") if torch.cuda.is_available() else ("fp32",)
    names = {f"{v} {p}" for v in ("T1", "rsfMRI", "dMRI", "T1 original budget") for p in precisions}
    assert set(res) - {"rsfMRI bf16, via float32"} == names
    assert res["T1 original budget fp32"]["x_vs_original_budget"] == pytest.approx(1.0)
    assert res["T1 fp32"]["tokens_per_image"] < res["T1 original budget fp32"]["tokens_per_image"]
    assert all(r["samples_per_s"] > 0 for r in res.values())


def test_data_path_reads_the_same_window_every_way(opts, payloads, capsys):
    out = data_path.run(opts)
    assert _json_line(capsys)["benchmark"] == "data_path"
    assert all(out["results"]["checks"].values()), out["results"]["checks"]
    fm = out["results"]["rsfMRI"]
    assert set(fm) >= {"cache (dataset)", "decode .nii.gz", "frame folder", "limit: numpy copy"}
    assert fm["decode .nii.gz"]["speedup_vs_decode"] == pytest.approx(1.0)
    assert fm["limit: numpy copy"]["times_the_limit"] == pytest.approx(1.0)
    assert all(v["per_s"] > 0 for k, v in fm.items() if not k.startswith("_"))
    payloads.append(out)


def test_loader_memory_reads_every_subject_through_two_workers(opts, payloads, capsys):
    out = loader_memory.run(opts, in_process=True)
    _json_line(capsys)
    res = out["results"]
    assert res["every_sample_read_by_workers"]
    small, large = (res["full epoch"]["runs"][str(n)][0] for n in (8, 24))
    assert (small["samples"], large["samples"]) == (8, 24)
    assert large["peak_total_rss_mb"] > 0 and large["peak_total_pss_mb"] > 0
    same_work = res["first 2 batches"]["runs"]["24"][0]
    assert same_work["samples"] == 8  # the small dataset's batches, read from the large one
    assert "rss_growth_below_50mb" in res["targets"]
    payloads.append(out)


def test_train_step_speeds_and_demo_accuracy(opts, payloads, capsys):
    out = train_step.run(opts, with_demo=True)
    _json_line(capsys)
    step = out["results"]["step"]
    assert {n: r["tokens_per_image"] for n, r in step.items()} == {
        "T1 (ours)": 8, "rsfMRI": 8, "rsfMRI, (T,D,H,W) memory": 8, "dMRI": 8,
        "T1 original budget": 64, "T1 pool 2": 1}
    assert step["T1 original budget"]["per_sample_speedup_vs_original"] == pytest.approx(1.0)
    demo = out["results"]["demo"]
    assert [demo[b]["tokens_per_image"] for b in ("ours", "original", "ours + pool 2")] == [8, 64, 1]
    assert all(0 <= r["accuracy_final"] <= 1 and r["steps"] == 2 for r in demo.values())
    payloads.append(out)


def test_collate_matches_reference_and_sampler_runs(opts, payloads, capsys):
    out = collate_sampler.run(opts)
    _json_line(capsys)
    res = out["results"]
    assert all(res["checks"].values()), res["checks"]
    assert res["loader_2_workers"]["brain_collator_s_per_batch"] > 0
    assert set(res["sampler"]) >= {"ModalityBatchSampler proportional",
                                   "torch BatchSampler(RandomSampler)"}
    payloads.append(out)


def test_patch_embed_compares_conv_with_linear_of_the_same_run(opts, capsys):
    out = patch_embed.run(opts, with_demo=True, in_process=True)
    _json_line(capsys)
    step = out["results"]["step"]
    assert set(step) == {"T1 linear", "T1 conv", "rsfMRI linear", "rsfMRI conv"}
    assert {r["tokens_per_image"] for r in step.values()} == {8}  # same token grid
    assert step["T1 linear"]["time_x_linear"] == pytest.approx(1.0)
    assert step["T1 conv"]["embedding_parameters"] > step["T1 linear"]["embedding_parameters"]
    assert set(out["results"]["conv_vs_linear"]) == {"T1", "rsfMRI"}
    demo = out["results"]["demo"]
    assert [demo[e]["embed"] for e in ("linear", "conv")] == ["linear", "conv"]
    assert all(r["steps"] == 2 and 0 <= r["accuracy_final"] <= 1 for r in demo.values())


def test_learning_trains_both_parts_and_reports_them_beside_reference_and_truth(tmp_path,
                                                                              capsys):
    """The learning benchmark end to end with its defaults on a 40-subject realistic cohort
    (T1 scans with their own CSF contrast): T1 in two stages (the tower alone, 1 epoch, then the
    VLM on it, frozen), rsfMRI in one; 4 VLM steps per part."""
    import torch
    from benchmarks import learning
    from safetensors.torch import load_file

    from umbrella.config import load_config

    out = learning.main(["--smoke", "--part", "T1,rsfMRI", "--workdir", str(tmp_path), "--quiet",
                         "--threads", "1"])
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"benchmark"')]
    assert len(printed) == 1 and json.loads(printed[0])["benchmark"] == "learning"
    assert out["config"]["pretrain_epochs"] == 1  # the smoke run caps the default 8
    res = out["results"]
    truth = json.loads((tmp_path / "realistic_40_4mm_csf0.1" / "cohort" / "truth.json").read_text())
    assert truth["planted"]["nuisance"]["T1_csf_contrast"]["spread"] == 0.1
    for part, tasks in (("T1", {"age", "sex"}), ("rsfMRI", {"sex"})):
        assert set(res[part]["tasks"]) == tasks
        run = res[part]["runs"][0]
        assert run["best"]["max_steps"] == 4 and run["train_s"] > 0
        for task, entry in res[part]["tasks"].items():
            assert entry["n_test"] > 0 and entry["seeds"] == 1
            assert entry["achievable"] == truth["tasks"][task][part]["achievable"]
            assert entry["reference"] is not None and entry["baseline"] is not None
            assert res["checks"][f"{part}.{task}"] == entry["met"]
    saved = {part: load_config(Path(res[part]["runs"][0]["run_dir"]) / "config.yaml")
             for part in ("T1", "rsfMRI")}
    # T1: the tower first, then the VLM on it, frozen, with the two-stage settings
    t1_run = res["T1"]["runs"][0]
    assert t1_run["pretrain_s"] > 0
    cfg = saved["T1"]
    assert (cfg.model.train_embeddings, cfg.model.train_vision) == ("frozen", "frozen")
    assert (cfg.model.patch_embed, cfg.model.stem_style, cfg.model.stem_channels,
            cfg.model.center_inputs) == ("conv", "pooled", [8, 16, 32, 64], False)
    ranges = cfg.dataset.T1.augment_ranges  # flips only
    assert (ranges.flip_prob, ranges.rotate_deg, ranges.translate_vox, ranges.scale) == \
        (0.5, 0, 0, 0)
    tower = load_file(str(Path(cfg.model.vision_init) / "vision_tower.safetensors"))
    model = load_file(str(Path(t1_run["run_dir"]) / "model" / "model.safetensors"))
    stem = "embeddings.T1.stem.0.conv.weight"
    assert torch.equal(model[f"model.vision_tower.{stem}"], tower[stem])
    for task in ("age", "sex"):  # the tower's own heads scored on the same test split
        alone = t1_run["tower_alone"][task]
        assert alone["ci"][0] <= alone["value"] <= alone["ci"][1]
        assert res["T1"]["tasks"][task]["tower_alone_per_seed"] == [alone["value"]]
    # rsfMRI: one stage, with the settings section 11 measured
    assert res["rsfMRI"]["runs"][0]["pretrain_s"] == 0
    assert "tower_alone" not in res["rsfMRI"]["runs"][0]
    fmri = saved["rsfMRI"].dataset.rsfMRI
    assert (fmri.image_size, fmri.patch_size, fmri.sequence_length) == \
        ([24, 32, 24], [4, 4, 4, 24], 24)
    assert (fmri.normalize, fmri.eval_windows, fmri.voxel_size) == ("zscore_voxel", "all",
                                                                    [8.0, 8.0, 8.0])
    assert saved["rsfMRI"].model.rsfmri_embed == "connectivity" and not saved["rsfMRI"].dataset.T1.records
    assert saved["rsfMRI"].model.vision_init is None and not saved["T1"].dataset.rsfMRI.records


def test_learning_in_one_stage_without_contrast(tmp_path):
    """--pretrain-epochs 0 --csf-contrast 0: the one-stage run of the earlier figures (linear
    patches, flips + rotations + translations), on the cohort without scanner contrast."""
    from benchmarks import learning

    from umbrella.config import load_config

    out = learning.main(["--smoke", "--part", "T1", "--workdir", str(tmp_path), "--quiet",
                         "--threads", "1", "--pretrain-epochs", "0", "--csf-contrast", "0"])
    run = out["results"]["T1"]["runs"][0]
    assert run["pretrain_s"] == 0 and "tower_alone" not in run
    assert set(out["results"]["T1"]["tasks"]) == {"age", "sex"}
    truth = json.loads((tmp_path / "realistic_40_4mm" / "cohort" / "truth.json").read_text())
    assert "T1_csf_contrast" not in truth["planted"]["nuisance"]
    cfg = load_config(Path(run["run_dir"]) / "config.yaml")
    assert cfg.model.patch_embed == "linear" and cfg.model.vision_init is None
    assert cfg.model.train_embeddings == "full" and cfg.dataset.T1.augment
    ranges = cfg.dataset.T1.augment_ranges  # the measured setting: flips, +-5 deg, +-2 voxels
    assert (ranges.flip_prob, ranges.rotate_deg, ranges.translate_vox, ranges.scale,
            ranges.intensity) == (0.5, 5, 2, 0, 0)


def test_cnn_probe_trains_the_stem_on_age_and_scores_the_test_split(tmp_path, capsys):
    """The stem-alone diagnostic on a 60-subject realistic cohort, 2 epochs of `umbrella
    pretrain` (age only, heads on the patch embeddings): the kept epoch's test MAE with its CI
    over the cohort's test split."""
    from benchmarks import cnn_probe

    from umbrella.config import load_config

    out = cnn_probe.main(["--smoke", "--workdir", str(tmp_path)])
    run = out["per_seed"][0]
    records = (tmp_path / "realistic_60_4mm_csf0.1" / "records" / "age_T1.jsonl").read_text()
    assert run["n_test"] == sum('"split": "test"' in r for r in records.splitlines()) > 0
    assert 1 <= run["epoch"] <= 2 and run["ci"][0] <= run["test"] <= run["ci"][1]
    assert out["mean"] == run["test"] and out["style"] == "pooled"
    info = json.loads((Path(run["folder"]) / "pretrain.json").read_text())
    assert [h["task"] for h in info["heads"]] == ["age"] and info["encoder_layers"] is False
    cfg = load_config(Path(run["folder"]) / "config.yaml")
    assert (cfg.model.patch_embed, cfg.model.stem_style, cfg.model.center_inputs) == \
        ("conv", "pooled", False)
    assert "cnn_probe seed 0: test age MAE" in capsys.readouterr().out


def test_allocator_compares_kept_with_returned_memory(opts, payloads, capsys):
    out = allocator.main(["--smoke", "--quiet", "--threads", "1"])
    payloads.append(_json_line(capsys))
    res = out["results"]
    assert set(res["medians"]) == {"returned", "kept"} and res["speedup_kept_vs_returned"] > 0
    from umbrella.runtime import retain_freed_memory

    assert [r["kept"] for r in res["runs"]["returned"]] == [False]
    assert res["kept_in_effect"] == retain_freed_memory()  # True wherever malloc is glibc's


def test_embedding_cache_serves_repeated_images_only(payloads, capsys):
    out = embedding_cache.main(["--smoke", "--quiet", "--threads", "1"])
    payloads.append(_json_line(capsys))
    res = out["results"]
    counts = res["cache_counts"]
    assert counts["no cache"] == {"hits": 0, "misses": 0, "entries": 0}
    assert counts["all misses"]["hits"] == 0 and counts["all misses"]["misses"] > 0
    # 1 warm-up + 1 timed step of 2 images drawn from 64 (with flips): each one hit or kept
    cached = counts["cached"]
    assert cached["hits"] + cached["misses"] == 2 * 2 and cached["entries"] == cached["misses"]
    assert all(r > 0 for r in res["ratio_vs_no_cache"].values())


def test_run_all_collects_every_target(payloads):
    targets, rows = run_all.summarize(payloads)
    assert {"data_path.rsfmri_cache_vs_decode_at_least_20x", "loader_memory.rss_growth_below_50mb",
            "train_step.default_budget_at_least_4x_faster_per_sample",
            "allocator.kept_at_least_1.1x_faster",
            "embedding_cache.cached_at_least_1.5x_faster"} <= set(targets)
    assert len(rows) == len(targets)
    assert all(isinstance(t["met"], bool) for t in targets.values())


def test_unseen_layout_scans_give_the_model_the_input_of_the_original(tiny_cohort, tmp_path):
    """A scan rewritten as the unseen site hands it over (reoriented to PIR, int16) is read back
    RAS+ and preprocessed into the same input as its original (up to the intensity rescaling);
    the same scan flipped along any axis matches less, so the comparison can tell orientations
    apart."""
    import numpy as np
    from benchmarks import unseen_layout

    from umbrella.data.volumes import VolumeSpec, preprocess_volume

    src = next(iter(sorted((tiny_cohort.root / "images").glob("*_T1w.nii.gz"))))
    dest = tmp_path / "sub-x" / "ses-01" / "anat" / "sub-x_ses-01_T1w.nii.gz"
    unseen_layout.rewrite_scan((src, dest))
    import nibabel as nib

    img = nib.load(dest)
    assert nib.aff2axcodes(img.affine) == tuple(unseen_layout.ORIENTATION)
    assert img.get_data_dtype() == np.int16
    canon = [np.asarray(nib.as_closest_canonical(nib.load(f)).dataobj, dtype=np.float32)
             for f in (src, dest)]  # exact reorientation: the same voxels, rescaled
    assert canon[0].shape == canon[1].shape
    assert np.corrcoef(canon[0].ravel(), canon[1].ravel())[0, 1] > 0.99
    spec = VolumeSpec(image_size=(32, 40, 32), voxel_size=(6.0, 6.0, 6.0))  # resampled
    a, b = preprocess_volume(src, spec), preprocess_volume(dest, spec)
    same = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    flips = [np.corrcoef(a.ravel(), np.flip(b, axis).ravel())[0, 1] for axis in range(3)]
    # left-right flips of a near-symmetric brain stay close; front-back and up-down do not
    assert same > 0.95 and max(flips) < same and max(flips[1:]) < same - 0.1, (same, flips)


def test_unseen_layout_runs_the_public_cli_on_the_rewritten_cohort(tmp_path):
    """The unseen-layout benchmark end to end on a 40-subject cohort: BIDS tree, prepare's
    train.yaml (the T1 recipe, its first stage run by `umbrella train`), evaluate with truth."""
    from benchmarks import unseen_layout

    from umbrella.config import load_config

    out = unseen_layout.main(["--smoke", "--workdir", str(tmp_path), "--quiet", "--threads", "1"])
    res = out["results"]
    assert out["config"]["recipe"] == "t1_two_stage"
    root = tmp_path / "unseen_40_3mm_csf0.1"
    assert len(list((root / "bids").glob("sub-*/ses-01/anat/*_T1w.nii.gz"))) == 40
    run = res["T1"]["runs"][0]
    cfg = load_config(Path(run["run_dir"]) / "config.yaml")
    assert cfg.model.vision_init == "pretrain" and cfg.dataset.T1.studies == ["UNSEEN"]
    assert list((root / "records" / "runs").glob("pretrain__*/seed_0/pretrain.json"))
    for task in ("age", "sex"):
        entry = res["T1"]["tasks"][task]
        assert entry["n_test"] > 0 and entry["reference"] is not None
        assert entry["achievable"] is not None and res["checks"][f"T1.{task}"] == entry["met"]
