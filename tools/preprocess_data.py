#!/usr/bin/env python
"""Raw multimodal data -> indexed dataset prefix. See `--help` and docs/preprocessing.md."""

import sys

from megasail.data.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
