"""``pacs-ai train``: fit a classifier on class folders, calibrate it, pick thresholds,
write the model card, weights and plots, and refuse degenerate models.

Steps: discover samples and split them by patient (stratified), preprocess once exactly as
inference does, train with class-weighted cross-entropy and augmentation (progress bar) for
a number of optimisation steps (not epochs: 90 images make 3 steps an epoch) with linear
warm-up and cosine decay, keep the best evaluation on the validation set (macro ROC AUC,
then loss) with a checkpoint and early stopping that cannot fire before half the steps, fit
a temperature on the validation set, choose each finding's threshold for the target
sensitivity on the validation set, fit the out-of-distribution density
(:mod:`pacs_ai.training.ood_fit`), compute the validation metrics (and the test metrics when
a separate test folder is given), write ``card.json``, ``model.safetensors``,
``ood.safetensors``, ``roc.png`` and ``confusion.png``, then apply the deployment check.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pacs_ai import __version__
from pacs_ai.errors import ModelRefused
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.inference.aggregate import aggregate
from pacs_ai.inference.architectures import Classifier
from pacs_ai.inference.card import ModelCard, deployment_problems, findings_for
from pacs_ai.inference.ood_spec import DEFAULT_QUANTILE
from pacs_ai.inference.precision import DEFAULT_BF16_TOLERANCE, precision_check
from pacs_ai.inference.runner import build_from_card, save_weights, select_device
from pacs_ai.training.augment import augment
from pacs_ai.training.datasets import (
    Sample,
    discover,
    load_ct_inputs,
    load_xray_inputs,
    patient_split,
)
from pacs_ai.training.metrics import (
    classification_report,
    fit_temperature,
    threshold_for_sensitivity,
)
from pacs_ai.training.ood_fit import fit_ood, reference
from pacs_ai.training.plots import plot_confusion, plot_roc

log = logging.getLogger(__name__)
CT_AGGREGATION = "topk_mean:0.25"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainOptions:
    kind: Literal["cxr", "ct"]
    arch: str = "resnet18_slim"
    steps: int = 300
    epochs: int | None = None  # set: steps = epochs x steps per epoch (the demos' cards)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    seed: int = 0
    size: int | None = None
    ct_slices: int = 24
    val_fraction: float = 0.2
    patience: int = 5  # evaluations without improvement, never before half the steps
    warmup_fraction: float = 0.1
    evaluations: int = 20  # validation passes over the whole run
    target_sensitivity: float = 0.9
    hflip: bool = False
    init_weights: Path | None = None
    ood_quantile: float = DEFAULT_QUANTILE
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    name: str = ""
    version: str = "1"
    demo: bool = False
    augment: bool = True
    progress: bool = True
    command: str = ""
    data_description: str = ""
    test_dir: Path | None = None


@dataclass
class _Data:
    classes: tuple[str, ...]
    labels: np.ndarray
    inputs: np.ndarray | list[np.ndarray]  # cxr: (N, 1, S, S); ct: per series (K, C, S, S)


def _load(
    data_dir: Path, opts: TrainOptions, spec: InputSpec, classes: tuple[str, ...] | None
) -> tuple[_Data, list[Sample]]:
    found, samples = discover(data_dir, opts.kind, opts.groups)
    if classes is not None and found != classes:
        raise ModelRefused(f"{data_dir} has classes {list(found)}, the model {list(classes)}")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if opts.kind == "cxr":
        inputs: np.ndarray | list[np.ndarray] = load_xray_inputs(samples, spec, opts.progress)
    else:
        inputs = load_ct_inputs(samples, spec, opts.progress)
    return _Data(found, labels, inputs), samples


def _logits(
    model: Classifier, inputs: np.ndarray | list[np.ndarray], device: torch.device, batch: int
) -> list[np.ndarray]:
    """Raw logits per unit: one (1, K) row per X-ray image, (slices, K) per CT series."""
    model.eval()
    units = (
        [inputs[i : i + 1] for i in range(len(inputs))]
        if isinstance(inputs, np.ndarray)
        else inputs
    )
    flat = np.concatenate(units).astype(np.float32)
    out = []
    with torch.inference_mode():
        for i in range(0, len(flat), batch):
            x = torch.from_numpy(flat[i : i + batch]).to(device)
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    logits = np.concatenate(out)
    sizes = np.cumsum([len(u) for u in units])[:-1]
    return list(np.split(logits, sizes))


def _image_probs(
    model: Classifier, device: torch.device, temperature: float
) -> Callable[[np.ndarray, torch.dtype | None], np.ndarray]:
    """Calibrated probabilities per model input, with an autocast type (None: fp32)."""

    def run(inputs: np.ndarray, autocast: torch.dtype | None) -> np.ndarray:
        out = []
        for i in range(0, len(inputs), 64):
            x = torch.from_numpy(inputs[i : i + 64]).to(device)
            ctx = (
                torch.autocast(device.type, dtype=autocast)
                if autocast is not None
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), ctx:
                logits = model(x.contiguous(memory_format=torch.channels_last)).float()
                out.append(torch.softmax(logits / temperature, dim=1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    return run


def _unit_probs(
    logits: list[np.ndarray], temperature: float, finding_idx: list[int], aggregation: str
) -> np.ndarray:
    rows = []
    for lg in logits:
        p = torch.softmax(torch.from_numpy(lg / temperature), dim=1).numpy().astype(np.float64)
        rows.append(aggregate(p, finding_idx, aggregation))
    return np.stack(rows)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)).mean())


def _macro_auc(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(k):
        truth = labels == j
        if 0 < truth.sum() < len(truth):
            aucs.append(float(roc_auc_score(truth, probs[:, j])))
    return float(np.mean(aucs)) if aucs else 0.5


def train(data_dir: Path, out_dir: Path, opts: TrainOptions) -> ModelCard:
    """Train, calibrate, evaluate and write a model directory (module doc). Raises
    :class:`~pacs_ai.errors.ModelRefused` (after writing the card, which records why) when
    the model fails the deployment check."""
    started = time.monotonic()
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    spec = InputSpec.default(opts.kind, opts.size)
    if opts.kind == "ct":
        spec = InputSpec("ct", spec.size, spec.windows, opts.ct_slices)
    data, samples = _load(data_dir, opts, spec, None)
    classes = data.classes
    findings = findings_for(classes)
    finding_idx = [classes.index(f.label) for f in findings]
    aggregation = CT_AGGREGATION if opts.kind == "ct" else "max_image"
    train_idx, val_idx = patient_split(
        data.labels, [s.group for s in samples], opts.val_fraction, opts.seed
    )
    if len(set(data.labels[val_idx].tolist())) < 2:
        raise ModelRefused("the validation split holds fewer than two classes; add data")
    device = select_device(opts.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = ModelCard(
        name=opts.name or f"pacs-ai-{opts.kind}",
        version=opts.version,
        kind=opts.kind,
        arch=opts.arch,
        classes=classes,
        input=spec,
        thresholds={},
        findings=findings,
        demo=opts.demo,
        aggregation=aggregation,
    )
    model = build_from_card(card).to(device).to(memory_format=torch.channels_last)

    # training units: X-ray images, or CT slices carrying their series' label
    if isinstance(data.inputs, np.ndarray):
        x_train = data.inputs[train_idx]
        y_train = data.labels[train_idx]
        val_inputs: np.ndarray | list[np.ndarray] = data.inputs[val_idx]
    else:
        x_train = np.concatenate([data.inputs[i] for i in train_idx])
        y_train = np.concatenate([np.full(len(data.inputs[i]), data.labels[i]) for i in train_idx])
        val_inputs = [data.inputs[i] for i in val_idx]
    y_val = data.labels[val_idx]
    counts = np.bincount(y_train, minlength=len(classes)).astype(np.float32)
    weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(classes)).to(device)
    if opts.init_weights is not None:
        load_init_weights(model, opts.init_weights)
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x_train) / opts.batch_size))
    total_steps = opts.epochs * steps_per_epoch if opts.epochs else max(1, opts.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, total_steps, opts.warmup_fraction)
    )
    eval_every = max(1, total_steps // max(1, opts.evaluations))
    gen = torch.Generator().manual_seed(opts.seed)
    amp = torch.bfloat16 if device.type == "cuda" else None
    best: tuple[float, float] = (-1.0, math.inf)
    best_state: dict[str, torch.Tensor] = {}
    best_step, stale = 0, 0
    history = []
    order: np.ndarray = np.zeros(0, dtype=np.int64)
    cursor, total, seen = 0, 0.0, 0
    model.train()
    bar = tqdm(range(1, total_steps + 1), desc="training", disable=not opts.progress, leave=False)
    for step in bar:
        if cursor >= len(order):
            order, cursor = rng.permutation(len(x_train)), 0
        idx = order[cursor : cursor + opts.batch_size]
        cursor += opts.batch_size
        xb = torch.from_numpy(x_train[idx].astype(np.float32))
        if opts.augment:
            xb = augment(xb, gen, intensity=opts.kind == "cxr", flip=opts.hflip)
        xb = xb.to(device).contiguous(memory_format=torch.channels_last)
        yb = torch.from_numpy(y_train[idx]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(xb).float(), yb, weight=weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % eval_every and step != total_steps:
            continue
        val_probs = _unit_probs(
            _logits(model, val_inputs, device, 64), 1.0, finding_idx, aggregation
        )
        model.train()
        auc, vloss = _macro_auc(val_probs, y_val, len(classes)), _nll(val_probs, y_val)
        history.append(
            {
                "step": step,
                "train_loss": round(total / max(seen, 1), 4),
                "val_loss": round(vloss, 4),
                "val_auc": round(auc, 4),
            }
        )
        log.info("step %d: train loss %.4f val AUC %.4f", step, total / max(seen, 1), auc)
        if opts.progress:
            print(
                f"step {step}/{total_steps}: train loss {total / max(seen, 1):.4f}  "
                f"val loss {vloss:.4f}  val macro AUC {auc:.4f}"
            )
        total, seen = 0.0, 0
        if auc > best[0] + 1e-4 or (auc >= best[0] - 1e-4 and vloss < best[1]):
            best, best_step, stale = (auc, vloss), step, 0
            best_state = copy.deepcopy(model.state_dict())
            torch.save({"step": step, "state_dict": best_state}, out_dir / CHECKPOINT_FILE)
        else:
            stale += 1
            if stale >= opts.patience and step >= total_steps // 2:
                break
    model.load_state_dict(best_state)
    val_logits = _logits(model, val_inputs, device, 64)
    temperature = fit_temperature(
        lambda t: _nll(_unit_probs(val_logits, t, finding_idx, aggregation), y_val)
    )
    val_probs = _unit_probs(val_logits, temperature, finding_idx, aggregation)
    # 3 decimals, rounded down (keeps the sensitivity): what reports show is what is used
    thresholds = {
        f.label: math.floor(
            1000
            * threshold_for_sensitivity(
                (y_val == classes.index(f.label)).astype(np.int64),
                val_probs[:, classes.index(f.label)],
                opts.target_sensitivity,
            )
        )
        / 1000
        for f in findings
    }
    metrics: dict[str, Any] = {
        "validation": classification_report(y_val, val_probs, classes, thresholds),
        "validation_note": (
            f"patient-level stratified hold-out ({opts.val_fraction:.0%}) of the training "
            "folders; it also chose the step, temperature and thresholds, so it is optimistic"
        ),
    }
    test: _Data | None = None
    if opts.test_dir is not None:
        test, _ = _load(opts.test_dir, opts, spec, classes)
        test_probs = _unit_probs(
            _logits(model, test.inputs, device, 64), temperature, finding_idx, aggregation
        )
        metrics["test"] = classification_report(test.labels, test_probs, classes, thresholds)
        metrics["test_note"] = f"independent folder {opts.test_dir.name}, not used in training"
    check_inputs = test.inputs if test is not None else val_inputs
    metrics["precision_check"] = {
        **precision_check(
            _image_probs(model, device, temperature),
            np.concatenate(
                [check_inputs] if isinstance(check_inputs, np.ndarray) else check_inputs
            ).astype(np.float32),
            DEFAULT_BF16_TOLERANCE,
        ),
        "data": "test" if test is not None else "validation",
    }
    problems = deployment_problems(metrics["validation"], classes)

    def forward(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
            logits, feats = model.logits_and_features(x)
            p = torch.softmax(logits.float() / temperature, dim=1)
            return p.cpu().numpy().astype(np.float64), feats.float().cpu().numpy()

    train_units = (
        data.inputs[train_idx]
        if isinstance(data.inputs, np.ndarray)
        else [data.inputs[i] for i in train_idx]
    )
    ood_spec, density = fit_ood(
        forward,
        train_units,
        data.labels[train_idx],
        val_inputs,
        test.inputs if test is not None else None,
        opts.ood_quantile,
    )
    ood_spec = replace(ood_spec, sha256=density.save(out_dir))
    weights_file, sha = save_weights(model.cpu(), out_dir)
    counts_all = np.bincount(data.labels, minlength=len(classes))
    card = ModelCard(
        name=card.name,
        version=opts.version,
        kind=opts.kind,
        arch=opts.arch,
        classes=classes,
        input=spec,
        thresholds=thresholds,
        findings=findings,
        demo=opts.demo,
        temperature=temperature,
        aggregation=aggregation,
        threshold_policy=(
            f"per finding, the highest threshold reaching sensitivity >= "
            f"{opts.target_sensitivity:g} on the validation set (after temperature scaling)"
        ),
        intended_use=(
            "DEMO ONLY - trained on synthetic phantoms; not for clinical use"
            if opts.demo
            else "research use; validate on local data before any clinical use"
        ),
        weights_file=weights_file,
        weights_sha256=sha,
        metrics=metrics,
        ood=ood_spec,
        training={
            "data": opts.data_description or str(data_dir.name),
            "class_counts": {c: int(counts_all[j]) for j, c in enumerate(classes)},
            "train_units": len(train_idx),
            "validation_units": len(val_idx),
            "split": "stratified by class, grouped by Patient ID (StratifiedGroupKFold)",
            "preprocessing": "pacs_ai.imaging.prepare (VOI policy of pacs_ai.imaging.lut)",
            "augmentation": (
                "shear 0.2, zoom 0.2, "
                + ("horizontal flip, " if opts.hflip else "")
                + "shift 5%, gamma/contrast/brightness, noise"
                if opts.augment
                else "none"
            ),
            "steps": total_steps,
            "steps_run": history[-1]["step"] if history else 0,
            "best_step": best_step,
            "warmup_steps": int(total_steps * opts.warmup_fraction),
            "init_weights": opts.init_weights.name if opts.init_weights else None,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "seed": opts.seed,
            "device": str(device),
            "seconds": round(time.monotonic() - started, 1),
            "command": opts.command,
            "pacs_ai_version": __version__,
            "torch_version": torch.__version__,
            "history": history,
            "deployment_problems": problems,
        },
    )
    card = replace(card, reference=reference(card, val_probs))
    card.save(out_dir)
    plot_roc(y_val, val_probs, classes, out_dir / "roc.png", f"{card.name} validation ROC")
    plot_confusion(metrics["validation"], out_dir / "confusion.png", f"{card.name} validation")
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if problems:
        raise ModelRefused("model refused for deployment: " + "; ".join(problems))
    return card


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 5%."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_init_weights(model: Classifier, path: Path) -> list[str]:
    """Start from a torchvision-format state dict (e.g. ImageNet ResNet-18 weights obtained
    elsewhere; a ``{"state_dict": ...}`` wrapper is accepted too). Tensors whose shapes fit
    are copied; a 3-channel first convolution is summed over its channels for a 1-channel
    model (or repeated over more), the classifier head is left freshly initialised. Returns
    the names of the tensors that were copied; raises :class:`ModelRefused` when none fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise ModelRefused(f"cannot read --init-weights {path.name}: {type(exc).__name__}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelRefused(f"--init-weights {path.name} is not a state dict")
    own = model.backbone.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        key = name.removeprefix("module.").removeprefix("backbone.")
        if key not in own or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue  # 0-dim: BatchNorm's num_batches_tracked counters fit anything
        target = own[key]
        if value.shape == target.shape:
            copied[key] = value.to(target.dtype)
        elif value.dim() == 4 and _same_but_channels(value.shape, target.shape):
            mean = value.float().mean(dim=1, keepdim=True)  # first conv: other channel count
            copied[key] = (mean * value.shape[1] / target.shape[1]).repeat(1, target.shape[1], 1, 1)
    if not copied:
        raise ModelRefused(f"no tensor of --init-weights {path.name} fits the architecture")
    model.backbone.load_state_dict(copied, strict=False)
    log.info("initialised %d of %d tensors from %s", len(copied), len(own), path.name)
    return sorted(copied)


def _same_but_channels(a: torch.Size, b: torch.Size) -> bool:
    return a[0] == b[0] and a[2:] == b[2:]
