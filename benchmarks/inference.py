"""Inference benchmark: preprocessing, model throughput against the matmul peak, pipeline.

Measures, in one run on one machine:

- preprocessing time per DX image (2048 x 2048, 14-bit, uncompressed) and per 300-slice CT
  (512 x 512): read headers, order, decode the scored slices, window, resize;
- the bundled models' images/s batched and one at a time, their FLOPs per image (torch's
  FlopCounterMode) and achieved GFLOP/s against the fp32 matmul peak measured in the same
  run (bf16 autocast too where the CPU has native bf16, with the score agreement);
- torchvision ResNet-18 at 224² for reference;
- decode -> preprocess -> infer (LoadedModel.score_series: decode processes of
  ``inference.decode_processes`` beside the model, and the same with threads) against
  model-only throughput on the same images, at the same precision (the model's configured
  one, named in the table), with the ratio; the old serial numpy path for comparison; and the
  CPU cost per image of preprocessing against the model's, which bounds the ratio on a CPU
  where both share the cores.

With ``--device cuda`` the model part runs on the GPU, fp32 against mixed precision.
Prints a markdown table and writes JSON (``--json``); ``--readme FILE`` replaces the block
between ``<!-- bench:inference:start -->`` and ``<!-- bench:inference:end -->`` in FILE.

    PYTHONPATH=. python benchmarks/inference.py --json benchmarks/results/inference.json \
        --readme docs/models.md

On a machine shared with other work, set ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP
threads of the model otherwise make model-only throughput swing by 10x between runs.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet18

from pacs_ai.imaging.ct import plan_volume, select_evenly
from pacs_ai.imaging.decode import read_dataset, read_header
from pacs_ai.imaging.prepare import ct_input, xray_input
from pacs_ai.imaging.reference import xray_input_reference
from pacs_ai.imaging.tensorprep import PrepTask, prepare_task
from pacs_ai.inference import bundled_model_dir, load_model
from pacs_ai.inference.decodepool import DecodePool, auto_processes
from pacs_ai.inference.precision import cpu_bf16_feature
from pacs_ai.inference.runner import LoadedModel
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """Best GFLOP/s of n x n matmuls over a few seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    deadline = time.perf_counter() + (3.0 if device.type == "cpu" else 1.0)
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def _cpu_has_native_bf16() -> bool:
    """The same detection ``inference.precision = "auto"`` uses."""
    return cpu_bf16_feature() is not None


def flops_per_image(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros((1, *shape), device=device))
    return int(counter.get_total_flops())


def model_throughput(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    autocast: torch.dtype | None,
    seconds: float,
) -> float:
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    x = torch.rand((batch, *shape), device=device).contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    with torch.inference_mode(), ctx:
        for _ in range(2):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            model(x)
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)


def _write_dx(folder: Path, count: int, side: int) -> list[Path]:
    img = cxr_phantom("covid", np.random.default_rng(0), side)
    paths = []
    for i in range(count):
        ds = dw.xray_image(img * 15000 + 500, modality="DX", bits_stored=14, pixel_spacing_mm=0.2)
        path = folder / f"dx{i:03d}.dcm"
        dw.write(ds, path)
        paths.append(path)
    return paths


def _write_ct(folder: Path, slices: int, side: int) -> list[Path]:
    small = ct_phantom("covid", np.random.default_rng(0), (slices, 128, 128))
    factor = side // 128
    datasets = dw.ct_series(
        np.kron(small, np.ones((1, factor, factor), dtype=np.float32)),
        slice_thickness_mm=1.0,
        pixel_spacing_mm=0.7,
    )
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"ct{i:04d}.dcm"
        dw.write(ds, path)
        paths.append(path)
    return paths


