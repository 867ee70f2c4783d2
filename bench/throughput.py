#!/usr/bin/env python
"""Throughput side by side, one run, same machine, images and model (MISSION.md speed gate).

Measures, in this order, on one generated sample catalogue and one model artifact:

1. model only: Predictor.predict over preprocessed pixel batches already in memory;
2. decode ceiling: fetch+decode+preprocess alone on the runner's thread pool, and the
   Runner with a null model (what the runner could do if the model cost nothing);
3. runner: the inference Runner over the catalogue URIs (fetch+decode+preprocess+model), no Spark;
4. Spark: `python -m jobs.tag_images --full` in a subprocess into scratch tables, once per
   variant (`baseline` plus any --spark-variant), reporting the job's own images_per_s (scoring
   stage) and the whole-run wall time (interpreter and session start, selection, scoring, MERGE).

Everything is written under a temporary directory, never into the repository's data/. Logs go to
stderr; the table goes to stdout and the last stdout line is the whole result as JSON.

    python bench/throughput.py --images 600 --arch tiny
    python bench/throughput.py --images 96 --arch ViT-B-32 --spark-variant 'p2:tag.partitions=2'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/throughput.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

from bench.machine import cpu_model, ram_gib  # noqa: E402
from mumic_batch.config import InitModelCfg, JobCfg, SampleCfg, load_config  # noqa: E402
from mumic_batch.core import status as st  # noqa: E402

log = logging.getLogger("bench.throughput")

GATE_RATIO = 0.9  # MISSION.md: end-to-end Spark >= 90% of model-only throughput
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# Log lines of jobs/tag_images.py that end each phase of a run (a missing one leaves its phase unknown).
_PHASE_ENDS = (
    ("session_start", "spark session ready"),
    ("selection", " to process (selected by "),  # includes writing the worklist
    ("scoring_and_stats", " status counts "),
    ("merge", " merged "),
    ("runs_row", " recorded in "),
)


# --------------------------------------------------------------------------------------------- args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="sample images to generate (default 600)")
    p.add_argument("--arch", default="tiny", help="'tiny' or an open_clip architecture, e.g. ViT-B-32 (random init)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: infer.batch_size)")
    p.add_argument("--threads", type=int, help="fetch/decode threads per engine (default: fetch.threads)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads in this process (default: torch's)")
    p.add_argument("--device", help="cpu | cuda | auto (default: infer.device)")
    p.add_argument("--frame-rows", type=int, help="rows per frame fed to the engine (default: spark.arrow_batch_rows)")
    p.add_argument("--width", type=int, default=SampleCfg.width, help="sample image width")
    p.add_argument("--height", type=int, default=SampleCfg.height, help="sample image height")
    p.add_argument("--seed", type=int, default=0, help="sample and model seed")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="repeat the in-process phases (model, decode, engine) until each ran this long")
    p.add_argument("--catalogue-files", type=int, help="parquet files in the catalogue (default: Spark cores)")
    p.add_argument("--config", default=str(REPO / "conf" / "local.yaml"), help="job config the settings start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every phase and the Spark job (repeatable)")
    p.add_argument("--skip-spark", action="store_true", help="measure model, decode and engine only")
    p.add_argument("--spark-variant", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                   help="an extra Spark run with these overrides on top (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="run only the --spark-variant runs")
    p.add_argument("--marginal-images", type=int, default=0,
                   help="also run the baseline job on the first K images; the difference of the two runs is "
                        "Spark's marginal rate without per-run fixed costs (needs a quiet machine; default 0: off)")
    p.add_argument("--clip-retrieval", metavar="PEER_PYTHON", nargs="?", const="/work/cr-venv/bin/python",
                   help="also run clip-retrieval's inference on the same images and weights with this Python "
                        "(bench/clip_retrieval_peer.py --setup makes one; default path /work/cr-venv/bin/python)")
    p.add_argument("--work-dir", help="scratch directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a.b=1;c.d=2' -> ('name', ['a.b=1', 'c.d=2'])."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--spark-variant {text!r} must look like NAME:KEY=VALUE[;KEY=VALUE]")
    return name, [item.strip() for item in rest.split(";") if item.strip()]


# ------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    """One measured line of the table."""

    name: str
    images: int
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ips(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def timed_passes(run_once: Callable[[], int], min_seconds: float) -> tuple[int, float, int]:
    """Call run_once (returns images done) until min_seconds passed; (images, seconds, passes)."""
    images, passes, start = 0, 0, time.perf_counter()
    while True:
        images += run_once()
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images, elapsed, passes


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the Spark job and its workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def observed(measure: Callable[[], Result], count_cpu: bool = True) -> Result:
    """Run one measurement and add what the machine did meanwhile: our CPU use and the load average.

    CPU use is left out for the Spark job (count_cpu=False): its JVM and Python workers are not
    waited-for children of this process, so getrusage would not see them.
    """
    cpu0 = cpu_seconds()
    result = measure()
    if count_cpu:
        used = cpu_seconds() - cpu0
        result.detail["cpu_s"] = round(used, 2)
        result.detail["cores_used"] = round(used / result.seconds, 2) if result.seconds else None
    result.detail["load_1m"] = round(os.getloadavg()[0], 2)
    return result


# ------------------------------------------------------------------------------------------ machine


def machine_info(device: str) -> dict[str, Any]:
    import PIL
    import pyspark
    import torch
    from PIL import features

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyspark": pyspark.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "device": device,
        "gpu": gpu,
    }


def spark_cores(master: str) -> int:
    """Task slots of a local master: local -> 1, local[N] -> N, local[*] -> all cores."""
    m = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\d+)?\])?", master.strip())
    if m is None or m.group(1) == "*":
        return os.cpu_count() or 1
    return int(m.group(1)) if m.group(1) else 1


def spark_worker_torch_threads(cfg: JobCfg) -> int:
    """Spark starts Python workers with OMP_NUM_THREADS=spark.task.cpus unless executorEnv sets it."""
    conf = cfg.spark.conf
    return int(conf.get("spark.executorEnv.OMP_NUM_THREADS", conf.get("spark.task.cpus", "1")))


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """What every phase shares: the catalogue, its images and the model artifact."""

    work: Path
    catalogue: pd.DataFrame  # image_id, uri, updated_at
    catalogue_path: Path
    image_dir: Path
    artifact: Path


def make_catalogue(work: Path, n: int, width: int, height: int, seed: int,
                   files: int) -> tuple[pd.DataFrame, Path, Path]:
    """Generate the sample JPEGs and write the catalogue as `files` parquet files."""
    from mumic_batch.core.sample import generate_sample

    started = time.perf_counter()
    sample = generate_sample(SampleCfg(out_dir=str(work / "sample"), n_images=n, seed=seed, width=width, height=height))
    out = write_parquet(sample.catalogue, work / "sample" / "catalogue", files)
    log.info("catalogue: %d images %dx%d in %.1fs, %d parquet files", n, width, height,
             time.perf_counter() - started, files)
    return sample.catalogue, out, sample.image_dir


def write_parquet(frame: pd.DataFrame, out: Path, files: int) -> Path:
    """`frame` as `files` parquet files under `out` (microsecond timestamps: Spark refuses nanoseconds)."""
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), max(1, files))):
        table = pa.Table.from_pandas(frame.iloc[part].reset_index(drop=True), preserve_index=False)
        pq.write_table(table, out / f"part-{i:05d}.parquet", coerce_timestamps="us")
    return out


def make_artifact(work: Path, arch: str, seed: int) -> Path:
    """A seeded random-init artifact of `arch` with the sample's classes (as jobs/init_model.py writes)."""
    from mumic_batch.pipeline import init_model

    started = time.perf_counter()
    out = work / "model"
    init_model.run(InitModelCfg(name="bench", version=f"bench-{arch}", architecture=arch, seed=seed), str(out))
    log.info("artifact %s written in %.1fs", arch, time.perf_counter() - started)
    return out


