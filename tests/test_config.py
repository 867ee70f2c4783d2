"""Config loading: YAML + overrides into frozen dataclasses; bad keys and values are named."""

from pathlib import Path

import pytest

from mumic_batch.config import ConfigError, JobCfg, load_config, to_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == JobCfg()


@pytest.mark.parametrize("name", ["local.yaml", "production.example.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONF / name)
    assert cfg.tables.predictions


def test_overrides_parse_types():
    cfg = load_config(CONF / "local.yaml", ["infer.batch_size=7", "fetch.allowed_schemes=[s3, https]",
                                             "tag.full=true", "fetch.deadline_s=2"])
    assert cfg.infer.batch_size == 7
    assert cfg.fetch.allowed_schemes == ("s3", "https")
    assert cfg.tag.full is True
    assert cfg.fetch.deadline_s == 2.0


def test_a_map_entry_override_keeps_its_dotted_name_and_the_files_other_entries(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("spark:\n  conf:\n    spark.ui.enabled: 'false'\n")
    cfg = load_config(path, ["spark.conf.spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000",
                             "spark.conf.spark.hadoop.fs.s3a.path.style.access=true"])
    assert cfg.spark.conf == {"spark.ui.enabled": "false", "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000",
                              "spark.hadoop.fs.s3a.path.style.access": "true"}


def test_zero_shot_classes_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  zero_shot:\n    - {name: pool, prompt: a photo of a pool, threshold: 0.7}\n")
    cfg = load_config(path)
    assert cfg.model.zero_shot[0].name == "pool"
    assert cfg.model.zero_shot[0].threshold == 0.7


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'infer.batch_sise'"):
        load_config(None, ["infer.batch_sise=3"])


def test_unknown_section_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("infr:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'infr'"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("infer.batch_size=abc", "infer.batch_size"),
    ("infer.batch_size=0", "infer.batch_size"),
    ("tag.full=maybe", "tag.full"),
    ("fetch.allowed_schemes=s3", "fetch.allowed_schemes"),
    ("infer.device=tpu", "infer.device"),
    ("tag.chunk_rows=0", "tag.chunk_rows"),
])
def test_bad_values_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_exponent_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_text: 1e-6\n")
    cfg = load_config(str(path), ["train.lr_image=5e-4"])
    assert (cfg.train.lr_image, cfg.train.lr_text) == (5e-4, 1e-6)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["infer.batch_size"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.infer.batch_size = 3  # type: ignore[misc]


def test_resolved_config_round_trips_to_plain_data():
    cfg = load_config(CONF / "production.example.yaml")
    data = to_dict(cfg)
    assert data["model"]["zero_shot"][0]["name"] == "rooftop_terrace"
    assert isinstance(data["fetch"]["allowed_schemes"], list)


def test_config_doc_is_current():
    from mumic_batch.config_doc import render

    doc = (CONF.parent / "docs" / "config.md").read_text()
    assert doc == render(), "docs/config.md is stale: run python -m mumic_batch.config_doc > docs/config.md"


@pytest.mark.parametrize("partitions, rows, slots, want", [
    (0, 300, 8, 1),      # small run: one model load
    (0, 10_000, 8, 8),   # large run: every slot busy
    (0, 1_200, 8, 3),    # in between: at least rows_per_task rows per task
    (0, 0, 8, 1),
    (5, 10, 8, 5),       # explicit setting wins
])
def test_score_tasks(partitions, rows, slots, want):
    from mumic_batch.config import TagCfg
    from mumic_batch.pipeline.tag import score_tasks

    assert score_tasks(TagCfg(partitions=partitions, rows_per_task=500), rows, slots) == want


@pytest.mark.parametrize("conf, executors, parallelism, want", [
    ({}, 1, 8, 8),  # CPU: one slot per core
    ({"spark.task.cpus": "2"}, 1, 8, 4),
    ({"spark.task.resource.gpu.amount": "1", "spark.executor.resource.gpu.amount": "4"}, 3, 96, 12),
    ({"spark.task.resource.gpu.amount": "0.5", "spark.executor.instances": "2"}, 1, 64, 4),  # two tasks per GPU
    ({"spark.task.resource.gpu.amount": "1"}, 0, 16, 1),  # no executor registered yet
])
def test_task_slots_count_gpus_when_tasks_request_them(conf, executors, parallelism, want):
    from mumic_batch.pipeline.tag import task_slots

    assert task_slots(conf, executors, parallelism) == want
