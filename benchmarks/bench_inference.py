"""CPU inference speed of every engine: batch throughput, single-image latency, model load time.

    python benchmarks/bench_inference.py                 # random-init ResNet-50 at 224 px
    python benchmarks/bench_inference.py --run RUNDIR    # a trained run (its own image size)

Without --run, a throwaway run folder is made: a random-init ResNet-50 (BatchNorm statistics
taken from real CT slices so activations look like a trained network's, which matters for INT8
ranges) and a split.csv of IQ-OTH/NCCD images for INT8 calibration. Speed does not depend on
the weights; the INT8 accuracy change it prints is only meaningful with --run of a trained model.

Reported per engine: img/s, the GFLOP/s that represents (forward FLOPs counted with
torch.utils.flop_counter) as a fraction of a GEMM measured in the same run (fp32, and bf16 where the
CPU has it natively), and as a multiple of plain PyTorch eager ResNet-50 in the same run; the CPU
model and its detected instruction set (AVX2 / AVX-512 / AMX) are printed first (benchmarks/_machine.py).
INT8 and bf16 engines can exceed 1.0 of the fp32 GEMM. `--engines torch` skips the exports (quick).
Targets (issue 4): >= 21 img/s fp32, >= 40 img/s INT8, single-image p50 <= 60 ms fp32, load <= 2 s.
On a shared machine numbers are noisy: run it when the machine is quiet, and say when it was not.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _machine  # benchmarks/_machine.py: the script's folder is on sys.path

from lungcad.data.images import decode_image
from lungcad.data.transforms import Preprocessing, normalise, prepare, preprocess
from lungcad.errors import first_line
from lungcad.inference.engine_factory import make_engine
from lungcad.inference.engines import TorchEngine, default_threads
from lungcad.inference.export import default_export_path, export_model, onnx_to_openvino
from lungcad.models.contract import ModelContract, load_model, save_model
from lungcad.models.factory import create_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "iqothnccd"
LABELS = {"Normal": "normal", "Bengin": "benign", "Malignant": "malignant"}
ENGINES = ("torch", "onnx", "openvino")


def synthetic_run(root: Path, size: int, data: Path) -> Path:
    """Random-init run folder with real-image BatchNorm statistics and a calibration split."""
    pp = Preprocessing(image_size=size)
    files = sorted(data.rglob("*.jpg"))
    if len(files) < 96:
        sys.exit(f"need the IQ-OTH/NCCD images in {data}")
    picks = [files[i] for i in np.linspace(0, len(files) - 1, 96).round().astype(int)]
    torch.manual_seed(0)
    model, _ = create_model(outputs=3)
    x = normalise(torch.stack([prepare(decode_image(p, "grey"), pp) for p in picks[:32]]), pp)
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    model.eval()
    run = root / "run"
    run.mkdir()
    with open(run / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "subset"])
        for i, p in enumerate(picks):
            w.writerow([str(p), LABELS[p.name.split()[0]], f"g{i}", "train" if i % 3 else "test"])
    (run / "config.json").write_text(json.dumps({"data": str(data)}))
    save_model(run, model, ModelContract(arch="resnet50", task="multiclass",
                                         classes=["normal", "benign", "malignant"], preprocessing=pp))
    return run


def throughput(run_fn, batch: np.ndarray, seconds: float) -> float:
    """Images per second over at least `seconds` (after two warm-up batches)."""
    for _ in range(2):
        run_fn(batch)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        run_fn(batch)
        n += 1
    return n * len(batch) / elapsed


def latency(engine, files: list[Path], pp: Preprocessing, repeats: int) -> tuple[float, float]:
    """p50, p95 in ms of decode + preprocess + infer for one JPEG at a time."""
    times = []
    for i in range(repeats + 3):
        path = files[i % len(files)]
        start = time.perf_counter()
        x = preprocess(decode_image(path, pp.colour), pp)[None].numpy()
        engine.run(x)
        if i >= 3:  # first calls warm caches and allocators
            times.append(1000 * (time.perf_counter() - start))
    q = statistics.quantiles(times, n=20)
    return statistics.median(times), q[18]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="trained run folder (default: random-init model)")
    ap.add_argument("--size", type=int, default=224, help="image size of the random-init model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0, help="minimum timing window per engine")
    ap.add_argument("--latency-repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--baseline-seconds", type=float, default=3.0,
                    help="timing window of each measured baseline (GEMM fp32/bf16, eager ResNet-50)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                    help="engines to measure (onnx and openvino need the exports: slower)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--data", type=Path, default=DATA, help="JPEGs for latency (and calibration)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory(prefix="bench-inference-")
    run = args.run or synthetic_run(Path(tmp.name), args.size, args.data)
    model, contract = load_model(run)
    pp = contract.preprocessing
    gflop = _machine.count_gflop(model.eval(), pp.image_size)
    print("measuring this machine (GEMM, eager ResNet-50) ...", flush=True)
    cap = _machine.measure(args.threads, pp.image_size, args.batch, args.baseline_seconds)
    print(cap.describe(), flush=True)
    results: dict = {"run": str(run), "image_size": pp.image_size, "batch": args.batch, "threads": args.threads,
                     "torch": torch.__version__, "gflop_per_image": round(gflop, 3), "machine": cap.to_dict(),
                     "throughput": {}, "latency_ms": {}, "load_s": {}}

    # exports (cached in the run folder, as make_engine does); timed separately from loading
    out_dir = Path(tmp.name) / "export" if args.run else None  # never write into a user's run folder
    paths = {}
    formats = [f for f in ("onnx", "openvino") if f in args.engines]
    if "openvino" in formats and "onnx" not in formats:
        formats.insert(0, "onnx")  # the OpenVINO models are converted from the ONNX exports
    for fmt in formats:
        for int8 in (False, True):
            target = (out_dir / default_export_path(run, fmt, int8).name) if out_dir else None
            start = time.perf_counter()
            if fmt == "openvino":  # the same graph as the ONNX export (and its INT8 calibration)
                res = onnx_to_openvino(paths[("onnx", int8)], target or default_export_path(run, fmt, int8))
            else:
                res = export_model(run, fmt, target, int8=int8, model=model, contract=contract, progress=False)
            paths[(fmt, int8)] = res.path
            if int8 and fmt == "onnx":
                results["int8_test_split"] = res.contract["export"]["int8"]["test_split"]
            print(f"export {fmt:8s} {'int8' if int8 else 'fp32'}: {time.perf_counter() - start:5.1f} s", flush=True)

    def load(kind: str, int8: bool = False):
        start = time.perf_counter()
        if kind == "torch":
            m, _ = load_model(run)  # includes reading + sha256-checking 94 MB of weights
            engine = TorchEngine(m)
        else:
            engine = make_engine(kind, run, contract=contract, int8=int8, path=paths[(kind, int8)],
                                 threads=args.threads)
        return engine, time.perf_counter() - start

    engines = {}
    for name, kind, int8 in [("torch", "torch", False), ("onnxruntime fp32", "onnx", False),
                             ("onnxruntime int8", "onnx", True), ("openvino fp32", "openvino", False),
                             ("openvino int8", "openvino", True)]:
        if kind == "torch" or kind in args.engines:
            engines[name], results["load_s"][name] = load(kind, int8)

    batch = torch.randn(args.batch, 3, pp.image_size, pp.image_size).numpy()
    eager = model.eval().to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def torch_eager(x):
        return eager(torch.from_numpy(x))

    runners = {"torch eager": torch_eager, "torch channels_last": engines["torch"].run}
    if not args.no_compile and "torch" in args.engines:
        try:
            cl = load_model(run)[0].to(memory_format=torch.channels_last)  # own copy: .to() is in place
            compiled = torch.compile(cl)

            @torch.inference_mode()
            def torch_compiled(x):
                return compiled(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

            start = time.perf_counter()
            torch_compiled(batch)
            print(f"torch.compile warm-up: {time.perf_counter() - start:.0f} s", flush=True)
            runners["torch.compile channels_last"] = torch_compiled
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            print(f"torch.compile unavailable: {first_line(exc, 120)}")
    runners.update({name: e.run for name, e in engines.items() if name != "torch"})

    print(f"\nbatch {args.batch} at {pp.image_size} px, {args.threads} threads ({gflop:.2f} GFLOP/img); "
          f"ratios to this run's fp32 GEMM ({cap.gemm_fp32_gflops:.0f} GFLOP/s"
          + (f", bf16 {cap.gemm_bf16_gflops:.0f}" if cap.gemm_bf16_gflops else "")
          + f") and plain eager PyTorch ({cap.eager_img_per_s:.1f} img/s):")
    for name, fn in runners.items():
        ips = throughput(fn, batch, args.seconds)
        r = _machine.ratios(ips * gflop, cap)
        results["throughput"][name] = {"img_per_s": round(ips, 2), **r}
        print(f"  {name:28s} {ips:6.1f} img/s  {_machine.format_ratios(r)}", flush=True)

    # a --fusion texture model adds its texture head after the engine (lungcad.models.fusion): its
    # features of the prepared uint8 images (scikit-image, one thread), whatever the engine
    from lungcad.evaluation.baselines import texture_features

    jpegs = sorted(args.data.rglob("*.jpg"))[::29][: args.batch]
    cache = torch.stack([prepare(decode_image(f, pp.colour), pp) for f in jpegs])
    ips = throughput(texture_features, cache, args.seconds)
    results["throughput"]["texture head (fusion)"] = {"img_per_s": round(ips, 2)}
    print(f"  {'texture head (fusion)':28s} {ips:6.1f} img/s  (added to an engine's time; one thread)", flush=True)

    files = sorted(args.data.rglob("*.jpg"))[::17][: args.latency_repeats] or sys.exit(f"no JPEGs in {args.data}")
    print("\nsingle image, decode + preprocess + infer (JPEG from disk):")
    for name, engine in engines.items():
        p50, p95 = latency(engine, files, pp, args.latency_repeats)
        results["latency_ms"][name] = {"p50": round(p50, 1), "p95": round(p95, 1)}
        print(f"  {name:28s} p50 {p50:6.1f} ms   p95 {p95:6.1f} ms", flush=True)

    print("\nmodel load (read + verify sha256 + build session):")
    for name, secs in results["load_s"].items():
        print(f"  {name:28s} {secs:5.2f} s")
    if "int8_test_split" in results:
        t = results["int8_test_split"]
        print(f"\nINT8 accuracy on the test split ({t['images']} images): {t['accuracy_fp32']:.3f} -> "
              f"{t['accuracy_int8']:.3f} ({t['accuracy_change_pp']:+.2f} pp), "
              f"labels agree {100 * t['label_agreement']:.1f} %"
              + ("" if args.run else "  [random-init model: not meaningful]"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
