"""Write an untrained (or CLIP-initialised) MuMIC model artifact for the sample catalogue's classes.

The artifact goes to model.artifact. Architecture, name, version, seed and an optional local
open_clip checkpoint come from the init_model section. No Spark session is started.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)

    def body(cfg):
        from mumic_batch.pipeline import init_model

        return init_model.run(cfg.init_model, cfg.model.artifact)

    return cli.run_job("init_model", args, [], body)


if __name__ == "__main__":
    sys.exit(main())
