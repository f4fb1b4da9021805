# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""What the recipes share: `--config file.yaml` defaults for an `HfArgumentParser`."""

import sys

import yaml
from transformers import HfArgumentParser


def parse_with_yaml(parser: HfArgumentParser, argv: list[str] | None = None):
    """Parse `argv` (default `sys.argv[1:]`) into the parser's dataclasses; `--config file.yaml` gives defaults and
    the other flags override them. A yaml key that is no field of the parser's dataclasses is an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a yaml file path")
        with open(argv[i + 1]) as f:
            defaults = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"--config {argv[i + 1]}: unknown key(s) {unknown}")
        parser.set_defaults(**defaults)
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(args=argv)
