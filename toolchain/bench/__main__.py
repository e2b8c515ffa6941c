"""`python -m toolchain.bench MODEL.onnx ...`: torch-free, for the deployment device."""

import sys

from .cli import main

sys.exit(main())
