"""Training-speed benchmark on this machine (not part of the test suite).

Measures, at 224 px with lungcad's own training step (model factory, fine-tuning strategy, frozen
BatchNorm, channels_last, optimizer), images/s for `--finetune fc`, `layer4` and `all`; the GFLOP/s
each achieves (FLOPs counted with torch.utils.flop_counter, not assumed) as a fraction of a GEMM
measured in the same run and as a multiple of a plain PyTorch eager ResNet-50 forward pass in the
same run (benchmarks/_machine.py, which also prints the CPU and its detected instruction set); the
peak resident memory of each configuration (own subprocess, VmHWM), and the data pipeline's
images/s (cached uint8 -> augmentation -> normalisation through the DataLoader used in training).

With `--jobs N`, each training configuration is also run as N processes at once, each with its
share of the cores, and their summed images/s is compared with the one-process figure of the same
run: what `lungcad train --folds K --jobs N` (fold members side by side) gains on this machine.
`--bf16` runs the steps under bf16 autocast, as `--amp auto` trains on CPUs with native bf16.

    python benchmarks/bench_train.py [--steps 6] [--only train:fc:adamw:32 ...] [--jobs 2] [--bf16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = [
    "train:fc:adamw:32", "train:layer4:adamw:16", "train:layer4:adamw:32",
    "train:all:sgd:16", "train:all:adamw:16", "train:all:adamw:32",
    "data:0", "data:1",
]


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_training_config(strategy: str, optimizer: str, batch: int, steps: int, size: int,
                        bf16: bool = False, compile_: bool = False) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lungcad.models.factory import configure_finetuning, create_model, set_train_mode

    torch.manual_seed(0)
    model, _ = create_model(outputs=3, pretrained="none")
    params = configure_finetuning(model, strategy)
    set_train_mode(model, True)
    model = model.to(memory_format=torch.channels_last)
    if strategy != "all":  # what the trainer runs: frozen stages folded, without autograd
        from lungcad.models.bn_folding import FrozenTrunkView

        model = FrozenTrunkView(model, strategy)
    opt = (torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    run = model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_fn(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_image = counter.get_total_flops() / batch
    compile_s = None
    if compile_:  # torch.compile (inductor); the first compiled step pays for the compilation
        run = torch.compile(model)
        t0 = time.perf_counter()
        step()
        compile_s = round(time.perf_counter() - t0, 1)
    step()  # warm-up: oneDNN primitive creation
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    ips = batch / median
    return {
        "what": f"train {strategy}{' bf16' if bf16 else ''}{' compiled' if compile_ else ''}", "optimizer": optimizer, "batch": batch, "image_size": size,
        "images_per_s": round(ips, 2), "gflop_per_image": round(flops_per_image / 1e9, 2),
        "peak_rss_mb": round(_vm_hwm_mb()), "step_times_s": [round(t, 3) for t in times],
        **({"compile_s": compile_s} if compile_ else {}),
    }


def run_data_pipeline(n: int, size: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from lungcad.data.dataset import CachedImageDataset
    from lungcad.data.transforms import Preprocessing, train_augmentation

    pp = Preprocessing(image_size=size)
    cache = torch.randint(0, 255, (n, 1, size, size), dtype=torch.uint8)
    ds = CachedImageDataset(cache, [0] * n, pp, train_augmentation(pp))
    loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch (worker start)
        pass
    t0 = time.perf_counter()
    seen = sum(len(x) for x, _ in loader)
    seconds = time.perf_counter() - t0
    return {"what": "data pipeline", "workers": workers, "image_size": size,
            "images_per_s": round(seen / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--baseline-seconds", type=float, default=3.0,
                    help="timing window of each measured baseline (GEMM fp32/bf16, eager ResNet-50 forward)")
    ap.add_argument("--only", nargs="+", choices=CONFIGS, metavar="CONFIG",
                    help=f"run only these configurations (default: all of {' '.join(CONFIGS)})")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--allocator", choices=["auto", "system"], default="auto",
                    help="auto: preload jemalloc like the lungcad command does")
    ap.add_argument("--jobs", type=int, default=1,
                    help="also run each training configuration as this many processes at once (cores shared)")
    ap.add_argument("--bf16", action="store_true", help="training steps under bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="training steps through torch.compile (inductor)")
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one configuration per process, so peak memory is its own
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        kind, *rest = args.child.split(":")
        if kind == "machine":  # the baselines, under the same allocator and threads as the configurations
            import torch

            import _machine

            result = _machine.measure(torch.get_num_threads(), args.size, 16, args.baseline_seconds).to_dict()
        elif kind == "train":
            strategy, optimizer, batch = rest
            result = run_training_config(strategy, optimizer, int(batch), args.steps, args.size, args.bf16,
                                         args.compile)
        else:
            result = run_data_pipeline(512, args.size, int(rest[0]))
        print(json.dumps(result))
        return
    configs = args.only or CONFIGS
    # Same process set-up as the `lungcad` command: jemalloc preloaded when installed (allocator.py)
    from lungcad.allocator import JEMALLOC_CONF, fast_allocator
    from lungcad.inference.engines import default_threads

    env = dict(os.environ)
    lib = None if args.allocator == "system" else fast_allocator()
    if lib:
        env["LD_PRELOAD"] = lib
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    print(f"allocator: {lib or 'system malloc'}; {args.size} px", flush=True)

    def command(cfg: str, threads: int = 0) -> list[str]:
        return [sys.executable, __file__, "--child", cfg, "--steps", str(args.steps), "--size", str(args.size),
                "--baseline-seconds", str(args.baseline_seconds), "--threads", str(threads),
                *(["--bf16"] if args.bf16 else []), *(["--compile"] if args.compile else [])]

    def result_of(cfg: str, returncode: int, stdout: str, stderr: str) -> dict | None:
        if returncode != 0:
            print(f"{cfg}: failed\n{stderr[-1500:]}", file=sys.stderr)
            return None
        return json.loads(stdout.strip().splitlines()[-1])

    def child(cfg: str) -> dict | None:
        out = subprocess.run(command(cfg), capture_output=True, text=True, env=env)
        return result_of(cfg, out.returncode, out.stdout, out.stderr)

    def side_by_side(cfg: str) -> list[dict] | None:
        threads = max(1, default_threads() // args.jobs)
        procs = [subprocess.Popen(command(cfg, threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for _ in range(args.jobs)]
        outs = [(p, *p.communicate()) for p in procs]
        results = [result_of(cfg, p.returncode, o, e) for p, o, e in outs]
        return None if None in results else results

    import _machine

    measured = child("machine")
    if measured is None:
        sys.exit("could not measure the machine's baselines")
    cap = _machine.Capability.from_dict(measured)
    print(cap.describe(), flush=True)
    print(f"training ratios: achieved GFLOP/s (forward + backward) to this run's fp32 GEMM and to the eager "
          f"forward pass ({cap.eager_gflops:.0f} GFLOP/s)", flush=True)
    results = []
    for cfg in configs:
        r = child(cfg)
        if r is None:
            continue
        if "gflop_per_image" in r:
            r.update(_machine.ratios(r["images_per_s"] * r["gflop_per_image"], cap))
        results.append(r)
        extra = (f"{r['gflop_per_image']:>6.1f} GFLOP/img  {_machine.format_ratios(r)}  "
                 f"peak RSS {r['peak_rss_mb']:>5} MB" if "gflop_per_image" in r else "")
        label = f"{r['what']} {r.get('optimizer', '')} b{r.get('batch', '')}" if "batch" in r else \
            f"{r['what']} workers={r['workers']}"
        print(f"{label:<34}{r['images_per_s']:>8.1f} img/s  {extra}", flush=True)
        if args.jobs > 1 and cfg.startswith("train"):
            side = side_by_side(cfg)
            if side:
                total = sum(x["images_per_s"] for x in side)
                r["side_by_side"] = {"jobs": args.jobs, "images_per_s": [x["images_per_s"] for x in side],
                                     "total_images_per_s": round(total, 2),
                                     "ratio_to_one_process": round(total / r["images_per_s"], 2)}
                print(f"{'  ' + str(args.jobs) + ' processes side by side':<34}{total:>8.1f} img/s  "
                      f"(sum of {', '.join(str(x['images_per_s']) for x in side)}; "
                      f"{total / r['images_per_s']:.2f}x one process)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": cap.to_dict(), "allocator": lib, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
