#!/usr/bin/env bash
# Builds the mandelbox test image from the static stub, without a registry.
# Usage: devstack/mandelbox/build-image.sh [TAG...]
# Default tags: whist/mandelbox-stub:latest and whist/browsers/chrome:current-build (the name the
# host service looks for in local development).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
tags=("$@")
[ ${#tags[@]} -gt 0 ] || tags=(whist/mandelbox-stub:latest whist/browsers/chrome:current-build)

RUSTFLAGS="-C target-feature=+crt-static" cargo build -q -p mandelbox-stub \
  --target x86_64-unknown-linux-gnu --manifest-path "$root/Cargo.toml"
binary="$target_dir/x86_64-unknown-linux-gnu/debug/mandelbox-stub"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/mandelbox-stub"
cp "$root/devstack/mandelbox/Dockerfile" "$context/Dockerfile"
tag_args=()
for t in "${tags[@]}"; do tag_args+=(-t "$t"); done
DOCKER_BUILDKIT=0 docker build -q "${tag_args[@]}" "$context" 2> >(grep -vE "DEPRECATED|legacy builder|BuildKit is currently|environment-variable|^$" >&2) >/dev/null
echo "built ${tags[*]}"
