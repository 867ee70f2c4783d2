#!/usr/bin/env python
"""Benchmark peer: clip-retrieval's `inference` on a folder of JPEGs with our model's CLIP weights.

clip-retrieval (rom1504/clip-retrieval, PyPI `clip-retrieval`) is a benchmark peer, not a project
dependency: it lives in its own venv (default /work/cr-venv, made by `--setup`) that reuses this
venv's torch/torchvision/open_clip/numpy/pandas through a `.pth` file, so no second torch is
downloaded. This script runs under the project's venv and calls the peer through subprocess:

1. loads a mumic-batch artifact and writes its open_clip backbone (`model.backbone`) as a
   safetensors checkpoint that `open_clip.create_model_and_transforms(arch, pretrained=<file>)`
   loads strictly (the peer itself loads it that way; nothing is downloaded);
2. runs `python -m clip_retrieval.cli inference --input_format files --enable_text False
   --enable_metadata False --clip_model open_clip:<arch>/<absolute checkpoint path>` on the folder
   (all_clip splits the model string at the first "/": the rest, "/abs/path", is the pretrained
   file), output into the work dir;
3. reports the wall time of that whole command (interpreter start, imports, model load and
   warm-up, reading, inference, writing) and the steady-state rate from clip-retrieval's own
   stats file (`<output>/stats/0.json`: the summed per-batch durations from the first batch
   request to the last batch written, i.e. the same figure as its `sample_per_sec_no_initial_load`
   log line), plus its model-only rate (summed `inference_duration`).

Architectures: open_clip built-in names (e.g. ViT-B-32) go through the unmodified CLI. The
project's dict architectures ("tiny", "demo") have no open_clip name, and all_clip cannot take a
`local-dir:` model; for them the peer is started with `python -c` that first registers the config
with `open_clip.add_model_config` and then calls the same `clip_retrieval.cli.main()` with the same
arguments (reported as `invocation: "cli+registered_config"`). Their preprocessing is open_clip's
default for a built-in name (e.g. "shortest" resize instead of the demo config's "squash").

    .venv/bin/python bench/clip_retrieval_peer.py --setup           # once: creates /work/cr-venv
    .venv/bin/python bench/clip_retrieval_peer.py --images-dir /tmp/s/images --artifact /tmp/a \\
        --batch-size 64 --num-workers 2

Logs go to stderr; a table goes to stdout and the last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/clip_retrieval_peer.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.clip_retrieval_peer")

DEFAULT_PEER_VENV = Path("/work/cr-venv")
DEFAULT_PEER_PYTHON = DEFAULT_PEER_VENV / "bin" / "python"
PEER_VERSION = "2.45.0"
# Installed with --no-deps: their declared requirements pin torch/open_clip<3/numpy<2/pyarrow<16, which
# would pull a second torch or downgrade what the shared venv provides. Versions are the ones tested.
PEER_NO_DEPS = [f"clip-retrieval=={PEER_VERSION}", "all_clip==1.3.0", "clip-anytorch==2.6.0",
                "sentence-transformers==2.7.0"]
# What `import clip_retrieval.clip_inference.main` really imports that the project venv lacks: the package's
# __init__ imports clip_back (flask_restful, faiss, h5py, prometheus_client), the inference logger imports
# wandb, the mapper imports sentence_transformers (-> transformers), main/worker import fire and braceexpand.
# webdataset is only for --input_format webdataset. None of these pulls torch; the constraints file pins
# the shared packages to the project venv's versions so pip cannot replace them.
PEER_RESOLVED = ["fire==0.5.0", "braceexpand==0.1.7", "flask-restful==0.3.10", "faiss-cpu==1.15.1", "h5py==3.16.0",
                 "prometheus-client==0.26.0", "wandb==0.31.0", "transformers==4.57.6", "webdataset==0.2.111"]
SHARED = ["torch", "torchvision", "numpy", "pandas", "pyarrow", "open_clip_torch", "pillow"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}  # what clip-retrieval's folder_to_keys globs
# The peer must never reach the network (no weights download, no telemetry).
PEER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


# -------------------------------------------------------------------------------------------- setup


def setup_commands(venv: Path = DEFAULT_PEER_VENV) -> list[list[str]]:
    """The command sequence --setup runs (also printed, so it can be reproduced by hand)."""
    base = getattr(sys, "_base_executable", sys.executable)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    constraints = venv / "shared-constraints.txt"
    return [
        [base, "-m", "venv", str(venv)],
        ["# write", str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
                        / "mumic_shared.pth"), "<- " + sysconfig.get_paths()["purelib"]],
        ["# write", str(constraints), "<- " + " ".join(f"{p}=={md.version(p)}" for p in SHARED)],
        pip + ["--no-deps", *PEER_NO_DEPS],
        pip + ["-c", str(constraints), *PEER_RESOLVED],
        [str(venv / "bin" / "python"), "-c", "from clip_retrieval.clip_inference.main import main"],
    ]


def setup_peer(venv: Path = DEFAULT_PEER_VENV) -> None:
    """Create the peer venv: shared site-packages via .pth, clip-retrieval and its import-time deps."""
    if sys.prefix == sys.base_prefix:
        raise SystemExit("--setup must run under the project venv (.venv/bin/python): the peer shares its packages")
    for cmd in setup_commands(venv):
        print("$ " + " ".join(cmd), file=sys.stderr)
        if cmd[0] == "# write":
            path = Path(cmd[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".pth":
                path.write_text(sysconfig.get_paths()["purelib"] + "\n")
            else:
                path.write_text("".join(f"{p}=={md.version(p)}\n" for p in SHARED))
            continue
        subprocess.run(cmd, check=True, env={**os.environ, **PEER_ENV})
    print(f"peer venv ready: {venv / 'bin' / 'python'}", file=sys.stderr)


# ----------------------------------------------------------------------------------------- checkpoint


def export_checkpoint(artifact: str, out_dir: Path) -> dict[str, Any]:
    """Write the artifact's open_clip backbone as <out_dir>/<name>.safetensors; reuse it when already there.

    Returns arch (the name the peer is given), checkpoint, config_file (dict architectures only: an open_clip
    model-config JSON to register), manifest_arch and preprocess notes.
    """
    import torch
    from safetensors.torch import save_file

    from mumic_batch.io.storage import localize_dir
    from mumic_batch.model.artifact import load_artifact
    from mumic_batch.model.manifest import read_manifest

    manifest = read_manifest(localize_dir(str(artifact)))
    tag = manifest.weights_sha256[:12]
    arch = manifest.architecture
    info: dict[str, Any] = {"manifest_arch": arch if isinstance(arch, str) else "dict", "config_file": None}
    if isinstance(arch, str):
        name = arch
        if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
            raise SystemExit(f"architecture {arch!r}: only open_clip built-in names (or the project's dict "
                             "configs) can be given to all_clip")
    else:  # the project's own config dict: register it under a name of its own
        model_cfg = dict(arch["model_cfg"]) if "model_cfg" in arch else dict(arch)
        name = f"mumic-{hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]}"
        config_dir = out_dir / "open_clip_configs"
        config_dir.mkdir(parents=True, exist_ok=True)
        config_file = config_dir / f"{name}.json"
        config_file.write_text(json.dumps(model_cfg, indent=1))
        info["config_file"] = str(config_file)
    info["arch"] = name
    checkpoint = out_dir / f"open_clip-{name}-{tag}.safetensors"
    info["checkpoint"] = str(checkpoint)
    info["preprocess_note"] = _preprocess_note(manifest.preprocess)
    if checkpoint.is_file():
        log.info("reusing exported checkpoint %s", checkpoint)
        return info
    started = time.perf_counter()
    model, _ = load_artifact(str(artifact))
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.backbone.state_dict().items()}
    tmp = checkpoint.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, checkpoint)  # written as .tmp first: a killed export never leaves a half file behind
    log.info("exported %d backbone tensors of %s to %s in %.1fs", len(state), artifact, checkpoint,
             time.perf_counter() - started)
    return info


def _preprocess_note(preprocess: dict[str, Any]) -> str | None:
    """How the peer's preprocessing (open_clip's default for a name + file) differs from the artifact's, if at all."""
    from open_clip.transform import PreprocessCfg

    default = PreprocessCfg()
    diffs = []
    for key in ("mean", "std", "interpolation", "resize_mode"):
        ours, theirs = preprocess.get(key), getattr(default, key)
        if ours is not None and (tuple(ours) if isinstance(ours, list) else ours) != theirs:
            diffs.append(f"{key}: artifact {ours} vs peer {theirs}")
    return "; ".join(diffs) or None


