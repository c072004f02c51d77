"""``python -m mazerun.export <run dir or checkpoint> --format onnx|torchscript [--out FILE]``.

Writes a trained policy's acting step as a graph other tools run, and its interface JSON beside
it (:mod:`mazerun.nn.export` builds both); ``run policy=onnx policy.path=<file>`` rolls an ONNX
export out through the normal runners.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mazerun.core import interrupts

if __name__ == "__main__":  # `python -m mazerun.export`: stop signals handled before torch loads
    interrupts.run_command("mazerun.export")

from mazerun.core.errors import MazerunError
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.export import EXPORT_FORMATS, export_policy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mazerun.export",
        description="Export a trained policy to ONNX or TorchScript, with an interface JSON beside the file.",
    )
    parser.add_argument("source", help="a training run's directory (its best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the graph format to write")
    parser.add_argument("--out", type=Path, default=None,
                        help="the graph file (default: beside the checkpoint, best.onnx or best.torchscript.pt)")
    arguments = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(arguments.source)
        graph_path, json_path = export_policy(checkpoint, arguments.format, arguments.out)
    except MazerunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("error: stopped; nothing was written", file=sys.stderr)
        return interrupts.exit_code(interrupt)
    print(f"wrote {graph_path} and {json_path} ({checkpoint.model_config['network']} of {checkpoint.path}, "
          f"{checkpoint.env_id})")
    return 0
