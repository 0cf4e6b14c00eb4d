"""What this CPU can do, measured in the same run as a benchmark (shared by the benchmarks).

A hard-coded "peak" goes stale as soon as the benchmark runs elsewhere: on a CPU with AVX-512 and
AMX, engines that use them reported "219 % of peak" against an AVX2 figure. So nothing is assumed:

- `detect()` reads the instruction set from /proc/cpuinfo flags (avx2, avx512f, avx512_bf16,
  amx_bf16, amx_int8) and torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`),
  plus the CPU model name and core counts;
- `measure()` times, with the benchmark's thread count, a square GEMM (`torch.mm`, fp32, and bf16
  when the CPU has native bf16) and a plain PyTorch eager ResNet-50 forward pass (torchvision, fp32,
  contiguous, random weights) at the benchmark's image size and batch.

Benchmarks then report each throughput as ratios: achieved GFLOP/s / measured GEMM GFLOP/s (the
share of what this CPU's matrix units deliver on the easiest kernel, fp32; INT8 and bf16 engines can
exceed 1 against fp32) and / plain eager PyTorch (how much an engine or a training set-up gains
over the obvious baseline). Both are measured under the same load, so a busy machine shifts the
absolute numbers more than the ratios.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")

__all__ = ["ISA_FLAGS", "Capability", "count_gflop", "cpu_info", "detect", "format_ratios", "measure", "ratios"]


@dataclass
class Capability:
    """The machine and its measured throughput; `asdict()` goes into the benchmarks' JSON."""

    cpu: str
    logical_cpus: int
    physical_cores: int
    usable_cpus: int  # this process's CPU affinity
    isa: dict[str, bool]
    torch_capability: str  # the SIMD level torch dispatches to (DEFAULT, AVX2, AVX512, ...)
    torch: str
    threads: int
    load_average: float | None = None  # 1-minute load when measured: other work shares the cores
    gemm_size: int = 0
    gemm_fp32_gflops: float = 0.0
    gemm_bf16_gflops: float | None = None  # only with native bf16 (avx512_bf16 or amx_bf16)
    eager_image_size: int = 0
    eager_batch: int = 0
    eager_img_per_s: float = 0.0
    eager_gflop_per_img: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def eager_gflops(self) -> float:
        return self.eager_img_per_s * self.eager_gflop_per_img

    def describe(self) -> str:
        """Multi-line summary: detected CPU and instruction set, then the measured baselines."""
        isa = " ".join(k for k, v in self.isa.items() if v) or "none of " + "/".join(ISA_FLAGS)
        lines = [
            f"CPU: {self.cpu}; {self.physical_cores} cores / {self.logical_cpus} logical, {self.usable_cpus} usable; "
            f"{self.threads} threads",
            f"instruction set: {isa}; torch {self.torch} dispatches {self.torch_capability}"
            + (f"; load average {self.load_average:.2f}" if self.load_average is not None else ""),
            f"measured GEMM ({self.gemm_size}x{self.gemm_size} torch.mm): {self.gemm_fp32_gflops:.0f} GFLOP/s fp32"
            + (f", {self.gemm_bf16_gflops:.0f} GFLOP/s bf16" if self.gemm_bf16_gflops
               else ", bf16 not native: skipped"),
            f"plain PyTorch eager ResNet-50 fp32 ({self.eager_image_size} px, batch {self.eager_batch}): "
            f"{self.eager_img_per_s:.1f} img/s = {self.eager_gflops:.0f} GFLOP/s "
            f"({self.eager_gflops / self.gemm_fp32_gflops:.2f} of fp32 GEMM)",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eager_gflops"] = round(self.eager_gflops, 1)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Capability:
        """Back from to_dict() (e.g. measured in a benchmark's child process)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """Model name, flags and physical core count from /proc/cpuinfo (Linux); best effort elsewhere."""
    model, flags, cores = "", set(), set()
    physical = core = None
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:  # x86 / arm64
                    flags = set(value.split())
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and physical is not None:  # blank line: end of one processor's block
                    cores.add((physical, core))
                    physical = core = None
        if physical is not None:
            cores.add((physical, core))
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "flags": flags,
            "physical_cores": len(cores) or os.cpu_count() or 1}


def detect(threads: int | None = None) -> Capability:
    """The CPU and its instruction set, without measuring anything."""
    import torch

    info = cpu_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return Capability(
        cpu=info["model"], logical_cpus=os.cpu_count() or 1, physical_cores=info["physical_cores"],
        usable_cpus=usable, isa={flag: flag in info["flags"] for flag in ISA_FLAGS},
        torch_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
        threads=threads or torch.get_num_threads(), load_average=load,
    )


def _timed(fn, seconds: float, min_runs: int = 3) -> tuple[int, float]:
    """(runs, elapsed) of `fn` repeated for at least `seconds` and `min_runs`, after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < min_runs:
        fn()
        n += 1
    return n, elapsed


def gemm_gflops(n: int, dtype, seconds: float) -> float:
    """GFLOP/s of an n x n x n torch.mm (2 n^3 FLOP) in the current thread setting."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        runs, elapsed = _timed(lambda: torch.mm(a, b, out=out), seconds)
    return 2 * n**3 * runs / elapsed / 1e9


def count_gflop(model, image_size: int) -> float:
    """Forward GFLOP per image (torch.utils.flop_counter: multiply-add = 2 FLOP), counted, not assumed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def measure(threads: int, image_size: int, batch: int, seconds: float = 3.0, gemm_size: int = 2048) -> Capability:
    """detect() plus the GEMM and eager ResNet-50 baselines, each timed for about `seconds`."""
    import torch
    import torchvision

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cap = detect(threads)
        cap.gemm_size = gemm_size
        cap.gemm_fp32_gflops = gemm_gflops(gemm_size, torch.float32, seconds)
        if cap.isa["avx512_bf16"] or cap.isa["amx_bf16"]:
            cap.gemm_bf16_gflops = gemm_gflops(gemm_size, torch.bfloat16, seconds)
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None, num_classes=3).eval()
        cap.eager_gflop_per_img = count_gflop(model, image_size)
        x = torch.randn(batch, 3, image_size, image_size)
        with torch.inference_mode():
            runs, elapsed = _timed(lambda: model(x), seconds)
        cap.eager_image_size, cap.eager_batch = image_size, batch
        cap.eager_img_per_s = runs * batch / elapsed
        if cap.load_average is not None and cap.load_average > 0.5 * cap.usable_cpus:
            cap.notes.append(f"the machine was busy (load {cap.load_average:.1f} on {cap.usable_cpus} CPUs): "
                             "absolute figures are low, ratios are from the same conditions")
        return cap
    finally:
        torch.set_num_threads(previous)


def ratios(gflops: float, cap: Capability) -> dict:
    """An achieved GFLOP/s as fractions of the measured GEMMs and as a multiple of eager PyTorch."""
    out = {"gflops": round(gflops, 1), "of_gemm_fp32": round(gflops / cap.gemm_fp32_gflops, 3),
           "vs_eager": round(gflops / cap.eager_gflops, 3)}
    if cap.gemm_bf16_gflops:
        out["of_gemm_bf16"] = round(gflops / cap.gemm_bf16_gflops, 3)
    return out


def format_ratios(r: dict) -> str:
    """'123 GFLOP/s  0.62 of fp32 GEMM (0.15 of bf16)  1.20x eager' for one result of ratios()."""
    bf16 = f" ({r['of_gemm_bf16']:.2f} of bf16)" if "of_gemm_bf16" in r else ""
    return f"{r['gflops']:6.0f} GFLOP/s  {r['of_gemm_fp32']:5.2f} of fp32 GEMM{bf16}  {r['vs_eager']:5.2f}x eager"