# ------------------------------------------------------------------------------------------- the run


def count_images(images_dir: Path) -> int:
    return sum(1 for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def peer_command(peer_python: str, images_dir: Path, output: Path, info: dict[str, Any],
                 batch_size: int, num_workers: int) -> tuple[list[str], str]:
    """(argv, invocation): the plain CLI for open_clip names, CLI main() after add_model_config for dicts."""
    args = ["inference", "--input_dataset", str(images_dir), "--output_folder", str(output),
            "--input_format", "files", "--enable_text", "False", "--enable_image", "True",
            "--enable_metadata", "False", "--clip_model", f"open_clip:{info['arch']}/{info['checkpoint']}",
            "--use_jit", "False", "--batch_size", str(batch_size), "--num_prepro_workers", str(num_workers)]
    if info["config_file"] is None:
        return [peer_python, "-m", "clip_retrieval.cli", *args], "cli"
    boot = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
            "sys.argv[0] = 'clip-retrieval'; from clip_retrieval.cli import main; main()")
    return [peer_python, "-c", boot, info["config_file"], *args], "cli+registered_config"


def peer_version(peer_python: str) -> str:
    out = subprocess.run([peer_python, "-c", "import importlib.metadata as m; print(m.version('clip-retrieval'))"],
                         check=True, capture_output=True, text=True, env={**os.environ, **PEER_ENV})
    return out.stdout.strip()