def bench_overrides(args: argparse.Namespace, inputs: Inputs) -> list[str]:
    """Overrides that point the job config at the scratch inputs and the benchmark's settings."""
    items = [
        f"tables.catalogue={inputs.catalogue_path}",
        "tables.catalogue_format=parquet",
        f"model.artifact={inputs.artifact}",
        "fetch.allowed_schemes=[file]",
        f"fetch.local_roots=[{inputs.image_dir}]",
    ]
    if args.threads is not None:
        items.append(f"fetch.threads={args.threads}")
    if args.batch_size is not None:
        items.append(f"infer.batch_size={args.batch_size}")
    if args.device is not None:
        items.append(f"infer.device={args.device}")
    return items + list(args.overrides)


# ---------------------------------------------------------------------------------- in-process runs


class NullPredictor:
    """The runner's model interface at ~zero model cost: runner throughput is then the decode ceiling."""

    def __init__(self, real: Any) -> None:
        import torch

        self.classes, self.spec, self.embed_dim, self.device = real.classes, real.spec, real.embed_dim, real.device
        self._probs = torch.zeros((4096, len(self.classes)), device=self.device)
        self._emb = torch.zeros((4096, self.embed_dim), device=self.device)

    def score_uint8(self, nhwc: Any) -> tuple[Any, Any]:
        return self._probs[:len(nhwc)], self._emb[:len(nhwc)]


