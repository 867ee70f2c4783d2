"""`make demo`: the whole product on the embedded sample catalogue, one step at a time.

Each step is a job run as its own process; its command line is printed first so it can be
repeated by hand. The last stdout line is a JSON object with the table and model paths and the
step command lines.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

CONFIG = "conf/local.yaml"

QUERIES = [
    # Label counts for the current model (assigned labels only).
    "SELECT label, count(*) AS images, round(avg(prob), 3) AS mean_prob FROM label_probs "
    "WHERE assigned GROUP BY label ORDER BY images DESC, label LIMIT 10",
    # Status counts and row totals per model version: one row per image, whatever happened to it.
    "SELECT model_version, status, count(*) AS rows, count(DISTINCT image_id) AS images "
    "FROM predictions GROUP BY model_version, status ORDER BY rows DESC",
]


def step_commands() -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    cfg = ["--config", CONFIG]
    return {
        "make_sample": [*py, "jobs.make_sample", *cfg],
        "init_model": [*py, "jobs.init_model", *cfg],
        "tag_images": [*py, "jobs.tag_images", *cfg],
        "tag_images_rerun": [*py, "jobs.tag_images", *cfg],
        "query": [*py, "jobs.query", *cfg, *(a for q in QUERIES for a in ("--sql", q))],
    }


def run_step(name: str, cmd: list[str]) -> dict:
    """Run one step, echo its stdout, return its JSON summary (its last stdout line)."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.rstrip("\n").splitlines()
    for line in out[:-1]:
        print(line)
    if proc.returncode != 0 or not out:
        raise SystemExit(f"demo step {name} failed with exit code {proc.returncode}: {out[-1] if out else ''}")
    summary = json.loads(out[-1])
    print(f"[{name}] done in {time.time() - started:.0f}s", flush=True)
    return summary


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"demo check failed: {message}")


def main() -> int:
    commands = step_commands()
    results = {name: run_step(name, cmd) for name, cmd in commands.items()}
    first, rerun = results["tag_images"], results["tag_images_rerun"]
    total = sum(r["rows"] for r in results["query"]["results"][1])
    check(total == first["input_rows"], f"predictions hold {total} rows, the catalogue {first['input_rows']}")
    check(rerun["processed"] == 0, f"the rerun processed {rerun['processed']} rows, expected 0")
    print(json.dumps({
        "catalogue": results["make_sample"]["catalogue"],
        "labels": results["make_sample"]["labels"],
        "model": results["init_model"]["model"],
        "predictions": first["predictions"],
        "runs": first["runs"],
        "commands": {name: shlex.join(cmd) for name, cmd in commands.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