def _ct_preprocess(paths: list[Path], model: LoadedModel) -> np.ndarray:
    headers = [read_header(p) for p in paths]
    chosen = select_evenly(plan_volume(headers), model.card.input.ct_slices)
    return np.stack([ct_input(read_dataset(paths[s.index]), model.card.input) for s in chosen])


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else "cpu")
    if args.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda:0")
    seconds = args.seconds
    res: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "native_bf16": _cpu_has_native_bf16() if device.type == "cpu" else None,
        }
    }
    fp32_peak = matmul_peak(torch.float32, device)
    res["matmul_peak_gflops"] = {"fp32": fp32_peak}
    bf16_ok = device.type == "cuda" or _cpu_has_native_bf16()
    if bf16_ok:
        res["matmul_peak_gflops"]["bf16"] = matmul_peak(torch.bfloat16, device)
    mixed = (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if device.type == "cuda"
        else torch.bfloat16
    )

    models = {
        "cxr-demo (resnet18_slim 224² 1ch)": load_model(bundled_model_dir("cxr"), str(device)),
        "ct-demo (resnet18_slim 128² 2ch)": load_model(bundled_model_dir("ct"), str(device)),
    }
    # what precision "auto" chose at load, and why (pacs_ai.inference.precision)
    res["auto_precision"] = {n: f"{m.precision} ({m.precision_reason})" for n, m in models.items()}
    res["models"] = []
    for name, lm in models.items():
        spec = lm.card.input
        shape = (spec.channels, spec.size, spec.size)
        res["models"].append(
            _bench_model(
                name, lm.module, shape, device, mixed, bf16_ok, fp32_peak, res, seconds, args.batch
            )
        )
    ref = resnet18(weights=None, num_classes=3)
    res["models"].append(
        _bench_model(
            "torchvision resnet18 224² 3ch",
            ref,
            (3, 224, 224),
            device,
            mixed,
            bf16_ok,
            fp32_peak,
            res,
            seconds,
            args.batch,
        )
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "dx").mkdir()
        (root / "ct").mkdir()
        dx = _write_dx(root / "dx", args.dx_images, 2048)
        ct = _write_ct(root / "ct", 300, 512)
        cxr = models["cxr-demo (resnet18_slim 224² 1ch)"]
        ctm = models["ct-demo (resnet18_slim 128² 2ch)"]
        # one core each (torch on one thread), alternated so that load from other programs
        # hits both alike: the production path from the file (decode_file + finish) and the
        # numpy reference
        size = cxr.card.input.size
        fast_s, ref_s = _paired_single_thread(
            lambda: prepare_task(PrepTask(dx[0], None, "cxr", (), size, True)),
            lambda: xray_input_reference(read_dataset(dx[0]), size),
            15,
        )
        res["preprocess_s"] = {
            "dx_2048": fast_s,
            "dx_2048_reference": ref_s,
            "ct_300x512": _median_time(lambda: _ct_preprocess(ct, ctm), 3),
            "ct_scored_slices": ctm.card.input.ct_slices,
        }
        res["pipeline"] = _pipeline(args, dx, ct, cxr, ctm, res["preprocess_s"])
    return res


