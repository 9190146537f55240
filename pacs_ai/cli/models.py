"""``pacs-ai synth|train|evaluate|predict``: phantoms, training, evaluation, scoring files."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import ImagingError, NotApplicable, PacsAiError
from pacs_ai.inference.ood_spec import DEFAULT_QUANTILE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("synth", help="write a synthetic phantom dataset (class folders)")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--kind", choices=("cxr", "ct"), default="cxr")
    p.add_argument("--n", type=int, default=300, help="images (cxr) or series (ct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image side (cxr 320, ct 128)")
    p.add_argument("--slices", type=int, default=40, help="CT slices per series")
    p.add_argument(
        "--format",
        choices=("dicom", "png"),
        default="dicom",
        dest="fmt",
        help="png: 8-bit PNG instead of DICOM (X-ray only)",
    )
    p.set_defaults(handler=_synth)

    p = sub.add_parser("train", help="train a classifier on class folders (PNG/JPEG/DICOM)")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--kind", choices=("cxr", "ct"), default="cxr")
    p.add_argument(
        "--arch",
        default="resnet18_slim",
        help="resnet18_slim (default), resnet18, mobilenet_v3_small",
    )
    p.add_argument(
        "--steps", type=int, default=300, help="optimisation steps (default 300, any data size)"
    )
    p.add_argument("--epochs", type=int, default=None, help="instead of --steps: whole passes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--size", type=int, default=None, help="input side (cxr 224, ct 128)")
    p.add_argument("--ct-slices", type=int, default=24, help="slices scored per CT series")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="early stopping: evaluations without improvement (never before half the steps)",
    )
    p.add_argument(
        "--hflip",
        action="store_true",
        help="augment with horizontal flips (off: a flip moves the heart to the right)",
    )
    p.add_argument(
        "--init-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="start from a torchvision-format state dict (e.g. ResNet-18 ImageNet weights)",
    )
    p.add_argument(
        "--ood-quantile",
        type=float,
        default=DEFAULT_QUANTILE,
        help="out-of-distribution threshold: this quantile of held-out scores",
    )
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="CLASS=FOLDER,FOLDER",
        help="merge folders into one class, e.g. other=normal,pneumonia",
    )
    p.add_argument(
        "--test-dir",
        type=Path,
        default=None,
        help="independent class folders evaluated after training (card 'test')",
    )
    p.add_argument("--name", default="")
    p.add_argument("--version", default="1")
    p.add_argument("--demo", action="store_true", help="label the model demo / not clinical")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "fit-ood",
        help="fit the out-of-distribution density and monitoring reference of a trained model",
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="the training class folders")
    p.add_argument("--test-dir", type=Path, default=None, help="measures the false-refusal rate")
    p.add_argument("--group", action="append", default=[], metavar="CLASS=FOLDER,FOLDER")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_fit_ood)

    p = sub.add_parser("evaluate", help="metrics of a model on class folders")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory or bundled:cxr|ct")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--group", action="append", default=[], metavar="CLASS=FOLDER,FOLDER")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("predict", help="score DICOM files or series folders")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory or bundled:cxr|ct")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-ct-slices", type=int, default=10)
    p.add_argument(
        "--heatmap-dir",
        type=Path,
        default=None,
        help="write an overlay PNG (image + Grad-CAM) per scored series here",
    )
    p.set_defaults(handler=_predict)


def _groups(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name or not members:
            raise PacsAiError(f"--group {item!r}: expected CLASS=FOLDER[,FOLDER...]")
        out[name] = [m for m in members.split(",") if m]
    return out


def _synth(args: argparse.Namespace) -> int:
    from pacs_ai.training.synth import synth

    if args.fmt == "png" and args.kind != "cxr":
        raise PacsAiError("--format png is for --kind cxr")
    n = synth(
        args.out_dir, args.kind, args.n, args.seed, size=args.size, fmt=args.fmt, slices=args.slices
    )
    print(f"wrote {n} {'images' if args.kind == 'cxr' else 'series'} to {args.out_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pacs_ai.training.metrics import summary_lines
    from pacs_ai.training.train import TrainOptions, train

    opts = TrainOptions(
        kind=args.kind,
        arch=args.arch,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        size=args.size,
        ct_slices=args.ct_slices,
        val_fraction=args.val_fraction,
        patience=args.patience,
        target_sensitivity=args.target_sensitivity,
        groups=_groups(args.group),
        name=args.name,
        version=args.version,
        demo=args.demo,
        augment=not args.no_augment,
        progress=not args.quiet,
        command="pacs-ai " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        test_dir=args.test_dir,
        hflip=args.hflip,
        init_weights=args.init_weights,
        ood_quantile=args.ood_quantile,
    )
    card = train(args.data_dir, args.out, opts)
    print(f"model {card.name} written to {args.out}")
    for line in summary_lines(card.metrics["validation"]):
        print(line)
    if "test" in card.metrics:
        print("independent test set:")
        for line in summary_lines(card.metrics["test"]):
            print(line)
    return 0


def _fit_ood(args: argparse.Namespace) -> int:
    from pacs_ai.training.ood_fit import fit_model_dir

    card = fit_model_dir(
        args.model_dir,
        args.data_dir,
        test_dir=args.test_dir,
        groups=_groups(args.group),
        quantile=args.quantile,
        val_fraction=args.val_fraction,
        device=args.device,
    )
    print(json.dumps(card.to_dict()["ood"], indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pacs_ai.inference import load_model, resolve_model_dir
    from pacs_ai.training.evaluate import evaluate
    from pacs_ai.training.metrics import summary_lines

    model = load_model(
        resolve_model_dir(args.model_dir), args.device, args.batch_size, require_deployable=False
    )
    report = evaluate(model, args.data_dir, _groups(args.group))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        card = model.card
        print(
            f"model {card.name} {card.version}"
            + (" (DEMO, not for clinical use)" if card.demo else "")
        )
        for line in summary_lines(report):
            print(line)
        check = report["precision_check"]
        print(
            f"precision {report['precision']}; bf16 vs fp32 max |dp| "
            f"{check['bf16_max_abs_diff']:.4f} on {check['n']} images "
            f"(tolerance {check['tolerance']:g})"
        )
    return 0


def _collect(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise PacsAiError(f"{path}: no such file or directory")
    return files


def _predict(args: argparse.Namespace) -> int:
    from pacs_ai.imaging.decode import read_header
    from pacs_ai.imaging.gating import assess_series
    from pacs_ai.inference import load_model, resolve_model_dir

    model = load_model(resolve_model_dir(args.model_dir), args.device, args.batch_size)
    series: dict[str, list[tuple[Path, Any]]] = {}
    results: list[dict[str, Any]] = []
    for path in _collect(args.paths):
        try:
            header = read_header(path)
        except ImagingError as exc:
            results.append({"path": str(path), "applicable": False, "reason": str(exc)})
            continue
        key = str(header.get("SeriesInstanceUID", "")) or str(path)
        series.setdefault(key, []).append((path, header))
    to_score: list[tuple[dict[str, Any], list[Path]]] = []
    for members in series.values():
        headers = [h for _, h in members]
        app = assess_series(headers, min_ct_slices=args.min_ct_slices)
        entry: dict[str, Any] = {
            "path": str(members[0][0]) if len(members) == 1 else str(members[0][0].parent),
            "modality": str(headers[0].get("Modality", "")),
            "files": len(members),
            "applicable": app.applicable,
            "kind": app.kind,
            "reason": app.reason,
        }
        if app.applicable and app.kind != model.card.kind:
            entry.update(applicable=False, reason=f"{app.reason}; needs the {app.kind} model")
        results.append(entry)
        if entry["applicable"]:
            to_score.append((entry, [p for p, _ in members]))
    status = 0
    for entry, paths in to_score:
        try:
            score = model.score_series([paths])[0]
        except (ImagingError, NotApplicable) as exc:
            entry.update(applicable=False, reason=str(exc))
            status = 1
            continue
        if score.ood_score is not None:
            entry["ood"] = {
                "score": round(score.ood_score, 3),
                "threshold": round(score.ood_threshold or 0.0, 3),
            }
        if score.refusal is not None:
            entry.update(applicable=False, reason=score.refusal)
            continue
        entry["model"] = {
            "name": model.card.name,
            "version": model.card.version,
            "demo": model.card.demo,
            "device": model.device,
        }
        entry["probabilities"] = {k: round(v, 3) for k, v in score.probabilities.items()}
        entry["present"] = score.present
        entry["thresholds"] = {k: round(v, 3) for k, v in score.thresholds.items()}
        entry["scored_instances"] = len(score.used_instances)
        if args.heatmap_dir is not None and score.display_image is not None:
            entry["overlay"] = str(_overlay(args.heatmap_dir, results.index(entry), entry, score))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for entry in results:
            print(_line(entry))
    return status


def _line(entry: dict[str, Any]) -> str:
    head = f"{entry['path']}: {entry.get('modality', '?')}"
    if not entry["applicable"]:
        return f"{head}: not applicable ({entry['reason']})"
    probs = "  ".join(f"{k}={v:.3f}" for k, v in entry["probabilities"].items())
    found = [k for k, v in entry["present"].items() if v]
    decision = "POSITIVE: " + ", ".join(found) if found else "no finding above threshold"
    demo = " [demo model, not for clinical use]" if entry["model"]["demo"] else ""
    return f"{head}: applicable ({entry['reason']}): {probs} -> {decision}{demo}"


def _overlay(out_dir: Path, index: int, entry: dict[str, Any], score: Any) -> Path:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    grey = np.asarray(score.display_image, dtype=np.float32)
    rgb = np.stack([grey] * 3, axis=-1)
    if score.heatmap is not None:
        heat = np.asarray(score.heatmap, dtype=np.float32)[..., None]
        rgb = np.clip(rgb * (1 - 0.45 * heat) + 0.45 * heat * np.array([1.0, 0.1, 0.0]), 0, 1)
    both = np.concatenate([np.stack([grey] * 3, axis=-1), rgb], axis=1)
    path = out_dir / f"series{index:03d}.png"
    Image.fromarray(np.rint(both * 255).astype(np.uint8)).save(path)
    return path
