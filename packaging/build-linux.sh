#!/usr/bin/env bash
# Builds static Linux binaries of cla-worker and cla-hub (x86_64, musl) and checks that they are static;
# with --deb also the Debian package of the worker. Installs what a fresh machine lacks (the musl target,
# musl-tools for ring's C code, cargo-deb). Output: target/x86_64-unknown-linux-musl/release/ and target/debian/*.deb.
#
#   packaging/build-linux.sh          # static binaries
#   packaging/build-linux.sh --deb    # and the .deb
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
profile=${PROFILE:-release}

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
# ring (rustls's crypto) has C and assembly parts: they need a musl C compiler (Debian's musl-tools).
if ! command -v musl-gcc >/dev/null 2>&1; then
    sudo_=""
    [[ $(id -u) -ne 0 ]] && sudo_=sudo
    $sudo_ apt-get install -y -q musl-tools
fi
export CC_x86_64_unknown_linux_musl=musl-gcc
cargo build --locked --profile "$profile" --target "$target" -p cla-worker -p cla-hub

for bin in cla-worker cla-hub; do
    f="target/$target/$profile/$bin"
    # `ldd` says "not a dynamic executable" or "statically linked" for a static binary.
    if ldd "$f" 2>&1 | grep -Eq 'not a dynamic executable|statically linked'; then
        echo "$bin: static, $(stat -c %s "$f") bytes: $(file -b "$f" | cut -d, -f1-2)"
    else
        echo "error: $f is not statically linked:" >&2
        ldd "$f" >&2 || true
        exit 1
    fi
done

if [[ "${1:-}" == "--deb" ]]; then
    if ! cargo deb --version >/dev/null 2>&1; then
        cargo install cargo-deb --locked --version '^3'
    fi
    cargo deb -p cla-worker --no-build --target "$target" --profile "$profile" --output target/debian/
    deb=$(ls -t target/debian/*.deb | head -1)
    echo "built $deb"
    dpkg-deb --info "$deb" | sed -n '/Package:/,/Description:/p'
    dpkg-deb --contents "$deb"
fi