def measure(images_dir: str | os.PathLike[str], artifact: str | os.PathLike[str],
            peer_python: str | os.PathLike[str] = DEFAULT_PEER_PYTHON, batch_size: int = 64, num_workers: int = 2,
            work_dir: str | os.PathLike[str] | None = None, verify: bool = True) -> dict[str, Any]:
    """Run clip-retrieval inference once on images_dir with the artifact's backbone; throughput as a dict.

    Keys: images, wall_s, images_per_s (end to end, whole command), steady_images_per_s (clip-retrieval's
    own stats: first batch request to last batch written; None if the stats file is missing),
    batch_size, num_workers, peer_version, plus model_images_per_s (summed inference_duration only),
    startup_s (wall_s minus the steady loop), warmup_s (all_clip's warm-up inside startup_s), stage sums, arch,
    invocation, device, preprocess_note and, with verify (after the timed run, not timed), min_cosine_vs_ours:
    the peer's embeddings of 4 images against our backbone's on the same pixels.
    """
    images_dir = Path(images_dir).resolve()
    peer_python = str(peer_python)
    if not Path(peer_python).is_file():
        raise FileNotFoundError(f"peer python {peer_python} not found: run this script with --setup first")
    n = count_images(images_dir)
    if n == 0:
        raise ValueError(f"no images ({'/'.join(sorted(IMAGE_SUFFIXES))}) under {images_dir}")
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="clip_retrieval_peer.")) if own_tmp else Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = export_checkpoint(str(artifact), work)
        version = peer_version(peer_python)
        output = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        cmd, invocation = peer_command(peer_python, images_dir, output, info, batch_size, num_workers)
        log.info("peer: %s", " ".join(cmd))
        log_file = work / f"{output.name}.log"
        started = time.perf_counter()
        with open(log_file, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **PEER_ENV},
                                  cwd=work)
        wall = time.perf_counter() - started
        peer_log = log_file.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(
                f"clip-retrieval inference exited {proc.returncode}; log {log_file}:\n{peer_log[-4000:]}")
        result = _collect(output, n, wall)
        result.update(batch_size=batch_size, num_workers=num_workers, peer_version=version, arch=info["arch"],
                      manifest_arch=info["manifest_arch"], invocation=invocation, device=_peer_device(peer_log),
                      preprocess_note=info["preprocess_note"], warmup_s=_warmup_s(peer_log), command=cmd,
                      log=str(log_file))
        if verify:
            result["min_cosine_vs_ours"] = verify_embeddings(str(artifact), output)
            log.info("peer embeddings vs our backbone on the same pixels: min cosine %.5f",
                     result["min_cosine_vs_ours"])
        return result
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _warmup_s(peer_log: str) -> float | None:
    for line in peer_log.splitlines():  # all_clip: "done warming up in Xs" (2 x encode_image+encode_text of a batch)
        if line.startswith("done warming up in "):
            try:
                return round(float(line[len("done warming up in "):].rstrip("s")), 2)
            except ValueError:
                return None
    return None


