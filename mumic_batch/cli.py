"""What every job shares: arguments, logging, the JSON summary line and the exit code."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from typing import Callable

from mumic_batch.config import ConfigError, JobCfg, load_config
from mumic_batch.core.errors import RunStopped, failure_message

log = logging.getLogger("mumic_batch.job")

CONFIG_HELP = "YAML config file (see conf/ and docs/config.md); defaults apply when omitted"
SET_HELP = "override one config key, e.g. --set infer.batch_size=64 (repeatable)"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the --config/--set pair every job takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=SET_HELP)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def configure_logging(level: str) -> None:
    """Logs go to stderr so stdout stays clean for the JSON summary line."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)


def run_job(name: str, args: argparse.Namespace, overrides: list[str], body: Callable[[JobCfg], dict]) -> int:
    """Load config, run `body`, print the one-line JSON summary; return the process exit code."""
    configure_logging(args.log_level)
    try:
        cfg = load_config(args.config, [*args.overrides, *overrides])
        summary = body(cfg)
    except ConfigError as err:
        log.error("%s: bad configuration: %s", name, err)
        print(json.dumps({"job": name, "ok": False, "error": str(err)}))
        return 2
    except RunStopped as err:
        log.error("%s ended %s: %s", name, err.outcome, err)
        print(json.dumps({"job": name, "ok": False, "outcome": err.outcome, "error": failure_message(err),
                          "run_id": getattr(err, "run_id", None)}))
        return err.exit_code
    except Exception as err:
        log.exception("%s failed", name)
        print(json.dumps({"job": name, "ok": False, "error": failure_message(err), "run_id": getattr(err, "run_id", None)}))
        return 1
    print(json.dumps({"ok": True, **summary}, default=str))
    return 0


def pipeline_body(pipeline: str) -> Callable[[JobCfg], dict]:
    """A job body running mumic_batch.pipeline.<pipeline>.run(spark, cfg) in a session the job owns.

    Imported only when called, so --help and configuration errors answer without starting a JVM.
    Outputs named as catalog tables (db.table) are created first and then used by their location.
    """

    def body(cfg: JobCfg) -> dict:
        from mumic_batch.spark.session import owned_session, persistent_catalog
        from mumic_batch.tables.catalog import names_catalog_tables, resolve_outputs

        module = importlib.import_module(f"mumic_batch.pipeline.{pipeline}")
        with owned_session(cfg.spark, module.JOB, names_catalog_tables(cfg.tables)) as spark:
            tables = resolve_outputs(spark, cfg.tables, persistent_catalog(cfg.spark))
            return module.run(spark, dataclasses.replace(cfg, tables=tables))

    return body
