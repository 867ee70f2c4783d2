-- Example SQL over the mumic-batch tables. Run them with
--   python -m jobs.query --config conf/local.yaml --file docs/queries.sql \
--     --param model_version=v1 --param label=digit_1 --param min_prob=0.9 \
--     --param old_version=v0 --param new_version=v1 --param image_id=<id>
-- (:name are Spark SQL named parameters). tests/test_queries.py runs every query and checks
-- its answer against the predictions computed independently in Python.

-- name: label_filter
-- All images tagged :label with probability >= :min_prob by one model version.
SELECT image_id, uri, prob
FROM label_probs
WHERE model_version = :model_version AND label = :label AND prob >= :min_prob
ORDER BY prob DESC, image_id;

-- name: label_counts
-- How many images carry each label (probability above the class threshold) for one model version.
SELECT label, zero_shot, count(*) AS images
FROM label_probs
WHERE model_version = :model_version AND assigned
GROUP BY label, zero_shot
ORDER BY images DESC, label;

-- name: version_changes
-- Per image: labels gained and lost between two model versions (images tagged ok by both).
SELECT image_id, gained, lost
FROM (
  SELECT o.image_id,
         array_sort(array_except(n.labels, o.labels)) AS gained,
         array_sort(array_except(o.labels, n.labels)) AS lost
  FROM predictions o
  JOIN predictions n ON o.image_id = n.image_id
  WHERE o.model_version = :old_version AND n.model_version = :new_version
    AND o.status = 'ok' AND n.status = 'ok'
)
WHERE size(gained) > 0 OR size(lost) > 0
ORDER BY image_id;

-- name: nearest_neighbours
-- The 5 images closest to :image_id by cosine similarity (embeddings are L2-normalised).
SELECT p.image_id, p.uri,
       aggregate(zip_with(p.embedding, q.embedding, (a, b) -> a * b), 0D, (acc, x) -> acc + x) AS cosine
FROM predictions p
CROSS JOIN (
  SELECT embedding FROM predictions
  WHERE image_id = :image_id AND model_version = :model_version AND status = 'ok'
) q
WHERE p.model_version = :model_version AND p.status = 'ok' AND p.image_id <> :image_id
ORDER BY cosine DESC, p.image_id
LIMIT 5;

-- name: last_run_failures
-- Failures by status written by the most recent tagging run that processed rows.
SELECT status, count(*) AS images, min(error) AS example_error
FROM predictions
WHERE status <> 'ok' AND run_id = (
  SELECT run_id FROM runs
  WHERE job = 'tag_images' AND outcome = 'succeeded' AND processed > 0
  ORDER BY started_at DESC
  LIMIT 1
)
GROUP BY status
ORDER BY images DESC, status;