def verify_embeddings(artifact: str, output: Path, k: int = 4) -> float:
    """Min cosine between the peer's stored (fp16) embeddings of k images and our backbone's on the same pixels.

    The pixels use the peer's preprocessing (open_clip's transform for the checkpoint's config), so a value near
    1 shows the peer ran exactly our weights.
    """
    import numpy as np
    import open_clip
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from mumic_batch.model.artifact import load_artifact

    paths = pq.read_table(sorted((output / "metadata").glob("*.parquet"))[0]).column("image_path").to_pylist()[:k]
    peer = np.load(sorted((output / "img_emb").glob("img_emb_*.npy"))[0])[: len(paths)].astype(np.float32)
    model, _ = load_artifact(artifact)
    backbone = model.backbone.eval()
    cfg = dataclasses.replace(open_clip.transform.PreprocessCfg(), size=backbone.visual.image_size)
    transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    with torch.no_grad():
        ours = backbone.encode_image(torch.stack([transform(Image.open(p)) for p in paths])).float()
    ours = torch.nn.functional.normalize(ours, dim=-1).numpy()
    cos = (ours * peer).sum(-1) / np.linalg.norm(peer, axis=-1)
    return round(float(cos.min()), 5)


def _peer_device(peer_log: str) -> str | None:
    for line in peer_log.splitlines():  # all_clip prints "warming up with batch size B on DEVICE"
        if line.startswith("warming up with batch size"):
            return line.rsplit(" on ", 1)[-1].strip()
    return None


def _collect(output: Path, n: int, wall: float) -> dict[str, Any]:
    """Check the embeddings cover every image; read clip-retrieval's stats for the steady-state rate."""
    import numpy as np
    import pyarrow.parquet as pq

    embs = sorted((output / "img_emb").glob("img_emb_*.npy"))
    rows = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in embs)
    meta = sum(pq.read_metadata(p).num_rows for p in sorted((output / "metadata").glob("*.parquet")))
    if rows != n or meta != n:
        raise RuntimeError(f"peer wrote {rows} embeddings and {meta} metadata rows for {n} images in {output}")
    stats_files = sorted((output / "stats").glob("[0-9]*.json"))  # final per-partition stats (not wip_*)
    stats: dict[str, float] = {}
    for p in stats_files:
        for k, v in json.loads(p.read_text()).items():
            stats[k] = stats.get(k, 0.0) + v
    loop = stats.get("total_duration")
    steady = round(stats["sample_count"] / loop, 2) if loop else None
    model = round(stats["sample_count"] / stats["inference_duration"], 2) if stats.get("inference_duration") else None
    return {
        "images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2), "steady_images_per_s": steady,
        "model_images_per_s": model, "startup_s": round(wall - loop, 2) if loop else None,
        "loop_s": round(loop, 2) if loop else None,
        "read_s": round(stats.get("read_duration", 0.0), 2),
        "inference_s": round(stats.get("inference_duration", 0.0), 2),
        "write_s": round(stats.get("write_duration", 0.0), 2),
        "embedding_dim": int(np.load(embs[0], mmap_mode="r").shape[1]),
    }


