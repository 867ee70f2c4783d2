-- Example SQL over the mumic-batch tables. Run one of them by name with
--   python -m jobs.query --config conf/local.yaml --file docs/queries.sql --name label_counts \
--     --param model_version=<version>
-- or all of them (each needs its :parameters: model_version, label, min_prob, old_version,
-- new_version, image_id). :name are named parameters, passed as strings: numbers are CAST.
-- Every query runs on DuckDB (jobs.query's default engine for local tables, no JVM) and on Spark
-- (--engine spark); nearest_neighbours has one text per engine (`-- engine:`).
-- tests/test_queries.py runs every query on both engines and checks the answers against the
-- predictions computed independently in Python.

-- name: label_filter
-- All images tagged :label with probability >= :min_prob by one model version.
SELECT image_id, uri, prob
FROM label_probs
WHERE model_version = :model_version AND label = :label AND prob >= CAST(:min_prob AS DOUBLE)
ORDER BY prob DESC, image_id;

-- name: label_counts
-- How many images carry each label (probability above the class threshold) for one model version.
SELECT label, zero_shot, count(*) AS images
FROM label_probs
WHERE model_version = :model_version AND assigned
GROUP BY label, zero_shot
ORDER BY images DESC, label;

-- name: version_changes
-- Labels gained and lost per image between two model versions, over every class both versions scored
-- (trained or zero-shot in either: a class the base model scored zero-shot and the fine-tuned model
-- learned is compared; a class only one version scored is not), for images tagged ok by both.
SELECT n.image_id, n.label, CASE WHEN n.assigned THEN 'gained' ELSE 'lost' END AS change,
       o.zero_shot AS old_zero_shot, o.prob AS old_prob, n.zero_shot AS new_zero_shot, n.prob AS new_prob
FROM label_probs o
JOIN label_probs n ON n.image_id = o.image_id AND n.label = o.label
WHERE o.model_version = :old_version AND n.model_version = :new_version AND o.assigned <> n.assigned
ORDER BY n.image_id, change, n.label;

-- name: nearest_neighbours
-- The 5 images closest to :image_id by cosine similarity (embeddings are L2-normalised). A full scan
-- of the version's embeddings: fine for a batch job, slow at 10^8 rows.
SELECT p.image_id, p.uri,
       aggregate(zip_with(p.embedding, q.embedding, (a, b) -> CAST(a AS DOUBLE) * b), 0D, (acc, x) -> acc + x) AS cosine
FROM predictions p
CROSS JOIN (
  SELECT embedding FROM predictions
  WHERE image_id = :image_id AND model_version = :model_version AND status = 'ok'
) q
WHERE p.model_version = :model_version AND p.status = 'ok' AND p.image_id <> :image_id
ORDER BY cosine DESC, p.image_id
LIMIT 5;

-- name: nearest_neighbours
-- engine: duckdb
-- The same in DuckDB SQL (Spark has no list_dot_product, DuckDB no zip_with).
SELECT p.image_id, p.uri,
       list_dot_product(CAST(p.embedding AS DOUBLE[]), CAST(q.embedding AS DOUBLE[])) AS cosine
FROM predictions p
CROSS JOIN (
  SELECT embedding FROM predictions
  WHERE image_id = :image_id AND model_version = :model_version AND status = 'ok'
) q
WHERE p.model_version = :model_version AND p.status = 'ok' AND p.image_id <> :image_id
ORDER BY cosine DESC, p.image_id
LIMIT 5;

-- name: last_run_statuses
-- Rows by status written by the most recent tagging run that processed rows, with an example error
-- for each failure status.
SELECT status, count(*) AS images, min(error) AS example_error
FROM predictions
WHERE run_id = (
  SELECT run_id FROM runs
  WHERE job = 'tag_images' AND outcome = 'succeeded' AND processed > 0
  ORDER BY started_at DESC
  LIMIT 1
)
GROUP BY status
ORDER BY images DESC, status;
