#!/usr/bin/env bash
# The main job: build the Swift workspace demo through treemat's persistent worker and run it, then show
# which materialization backend every staged input file took.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

bazel build --config=treemat //examples/...
bazel run --config=treemat //examples/app
python3 -m treemat stats
