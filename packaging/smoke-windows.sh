#!/usr/bin/env bash
# Builds cla-worker.exe (x86_64-pc-windows-gnu, mingw-w64) and the library's unit tests for Windows, runs
# the unit tests under Wine, then the worker against a Linux cla-hub serving TLS on 127.0.0.1: register
# (pinning the hub), start in the background, status, exec through `cmd /C`, a timeout that must kill a
# tree of cmd.exe processes (Job Object), eval, ship and fetch back, stop (the stop event), and the Windows
# service: install, start, a job through it, stop, uninstall.
# Installs what a fresh machine lacks (the rust target, mingw-w64, wine64). Output: target/x86_64-pc-windows-gnu/release/ (debug/ with PROFILE=dev).
#
#   packaging/smoke-windows.sh
#
# Debian 12's Wine 8 lacks bcryptprimitives.dll (ProcessPrng), which Rust's std imports on Windows; a
# test-only shim (tests/wine/bcryptprimitives.c) is built next to a copy of the .exe in a temporary
# directory. It is never part of a release: Windows 10 and later have the DLL.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-pc-windows-gnu
sudo_=""
[[ $(id -u) -ne 0 ]] && sudo_=sudo

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
if ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1; then
    $sudo_ apt-get install -y -q gcc-mingw-w64-x86-64
fi
wine=/usr/lib/wine/wine64
wineserver=/usr/lib/wine/wineserver64
if [[ ! -x $wine ]]; then
    $sudo_ apt-get install -y -q wine64