def build_engine(predictor: Any, cfg: JobCfg) -> Any:
    from mumic_batch.inference.runner import Runner
    from mumic_batch.io.fetch import Fetcher

    return Runner(predictor, Fetcher(cfg.fetch), cfg.decode, cfg.infer, cfg.fetch.threads)


def load_pixels(engine: Any, uris: list[str]) -> np.ndarray:
    """Decode and preprocess every image once (on the runner's pool): the model-only input, normalised float32."""
    from mumic_batch.core.preprocess import normalise

    prepared = list(engine.pool.map(engine.preparer.prepare, uris))
    bad = [p.status for p in prepared if p.status != st.OK]
    if bad:
        raise RuntimeError(f"{len(bad)} sample images failed to prepare: {sorted(set(bad))}")
    return np.stack([normalise(p.pixels, engine.model.spec).transpose(2, 0, 1) for p in prepared])


def bench_model(predictor: Any, pixels: np.ndarray, batch_size: int, min_seconds: float) -> Result:
    """Predictor.predict over batches already in memory (on the device for a GPU)."""
    import torch

    batches = [torch.from_numpy(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    if predictor.device.type == "cuda":
        batches = [b.to(predictor.device) for b in batches]
    for batch in {tuple(b.shape): b for b in batches}.values():
        predictor.predict(batch)  # warm-up of every batch shape: allocator, oneDNN primitives, lazy init

    def once() -> int:
        for batch in batches:
            predictor.predict(batch)
        return len(pixels)

    images, seconds, passes = timed_passes(once, min_seconds)
    return Result("model only (Predictor.predict, pixels in memory)", images, seconds,
                  {"passes": passes, "batches_per_pass": len(batches)})


def bench_prepare(engine: Any, uris: list[str], threads: int, min_seconds: float) -> Result:
    """fetch+decode+resize alone on the runner's thread pool: the CPU decode ceiling."""

    def once() -> int:
        for p in engine.pool.map(engine.preparer.prepare, uris):
            if p.status != st.OK:
                raise RuntimeError(f"prepare failed: {p.status} {p.error}")
        return len(uris)

    images, seconds, passes = timed_passes(once, min_seconds)
    return Result(f"fetch+decode+preprocess only ({threads} threads)", images, seconds,
                  {"passes": passes})


def frames_of(catalogue: pd.DataFrame, rows: int) -> list[pa.RecordBatch]:
    """The catalogue in Arrow frames of `rows`, with the columns the Spark UDF receives."""
    frame = catalogue.rename(columns={"updated_at": "source_updated_at"})[["image_id", "uri", "source_updated_at"]]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table.to_batches(max_chunksize=rows)


def bench_engine(name: str, engine: Any, catalogue: pd.DataFrame, rows: int, min_seconds: float) -> Result:
    """Runner.run over the catalogue; stage sums come from the output's timing columns."""
    import pyarrow.compute as pc

    sums = {"fetch_s": 0.0, "decode_preprocess_s": 0.0, "infer_s": 0.0}
    statuses: dict[str, int] = {}
    frames = frames_of(catalogue, rows)

    def once() -> int:
        n = 0
        for out in engine.run(iter(frames)):
            n += out.num_rows
            sums["fetch_s"] += pc.sum(out.column("fetch_ms")).as_py() / 1000.0
            sums["decode_preprocess_s"] += pc.sum(out.column("decode_ms")).as_py() / 1000.0
            sums["infer_s"] += (pc.sum(out.column("infer_ms")).as_py() or 0.0) / 1000.0
            for key, count in zip(*np.unique(out.column("status").to_numpy(zero_copy_only=False), return_counts=True)):
                statuses[str(key)] = statuses.get(str(key), 0) + int(count)
        return n

    images, seconds, passes = timed_passes(once, min_seconds)
    detail = {k: round(v, 3) for k, v in sums.items()}
    detail.update(passes=passes, frame_rows=rows, status_counts=statuses,
                  model_busy=round(sums["infer_s"] / seconds, 3) if seconds else None)
    return Result(name, images, seconds, detail)


def thread_candidates(args: argparse.Namespace) -> list[int]:
    """torch thread counts to try for model-only: --torch-threads, else 1 and every core."""
    if args.torch_threads:
        return [args.torch_threads]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, cores})


