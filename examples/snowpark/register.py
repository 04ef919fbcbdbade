"""Put the scorer into Snowflake: upload the package and the model to a stage, register the
vectorized UDF ``SIMILARITY_SCORE`` and the stored procedure ``SIMILARITY_SCORE_TABLE``.

    pip install 'text-image-similarity[snowpark]'
    similarity model export models/clip-vit-base-patch32          # the UDF runs ONNX Runtime
    python examples/snowpark/register.py --connection my_conn --stage @similarity \\
        --model-dir models/clip-vit-base-patch32 --integration similarity_images_access

``--connection`` names a connection in ~/.snowflake/connections.toml. The External Access
Integration (score.sql creates it) lets the UDF fetch http(s) images from the hosts its network
rule lists; without it only ``data:`` URIs can be scored. Then see score.sql for the SQL.
Not run against Snowflake by this project's tests (see docs/engines.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connection", required=True, help="a connection name in connections.toml")
    p.add_argument("--stage", required=True, help="e.g. @similarity (created if missing)")
    p.add_argument("--model-dir", required=True, help="local model directory with onnx/ (similarity model export)")
    p.add_argument("--integration", action="append", default=[], help="External Access Integration (repeatable)")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    from snowflake.snowpark import Session

    from similarity.engines.snowpark import package_zip, register_procedure, register_udf, udf_spec

    session = Session.builder.config("connection_name", args.connection).create()
    stage = args.stage if args.stage.startswith("@") else f"@{args.stage}"
    session.sql(f"CREATE STAGE IF NOT EXISTS {stage[1:]}").collect()
    with tempfile.TemporaryDirectory() as tmp:
        pkg = package_zip(Path(tmp) / "similarity.zip")
        model_name = Path(args.model_dir).resolve().name
        model_zip = Path(shutil.make_archive(str(Path(tmp) / model_name), "zip", args.model_dir))
        for f in (pkg, model_zip):
            session.file.put(str(f), stage, auto_compress=False, overwrite=True)
    spec = udf_spec(f"import:{model_zip.name}", backend=args.backend, batch_size=args.batch_size)
    register_udf(
        session,
        spec,
        imports=[f"{stage}/similarity.zip", f"{stage}/{model_zip.name}"],
        stage_location=stage,
        external_access_integrations=args.integration,
    )
    register_procedure(session, imports=[f"{stage}/similarity.zip"], stage_location=stage)
    print(f"registered SIMILARITY_SCORE and SIMILARITY_SCORE_TABLE with the model {model_zip.name} from {stage}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
