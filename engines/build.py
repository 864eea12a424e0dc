"""Build engines for a pipeline: the same command as `fastdiff build`.

    python engines/build.py --model shapes --backend onnxruntime
    python engines/build.py --model sd-turbo --profile sd-turbo --backend tensorrt --precision fp16
    python engines/build.py --help

Shape profiles of the supported model families are the JSON files in engines/profiles/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["build", *sys.argv[1:]], prog_name="engines/build.py")