def best_model(predictor: Any, pixels: np.ndarray, batch_size: int, args: argparse.Namespace) -> list[Result]:
    """Model-only at each torch thread count; the fastest first (it is the gate's denominator), and kept set."""
    import torch

    runs = []
    for threads in thread_candidates(args):
        torch.set_num_threads(threads)
        result = observed(lambda: bench_model(predictor, pixels, batch_size, args.min_seconds))
        result.name = f"model only, torch {threads} thread(s)"
        result.detail["torch_threads"] = threads
        runs.append(result)
    runs.sort(key=lambda r: r.ips, reverse=True)
    torch.set_num_threads(runs[0].detail["torch_threads"])
    runs[0].name = f"model only (Predictor.predict, in memory, torch {runs[0].detail['torch_threads']} thr)"
    runs[0].detail["denominator"] = True
    return runs


def model_again(predictor: Any, pixels: np.ndarray, batch_size: int, args: argparse.Namespace) -> Result:
    """Model-only once more after the Spark runs, to see how much the machine's speed drifted meanwhile."""
    import torch

    result = observed(lambda: bench_model(predictor, pixels, batch_size, args.min_seconds))
    result.name = f"model only, again after the Spark runs (torch {torch.get_num_threads()} thr)"
    result.detail.update(torch_threads=torch.get_num_threads(), denominator=True)
    return result


def model_rate(results: list[Result]) -> float:
    """The gate's denominator: the best model-only rate measured (before or after Spark), the strict choice."""
    return max(r.ips for r in results if r.detail.get("denominator"))