fi
# PROFILE=dev (what CI uses: it compiles in about half the time, and the unit tests and the native hub
# share the build) or release (the default).
profile=${PROFILE:-release}
case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
cargo build --locked --profile "$profile" --target "$target" -p cla-worker
cargo build --locked --profile "$profile" -p cla-hub
# The unit tests of every crate the worker links, built for Windows in the profile the worker .exe was
# just built in (its dependencies are reused), to run under Wine too.
crates=(cla-common cla-protocol cla-config cla-transfer cla-eval cla-worker-core)
mapfile -t units < <(cargo test --locked --profile "$profile" --target "$target" --lib --no-run --message-format=json \
    "${crates[@]/#/-p}" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
[[ ${#units[@]} -eq ${#crates[@]} ]] || { echo "error: expected ${#crates[@]} unit-test executables, got ${#units[@]}" >&2; exit 1; }
exe="target/$target/$dir/cla-worker.exe"
hubbin="$PWD/target/$dir/cla-hub"
echo "cla-worker.exe: $(stat -c %s "$exe") bytes, $(file -b "$exe" | cut -d, -f1-2)"

tmp=$(mktemp -d)
export WINEPREFIX="$tmp/prefix" WINEDEBUG=-all WINEARCH=win64 WINEDLLOVERRIDES="mscoree,mshtml="
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    $wineserver -k 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
    echo "error: $*" >&2
    for f in "$tmp"/hub.log "$tmp"/state/*.log "$WINEPREFIX"/drive_c/users/*/AppData/Local/cla-worker/*.log; do
        [[ -f $f ]] && { echo "--- $f" >&2; tail -20 "$f" >&2; }
    done
    exit 1
}

mkdir -p "$tmp/bin" "$tmp/state"
cp "$exe" "$tmp/bin/"
x86_64-w64-mingw32-gcc -O2 -shared -o "$tmp/bin/bcryptprimitives.dll" tests/wine/bcryptprimitives.c -ladvapi32
# Wine maps / to Z:, and the worker runs in a Z: directory: Unix absolute paths name the same files.
cd "$tmp"
# The prefix is created on first use (about 10 s); the console programs need no display.
# Wait for that first boot to finish: until then its service database is locked.
timeout 120 $wine wineboot --init >/dev/null 2>&1 || true
timeout 120 $wineserver -w || true
for unit in "${units[@]}"; do
    name=$(basename "$unit" .exe)
    cp "$unit" "$tmp/bin/$name.exe"
    out=$(timeout 600 $wine "$tmp/bin/$name.exe" 2>&1) || { printf '%s\n' "$out" | tail -40; fail "unit tests of $name under Wine"; }
    echo "$name: $(grep -E '^test result: ok' <<<"$out" | tr -d '\r')"
done
echo "the worker crates' unit tests pass under Wine"
w() { timeout 120 $wine "$tmp/bin/cla-worker.exe" -c "$tmp/w.yml" "$@"; }
hub() { timeout 120 "$hubbin" --data-dir "$tmp/hub" "$@"; }
win() { sed 's#/#\\#g; s#^#Z:#' <<<"$1"; }
echo "cla-worker.exe --version under Wine: $(w --version | tr -d '\r')"

"$hubbin" --data-dir "$tmp/hub" serve --tls --listen 127.0.0.1:0 >/dev/null 2>"$tmp/hub.log" &
pids+=($!)
addr=""
for _ in $(seq 60); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$tmp/hub.log" | head -1)
    [[ -n "$addr" ]] && break
    sleep 0.5
done
[[ -n "$addr" ]] || fail "the hub did not start"
key=$(hub passkey create --project smoke)
w register --url "https://$addr" --passkey "$key" --id win-smoke --tags windows --save >/dev/null || fail "register"
grep -q 'pin: ' "$tmp/w.yml" || fail "register did not pin the hub's certificate"
echo "registered over TLS, hub certificate pinned"

# In the background, as `start` does it: a detached process holding its pidfile, logging to a file.
w start --spool-dir "$tmp/spool" --pidfile "$tmp/state/w.pid" --logfile "$tmp/state/worker.log" >/dev/null || fail "start"
w status --pidfile "$tmp/state/w.pid" | tr -d '\r' | grep -q running || fail "status does not say running"
for _ in $(seq 60); do
    hub workers 2>/dev/null | grep -q 'win-smoke  *IDLE' && break
    sleep 0.5
done
hub workers | grep -q 'win-smoke  *IDLE' || fail "the worker did not connect"

out=$(hub exec --worker win-smoke -- cmd /C echo smoke-ok | tr -d '\r')
[[ "$out" == smoke-ok ]] || fail "exec gave '$out'"
echo "exec through cmd /C: ok"

# A timeout kills the whole tree: cmd.exe running a cmd.exe that would loop for minutes.
started=$SECONDS
rc=0
hub exec --worker win-smoke --timeout 3 -- cmd /C "cmd /C for /L %i in (1,1,2000000000) do @rem" >/dev/null 2>&1 || rc=$?
took=$((SECONDS - started))
[[ $rc -eq 124 ]] || fail "the timed-out job exited $rc, not 124"
[[ $took -lt 30 ]] || fail "the timed-out job took ${took}s to end"
sleep 1
# Wine's processes are Linux processes with their Windows command lines (Wine's tasklist lists nothing).
left=$(pgrep -fc 'for /L %i in .1,1,2000000000. do' || true)
[[ $left -eq 0 ]] || fail "$left cmd.exe processes outlived the timed-out job"
echo "timeout after 3 s ended the process tree (${took}s, no cmd.exe left)"

out=$(hub eval --worker win-smoke '[1 + 1, cla.worker.id]' | tr -d '\r\n ')
[[ "$out" == '[2,"win-smoke"]' ]] || fail "eval gave '$out'"
echo "eval: ok"

head -c 3000000 /dev/urandom >"$tmp/payload"
mkdir "$tmp/on-worker" "$tmp/back"
hub ship --worker win-smoke "$tmp/payload" "$(win "$tmp/on-worker")\\" >/dev/null || fail "ship"
hub fetch --worker win-smoke "$(win "$tmp/on-worker/payload")" "$tmp/back/" >/dev/null || fail "fetch"
cmp "$tmp/payload" "$tmp/on-worker/payload" || fail "the shipped file differs"
cmp "$tmp/payload" "$tmp/back/payload" || fail "the fetched file differs"
echo "ship and fetch of 3 MB: ok"

w stop --pidfile "$tmp/state/w.pid" --timeout 60 >/dev/null || fail "stop"
rc=0
w status --pidfile "$tmp/state/w.pid" >/dev/null || rc=$?
[[ $rc -eq 3 ]] || fail "status after stop exited $rc, not 3"
[[ ! -e "$tmp/state/w.pid" ]] || fail "the pidfile was left behind"
echo "start, status, stop: ok"

# The Windows service, through Wine's Service Control Manager. Wine ends its services when no other
# program runs: a console program waiting for a key keeps the session up meanwhile.
mkfifo "$tmp/keep"
$wine cmd /C pause <"$tmp/keep" >/dev/null 2>&1 &
pids+=($!)
exec 3>"$tmp/keep"
w service install --manual >/dev/null || fail "service install"
w service start >/dev/null || fail "service start"
for _ in $(seq 60); do
    hub workers 2>/dev/null | grep -q 'win-smoke  *IDLE' && break
    sleep 0.5
done
out=$(hub exec --worker win-smoke -- cmd /C echo from-service | tr -d '\r')
[[ "$out" == from-service ]] || fail "exec through the service gave '$out'"
w service stop >/dev/null || fail "service stop"
w service uninstall >/dev/null || fail "service uninstall"
echo "service install, start, exec, stop, uninstall: ok"
exec 3>&-
echo "Windows smoke test passed under $($wine --version): TLS register with a pin, start/status/stop, exec, tree kill on timeout, eval, ship and fetch of 3 MB, the service"
