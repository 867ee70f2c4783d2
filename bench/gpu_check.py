#!/usr/bin/env python
"""GPU check without Spark: model-only vs the inference runner (CPU decode and GPU decode), bf16.

For each architecture (default ViT-B-32 and ViT-B-16, random weights written as project
artifacts, 120 classes), on the same generated 640x480 JPEGs:

1. model only: the model on uint8 batches already on the device (normalisation included);
2. runner, CPU decode: Pillow decode + resize on `--workers` threads, uint8 pinned batches to the GPU;
3. runner, GPU decode: JPEGs decoded in batches by nvJPEG (torchvision.io.decode_jpeg) and resized
   on the device.

Each line reports images/s, the ratio to model-only and the mean GPU utilisation sampled by
nvidia-smi while it ran. Needs no pyspark; meant to finish in under 8 minutes on one H100/H200.
On a machine without CUDA it runs on the CPU (for a smoke test: --device cpu --arch tiny).

    python bench/gpu_check.py                              # on a GPU machine
    python bench/gpu_check.py --device cpu --arch tiny --images 64 --seconds 2

Logs go to stderr; the table to stdout; the last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_line  # noqa: E402
from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg, SampleCfg  # noqa: E402

log = logging.getLogger("bench.gpu_check")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["ViT-B-32", "ViT-B-16"], help="open_clip architectures, or tiny")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--images", type=int, default=2048, help="distinct JPEGs generated (default 2048)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode threads (default: cores)")
    p.add_argument("--seconds", type=float, default=20.0, help="each measurement runs at least this long")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    return p.parse_args(argv)


class GpuUtilisation:
    """Mean GPU utilisation (%) from nvidia-smi samples every 200 ms while the block runs; None without it."""

    def __enter__(self) -> GpuUtilisation:
        self.samples: list[float] = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_artifact(work: Path, arch: str) -> Path:
    from mumic_batch.model.artifact import create_untrained_artifact
    from mumic_batch.model.manifest import ClassEntry
    from mumic_batch.model.backbone import TINY_ARCH

    classes = [ClassEntry(f"class_{i:03d}", f"a photo with class {i}") for i in range(120)]
    out = work / f"model-{arch}"
    create_untrained_artifact(out, TINY_ARCH if arch == "tiny" else arch, classes, name="gpu-check",
                              version=arch, seed=0)
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(predictor, uint8_batch, seconds: float) -> tuple[float, float | None]:
    predictor.score_uint8(uint8_batch)  # warm-up (and compile)
    sync(predictor.device)
    images, started = 0, time.perf_counter()
    with GpuUtilisation() as util:
        while time.perf_counter() - started < seconds:
            predictor.score_uint8(uint8_batch)
            images += len(uint8_batch)
        sync(predictor.device)
    return images / (time.perf_counter() - started), util.mean


def runner_rate(predictor, frames: list[pa.RecordBatch], decode: str, args) -> tuple[float, float | None, dict]:
    from mumic_batch.inference.runner import Runner
    from mumic_batch.io.fetch import Fetcher

    infer = InferCfg(batch_size=args.batch_size, decode=decode, decode_workers=args.workers,
                     device=args.device, precision=args.precision)
    runner = Runner(predictor, Fetcher(FetchCfg(allowed_schemes=("file",))), DecodeCfg(), infer, args.workers)
    statuses: dict[str, int] = {}
    try:
        list(runner.run(iter(frames[:2])))  # warm-up: threads, pinned buffers, nvJPEG handles
        images, started = 0, time.perf_counter()
        with GpuUtilisation() as util:
            while time.perf_counter() - started < args.seconds:
                for out in runner.run(iter(frames)):
                    images += out.num_rows
                    for s in out.column("status").to_pylist():
                        statuses[s] = statuses.get(s, 0) + 1
        return images / (time.perf_counter() - started), util.mean, statuses
    finally:
        runner.close()


def check_arch(arch: str, work: Path, frames: list[pa.RecordBatch], args) -> list[dict]:
    import torch

    from mumic_batch.model.predictor import Predictor

    artifact = make_artifact(work, arch)
    predictor = Predictor.load(str(artifact), device=args.device, precision=args.precision,
                               compile_model=args.compile)
    size = predictor.spec.size
    batch = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8, device=predictor.device)
    rows = []
    ips, util = model_only(predictor, batch, args.seconds)
    rows.append({"arch": arch, "what": "model only (uint8 batch on the device)", "images_per_s": ips, "gpu_util": util})
    for decode in ("cpu", "gpu"):
        ips, util, statuses = runner_rate(predictor, frames, decode, args)
        rows.append({"arch": arch, "what": f"runner, {decode.upper()} decode", "images_per_s": ips,
                     "gpu_util": util, "statuses": statuses})
    model_ips = rows[0]["images_per_s"]
    for r in rows:
        r["ratio"] = r["images_per_s"] / model_ips
        log.info("%s %-40s %8.1f images/s  %.2fx  GPU %s%%", arch, r["what"], r["images_per_s"], r["ratio"],
                 None if r["gpu_util"] is None else round(r["gpu_util"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from mumic_batch.core.sample import generate_sample

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sample = generate_sample(SampleCfg(out_dir=str(work / "sample"), n_images=args.images, seed=0))
        table = pa.Table.from_pandas(sample.catalogue[["image_id", "uri"]], preserve_index=False)
        frames = table.to_batches(max_chunksize=256)
        log.info("%d JPEGs generated in %.0fs", args.images, time.perf_counter() - started)
        rows = [r for arch in args.arch for r in check_arch(arch, work, frames, args)]
    print(machine_line())
    print(f"{args.images} JPEGs 640x480, 120 classes, batch {args.batch_size}, {args.precision}, "
          f"{args.workers} decode threads{', compiled' if args.compile else ''}; total {time.perf_counter() - started:.0f}s")
    print()
    print("| arch | measurement | images/s | x model-only | mean GPU util |")
    print("|---|---|---|---|---|")
    for r in rows:
        util = "n/a" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}%"
        print(f"| {r['arch']} | {r['what']} | {r['images_per_s']:.0f} | {r['ratio']:.2f} | {util} |")
    print(json.dumps({"bench": "gpu_check", "machine": machine_line(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
