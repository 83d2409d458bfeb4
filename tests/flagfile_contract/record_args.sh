#!/bin/sh
# Writes every argument after the first (the output path), one per line, then $TRICKY, into the output.
out="$1"
shift
mkdir -p "$(dirname "$out")"
{ for arg in "$@"; do printf '%s\n' "$arg"; done; printf 'TRICKY=%s\n' "$TRICKY"; } > "$out"