def in_process(args: argparse.Namespace, cfg: JobCfg, inputs: Inputs
               ) -> tuple[list[Result], dict[str, Any], Callable[[], Result]]:
    """Model-only, decode ceiling and engine results, plus the settings they ran with."""
    import torch

    from mumic_batch.model.predictor import Predictor

    started = time.perf_counter()
    predictor = Predictor.load(str(inputs.artifact), device=cfg.infer.device, precision=cfg.infer.precision)
    load_s = time.perf_counter() - started
    engine = build_engine(predictor, cfg)
    null_engine = build_engine(NullPredictor(predictor), cfg)
    uris = inputs.catalogue["uri"].tolist()
    rows = args.frame_rows or cfg.spark.arrow_batch_rows
    try:
        pixels = load_pixels(engine, uris)
        log.info("pixels in memory: %s float32 (%.0f MiB)", list(pixels.shape), pixels.nbytes / 2**20)
        models = best_model(predictor, pixels, cfg.infer.batch_size, args)
        results = [*models, observed(lambda: bench_prepare(engine, uris, cfg.fetch.threads, args.min_seconds))]
        results.append(observed(lambda: bench_engine("runner, null model (decode ceiling)", null_engine,
                                                     inputs.catalogue, rows, args.min_seconds)))
        results.append(observed(lambda: bench_engine("runner (fetch+decode+preprocess+model)", engine,
                                                     inputs.catalogue, rows, args.min_seconds)))
    finally:
        engine.close()
        null_engine.close()
    settings = {
        "model_load_s": round(load_s, 2),
        "image_size": predictor.spec.size,
        "embed_dim": predictor.embed_dim,
        "classes": len(predictor.classes),
        "params_m": round(sum(p.numel() for p in predictor.model.parameters()) / 1e6, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_tried": thread_candidates(args),
        "frame_rows": rows,
        "device": str(predictor.device),
    }
    for r in results:
        log.info("%-60s %8.1f images/s", r.name, r.ips)
    return results, settings, lambda: model_again(predictor, pixels, cfg.infer.batch_size, args)


# ------------------------------------------------------------------------------------------- spark


def event_log(out: Path) -> tuple[list[str], Path]:
    """Overrides that turn on an uncompressed event log (task counts) in out/spark-events, and that directory.

    Passed as Spark settings (--set), so the job's own configuration stays the only Spark configuration.
    """
    events = out / "spark-events"
    events.mkdir(exist_ok=True)
    settings = {"enabled": "true", "dir": f"file://{events}", "compress": "false", "rolling.enabled": "false"}
    return [f"spark.conf.spark.eventLog.{key}={value}" for key, value in settings.items()], events


def run_spark(name: str, args: argparse.Namespace, inputs: Inputs, extra: list[str]) -> Result:
    """One `jobs.tag_images --full` subprocess into scratch tables; its summary, runs row and event log."""
    out = inputs.work / "spark" / name
    out.mkdir(parents=True, exist_ok=True)
    logging_sets, events = event_log(out)
    sets = bench_overrides(args, inputs) + logging_sets + [
        f"tables.predictions={out / 'predictions'}", f"tables.runs={out / 'runs'}", f"tables.metrics={out / 'metrics'}",
    ] + extra
    cmd = [sys.executable, "-m", "jobs.tag_images", "--config", str(Path(args.config).resolve()), "--full"]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log.info("spark run %s: %s", name, " ".join(cmd[1:4] + ["..."] + extra))
    started_wall, started = datetime.now(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "job.stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        log.error("spark run %s failed (rc %d); stderr tail:\n%s", name, proc.returncode, proc.stderr[-4000:])
        raise RuntimeError(f"spark run {name} failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return spark_result(name, summary, read_delta_rows(out / "runs"), proc.stderr, started_wall, wall,
                        scoring_stage(events), extra)


def spark_result(name: str, summary: dict[str, Any], runs: list[dict[str, Any]], stderr: str,
                 started_wall: datetime, wall: float, stage: dict[str, Any], extra: list[str]) -> Result:
    stages = as_dict(runs[-1]["stage_seconds"]) if runs else {}
    score_wall = stages.get("score_wall", float("nan"))
    detail = {
        "overrides": extra,
        "job_images_per_s": summary.get("images_per_s"),
        "score_wall_s": round(score_wall, 2),
        "merge_s": round(stages.get("write", float("nan")), 2),
        "session_start_s": phase_seconds(stderr, started_wall, wall)["session_start"],
        "phases_s": phase_seconds(stderr, started_wall, wall),
        "total_wall_s": round(wall, 2),
        "worker_fetch_s": round(stages.get("fetch", 0.0), 2),
        "worker_decode_preprocess_s": round(stages.get("decode", 0.0), 2),
        "worker_infer_s": round(stages.get("infer", 0.0), 2),
        "status_counts": summary.get("status_counts"),
        "scoring_stage": stage,
    }
    return Result(f"spark [{name}]", int(summary.get("processed") or 0), score_wall, detail)


def as_dict(value: Any) -> dict[str, Any]:
    """pyarrow reads a map column as a list of (key, value) pairs."""
    return dict(value) if value is not None else {}


def read_delta_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a small append-only Delta table, read from its log's add actions (no Spark needed)."""
    files: list[str] = []
    for log_file in sorted((path / "_delta_log").glob("*.json")):
        for line in log_file.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                files.append(action["add"]["path"])
    rows: list[dict[str, Any]] = []
    for name in files:
        rows += pq.read_table(path / name).to_pylist()
    return rows


def phase_seconds(stderr: str, started: datetime, wall: float) -> dict[str, float | None]:
    """Seconds of each phase of the job run, from the timestamps of its log lines; 'shutdown' is the rest."""
    ends: dict[str, float] = {}
    for line in stderr.splitlines():
        m = _LOG_TIME.match(line)
        if not m:
            continue
        for phase, marker in _PHASE_ENDS:
            if phase not in ends and marker in line:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                ends[phase] = (at - started).total_seconds()
    phases: dict[str, float | None] = {}
    previous: float | None = 0.0
    for phase, _ in _PHASE_ENDS:
        end = ends.get(phase)
        phases[phase] = round(end - previous, 2) if end is not None and previous is not None else None
        previous = end
    phases["shutdown"] = round(wall - previous, 2) if previous is not None else None
    return phases


def scoring_stage(events: Path) -> dict[str, Any]:
    """The longest stage of the run (the UDF's write): its task count, wall and busy task slots."""
    stages: dict[int, dict[str, Any]] = {}
    for path in events.iterdir():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            kind = event.get("Event")
            if kind == "SparkListenerTaskEnd":
                info = event["Task Info"]
                stage = stages.setdefault(event["Stage ID"], {"tasks": []})
                stage["tasks"].append((info["Finish Time"] - info["Launch Time"]) / 1000.0)
            elif kind == "SparkListenerStageCompleted":
                info = event["Stage Info"]
                stage = stages.setdefault(info["Stage ID"], {"tasks": []})
                stage["wall"] = (info.get("Completion Time", 0) - info.get("Submission Time", 0)) / 1000.0
    if not stages:
        return {}
    longest = max(stages.values(), key=lambda s: s.get("wall", 0.0))
    wall, tasks = longest.get("wall", 0.0), sorted(longest["tasks"], reverse=True)
    return {"tasks": len(tasks), "wall_s": round(wall, 2), "task_s": [round(t, 2) for t in tasks[:8]],
            "busy_slots": round(sum(tasks) / wall, 2) if wall else None}


# ------------------------------------------------------------------------------------------- report


def is_spark_run(result: Result) -> bool:
    return "total_wall_s" in result.detail


def ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def table(results: list[Result], model_ips: float) -> list[str]:
    """One line per measurement: images, seconds, images/s and the ratio to model-only."""
    head = (f"{'measurement':<58} {'images':>7} {'seconds':>9} {'images/s':>10} {'x model':>8} "
            f"{'cores':>6} {'load':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        cores, load = r.detail.get("cores_used") or float("nan"), r.detail.get("load_1m", float("nan"))
        lines.append(f"{r.name:<58} {r.images:>7d} {r.seconds:>9.2f} {r.ips:>10.1f} {ratio(r.ips, model_ips):>8.3f} "
                     f"{cores:>6.2f} {load:>5.1f}")
        if is_spark_run(r):
            d = r.detail
            wall_ips = r.images / d["total_wall_s"]
            label = "  same run, whole-job wall (start+select+score+MERGE)"
            lines.append(f"{label:<58} {r.images:>7d} {d['total_wall_s']:>9.2f} {wall_ips:>10.1f} "
                         f"{ratio(wall_ips, model_ips):>8.3f}")
    return lines


def breakdown(results: list[Result], model_ips: float) -> list[str]:
    """Where the time went, per engine and Spark run."""
    lines = []
    for r in results:
        d = r.detail
        if r.name.startswith("runner"):
            lines.append(f"{r.name}: wall {r.seconds:.2f}s over {d['passes']} pass(es); thread-seconds "
                         f"fetch {d['fetch_s']:.2f}, decode+preprocess {d['decode_preprocess_s']:.2f}; "
                         f"model {d['infer_s']:.2f}s (model busy {d['model_busy']:.0%} of wall)")
        elif is_spark_run(r):
            s = d["scoring_stage"]
            phases = ", ".join(f"{k} {v}" for k, v in d["phases_s"].items())
            inside = r.images / d["worker_infer_s"] if d["worker_infer_s"] else float("nan")
            lines.append(
                f"{r.name} {' '.join(d['overrides']) or '(config as is)'}: total {d['total_wall_s']:.1f}s, "
                f"phases (s): {phases}; of which scoring (staging write) {d['score_wall_s']:.1f}s, MERGE "
                f"{d['merge_s']:.1f}s; worker sums: fetch {d['worker_fetch_s']:.1f}s, decode+preprocess "
                f"{d['worker_decode_preprocess_s']:.1f}s, model {d['worker_infer_s']:.1f}s (model rate inside "
                f"Spark {inside:.1f} images/s = {ratio(inside, model_ips):.2f} x model); scoring stage "
                f"{s.get('tasks')} task(s), longest {s.get('task_s', [None])[0]}s, busy slots {s.get('busy_slots')}")
    return lines


def shared_bound(results: list[Result], device: str, cores: int) -> list[str]:
    """What end-to-end can reach at best given the model-only and decode-ceiling rates measured here."""
    model = model_rate(results)
    best = next(r for r in results if r.detail.get("denominator"))
    decode = next(r for r in results if r.name.startswith("runner, null model"))
    if not device.startswith("cpu"):
        return [bound_line("bound (model on the accelerator, decode on the CPU: min(model, decode))",
                           min(model, decode.ips), model)]
    serial = 1.0 / (1.0 / model + 1.0 / decode.ips)
    lines = [bound_line("bound if model and decode take turns on all cores: 1/(1/model+1/decode)", serial, model)]
    if "cpu_s" in best.detail and "cpu_s" in decode.detail:
        per_image = best.detail["cpu_s"] / best.images + decode.detail["cpu_s"] / decode.images
        by_cpu = min(model, decode.ips, cores / per_image)
        lines.append(bound_line(f"bound from CPU time: min(model, decode, {cores} cores / CPU s per image)", by_cpu,
                                model))
    return lines


def bound_line(label: str, value: float, model: float) -> str:
    return f"{label:<76} {value:>10.1f} {ratio(value, model):>8.3f}"


def gate(results: list[Result], model_ips: float) -> dict[str, Any]:
    """The MISSION speed gate on the baseline Spark run, on its scoring stage and on whole-job wall."""
    spark = [r for r in results if is_spark_run(r)]
    if not spark:
        return {"evaluated": False}
    base = spark[0]
    score = ratio(base.ips, model_ips)
    wall = ratio(base.images / base.detail["total_wall_s"], model_ips)
    verdict = {"evaluated": True, "run": base.name, "threshold": GATE_RATIO,
               "scoring_ratio": round(score, 3), "scoring_holds": score >= GATE_RATIO,
               "wall_ratio": round(wall, 3), "wall_holds": wall >= GATE_RATIO}
    for r in results:
        if r.name.startswith("marginal:"):
            value = ratio(r.ips, model_ips)
            # faster than the model alone is impossible: the two runs saw different machine speeds
            resolved = bool(np.isfinite(value)) and value <= 1.0
            verdict["marginal_ratio"] = round(value, 3)
            verdict["marginal_holds"] = value >= GATE_RATIO if resolved else None
            verdict["fixed_s"] = r.detail["fixed_s"] if resolved else None
    peer = next((r for r in results if r.name.startswith("clip-retrieval inference, whole")), None)
    if peer is not None:
        job = base.images / base.detail["total_wall_s"]
        verdict.update(peer_whole_ips=round(peer.ips, 2), job_whole_ips=round(job, 2),
                       job_vs_peer=round(ratio(job, peer.ips), 3), beats_peer=job >= peer.ips)
    return verdict


def print_report(machine: dict[str, Any], settings: dict[str, Any], results: list[Result]) -> dict[str, Any]:
    model_ips = model_rate(results)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
          f"torch {machine['torch']}, pyspark {machine['pyspark']}, Pillow {machine['pillow']} "
          f"(libjpeg-turbo {machine['libjpeg_turbo']}), device {settings['device']}"
          + (f" ({machine['gpu']})" if machine["gpu"] else ""))
    print(f"workload: {settings['images']} JPEGs {settings['image_width']}x{settings['image_height']}, model "
          f"{settings['arch']} ({settings['params_m']}M params, input {settings['image_size']}px), batch "
          f"{settings['batch_size']}, frame rows {settings['frame_rows']}")
    print(f"threads: torch {settings['torch_threads']} in this process (best of {settings['torch_threads_tried']} "
          f"for model-only, also used by the engine); fetch/decode {settings['fetch_threads']} "
          f"per engine; Spark {settings['spark_master']} with torch {settings['spark_worker_torch_threads']} "
          f"per Python worker (OMP_NUM_THREADS)")
    print("columns: x model = images/s divided by the best model-only images/s (before or after Spark); cores = "
          "CPU seconds used by the benchmark and its children / wall seconds; load = 1-minute load average after "
          "the measurement")
    print()
    for line in table(results, model_ips):
        print(line)
    for line in shared_bound(results, settings["device"], machine["cores"]):
        print(line)
    print()
    for line in breakdown(results, model_ips):
        print(line)
    verdict = gate(results, model_ips)
    if verdict["evaluated"]:
        print(f"\ngate (Spark >= {GATE_RATIO:.0%} of model-only, {verdict['run']}): scoring stage "
              f"{verdict['scoring_ratio']:.1%} -> {'HOLDS' if verdict['scoring_holds'] else 'FAILS'}; "
              f"whole-job wall {verdict['wall_ratio']:.1%} -> {'HOLDS' if verdict['wall_holds'] else 'FAILS'}"
              + marginal_text(verdict))
    if "beats_peer" in verdict:
        print(f"whole job {verdict['job_whole_ips']} images/s vs clip-retrieval's whole command "
              f"{verdict['peer_whole_ips']} images/s: {verdict['job_vs_peer']:.2f}x -> "
              f"{'AT LEAST THE PEER' if verdict['beats_peer'] else 'SLOWER THAN THE PEER'}")
    return verdict


def marginal_text(verdict: dict[str, Any]) -> str:
    if "marginal_ratio" not in verdict:
        return ""
    if verdict["marginal_holds"] is None:
        return f"; marginal rate {verdict['marginal_ratio']:.1%} -> UNRESOLVED (machine speed changed between runs)"
    return (f"; marginal rate {verdict['marginal_ratio']:.1%} -> {'HOLDS' if verdict['marginal_holds'] else 'FAILS'}"
            f" (per-run fixed cost of the scoring stage {verdict['fixed_s']}s)")


def to_json(machine: dict[str, Any], settings: dict[str, Any], results: list[Result], verdict: dict[str, Any]) -> str:
    model_ips = model_rate(results)
    rows = [{**asdict(r), "images_per_s": round(r.ips, 2), "ratio_to_model": round(ratio(r.ips, model_ips), 4)}
            for r in results]
    data = {"bench": "throughput", "machine": machine, "settings": settings, "results": rows, "gate": verdict}
    return json.dumps(finite(data), default=str)


def finite(value: Any) -> Any:
    """NaN and infinities become null, so the line is strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- main


def settings_of(args: argparse.Namespace, cfg: JobCfg, measured: dict[str, Any]) -> dict[str, Any]:
    return {
        "arch": args.arch, "images": args.images, "image_width": args.width, "image_height": args.height,
        "batch_size": cfg.infer.batch_size, "fetch_threads": cfg.fetch.threads, "precision": cfg.infer.precision,
        "spark_master": cfg.spark.master, "spark_arrow_batch_rows": cfg.spark.arrow_batch_rows,
        "tag_partitions": cfg.tag.partitions, "spark_worker_torch_threads": spark_worker_torch_threads(cfg),
        "catalogue_files": args.catalogue_files or spark_cores(cfg.spark.master), **measured,
    }


def prepare_inputs(args: argparse.Namespace, work: Path) -> Inputs:
    files = args.catalogue_files or spark_cores(load_config(args.config, args.overrides).spark.master)
    frame, path, image_dir = make_catalogue(work, args.images, args.width, args.height, args.seed, files)
    return Inputs(work, frame, path, image_dir, make_artifact(work, args.arch, args.seed))


def spark_variants(args: argparse.Namespace, inputs: Inputs) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every Spark run: baseline, its small twin for the marginal rate, the variants."""
    runs = [] if args.no_baseline else [("baseline", [])]
    small = args.marginal_images
    if runs and 0 < small < args.images:
        path = write_parquet(inputs.catalogue.iloc[:small], inputs.work / "sample" / "catalogue-small",
                             args.catalogue_files or 1)
        runs.append(("baseline-small", [f"tables.catalogue={path}"]))
    return runs + [parse_variant(v) for v in args.spark_variant]


def clip_retrieval(args: argparse.Namespace, inputs: Inputs) -> list[Result]:
    """The peer on the same images and weights: its whole command, and its steady loop (its own stats)."""
    from bench.clip_retrieval_peer import measure

    r = measure(inputs.image_dir, inputs.artifact, args.clip_retrieval, batch_size=args.batch_size or 32,
                num_workers=spark_cores(load_config(args.config, args.overrides).spark.master),
                work_dir=inputs.work / "clip-retrieval")
    detail = {"load_1m": round(os.getloadavg()[0], 2), "peer_version": r["peer_version"],
              "min_cosine_vs_ours": r.get("min_cosine_vs_ours"), "peer_batch_size": r["batch_size"],
              "peer_num_workers": r["num_workers"]}
    results = [Result("clip-retrieval inference, whole command (peer)", r["images"], r["wall_s"], dict(detail))]
    if r.get("steady_images_per_s"):
        results.append(Result("clip-retrieval inference, steady loop (peer)", r["images"],
                              r["images"] / r["steady_images_per_s"], dict(detail)))
    return results


def marginal(results: list[Result]) -> list[Result]:
    """Baseline minus its small twin: images/s of the extra images, i.e. without per-run fixed costs."""
    runs = {r.name: r for r in results}
    big, small = runs.get("spark [baseline]"), runs.get("spark [baseline-small]")
    if big is None or small is None:
        return []
    images, seconds = big.images - small.images, big.seconds - small.seconds
    if seconds <= 0:
        log.warning("marginal rate unresolved: the small run took as long as the full one (noise > signal; "
                    "use more images)")
    rate = images / seconds if seconds > 0 else float("nan")
    fixed = big.seconds - big.images / rate if seconds > 0 else float("nan")
    return [Result("marginal: spark [baseline] minus [baseline-small]", images, seconds,
                   {"fixed_s": round(fixed, 2), "load_1m": big.detail.get("load_1m")})]


def run(args: argparse.Namespace, work: Path) -> int:
    inputs = prepare_inputs(args, work)
    cfg = load_config(args.config, bench_overrides(args, inputs))
    results, measured, again = in_process(args, cfg, inputs)
    if not args.skip_spark:
        results += [observed(lambda: run_spark(name, args, inputs, extra), False)
                    for name, extra in spark_variants(args, inputs)]
        results += marginal(results)
        results.append(again())
    if args.clip_retrieval:
        results += clip_retrieval(args, inputs)
    machine = machine_info(measured["device"])
    settings = settings_of(args, cfg, measured)
    verdict = print_report(machine, settings, results)
    print(to_json(machine, settings, results, verdict), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mumic-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log.info("scratch directory %s", work)
    try:
        return run(args, work)
    finally:
        if args.keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