def _time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _paired_single_thread(
    a: Callable[[], object], b: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b`` on one torch thread (their CPU cost on one
    core), measured alternately."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a()
        b()
        times_a, times_b = [], []
        for _ in range(repeat):
            times_a.append(_time_once(a))
            times_b.append(_time_once(b))
        return statistics.median(times_a), statistics.median(times_b)
    finally:
        torch.set_num_threads(threads)


def _pipeline(
    args: argparse.Namespace,
    dx: list[Path],
    ct: list[Path],
    cxr: LoadedModel,
    ctm: LoadedModel,
    res_prep: dict[str, Any],
) -> dict[str, Any]:
    spec = cxr.card.input
    n = len(dx)
    series = [[p] for p in dx]
    processes = auto_processes(args.decode_processes)
    pool = DecodePool(processes) if processes > 0 else None
    rounds: dict[str, list[float]] = {"model": [], "threads": [], "processes": [], "serial": []}
    try:
        inputs = np.stack([xray_input(read_dataset(p), spec) for p in dx])
        cxr.predict(inputs)  # warm
        cxr.decode_pool = pool
        cxr.score_series(series, heatmaps=False)  # starts the decode processes
        # Rounds interleave the variants, so load from other programs on a shared machine
        # hits them alike; ratios are taken within each round, then the median.
        for r in range(args.rounds):
            rounds["model"].append(_time_once(lambda: cxr.predict(inputs)))
            cxr.decode_pool = None
            rounds["threads"].append(_time_once(lambda: cxr.score_series(series, heatmaps=False)))
            cxr.decode_pool = pool
            rounds["processes"].append(_time_once(lambda: cxr.score_series(series, heatmaps=False)))
            if r < 2:  # the old serial numpy path, for comparison only
                rounds["serial"].append(
                    _time_once(
                        lambda: cxr.predict(
                            np.stack([xray_input_reference(read_dataset(p), spec.size) for p in dx])
                        )
                    )
                )
        ctm.decode_pool = pool
        ct_s = _median_time(lambda: ctm.score_series([ct], heatmaps=False), 3)
    finally:
        cxr.decode_pool = ctm.decode_pool = None
        if pool is not None:
            pool.close()
    model_only = statistics.median(rounds["model"])
    procs = statistics.median(rounds["processes"])
    threads = statistics.median(rounds["threads"])
    serial_ref = statistics.median(rounds["serial"])
    ratio_p = [m / x for m, x in zip(rounds["model"], rounds["processes"], strict=True)]
    ratio_t = [m / x for m, x in zip(rounds["model"], rounds["threads"], strict=True)]
    out: dict[str, Any] = {
        "images": n,
        "batch_size": cxr.batch_size,
        "precision": cxr.precision,  # model-only and pipelines alike
        "device": cxr.device,
        "decode_processes": processes,
        "model_only_img_s": n / model_only,
        "pipeline_processes_img_s": n / procs,
        "pipeline_threads_img_s": n / threads,
        "pipeline_serial_reference_img_s": n / serial_ref,
        "rounds": args.rounds,
        "ratio_processes": statistics.median(ratio_p),  # median of the per-round ratios
        "ratio_threads": statistics.median(ratio_t),
        "ct_series_s": ct_s,
    }
    if cxr.device == "cpu":
        # the model uses every torch thread: its core-ms per image; with preprocessing on the
        # same cores the best ratio is model / (model + preprocessing) per image (load from
        # other programs inflates both the model's and the preprocessing's times)
        model_core_ms = 1000 * torch.get_num_threads() * model_only / n
        out["model_core_ms_per_image"] = model_core_ms
        prep_ms = 1000 * res_prep["dx_2048"]
        out["cpu_bound_ratio"] = model_core_ms / (model_core_ms + prep_ms)
    return out


def _bench_model(
    name: str,
    model: torch.nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    mixed: torch.dtype,
    bf16_ok: bool,
    fp32_peak: float,
    res: dict[str, Any],
    seconds: float,
    batch: int,
) -> dict[str, Any]:
    model = model.to(device).eval()
    flops = flops_per_image(model, shape, device)
    row: dict[str, Any] = {"model": name, "gflop_per_image": flops / 1e9}
    for label, bs in (("bs1", 1), (f"bs{batch}", batch)):
        ips = model_throughput(model, shape, bs, device, None, seconds)
        row[f"fp32_{label}_img_s"] = ips
        row[f"fp32_{label}_pct_peak"] = 100 * ips * flops / 1e9 / fp32_peak
    if bf16_ok:
        ips = model_throughput(model, shape, batch, device, mixed, seconds)
        peak = res["matmul_peak_gflops"].get("bf16", fp32_peak)
        row[f"mixed_bs{batch}_img_s"] = ips
        row[f"mixed_bs{batch}_pct_peak"] = 100 * ips * flops / 1e9 / peak
        x = torch.rand((16, *shape), device=device)
        with torch.inference_mode():
            ref = torch.softmax(model(x).float(), 1)
            with torch.autocast(device.type, dtype=mixed):
                low = torch.softmax(model(x).float(), 1)
        row["mixed_max_abs_prob_diff"] = float((ref - low).abs().max())
        row["mixed_argmax_agreement"] = float((ref.argmax(1) == low.argmax(1)).float().mean())
    return row


def table(res: dict[str, Any], batch: int) -> str:
    m = res["machine"]
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in res["matmul_peak_gflops"].items())
    lines = [
        f"Machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']} with "
        f"{m['torch_threads']} threads, device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "")
        + f"; matmul peak measured in the run: {peaks}"
        + (
            ""
            if res["matmul_peak_gflops"].get("bf16")
            else "; no native bf16 on this CPU, bf16 not measured"
        ),
        "",
        f"| model | GFLOP/img | fp32 bs1 img/s | fp32 bs{batch} img/s | "
        f"fp32 bs{batch} % of peak | mixed bs{batch} img/s | mixed % of peak | "
        "mixed vs fp32 max Δp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        mixed = (
            (
                f"{r[f'mixed_bs{batch}_img_s']:.1f}",
                f"{r[f'mixed_bs{batch}_pct_peak']:.0f}%",
                f"{r['mixed_max_abs_prob_diff']:.4f}",
            )
            if f"mixed_bs{batch}_img_s" in r
            else ("n/a", "n/a", "n/a")
        )
        lines.append(
            f"| {r['model']} | {r['gflop_per_image']:.3f} | {r['fp32_bs1_img_s']:.1f} | "
            f"{r[f'fp32_bs{batch}_img_s']:.1f} | {r[f'fp32_bs{batch}_pct_peak']:.0f}% | "
            f"{mixed[0]} | {mixed[1]} | {mixed[2]} |"
        )
    p, pipe = res["preprocess_s"], res["pipeline"]
    lines += [
        "",
        "| stage | result |",
        "|---|---|",
        f"| preprocess one DX 2048² (read, decode, VOI, resize) on one core, fast path / "
        f"numpy reference | {1000 * p['dx_2048']:.1f} ms / "
        f"{1000 * p['dx_2048_reference']:.1f} ms |",
        f"| preprocess one CT of 300 × 512² (300 headers, order, {p['ct_scored_slices']} "
        f"slices decoded/windowed) | {1000 * p['ct_300x512']:.0f} ms |",
        f"| CXR model only, {pipe['images']} images, batch {pipe['batch_size']}, "
        f"{pipe['precision']} on {pipe['device']} | {pipe['model_only_img_s']:.1f} img/s |",
        f"| CXR decode → preprocess → infer, {pipe['decode_processes']} decode processes, "
        f"{pipe['precision']} | {pipe['pipeline_processes_img_s']:.1f} img/s "
        f"(**{100 * pipe['ratio_processes']:.0f}%** of model-only) |",
        f"| CXR decode → preprocess → infer, decode threads, {pipe['precision']} | "
        f"{pipe['pipeline_threads_img_s']:.1f} img/s "
        f"({100 * pipe['ratio_threads']:.0f}% of model-only) |",
        f"| CXR serial, numpy reference preprocessing then model | "
        f"{pipe['pipeline_serial_reference_img_s']:.1f} img/s |",
        *(
            [
                f"| CPU per image: model ({pipe['precision']}, all cores) | "
                f"{pipe['model_core_ms_per_image']:.1f} core-ms → with the fast path's "
                f"{1000 * p['dx_2048']:.1f} ms the best pipeline ratio on these shared "
                f"cores is {100 * pipe['cpu_bound_ratio']:.0f}% |"
            ]
            if "cpu_bound_ratio" in pipe
            else []
        ),
        f"| one 300-slice CT series scored end to end | {pipe['ct_series_s']:.2f} s |",
        "",
        *(f"- `precision = auto` for {k}: {v}" for k, v in res.get("auto_precision", {}).items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput point")
    parser.add_argument("--dx-images", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved pipeline rounds (median)"
    )
    parser.add_argument(
        "--decode-processes", default="auto", help='"auto" (one per core, at most 8) or N'
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    res = run(args)
    text = table(res, args.batch)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if args.readme:
        start, end = "<!-- bench:inference:start -->", "<!-- bench:inference:end -->"
        doc = args.readme.read_text()
        if start in doc and end in doc:
            head, rest = doc.split(start, 1)
            _, tail = rest.split(end, 1)
            args.readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
