#!/usr/bin/env bash
# Builds the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) into target/packages/.
#
#   packaging/build.sh                       # the version in Cargo.toml
#   PATCH_AGENT_VERSION=0.1.1 packaging/build.sh
#                                            # another version: the packages and the binaries
#                                            # (patch-agent --version, GetStatus) report it
#
# Needs: cargo install --locked cargo-deb cargo-generate-rpm (.ci/run does it).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cargo-deb cargo-generate-rpm; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing: cargo install --locked $tool" >&2; exit 1; }
done
base=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
version="${PATCH_AGENT_VERSION:-$base}"
if [ "$version" != "$base" ]; then
    export PATCH_AGENT_VERSION="$version"
else
    unset PATCH_AGENT_VERSION
fi
out=target/packages
mkdir -p "$out"
# One package at a time: built together, Cargo would unify features, and the daemon would link
# what only patchctl needs (clap's env and suggestions). The daemon uses the `agent` profile
# (size-optimized, fat LTO: Cargo.toml says why) into target/agent/.
cargo build --profile agent --locked -p patch-agent
cargo build --release --locked -p patchctl
cargo deb --no-build --no-strip --deb-version "$version" --output "$out/patch-agent_${version}_$(dpkg --print-architecture).deb"
cargo generate-rpm --set-metadata "version = \"$version\"" --output "$out/"
ls -l "$out"
