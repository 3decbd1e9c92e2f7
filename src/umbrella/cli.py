"""The `umbrella` command: a thin shell that parses arguments and calls the library.

    umbrella demo [--out DIR] [--seed N] [--cohort basic|realistic] [--build-only] [KEY=VALUE ...]
    umbrella train -c CONFIG [KEY=VALUE ...]
    umbrella evaluate --model RUN_DIR [-c CONFIG] [--split test] [KEY=VALUE ...]
    umbrella ask --model RUN_DIR --image T1=scan.nii.gz "What is the sex of this subject?"
    umbrella serve --model RUN_DIR [--eval DIR] [--data-root T1=DIR] [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from umbrella.errors import UmbrellaError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umbrella", description="Vision-language models on brain MRI.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="build the embedded demo cohort, train, evaluate and ask")
    d.add_argument("--out", default="umbrella-demo", help="output folder (default: umbrella-demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--subjects", type=int, help="cohort size (default: 200; realistic 400)")
    d.add_argument("--quick", action="store_true",
                   help="60 subjects, 48³ volumes (realistic: 56x64x56 at 4 mm): a smoke run")
    d.add_argument("--cohort", choices=["basic", "realistic"], default="basic",
                   help="basic (default): a quick pipeline check on sex; realistic: overlapping "
                        "effects with known limits (truth.json), sex and age trained together")
    d.add_argument("--build-only", action="store_true",
                   help="stop after the cohort, the records and demo.yaml (train them later "
                        "with `umbrella train -c OUT/demo.yaml`)")
    d.add_argument("--modalities", default="T1",
                   help="comma list of T1, rsfMRI, dMRI (default T1); one model learns them all")
    d.add_argument("--csf-contrast", type=float, default=0.0, metavar="C",
                   help="realistic cohort only: every T1 scan's CSF level is the template's "
                        "times U[1-C, 1+C], as contrast differs between scanners (default 0: off)")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    p_ = sub.add_parser("prepare", help="phenotype table + images -> instruction records")
    p_.add_argument("--config", help="YAML with the same keys as these flags (flags win)")
    p_.add_argument("--phenotype", action="append", default=[],
                    help="CSV or TSV, one row per subject (or subject x session); repeat to "
                         "join several tables on subject (and session)")
    p_.add_argument("--out", help="folder for the records, splits and summary")
    p_.add_argument("--tasks", help="comma list: sex, age, bmi, diagnosis, compare_sex, "
                    "compare_age, session_order, session_gap, or a column")
    p_.add_argument("--study", help="ABCD, UKB, HCP, HBN, ABIDE or your own name")
    p_.add_argument("--image", action="append", default=[], metavar="MODALITY=PATTERN",
                    help="path pattern with {subject} (and optionally {session}), e.g. "
                         "T1=derivatives/{subject}/T1w.nii.gz")
    p_.add_argument("--image-root",
                    help="folder that relative --image patterns start from (default: the "
                         "phenotype table's folder)")
    p_.add_argument("--bids", help="a BIDS dataset: sub-*/[ses-*/]anat/*_T1w, func/*_bold, dwi/*_dwi")
    p_.add_argument("--subject-column", help="default: the study's (e.g. src_subject_id for ABCD)")
    p_.add_argument("--session-column", help="column naming each row's visit (default: the "
                    "study's, e.g. eventname for ABCD, or session_id)")
    p_.add_argument("--sex-column", help="column holding sex (default: the study's)")
    p_.add_argument("--sex-coding", metavar="CODE=LABEL,...",
                    help="raw codes of sex, e.g. 1=male,2=female (default: the study's)")
    p_.add_argument("--age-column", help="column holding age (default: the study's)")
    p_.add_argument("--age-unit", choices=["years", "months"], help="override the study's unit")
    p_.add_argument("--ratios", help="train,val,test (default 0.7,0.15,0.15)")
    p_.add_argument("--seed", type=int)
    p_.add_argument("--column", action="append", default=[], metavar="TASK=COLUMN",
                    help="phenotype column of a task, e.g. diagnosis=DX_GROUP")
    p_.add_argument("--set", action="append", default=[], metavar="studies.NAME.FIELD=VALUE",
                    help="override a study registry field, e.g. studies.ABCD.sex_other=[3,4]")

    v = sub.add_parser("validate", help="check every record and referenced file before training")
    v.add_argument("-c", "--config", help="YAML config: its records files and data roots")
    v.add_argument("--records", nargs="+", default=[], help="records files (instead of -c)")
    v.add_argument("--data-root", action="append", default=[], metavar="MODALITY=PATH",
                   help="data root for --records, e.g. T1=/data/abcd (repeatable)")
    v.add_argument("--workers", type=int, default=2)
    v.add_argument("--json", help="also write the report as JSON to this file")
    v.add_argument("--quiet", action="store_true")
    v.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    c = sub.add_parser("cache", help="preprocess every referenced image once into the cache")
    c.add_argument("-c", "--config", required=True, help="YAML config naming dataset.cache_dir")
    c.add_argument("--workers", type=int, default=2, help="parallel processes (default: 2)")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (= training.resume=auto)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.max_steps=20")

    pt = sub.add_parser("pretrain", help="train the vision tower alone on the training split's "
                                         "answers (a first stage; load it with model.vision_init)")
    pt.add_argument("-c", "--config", required=True, help="YAML config (the pretrain section and "
                                                          "the dataset / model the VLM will use)")
    pt.add_argument("--quiet", action="store_true", help="no progress bars")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. pretrain.epochs=4")

    e = sub.add_parser("evaluate", help="metrics of a trained model on one split")
    e.add_argument("--model", required=True, help="run folder printed by `umbrella train`")
    e.add_argument("-c", "--config", help="config naming the records (default: the run's)")
    e.add_argument("--split", help="split to evaluate (default: evaluation.split)")
    e.add_argument("--out", help="output folder (default: <run>/evaluation_<split>)")
    e.add_argument("--constrained", action="store_true",
                   help="regression: decode only digits, '.' and the unit")
    e.add_argument("--regression", choices=("expected", "median", "generate"),
                   help="regression answers: the expected value or median of the model's "
                        "distribution over candidate numbers, or greedy generation "
                        "(default: evaluation.regression)")
    e.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% CIs")
    e.add_argument("--no-reference", action="store_true",
                   help="skip the classical reference (= evaluation.reference=false)")
    e.add_argument("--truth", metavar="FILE",
                   help="a cohort's truth file (JSON): show achievable figures (= evaluation.truth)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    a = sub.add_parser("ask", help="ask a trained model about one subject's scans")
    a.add_argument("--model", required=True, help="run folder or its model/ folder")
    a.add_argument("--image", action="append", required=True, metavar="MODALITY=PATH",
                   help="a scan, e.g. T1=sub-01_T1w.nii.gz (repeat for several)")
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--regression", choices=("expected", "median", "generate"), default="expected",
                   help="a built-in regression question (e.g. age): the expected value or median "
                        "of the model's distribution over candidate numbers, or greedy generation")
    a.add_argument("--show", metavar="PNG", help="also write orthogonal slices + answer to PNG")
    a.add_argument("--interactive", action="store_true",
                   help="keep the model loaded and ask several questions (empty line ends)")
    a.add_argument("question", nargs="?", help="the question (not needed with --interactive)")

    s = sub.add_parser("serve", help="the model over HTTP, with a viewer and chat page")
    s.add_argument("--model", required=True, help="run folder or its model/ folder")
    s.add_argument("--eval", help="an `umbrella evaluate` folder to browse (e.g. <run>/evaluation)")
    s.add_argument("--data-root", action="append", default=[], metavar="MODALITY=DIR",
                   help="folder whose files clients may name (repeatable)")
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--token", default=None,
                   help="required on every request (default: $UMBRELLA_TOKEN); needed off localhost")
    s.add_argument("--max-upload-mb", type=float, default=512.0)
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    return p


def _cmd_demo(args) -> int:
    from umbrella.demo.run import run_demo

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    realistic = args.cohort == "realistic"
    if args.quick:
        n, size, patch = 60, ((56, 64, 56) if realistic else 48), 8
    else:
        n, size, patch = args.subjects, (None if realistic else 96), 16
    kwargs = {"cohort": args.cohort, "seed": args.seed, "n_subjects": n, "image_size": size,
              "patch": patch, "overrides": args.overrides, "modalities": modalities,
              "csf_contrast": args.csf_contrast}
    if args.build_only:
        from umbrella.demo.run import prepare_demo

        plan = prepare_demo(args.out, **kwargs)
        for m, files in plan.records.items():
            print(f"{m} records: {', '.join(str(f) for f in files)}")
        print(f"cohort: {plan.cohort.root}\nconfig: {plan.config_path}\n"
              f"train with: umbrella train -c {plan.config_path} [training.seed=N ...]")
        return 0
    result = run_demo(args.out, **kwargs)
    for modality, m in result.per_modality.items():
        print(f"held-out {modality} sex accuracy: {m['n_correct']}/{m['n']} = {m['accuracy']:.3f}")
    return 0


def _cmd_train(args) -> int:
    from umbrella.config import load_config
    from umbrella.training.run import best_summary, train

    overrides = list(args.overrides) + (["training.resume=auto"] if args.resume else [])
    result = train(load_config(args.config, overrides), progress=not args.quiet)
    print(f"trained in {result.seconds:.0f} s; run folder: {result.run_dir}\nmodel: {result.model_dir}")
    if line := best_summary(result.best):
        print(line)
    return 0


def _cmd_pretrain(args) -> int:
    from umbrella.config import load_config
    from umbrella.training.pretrain import pretrain

    out = pretrain(load_config(args.config, args.overrides), progress=not args.quiet)
    print(f"pretrained vision tower: {out}\nuse it with: umbrella train -c {args.config} "
          f"model.vision_init={out}")
    return 0


def _cmd_validate(args) -> int:
    from umbrella.config import load_config
    from umbrella.data.validate import validate_config, validate_records_files
    from umbrella.io import atomic_write_json

    if bool(args.config) == bool(args.records):
        raise UmbrellaError("give either -c CONFIG or --records FILE [FILE ...]")
    if args.config:
        report = validate_config(load_config(args.config, args.overrides), workers=args.workers,
                                 progress=not args.quiet)
    else:
        roots = dict(_pair(item, "--data-root", "T1=/data/abcd") for item in args.data_root)
        report = validate_records_files([Path(r) for r in args.records],
                                        {m: Path(p) for m, p in roots.items()},
                                        workers=args.workers, progress=not args.quiet)
    print(report.summary_table())
    if report.geometry:
        print(report.geometry_table())
    for line in report.lines() + report.warning_lines():
        print(line)
    if args.json:
        atomic_write_json(args.json, report.to_dict())
    print("no problems found" if report.ok else f"{len(report.problems)} problems found")
    return 0 if report.ok else 1


def _pair(item: str, flag: str, example: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise UmbrellaError(f"{flag} {item!r} must be KEY=VALUE, e.g. {example}")
    return key, value


def _cmd_cache(args) -> int:
    from umbrella.config import load_config
    from umbrella.data.cache import PreprocessCache, build_cache, cache_size_bytes
    from umbrella.data.catalog import cache_jobs

    cfg = load_config(args.config, args.overrides)
    if not cfg.dataset.cache_dir:
        raise UmbrellaError("dataset.cache_dir is not set; add it to the config or pass "
                            "dataset.cache_dir=PATH")
    report = build_cache(PreprocessCache(cfg.dataset.cache_dir), cache_jobs(cfg),
                         workers=args.workers, progress=not args.quiet)
    size = cache_size_bytes(cfg.dataset.cache_dir) / 2**20
    print(f"cache {cfg.dataset.cache_dir}: {report.built} built, {report.reused} reused, "
          f"{len(report.failed)} failed in {report.seconds:.1f} s ({size:.0f} MiB)")
    for path, message in report.failed:
        print(f"  failed: {path}: {message}", file=sys.stderr)
    return 1 if report.failed else 0


def _cmd_evaluate(args) -> int:
    from umbrella.config import load_config
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table
    from umbrella.inference import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    run_dir = model_dir.parent
    cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
    split = args.split or cfg.evaluation.split
    splits = by_split(load_config_records(cfg))
    records = splits.get(split)
    if not records:
        raise UmbrellaError(f"no records in split {split!r}; pick another with --split")
    out = Path(args.out) if args.out else run_dir / f"evaluation_{split}"
    result = evaluate_records(model_dir, records, out, split=split, scoring=cfg.evaluation.scoring,
                              batch_size=cfg.evaluation.batch_size,
                              max_new_tokens=cfg.evaluation.max_new_tokens, run_dir=run_dir,
                              progress=not args.quiet, baseline_records=splits.get("train"),
                              constrained=args.constrained, bootstrap=args.bootstrap,
                              windows=cfg.dataset.rsfMRI.eval_windows,
                              regression=args.regression or cfg.evaluation.regression,
                              regression_step=cfg.evaluation.regression_step,
                              with_reference=cfg.evaluation.reference and not args.no_reference,
                              truth=args.truth or cfg.evaluation.truth,
                              memoize=cfg.dataset.memoize, cache_dir=cfg.dataset.cache_dir)
    print(metrics_table(result.metrics))
    print(f"written: {out / 'metrics.json'}, {out / 'report.md'}, {out / 'predictions.jsonl'}")
    return 0


def _cmd_ask(args) -> int:
    from umbrella.inference import BrainAssistant, interactive

    images = [_pair(item, "--image", "T1=scan.nii.gz (MODALITY=PATH)") for item in args.image]
    if not args.interactive and not args.question:
        raise UmbrellaError("give a question, or --interactive")
    assistant = BrainAssistant(args.model, regression=args.regression)
    notice = None if args.interactive else assistant.notice(args.question)[1]
    if notice:  # a question the model was not trained for, or tasks unknown
        print(f"notice: {notice}", file=sys.stderr)
    if args.interactive:
        interactive(assistant, images, max_new_tokens=args.max_new_tokens,
                    show_dir=Path(args.show).parent if args.show else None)
        return 0
    answer = assistant.ask(args.question, images, args.max_new_tokens)
    print(answer)
    if args.show:
        print(f"slices: {assistant.show(args.question, images, answer, args.show)}")
    return 0


def _cmd_serve(args) -> int:
    import uvicorn

    from umbrella.serve.app import check_bind, create_app

    token = args.token or os.environ.get("UMBRELLA_TOKEN") or None
    check_bind(args.host, token)
    roots = dict(_pair(item, "--data-root", "T1=/data/t1") for item in args.data_root)
    app = create_app(args.model, eval_dir=args.eval, data_roots=roots, token=token,
                     max_upload_mb=args.max_upload_mb, device=args.device)
    print(f"serving {app.state.umbrella.assistant.model_dir} on http://{args.host}:{args.port}/"
          + ("?token=..." if token else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_prepare(args) -> int:
    from umbrella.tasks import options as opt
    from umbrella.tasks.prepare import prepare

    flags = {
        "phenotype": args.phenotype or None, "out": args.out, "tasks": args.tasks, "study": args.study,
        "image": dict(_pair(i, "--image", "T1=derivatives/{subject}/T1w.nii.gz")
                      for i in args.image),
        "image_root": args.image_root, "bids": args.bids, "subject_column": args.subject_column,
        "session_column": args.session_column, "sex_column": args.sex_column,
        "sex_coding": opt.parse_sex_coding(args.sex_coding) if args.sex_coding else None,
        "age_column": args.age_column, "age_unit": args.age_unit, "ratios": args.ratios,
        "seed": args.seed, "column": dict(_pair(c, "--column", "diagnosis=DX_GROUP")
                                          for c in args.column),
        "studies": opt.parse_set(args.set)}
    options = opt.merge_options(opt.read_options_file(args.config) if args.config else {}, flags)
    phenotype, out, kwargs = opt.prepare_arguments(options)
    summary = prepare(phenotype, out, **kwargs)
    print(f"records written to {out}:")
    for name, path in summary.files.items():
        print(f"  {name}: {path}  {summary.records.get(name, {})}")
    print(f"subjects per split: {summary.subjects}")
    for modality, match in summary.matching.items():
        print(f"  ids {modality}: {match['matched']} of {match['table_ids']} table subjects "
              f"matched {match['image_ids']} with images"
              + (f"; table only e.g. {match['unmatched_table_examples']}"
                 if match["unmatched_table_examples"] else "")
              + (f"; images only e.g. {match['unmatched_image_examples']}"
                 if match["unmatched_image_examples"] else "")
              + (f"; {summary.sessions[modality]} sessions" if summary.sessions.get(modality)
                 else ""))
    for reason, count in sorted(summary.skipped.items()):
        print(f"  skipped {count}: {reason}")
    for modality, root in summary.data_roots.items():
        print(f"set dataset.{modality}.data_root={root}")
    print(f"config: {summary.config_file} (records, data roots"
          + (f", the measured recipe {summary.recipe}" if summary.recipe else "")
          + f")\ntrain with: umbrella train -c {summary.config_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may also follow options: `train -c C --quiet a.b=1`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handlers = {"demo": _cmd_demo, "prepare": _cmd_prepare, "validate": _cmd_validate,
                "cache": _cmd_cache, "train": _cmd_train, "pretrain": _cmd_pretrain,
                "evaluate": _cmd_evaluate, "ask": _cmd_ask, "serve": _cmd_serve}
    try:
        code = handlers[args.command](args)
    except UmbrellaError as exc:
        print(f"umbrella {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if code == 0:  # a finished torchrun / deepspeed worker ends here, in step with its peers
        from umbrella.training.launch import finish_worker

        finish_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
