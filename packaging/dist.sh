#!/usr/bin/env bash
# Builds the release binaries of cla-worker and cla-hub for the five supported targets into dist/, with
# their sizes and SHA256SUMS. Installs what a fresh machine lacks: the rust targets, zig and cargo-zigbuild
# (PyPI) for the Linux musl and macOS targets, mingw-w64 (Debian) for Windows.
#
#   packaging/dist.sh                       # all five targets, profile `dist` (thin LTO)
#   PROFILE=release packaging/dist.sh       # quicker builds, a little larger
#   packaging/dist.sh aarch64-apple-darwin  # only the targets named
#
# Targets: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl (static), x86_64-pc-windows-gnu,
# aarch64-apple-darwin, x86_64-apple-darwin (macOS 11 and later). The macOS binaries are linked by zig
# against its own macOS stubs: they are built and checked here (Mach-O, architecture) but only run on a Mac;
# the Linux and Windows ones are run by packaging/smoke-aarch64.sh (qemu) and smoke-windows.sh (Wine).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-dist}
all=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl x86_64-pc-windows-gnu aarch64-apple-darwin x86_64-apple-darwin)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")
sudo_=""
[[ $(id -u) -ne 0 ]] && sudo_=sudo
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "error: unknown target $t (one of: ${all[*]})" >&2; exit 2; }
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
if [[ " ${targets[*]} " == *"-linux-musl "* || " ${targets[*]} " == *"-apple-darwin"* ]]; then
    if ! command -v cargo-zigbuild >/dev/null 2>&1; then
        pip install -q ziglang cargo-zigbuild
    fi
fi
if [[ " ${targets[*]} " == *" x86_64-pc-windows-gnu "* ]] && ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1; then
    $sudo_ apt-get install -y -q gcc-mingw-w64-x86-64
fi
# The oldest macOS the binaries run on (zig's default would be the newest it knows).
export MACOSX_DEPLOYMENT_TARGET=11.0

mkdir -p dist
: >dist/SHA256SUMS.new
for t in "${targets[@]}"; do
    start=$SECONDS
    case $t in
        *-windows-gnu) cargo build --locked --profile "$profile" --target "$t" -p cla-worker -p cla-hub ;;
        *) cargo zigbuild --locked --profile "$profile" --target "$t" -p cla-worker -p cla-hub ;;
    esac
    ext=""
    [[ $t == *windows* ]] && ext=.exe
    for bin in cla-worker cla-hub; do
        src="target/$t/$profile/$bin$ext"
        out="dist/$bin-$version-$t$ext"
        desc=$(file -b "$src")
        # What the file must be, so a wrong toolchain or a dynamic link cannot slip into dist/.
        case $t in
            x86_64-unknown-linux-musl) want='ELF 64-bit.*x86-64.*static' ;;
            aarch64-unknown-linux-musl) want='ELF 64-bit.*aarch64.*static' ;;
            x86_64-pc-windows-gnu) want='PE32\+ executable.*x86-64' ;;
            aarch64-apple-darwin) want='Mach-O 64-bit.*arm64' ;;
            x86_64-apple-darwin) want='Mach-O 64-bit.*x86_64' ;;
        esac
        grep -Eq "$want" <<<"$desc" || { echo "error: $src is not what $t needs: $desc" >&2; exit 1; }
        cp "$src" "$out.tmp"
        mv "$out.tmp" "$out"
        (cd dist && sha256sum "$(basename "$out")") >>dist/SHA256SUMS.new
    done
    echo "built $t in $((SECONDS - start))s"
done
# Lines of targets not rebuilt this time are kept.
if [[ -f dist/SHA256SUMS ]]; then
    while read -r sum name; do
        grep -q " $name\$" dist/SHA256SUMS.new || [[ ! -f dist/$name ]] || echo "$sum  $name" >>dist/SHA256SUMS.new
    done <dist/SHA256SUMS
fi
sort -k2 dist/SHA256SUMS.new >dist/SHA256SUMS
rm dist/SHA256SUMS.new
(cd dist && sha256sum --quiet -c SHA256SUMS)
echo
printf '%-52s %12s  %s\n' FILE BYTES SHA256
while read -r sum name; do
    printf '%-52s %12s  %s\n' "$name" "$(stat -c %s "dist/$name")" "$sum"
done <dist/SHA256SUMS
