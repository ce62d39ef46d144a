#!/usr/bin/env bash
# Regenerates the Python stubs next to the .proto files. Run from anywhere; needs grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto
