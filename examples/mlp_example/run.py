"""``python -m examples.mlp_example.run CONFIG [-o key.path=value ...]``

Started by hand, it launches the config's topology itself (through the launcher: torchrun on this
machine); started by the launcher (RANK is set), it is one rank of that world and trains.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from examples.mlp_example.config import MLPConfig
from scaling.core.config import ConfigError
from scaling.core.runner import launch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.mlp_example.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config (see examples/mlp_example/config.yml)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    try:
        config = MLPConfig.from_yaml(args.config, args.override)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if "RANK" not in os.environ and config.topology.n_ranks > 1:
        script_args = [args.config, *[a for o in args.override for a in ("-o", o)]]
        runner = config.runner.model_copy(
            update={"script": "examples.mlp_example.run", "module": True, "script_args": script_args}
        )
        return launch(runner, config.topology.n_ranks, log_dir=config.logger.log_dir)
    from examples.mlp_example.train import train
    from scaling.core.topology import shutdown_distributed

    result = train(config)
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"test accuracy: {result['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
