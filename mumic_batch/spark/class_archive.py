"""A class-data archive (AppCDS) for the local driver JVM.

A local job starts a new driver JVM, and its first Spark and Delta operations load, parse and
verify some 18,000 classes of Spark, Delta and their dependencies: most of the CPU a cold driver
spends before the first row is scored (docs/benchmarks.md). A dynamic class-data archive holds those
classes already parsed and verified; a JVM started with it maps them instead. `jobs.jvm_archive`
writes the archive once per machine (`make setup` runs it); every later local run whose archive
matches uses it.

The archive only fits the JVM build, the Spark jars (where they are, too: each virtualenv gets its
own) and the Delta packages it was written with, and JVM options such as the garbage collector: all
of them go into a key in its file name, so a new JDK, another venv, a pyspark upgrade or other
driver options find no archive (the job logs so and runs without it) instead of one the JVM would
reject. The JVM also refuses to archive a class path holding a non-empty directory: Spark's conf
directory (SPARK_CONF_DIR, else SPARK_HOME/conf) with files in it rules the archive out. Runs under spark-submit never use it: the cluster owns the driver's JVM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pyspark
from pyspark import SparkContext
from pyspark.sql import SparkSession

from mumic_batch.config import SparkCfg

log = logging.getLogger(__name__)

# JVM warnings (e.g. an archive it cannot map) belong on stderr: a job's stdout ends with its JSON summary.
# Only the default stdout output is switched off: -Xlog settings of the user's (JDK_JAVA_OPTIONS) stay.
_WARNINGS_TO_STDERR = ("-Xlog:all=off:stdout", "-Xlog:all=warning:stderr")


def java_home() -> Path | None:
    """The JDK spark-submit starts: JAVA_HOME, else the `java` on PATH."""
    if os.environ.get("JAVA_HOME"):
        return Path(os.environ["JAVA_HOME"]).resolve()
    java = shutil.which("java")
    return Path(java).resolve().parent.parent if java else None


def spark_home() -> Path:
    """The Spark that spark-submit runs: SPARK_HOME, else the one inside the pyspark package."""
    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def archive_key(cfg: SparkCfg) -> str:
    """What the archive depends on: JDK build, Spark's jars (where they are and which), Delta's packages,
    the driver's JVM options."""
    home = java_home()
    release = home / "release" if home else None
    jars = spark_home() / "jars"
    parts = {
        "java": str(home),
        "java_release": release.read_text() if release and release.is_file() else "",
        # The JVM checks the class path it was archived with, paths included: another venv needs its own.
        "spark_jars": str(jars.resolve()),
        "spark_jar_files": sorted((p.name, p.stat().st_size) for p in jars.glob("*.jar")) if jars.is_dir() else [],
        "packages": [cfg.delta_package, *cfg.packages],
        "driver_java_options": cfg.driver_java_options,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def archive_path(cfg: SparkCfg) -> Path | None:
    """Where this configuration's archive lives; None when spark.class_archive is empty (no archive)."""
    if not cfg.class_archive:
        return None
    return Path(cfg.class_archive).expanduser().resolve() / f"driver-{archive_key(cfg)}.jsa"


def class_path_blocker() -> str | None:
    """Why the driver's class path cannot be archived, or None: Spark's conf directory (SPARK_CONF_DIR, else
    SPARK_HOME/conf) is on it, and the JVM cannot archive a class path holding a non-empty directory."""
    conf = Path(os.environ.get("SPARK_CONF_DIR") or spark_home() / "conf")
    if conf.is_dir() and any(conf.iterdir()):
        return (f"Spark's conf directory {conf} (SPARK_CONF_DIR, else SPARK_HOME/conf) is a non-empty directory "
                "on the driver's class path, which the JVM cannot archive; pass Spark settings with "
                "--set spark.conf.<key>=<value> instead")
    return None


def driver_options(cfg: SparkCfg) -> list[str]:
    """JVM options that map this configuration's archive into the local driver; none (logged) without one."""
    path = archive_path(cfg)
    if path is None:
        return []
    blocker = class_path_blocker()
    if blocker:
        log.info("driver JVM without a class archive: %s", blocker)
        return []
    if not path.is_file():
        log.info("no class archive for this JDK, Spark and driver options at %s: `python -m jobs.jvm_archive` "
                 "(run by `make setup`) writes one, and local jobs then start faster", path)
        return []
    log.info("driver JVM maps its classes from %s", path)
    return [f"-XX:SharedArchiveFile={path}", *_WARNINGS_TO_STDERR]


def dump_log(target: Path) -> Path:
    """The class-data log of the JVM that writes `target` (dump_options), beside it."""
    return target.with_name(f"{target.name}.log")


def dump_options(target: Path) -> list[str]:
    """JVM options that write the loaded classes to `target` when the JVM exits, logging to dump_log(target)."""
    # Dumping warns about thousands of classes it skips (signed jars, generated accessors): those go to the log only.
    return [_WARNINGS_TO_STDERR[0], "-Xlog:all=warning,cds*=off:stderr", f"-Xlog:cds*=info:file={dump_log(target)}",
            f"-XX:ArchiveClassesAtExit={target}"]


def stop_and_exit_jvm(spark: SparkSession, timeout_s: float = 600) -> None:
    """Stop the session and end the driver JVM this process started, waiting until it has exited: a JVM
    writes its class archive as it exits, after the session is gone."""
    gateway = SparkContext._gateway
    spark.stop()
    proc = getattr(gateway, "proc", None)
    if proc is None or proc.stdin is None:
        raise RuntimeError("this process did not start the driver JVM, so it cannot end it (and have it write "
                           "its class archive)")
    proc.stdin.close()  # pyspark's gateway server exits when its stdin closes
    proc.wait(timeout_s)
    SparkContext._gateway, SparkContext._jvm = None, None