# ---------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    from bench.machine import cpu_model

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}


def table(r: dict[str, Any], m: dict[str, Any]) -> str:
    rate = lambda v: f"{v:>10.2f}" if v is not None else f"{'-':>10}"  # noqa: E731
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_1m']} (1 min, after the run), Python {m['python']}; "
        f"peer device: {r['device']}",
        f"clip-retrieval {r['peer_version']} inference ({r['invocation']}), model {r['arch']}, "
        f"{r['images']} images, batch {r['batch_size']}, {r['num_workers']} prepro workers",
        f"{'measurement':<52} {'seconds':>9} {'images/s':>10}",
        f"{'whole command (start, imports, load, warm-up, run)':<52} {r['wall_s']:>9.2f} {rate(r['images_per_s'])}",
        f"{'steady loop (its stats: 1st batch request -> end)':<52} {r['loop_s'] or float('nan'):>9.2f} "
        f"{rate(r['steady_images_per_s'])}",
        f"{'  of which model forward (summed inference_duration)':<52} {r['inference_s']:>9.2f} "
        f"{rate(r['model_images_per_s'])}",
        f"{'  of which waiting for batches (read_duration)':<52} {r['read_s']:>9.2f}",
        f"{'fixed costs (whole command - steady loop)':<52} {r['startup_s'] or float('nan'):>9.2f}",
        f"{'  of which all_clip warm-up (2 x encode of 1 batch)':<52} {r['warmup_s'] or float('nan'):>9.2f}",
    ]
    if r.get("min_cosine_vs_ours") is not None:
        lines.append(f"check: peer embeddings vs our backbone on the same pixels, min cosine {r['min_cosine_vs_ours']}")
    if r.get("preprocess_note"):
        lines.append(f"note: peer preprocessing differs from the artifact's: {r['preprocess_note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-dir", help="folder of JPEGs (e.g. from mumic_batch.core.sample.generate_sample)")
    p.add_argument("--artifact", help="mumic-batch model artifact directory")
    p.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON),
                   help=f"python of the clip-retrieval venv (default {DEFAULT_PEER_PYTHON})")
    p.add_argument("--batch-size", type=int, default=64, help="clip-retrieval --batch_size (default 64)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="clip-retrieval --num_prepro_workers, DataLoader workers (default 2)")
    p.add_argument("--work-dir", help="checkpoint, peer outputs and log (default: a temporary dir, removed)")
    p.add_argument("--setup", action="store_true",
                   help="create the peer venv next to --peer-python (../..) first; alone, set up and exit")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the peer's embeddings of 4 images with our backbone's (untimed check)")
    p.add_argument("--print-setup", action="store_true", help="print the setup command sequence and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    venv = Path(args.peer_python).parent.parent
    if args.print_setup:
        print("\n".join(" ".join(c) for c in setup_commands(venv)))
        return 0
    if args.setup:
        setup_peer(venv)
        if not args.images_dir:
            return 0
    if not (args.images_dir and args.artifact):
        p.error("--images-dir and --artifact are required (unless --setup / --print-setup alone)")
    result = measure(args.images_dir, args.artifact, args.peer_python, args.batch_size, args.num_workers,
                     args.work_dir, verify=not args.no_verify)
    m = machine()
    print(table(result, m))
    keys = ("images", "wall_s", "images_per_s", "steady_images_per_s", "batch_size", "num_workers", "peer_version")
    out = {k: result[k] for k in keys}
    out.update({k: v for k, v in result.items() if k not in keys and k != "command"})
    out.update(steady_source="clip-retrieval stats/*.json: sample_count / summed per-batch total_duration",
               machine=m, command=" ".join(result["command"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
