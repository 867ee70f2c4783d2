"""Job configuration: YAML files plus `--set a.b=c` overrides, loaded into frozen dataclasses.

Every key is declared here with a one-line comment; docs/config.md documents them for users.
Unknown keys and values of the wrong type fail with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


@dataclass(frozen=True)
class SparkCfg:
    master: str = "local[2,4]"  # Spark master URL (local[N,M]: N cores, each task tried up to M times); spark-submit's --master wins
    app_name: str = "mumic-batch"  # Spark application name (a job adds its own suffix)
    delta_package: str = "io.delta:delta-spark_2.13:4.0.0"  # Maven coordinate of Delta's jars
    packages: tuple[str, ...] = ()  # extra Maven coordinates (e.g. hadoop-aws for s3a tables)
    driver_memory: str = "4g"  # spark.driver.memory for local runs
    shuffle_partitions: int = 4  # spark.sql.shuffle.partitions
    arrow_batch_rows: int = 256  # rows per Arrow frame sent to the tagging UDF (ids and URIs; model batches do not depend on it)
    arrow_batch_bytes: int = 16_000_000  # bytes per Arrow batch, whichever limit is hit first
    metastore: str = ""  # local runs: Derby metastore directory that keeps catalog tables (db.table) between jobs; empty: in-memory catalog (paths only)
    warehouse: str = ""  # local runs: spark.sql.warehouse.dir, where catalog tables' files live (empty: Spark's ./spark-warehouse)
    driver_java_options: str = ""  # local runs: JVM options of the driver (spark.driver.extraJavaOptions), e.g. -XX:TieredStopAtLevel=1
    conf: dict[str, str] = field(default_factory=dict)  # any other Spark settings, verbatim

    def __post_init__(self) -> None:
        _require(self.arrow_batch_rows >= 1, "spark.arrow_batch_rows", "must be >= 1")
        _require(self.shuffle_partitions >= 1, "spark.shuffle_partitions", "must be >= 1")


@dataclass(frozen=True)
class TablesCfg:
    catalogue: str = "data/sample/catalogue"  # input: Delta path, Parquet path or catalog table name
    catalogue_format: str = "auto"  # auto | delta | parquet | table
    labels: str = "data/sample/labels"  # labels table (training/evaluation input)
    labels_format: str = "auto"  # auto | delta | parquet | table
    predictions: str = "data/out/predictions"  # output: Delta path, or catalog table name (db.table) of the predictions table
    runs: str = "data/out/runs"  # output: Delta path or catalog table name of the runs table
    metrics: str = "data/out/metrics"  # output: Delta path or catalog table name of the metrics table

    def __post_init__(self) -> None:
        for key in ("catalogue_format", "labels_format"):
            value = getattr(self, key)
            _require(value in TABLE_FORMATS, f"tables.{key}", f"must be one of {TABLE_FORMATS}")


TABLE_FORMATS = ("auto", "delta", "parquet", "table")
ZERO_SHOT_FROM = ("self", "base")


@dataclass(frozen=True)
class ZeroShotClassCfg:
    name: str  # class name as stored in the outputs
    prompt: str  # text prompt scored through the text tower
    threshold: float = 0.5  # probability at or above which the label is assigned


@dataclass(frozen=True)
class ModelCfg:
    artifact: str = "data/models/demo"  # model artifact directory (local path or s3://bucket/prefix)
    zero_shot: tuple[ZeroShotClassCfg, ...] = ()  # extra classes scored without retraining
    zero_shot_from: str = "self"  # self | base: score the zero_shot classes with model.artifact, or with the base model it was fine-tuned from (a second image tower per image; docs/learning.md)

    def __post_init__(self) -> None:
        _require(self.zero_shot_from in ZERO_SHOT_FROM, "model.zero_shot_from", f"must be one of {ZERO_SHOT_FROM}")


@dataclass(frozen=True)
class FetchCfg:
    allowed_schemes: tuple[str, ...] = ("file", "s3", "http", "https")  # URI schemes that may be read
    local_roots: tuple[str, ...] = ()  # file:// and plain paths must lie under one of these (empty: any)
    allowed_buckets: tuple[str, ...] = ()  # s3 buckets that may be read (empty: any)
    allowed_hosts: tuple[str, ...] = ()  # http(s) hosts that may be read (empty: any public host)
    allowed_networks: tuple[str, ...] = ()  # CIDRs exempt from the private-address block (tests, VPC)
    connect_timeout_s: float = 5.0  # TCP connect timeout per attempt
    read_timeout_s: float = 10.0  # socket inactivity timeout per attempt
    deadline_s: float = 30.0  # total time allowed for one object, retries included
    max_bytes: int = 20_000_000  # largest object body accepted, enforced while streaming
    max_attempts: int = 3  # attempts for retryable failures (throttling, 5xx, resets)
    backoff_s: float = 0.2  # first retry delay; doubles per attempt, with jitter
    max_redirects: int = 3  # http redirects followed, each hop re-checked
    threads: int = 8  # fetch threads per Python worker
    s3_endpoint_url: str = ""  # S3-compatible endpoint (empty: AWS default)
    s3_region: str = ""  # S3 region (empty: the credential chain's default)
    s3_expected_bucket_owner: str = ""  # AWS account id sent as ExpectedBucketOwner (empty: not checked)
    ca_bundle: str = ""  # PEM file of CA certificates for https (empty: the system store)
    user_agent: str = "mumic-batch/0.1"  # User-Agent header sent with http(s) requests
    pool_connections: int = 32  # idle keep-alive http(s) connections kept per Fetcher, all hosts (0: no reuse)
    pool_idle_s: float = 15.0  # a pooled connection idle for longer is closed, not reused

    def __post_init__(self) -> None:
        import ipaddress  # local: only this validation needs it

        _require(self.max_bytes > 0, "fetch.max_bytes", "must be > 0")
        _require(self.max_attempts >= 1, "fetch.max_attempts", "must be >= 1")
        _require(self.threads >= 1, "fetch.threads", "must be >= 1")
        _require(self.deadline_s > 0, "fetch.deadline_s", "must be > 0")
        _require(self.connect_timeout_s > 0, "fetch.connect_timeout_s", "must be > 0")
        _require(self.read_timeout_s > 0, "fetch.read_timeout_s", "must be > 0")
        _require(self.backoff_s >= 0, "fetch.backoff_s", "must be >= 0")
        _require(self.max_redirects >= 0, "fetch.max_redirects", "must be >= 0")
        _require(self.pool_connections >= 0, "fetch.pool_connections", "must be >= 0")
        _require(self.pool_idle_s > 0, "fetch.pool_idle_s", "must be > 0")
        supported = ("file", "s3", "http", "https")  # what mumic_batch.io.fetch can read
        unknown = sorted(set(self.allowed_schemes) - set(supported))
        _require(not unknown, "fetch.allowed_schemes", f"has unsupported {unknown}; supported: {supported}")
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                _require(False, "fetch.allowed_networks", f"holds an invalid CIDR {cidr!r}")


@dataclass(frozen=True)
class DecodeCfg:
    max_pixels: int = 40_000_000  # larger images are refused as decompression_bomb
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow formats accepted
    draft: bool = True  # reduced-size JPEG decoding when the model input is much smaller

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, "decode.max_pixels", "must be > 0")
        _require(len(self.formats) > 0, "decode.formats", "must list at least one format")
        _require(all(f == f.upper() for f in self.formats), "decode.formats", "must be Pillow names in upper case")


@dataclass(frozen=True)
class InferCfg:
    batch_size: int = 32  # images per model forward pass, filled across Arrow frames (256 or more on a GPU)
    prefetch_batches: int = 2  # model batches prepared ahead of the one the model runs (bounds memory)
    decode_workers: int = 0  # threads decoding and resizing at once; 0: the CPU cores the task was given
    decode: str = "cpu"  # cpu: Pillow decode, torch uint8 resize on CPU threads; gpu: JPEGs decoded and resized on the device
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when torch sees one)
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 on CUDA, fp32 on CPU)
    compile: bool = False  # torch.compile the image tower (slower start, faster steady state on a GPU)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "infer.batch_size", "must be >= 1")
        _require(self.prefetch_batches >= 1, "infer.prefetch_batches", "must be >= 1")
        _require(self.decode_workers >= 0, "infer.decode_workers", "must be >= 0")
        _require(self.decode in DECODERS, "infer.decode", f"must be one of {DECODERS}")
        _require(self.device in DEVICES, "infer.device", f"must be one of {DEVICES}")
        _require(self.precision in ("auto",) + PRECISIONS, "infer.precision", f"must be auto or one of {PRECISIONS}")


DECODERS = ("cpu", "gpu")


@dataclass(frozen=True)
class ErrorRateCfg:
    permanent: float = 0.5  # largest share of a run's rows with a permanent failure (not_found, decode_error, http_404, ...)
    transient: float = 0.5  # largest share with a transient failure (timeout, fetch_error, throttled, http_5xx; retried later)
    policy: float = 0.5  # largest share refused by the fetch policy (blocked_*, too_large, too_many_redirects)

    def __post_init__(self) -> None:
        for key in ("permanent", "transient", "policy"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"tag.max_error_rate.{key}", "must be between 0 and 1")


@dataclass(frozen=True)
class TagCfg:
    full: bool = False  # reprocess every catalogue row, not only new/changed/failed ones
    max_attempts: int = 3  # rows with a transient failure are retried by later runs up to this many attempts
    retry_after_s: float = 6 * 3600  # a failed row is retried only once this long has passed since its attempt
    partitions: int = 0  # tasks to score in; 0: auto, one per task slot, at least rows_per_task rows each
    rows_per_task: int = 500  # auto partitioning: fewer rows than this per task are not worth a model load
    chunk_rows: int = 1_000_000  # rows scored and merged per chunk; a crash loses at most the chunk in flight
    max_error_rate: ErrorRateCfg = field(default_factory=ErrorRateCfg)  # above these shares of failed rows the run ends failed (its rows are kept)
    min_ok_rows: int = 0  # a run with fewer ok rows than this ends failed, also when it had nothing to do
    warm_up: bool = True  # start the Python workers loading the model (in the background) while the driver takes the lease and selects rows
    lease_s: float = 300.0  # one run per (predictions table, model version): its lease, renewed every lease_s/3; a killed run's lease is taken over after this

    def __post_init__(self) -> None:
        _require(self.max_attempts >= 1, "tag.max_attempts", "must be >= 1")
        _require(self.partitions >= 0, "tag.partitions", "must be >= 0")
        _require(self.rows_per_task >= 1, "tag.rows_per_task", "must be >= 1")
        _require(self.chunk_rows >= 1, "tag.chunk_rows", "must be >= 1")
        _require(self.retry_after_s >= 0, "tag.retry_after_s", "must be >= 0")
        _require(self.min_ok_rows >= 0, "tag.min_ok_rows", "must be >= 0")
        _require(self.lease_s > 0, "tag.lease_s", "must be > 0")


@dataclass(frozen=True)
class MaintainCfg:
    optimize: bool = True  # compact the predictions table and Z-order its files by image_id (OPTIMIZE ... ZORDER BY)
    model_version: str = ""  # OPTIMIZE only this model version's partition; "" = every partition
    purge_deletion_vectors: bool = False  # also rewrite the files that carry deletion vectors (REORG ... APPLY (PURGE)); the table feature stays (docs/tables.md)
    vacuum: bool = True  # delete files the table no longer references once older than retain_hours (VACUUM)
    retain_hours: float = 168.0  # VACUUM retention; Delta refuses less than 168 unless spark.databricks.delta.retentionDurationCheck.enabled=false

    def __post_init__(self) -> None:
        _require(self.retain_hours >= 0, "maintain.retain_hours", "must be >= 0")


@dataclass(frozen=True)
class AddLabelsCfg:
    classes: tuple[str, ...] = ()  # names of model.zero_shot entries to score into the stored rows (empty: all of them)


@dataclass(frozen=True)
class SearchCfg:
    index_dir: str = "data/out/search"  # local directory of the indexes, one per model version: <index_dir>/<version>/
    m: int = 32  # HNSW graph degree M: more gives better recall and a bigger index
    ef_construction: int = 200  # HNSW candidate list while building: more gives a better graph, slower builds
    ef_search: int = 128  # HNSW candidate list while searching: more gives better recall, slower queries
    top_k: int = 10  # neighbours returned per query
    duplicates: str = "data/out/duplicates"  # output Delta path of the near-duplicate groups table
    duplicate_cosine: float = 0.97  # two images whose embeddings' cosine is at least this are near-duplicates
    duplicate_neighbours: int = 10  # neighbours per image looked at for near-duplicates
    recall_queries: int = 200  # indexed images whose top_k the build also finds exactly, to measure recall (0: none)
    threads: int = 0  # threads building and searching the index (0: all cores)

    def __post_init__(self) -> None:
        _require(self.m >= 2, "search.m", "must be >= 2")
        _require(self.top_k >= 1 and self.duplicate_neighbours >= 1, "search.top_k",
                 "and search.duplicate_neighbours must be >= 1")
        _require(self.ef_construction >= 1 and self.ef_search >= self.top_k, "search.ef_search",
                 "must be >= search.top_k (and search.ef_construction >= 1)")
        _require(-1.0 <= self.duplicate_cosine <= 1.0, "search.duplicate_cosine", "must be in [-1, 1]")
        _require(self.recall_queries >= 0 and self.threads >= 0, "search.recall_queries",
                 "and search.threads must be >= 0")


@dataclass(frozen=True)
class SampleCfg:
    out_dir: str = "data/sample"  # where images and tables are written
    n_images: int = 300  # number of images
    seed: int = 0  # generator seed; same seed, same bytes
    width: int = 640  # image width in pixels
    height: int = 480  # image height in pixels
    noise_rate: float = 0.05  # train split only: each true label dropped with this probability, as many false ones added
    table_format: str = "delta"  # delta | parquet

    def __post_init__(self) -> None:
        _require(self.n_images >= 1, "sample.n_images", "must be >= 1")
        _require(0.0 <= self.noise_rate < 1.0, "sample.noise_rate", "must be in [0, 1)")
        _require(self.table_format in ("delta", "parquet"), "sample.table_format", "must be delta or parquet")


@dataclass(frozen=True)
class InitModelCfg:
    name: str = "mumic-demo"  # model name stored in the manifest and every prediction row
    version: str = "v0-untrained"  # model version (part of the predictions key)
    architecture: str = "tiny"  # "tiny" (the project's small test/demo config) or an open_clip name, e.g. ViT-B-32
    clip_weights: str = ""  # optional open_clip checkpoint (local path) to start from instead of random init
    seed: int = 0  # seed of the random initialisation


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
TOWERS = ("image", "text", "both", "none")
LOSSES = ("tempered", "focal", "asl")
CALIBRATIONS = ("none", "platt")


@dataclass(frozen=True)
class ClassPromptCfg:
    name: str  # class name as it appears in the labels table
    prompt: str  # text prompt whose embedding is the class's classifier weight


@dataclass(frozen=True)
class PretrainCfg:
    out: str = "data/models/base"  # local directory the base artifact is written to
    overwrite: bool = False  # replace an existing artifact at pretrain.out
    name: str = "mumic-base"  # model name in the base artifact's manifest
    version: str = "base-v1"  # model version in the base artifact's manifest
    architecture: str = "demo"  # "demo" or "tiny" (the project's small configs) or an open_clip name
    split: str = "train"  # labels-table split whose captions are trained on
    val_split: str = "val"  # split whose contrastive loss picks the step that is kept (empty: the last step)
    caption_column: str = "caption"  # labels-table column holding one caption per image
    steps: int = 200  # optimiser steps
    eval_every: int = 25  # steps between validation losses
    batch_size: int = 128  # image-caption pairs per step (every other pair of the batch is a negative)
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay (never on gains, biases and the logit scale)
    warmup_steps: int = 50  # linear warm-up steps, then cosine decay to zero
    shift: int = 4  # random translation augmentation in model-input pixels (0: none)
    seed: int = 0  # seed of the initialisation, the batch order and the augmentation
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast on CUDA only)

    def __post_init__(self) -> None:
        _check_optim("pretrain", self.steps, self.batch_size, self.warmup_steps, self.shift)
        _require(self.lr > 0, "pretrain.lr", "must be > 0")
        _require(self.eval_every >= 1, "pretrain.eval_every", "must be >= 1")
        _require(self.split != self.val_split, "pretrain.val_split", "must differ from pretrain.split")
        _check_device("pretrain", self.device, self.precision)
        _require(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0")
        _require(bool(self.name and self.version), "pretrain.name", "and pretrain.version must not be empty")


@dataclass(frozen=True)
class TrainCfg:
    base: str = "data/models/base"  # starting model: a MuMIC artifact (local path or s3://)
    clip_weights: str = ""  # instead of train.base: open_clip weights (local path, s3:// or hf-hub:org/repo, offline cache)
    architecture: str = ""  # architecture of train.clip_weights: an open_clip name, "demo" or "tiny"
    name: str = "mumic-demo"  # model name in the manifest and every prediction row
    version: str = ""  # model version; empty: ft-<UTC time>, a new version for every training run
    overwrite: bool = False  # replace an existing artifact at model.artifact
    classes: tuple[ClassPromptCfg, ...] = ()  # classes to train (empty: the sample catalogue's fine-tuning classes)
    label_column: str = "labels"  # array<string> column of positive labels
    negatives_column: str = "negatives"  # optional array<string> column of explicit negative labels
    mask_unannotated: bool = False  # only pairs named in the label or negatives column count (partial labels)
    train_split: str = "train"  # labels-table split trained on
    val_split: str = "val"  # split for early stopping and thresholds
    towers: str = "image"  # towers that train: image | text | both | none (temperature and bias only)
    image_groups: int = 0  # partial tuning: train only the image tower's last n groups (blocks; 0: all of it)
    lr_image: float = 2e-3  # peak learning rate of the image tower (demo scale; ~1e-5 for a real CLIP)
    lr_text: float = 1e-4  # peak learning rate of the text tower (~1e-6 for a real CLIP)
    lr_head: float = 1e-2  # peak learning rate of the log temperature and the bias
    weight_decay: float = 0.05  # AdamW weight decay of the towers' matrices
    loss: str = "tempered"  # tempered (MuMIC's) | focal | asl (baselines)
    gamma: float = 0.0  # focusing exponent of the tempered loss, (1 - p_t)^gamma (0: none)
    learn_scale: bool = True  # learnable log temperature, initialised from the base model's logit scale
    bias: bool = True  # learnable logit bias
    init_bias: float = -2.0  # initial bias when the base model has none
    epochs: int = 60  # most epochs; the cosine schedule spans all of them
    batch_size: int = 32  # images per step (each with every class)
    warmup_steps: int = 20  # linear warm-up steps, then cosine decay to zero
    patience: int = 10  # early stopping: epochs without a better validation GAP (0: never stop early)
    shift: int = 4  # random translation augmentation in model-input pixels (0: none)
    checkpoint_dir: str = ""  # periodic checkpoints (empty: <model.artifact>.ckpt); the same run resumes there
    checkpoint_every: int = 5  # epochs between checkpoints (0: no checkpoints)
    resume: bool = True  # continue from a checkpoint of the same run (same config, base and data) if present
    target_precision: float = 0.8  # per-class threshold: lowest validation score whose precision reaches this
    threshold_min_support: int = 5  # a class with fewer validation positives gets no label (fallback)
    threshold_bootstrap: int = 200  # validation resamples behind each threshold and its expected precision/recall
    threshold_shrinkage: float = 10.0  # pseudo-positives pulling a class's threshold towards the global one (0: none)
    threshold_ci: float = 0.9  # coverage of the expected precision/recall intervals in the manifest
    calibration: str = "platt"  # platt | none: per-class Platt scaling fitted on the validation split; thresholds on the calibrated probabilities
    calibration_min_support: int = 10  # platt: a class with fewer validation positives or negatives keeps the identity
    preserve: float = 0.0  # feature preservation: weight of the mean squared distance to the base's image embeddings
    wise_alpha: float = 1.0  # WiSE-FT: saved towers = (1 - a) * base + a * fine-tuned; < 1 keeps more zero-shot ability
    seed: int = 0  # seed of the batch order and the augmentation
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast on CUDA only)

    def __post_init__(self) -> None:
        _check_optim("train", self.epochs, self.batch_size, self.warmup_steps, self.shift)
        for key in ("lr_image", "lr_text", "lr_head"):
            _require(getattr(self, key) > 0, f"train.{key}", "must be > 0")
        _check_device("train", self.device, self.precision)
        _require(self.towers in TOWERS, "train.towers", f"must be one of {TOWERS}")
        _require(self.loss in LOSSES, "train.loss", f"must be one of {LOSSES}")
        _require(self.gamma >= 0, "train.gamma", "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.patience >= 0 and self.checkpoint_every >= 0, "train.patience",
                 "and train.checkpoint_every must be >= 0")
        _require(0.0 < self.target_precision <= 1.0, "train.target_precision", "must be in (0, 1]")
        _require(self.threshold_min_support >= 1 and self.threshold_bootstrap >= 1, "train.threshold_min_support",
                 "and train.threshold_bootstrap must be >= 1")
        _require(self.threshold_shrinkage >= 0, "train.threshold_shrinkage", "must be >= 0")
        _require(0.0 < self.threshold_ci < 1.0, "train.threshold_ci", "must be in (0, 1)")
        _require(self.calibration in CALIBRATIONS, "train.calibration", f"must be one of {CALIBRATIONS}")
        _require(self.calibration_min_support >= 1, "train.calibration_min_support", "must be >= 1")
        _require(0.0 <= self.wise_alpha <= 1.0, "train.wise_alpha", "must be in [0, 1]")
        _require(self.preserve >= 0 and self.image_groups >= 0, "train.preserve", "and train.image_groups must be >= 0")
        _require(not self.clip_weights or bool(self.architecture), "train.architecture",
                 "must name the architecture of train.clip_weights")
        _require(self.train_split != self.val_split, "train.val_split", "must differ from train.train_split")
        names = [c.name for c in self.classes]
        _require(len(names) == len(set(names)), "train.classes", "has duplicate names")


@dataclass(frozen=True)
class EvaluateCfg:
    split: str = "test"  # labels-table split that is scored
    label_column: str = "labels"  # array<string> column of positive labels
    dataset: str = ""  # dataset name in the metrics table (empty: tables.labels)
    gap_k: int = 10  # k of GAP@k
    map_classes: tuple[str, ...] = ()  # classes of the macro mAP (empty: the evaluate.majority most frequent)
    majority: int = 8  # how many classes, by support in the split, the default macro mAP averages
    report_dir: str = "data/out/reports"  # the Markdown report goes to <report_dir>/<model_version>-<split>/
    previous: str = ""  # artifact of the previous model version: the report compares both on the same images

    def __post_init__(self) -> None:
        _require(self.gap_k >= 1, "evaluate.gap_k", "must be >= 1")
        _require(self.majority >= 1, "evaluate.majority", "must be >= 1")


def _check_optim(section: str, length: int, batch_size: int, warmup: int, shift: int) -> None:
    """Checks shared by the pretraining and training sections."""
    _require(length >= 1, f"{section}.{'steps' if section == 'pretrain' else 'epochs'}", "must be >= 1")
    _require(batch_size >= 2, f"{section}.batch_size", "must be >= 2")
    _require(warmup >= 0, f"{section}.warmup_steps", "must be >= 0")
    _require(shift >= 0, f"{section}.shift", "must be >= 0")


def _check_device(section: str, device: str, precision: str) -> None:
    _require(device in DEVICES, f"{section}.device", f"must be one of {DEVICES}")
    _require(precision in PRECISIONS, f"{section}.precision", f"must be one of {PRECISIONS}")


@dataclass(frozen=True)
class JobCfg:
    spark: SparkCfg = field(default_factory=SparkCfg)
    tables: TablesCfg = field(default_factory=TablesCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fetch: FetchCfg = field(default_factory=FetchCfg)
    decode: DecodeCfg = field(default_factory=DecodeCfg)
    infer: InferCfg = field(default_factory=InferCfg)
    tag: TagCfg = field(default_factory=TagCfg)
    maintain: MaintainCfg = field(default_factory=MaintainCfg)
    add_labels: AddLabelsCfg = field(default_factory=AddLabelsCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    init_model: InitModelCfg = field(default_factory=InitModelCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobCfg:
    """Load a YAML file (optional), apply `a.b=c` overrides, and build the frozen JobCfg."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return build(JobCfg, raw, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (stored with each run)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    node = raw
    parts, entry = _override_path(key.strip())
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    try:
        # A map entry (a Spark setting) is a string as given: `true` stays "true", not a YAML boolean.
        node[parts[-1]] = text.strip() if entry else (yaml.safe_load(text) if text.strip() else "")
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML: {_yaml_problem(err)} "
                          "(quote strings that hold ':', '[' or '{')") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and position on one line (its own text spans lines and names '<unicode string>')."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _override_path(key: str) -> tuple[list[str], bool]:
    """`a.b.c` split at its dots, and whether it names one entry of a map: what follows a map's key is
    the entry's name, so `spark.conf.spark.hadoop.fs.s3a.endpoint` is the entry
    `spark.hadoop.fs.s3a.endpoint` of `spark.conf`."""
    parts = key.split(".")
    cls: Any = JobCfg
    for i, part in enumerate(parts[:-1]):
        hint = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if typing.get_origin(hint) is dict:
            return [*parts[:i + 1], ".".join(parts[i + 1:])], True
        cls = hint
    return parts, False


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types."""
    where = prefix or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (valid keys under {where}: {', '.join(names)})")
    values = {name: _convert(hints[name], raw[name], _join(prefix, name)) for name in names if name in raw}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"config section '{where}': {err}") from err


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"config key '{key}' has an unsupported type {hint!r}")
    raise ConfigError(f"config key '{key}' expects {hint.__name__}, got {value!r}")
