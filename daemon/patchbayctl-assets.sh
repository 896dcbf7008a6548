#!/bin/sh
# Writes patchbayctl's shell completions and man page, generated from the binary's own
# command-line definition, next to it: where daemon/Cargo.toml's [package.metadata.deb]
# assets pick them up. Run from the repository root after `cargo build --release`:
#   daemon/patchbayctl-assets.sh [BINARY [OUT_DIR]]   (default target/release/patchbayctl)
set -eu
bin=${1:-target/release/patchbayctl}
out=${2:-$(dirname "$bin")}
"$bin" completions bash > "$out/patchbayctl.bash"
"$bin" completions zsh > "$out/_patchbayctl"
"$bin" completions fish > "$out/patchbayctl.fish"
"$bin" man > "$out/patchbayctl.1"
