#!/usr/bin/env bash
# Builds the static aarch64 Linux binaries (cargo-zigbuild, zig from PyPI) and runs them under qemu-user:
# --version, then a hub serving TLS and a worker on 127.0.0.1 — register (pinning the hub), run, exec,
# ship and fetch back — and cleans up. Installs what a fresh machine lacks (the rust target, ziglang and
# cargo-zigbuild, Debian's qemu-user). Output: target/aarch64-unknown-linux-musl/release/ (debug/ with PROFILE=dev).
#
#   packaging/smoke-aarch64.sh
#
# Under qemu-user an eval fails ("Exec format error"): the worker runs each eval in a child process of its
# own binary, which the kernel cannot execute without qemu's binfmt registration. Real aarch64 machines run
# it natively; the smoke test leaves eval out.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-musl
sudo_=""
[[ $(id -u) -ne 0 ]] && sudo_=sudo

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
    pip install -q ziglang cargo-zigbuild
fi
if ! command -v qemu-aarch64 >/dev/null 2>&1; then
    $sudo_ apt-get install -y -q qemu-user
fi
# PROFILE=dev (what CI uses: it compiles in about half the time) or release (the default).
profile=${PROFILE:-release}
case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
cargo zigbuild --locked --profile "$profile" --target "$target" -p cla-worker -p cla-hub
bin="target/$target/$dir"
for b in cla-worker cla-hub; do
    file "$bin/$b" | grep -q 'ARM aarch64.*statically linked' || { file "$bin/$b"; echo "error: $b is not a static aarch64 binary" >&2; exit 1; }
    echo "$b: static aarch64, $(stat -c %s "$bin/$b") bytes, $(qemu-aarch64 "$bin/$b" --version)"
done

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
hub() { qemu-aarch64 "$bin/cla-hub" --data-dir "$tmp/hub" "$@"; }
worker() { qemu-aarch64 "$bin/cla-worker" -c "$tmp/w.yml" "$@"; }

qemu-aarch64 "$bin/cla-hub" --data-dir "$tmp/hub" serve --tls --listen 127.0.0.1:0 >/dev/null 2>"$tmp/hub.log" &
pids+=($!)
addr=""
for _ in $(seq 60); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$tmp/hub.log" | head -1)
    [[ -n "$addr" ]] && break
    sleep 0.5
done
[[ -n "$addr" ]] || { cat "$tmp/hub.log"; echo "error: the hub did not start" >&2; exit 1; }
key=$(hub passkey create --project smoke)
worker register --url "https://$addr" --passkey "$key" --id arm-smoke --save >/dev/null
grep -q 'pin: ' "$tmp/w.yml" || { echo "error: register did not pin the hub's certificate" >&2; exit 1; }
# Not through the function: `$!` must be qemu's own pid.
qemu-aarch64 "$bin/cla-worker" -c "$tmp/w.yml" run --spool-dir "$tmp/spool" >/dev/null 2>"$tmp/worker.log" &
pids+=($!)

out=$(timeout 60 qemu-aarch64 "$bin/cla-hub" --data-dir "$tmp/hub" exec --worker arm-smoke -- echo smoke-ok)
[[ "$out" == smoke-ok ]] || { echo "error: exec gave '$out'" >&2; cat "$tmp/worker.log" >&2; exit 1; }
head -c 3000000 /dev/urandom >"$tmp/payload"
mkdir "$tmp/on-worker" "$tmp/back"
timeout 60 qemu-aarch64 "$bin/cla-hub" --data-dir "$tmp/hub" ship --worker arm-smoke "$tmp/payload" "$tmp/on-worker/" >/dev/null
timeout 60 qemu-aarch64 "$bin/cla-hub" --data-dir "$tmp/hub" fetch --worker arm-smoke "$tmp/on-worker/payload" "$tmp/back/" >/dev/null
cmp "$tmp/payload" "$tmp/on-worker/payload"
cmp "$tmp/payload" "$tmp/back/payload"
echo "aarch64 smoke test passed: TLS register with a pin, exec, ship and fetch of 3 MB under qemu-aarch64"
