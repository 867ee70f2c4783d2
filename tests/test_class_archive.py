"""The local driver JVM's class archive: which archive a configuration gets, when a driver maps it,
and jobs.jvm_archive writing one that a later driver really maps."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

from jobs import jvm_archive as job
from mumic_batch.config import SparkCfg
from mumic_batch.spark.class_archive import archive_key, archive_path, driver_options
from mumic_batch.spark.session import catalog_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_spark_conf_dir(monkeypatch):
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)


def java_options(cfg: SparkCfg) -> str:
    return catalog_settings(cfg, catalog=False).get("spark.driver.extraJavaOptions", "")


def test_archive_key_follows_the_jdk_packages_and_driver_options(tmp_path, monkeypatch):
    base = SparkCfg(class_archive=str(tmp_path))
    assert archive_key(base) == archive_key(SparkCfg(class_archive=str(tmp_path / "elsewhere")))
    others = [SparkCfg(delta_package="io.delta:delta-spark_2.13:4.0.1"),
              SparkCfg(packages=("org.apache.hadoop:hadoop-aws:3.4.1",)),
              SparkCfg(driver_java_options="-XX:+UseSerialGC")]
    assert len({archive_key(base), *(archive_key(c) for c in others)}) == 4
    # The same jars (names and sizes) elsewhere, as in another venv: the JVM checks their paths too.
    here = archive_key(base)
    elsewhere = tmp_path / "spark" / "jars"
    elsewhere.mkdir(parents=True)
    for jar in (Path(pyspark.__file__).parent / "jars").glob("*.jar"):
        (elsewhere / jar.name).touch()
        os.truncate(elsewhere / jar.name, jar.stat().st_size)
    monkeypatch.setenv("SPARK_HOME", str(tmp_path / "spark"))
    assert archive_key(base) != here
    monkeypatch.delenv("SPARK_HOME")
    this_jdk = archive_key(base)
    jdk = tmp_path / "jdk"
    jdk.mkdir()
    (jdk / "release").write_text('JAVA_VERSION="17.0.99"\n')
    monkeypatch.setenv("JAVA_HOME", str(jdk))
    other_jdk = archive_key(base)
    (jdk / "release").write_text('JAVA_VERSION="17.0.100"\n')  # the same path, another build
    assert len({this_jdk, other_jdk, archive_key(base)}) == 3


def test_no_archive_directory_means_no_archive_options():
    cfg = SparkCfg(driver_java_options="-XX:TieredStopAtLevel=1")
    assert archive_path(cfg) is None and driver_options(cfg) == []
    assert java_options(cfg) == "-XX:TieredStopAtLevel=1"


def test_a_missing_archive_is_logged_with_the_command_that_writes_it(tmp_path, caplog):
    cfg = SparkCfg(class_archive=str(tmp_path), driver_java_options="-XX:TieredStopAtLevel=1")
    caplog.set_level("INFO", logger="mumic_batch.spark.class_archive")
    assert java_options(cfg) == "-XX:TieredStopAtLevel=1"
    assert str(archive_path(cfg)) in caplog.text and "jobs.jvm_archive" in caplog.text


def test_an_existing_archive_is_mapped_with_jvm_warnings_on_stderr(tmp_path):
    cfg = SparkCfg(class_archive=str(tmp_path), driver_java_options="-XX:TieredStopAtLevel=1")
    path = archive_path(cfg)
    assert path.parent == tmp_path.resolve() and path.name.startswith("driver-") and path.suffix == ".jsa"
    path.write_bytes(b"archive")
    # A JVM that cannot map it warns on stderr (stdout ends with the job's JSON summary); the user's own
    # options come after the archive's, so theirs win.
    assert java_options(cfg) == (f"-XX:SharedArchiveFile={path} -Xlog:all=off:stdout -Xlog:all=warning:stderr "
                                 "-XX:TieredStopAtLevel=1")


def test_a_non_empty_spark_conf_dir_rules_the_archive_out(tmp_path, monkeypatch, caplog):
    cfg = SparkCfg(class_archive=str(tmp_path / "jvm"))
    archive_path(cfg).parent.mkdir()
    archive_path(cfg).write_bytes(b"archive")
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf))
    assert driver_options(cfg)  # an empty directory is fine
    (conf / "spark-defaults.conf").write_text("spark.eventLog.enabled true\n")
    caplog.set_level("INFO", logger="mumic_batch.spark.class_archive")
    assert driver_options(cfg) == []
    assert f"conf directory {conf} (SPARK_CONF_DIR" in caplog.text and "--set spark.conf." in caplog.text


def run_archive_job(capsys, args: list[str]) -> tuple[int, dict]:
    code = job.main(args)
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_job_refuses_without_an_archive_directory(capsys):
    code, summary = run_archive_job(capsys, ["--set", "spark.class_archive="])
    assert code == 2 and summary["ok"] is False and "spark.class_archive is empty" in summary["error"]


def test_the_job_refuses_a_class_path_it_cannot_archive(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("spark.ui.enabled false\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf))
    code, summary = run_archive_job(capsys, ["--set", f"spark.class_archive={tmp_path / 'jvm'}"])
    assert code == 2 and f"conf directory {conf} (SPARK_CONF_DIR" in summary["error"]
    assert not (tmp_path / "jvm").exists()


MAPPED_CLASSES = """
import logging, sys
logging.basicConfig(level="INFO")
from mumic_batch.config import load_config
from mumic_batch.spark.session import build_session
spark = build_session(load_config(sys.argv[1], sys.argv[2:]).spark, "archive-check", catalog=False)
spark.range(10).selectExpr("sum(id)").collect()
spark.stop()
"""


@pytest.mark.slow
def test_written_archive_is_mapped_by_a_later_local_driver(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPARK_CONF_DIR", None)
    sets = ["--set", f"spark.class_archive={tmp_path / 'jvm'}"]
    config = str(ROOT / "conf" / "local.yaml")

    def archive_job() -> dict:
        done = subprocess.run([sys.executable, "-m", "jobs.jvm_archive", "--config", config, *sets], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "[warning][cds]" not in done.stderr  # the dump's skipped classes go to its log only
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = archive_job()
    archive = Path(first["archive"])
    assert first["written"] is True and first["classes"] > 5000 and archive.stat().st_size == first["bytes"]
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # no temp file or log left behind
    assert archive_job()["written"] is False

    # JDK_JAVA_OPTIONS: a class-load log without changing the driver options the archive is keyed on.
    env["JDK_JAVA_OPTIONS"] = f"-Xlog:class+load=info:file={tmp_path}/classes-%p.log"
    done = subprocess.run([sys.executable, "-c", MAPPED_CLASSES, config, sets[1]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"driver JVM maps its classes from {archive}" in done.stderr
    from_archive = max(Path(p).read_text().count("source: shared objects file (top)")
                       for p in glob.glob(f"{tmp_path}/classes-*.log"))
    assert from_archive > 5000
