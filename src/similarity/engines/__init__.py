"""Thin adapters that run the library inside data engines: the engine distributes, the library scores.

- ``similarity.engines.spark.score_dataframe``: a Spark DataFrame in, the same rows with
  ``similarity``, ``cosine``, ``error`` and ``truncated`` appended (a pandas UDF over the URL and caption).
- ``similarity.engines.ray.score_dataset``: the same for a Ray Dataset (``map_batches`` over an
  actor pool).
- ``similarity.engines.ray_serve``: ``similarity serve``'s app as a Ray Serve deployment, one model
  per replica.
- ``similarity.engines.snowpark``: a vectorized UDF and a stored procedure for Snowflake.
- ``similarity.engines.local``: Spark and Ray started on this machine on loopback only (tests,
  benchmarks, trying things out).

What they share lives in ``core`` (settings, a model cache per process, scoring pandas batches)
and ``models`` (a model from a local path, an ``s3://`` prefix or Snowflake's import directory).
Nothing here imports an engine at import time: each is an optional extra.
"""
