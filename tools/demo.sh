#!/usr/bin/env bash
# The main job: build the Swift examples through treemat's persistent worker, run the tally CLI (subcommands,
# @main) and the Swift workspace demo, run tally's XCTest + Swift Testing suite, then show which
# materialization backend every staged input file took.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

bazel build --config=treemat //examples/...
echo "== tally top 2 (CLI with subcommands)"
bazel run --config=treemat //examples/tally -- top 2 to be or not to be, that is the question
echo "== tally sum / magnitude"
bazel run --config=treemat //examples/tally -- sum 3 -4 10
bazel run --config=treemat //examples/tally -- magnitude 3 -4 10
echo "== tally's tests (XCTest + Swift Testing)"
bazel test --config=treemat //examples/tally:TallyCoreTests
echo "== invoice demo"
bazel run --config=treemat //examples/app
python3 -m treemat stats
