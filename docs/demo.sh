#!/usr/bin/env bash
# The scripted tour `make demo` runs: start `dc-broker dev` (dev IdP + demo API + broker), get a token
# with dc-token, call the demo API without and with it, show the broker's status, stop. Exits by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dc-broker-demo.XXXXXX")
export DC_BROKER_SOCKET="$tmp/run/broker.sock"
dev_pid=""
cleanup() {
    if [ -n "$dev_pid" ] && kill -0 "$dev_pid" 2>/dev/null; then
        kill -INT "$dev_pid" 2>/dev/null || true
        wait "$dev_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# colour only on a terminal, and never with NO_COLOR set (https://no-color.org)
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
http_get() {  # http_get URL [TOKEN] -> prints "STATUS BODY"
    "$BIN/python" - "$@" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode()[:200])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode()[:200])
PY
}

step "dc-broker dev  (dev IdP + demo API + broker with a ready 'demo' profile)"
"$BIN/dc-broker" dev --socket "$DC_BROKER_SOCKET" >"$tmp/dev.out" 2>"$tmp/dev.err" &
dev_pid=$!
for _ in $(seq 1 200); do
    "$BIN/dc-broker" status >/dev/null 2>&1 && break
    kill -0 "$dev_pid" 2>/dev/null || { cat "$tmp/dev.err"; exit 1; }
    sleep 0.05
done
cat "$tmp/dev.out"
api=$(grep -o 'http://[^ ]*/dp/api/v1/aiconnections/types' "$tmp/dev.out" | head -n1)

step "export DC_BROKER_SOCKET=$DC_BROKER_SOCKET; dc-token demo"
token=$("$BIN/dc-token" demo)
echo "${token:0:48}...  (${#token} characters)"

step "GET $api  without a token"
no_token=$(http_get "$api")
echo "$no_token"

if command -v curl >/dev/null 2>&1; then
    step "curl -H \"Authorization: Bearer \$(dc-token demo)\" $api"
    with_token=$(curl -s -w ' HTTP %{http_code}' -H "Authorization: Bearer $("$BIN/dc-token" demo)" "$api")
    echo "$with_token"
    code=${with_token##* }
else
    step "GET $api  with \$(dc-token demo)   (curl not installed: using Python)"
    with_token=$(http_get "$api" "$("$BIN/dc-token" demo)")
    echo "$with_token"
    code=${with_token%% *}
fi

step "dc-broker status"
"$BIN/dc-broker" status

step "stopping"
kill -INT "$dev_pid"
wait "$dev_pid"
dev_pid=""
if [ "${no_token%% *}" = "401" ] && [ "$code" = "200" ]; then
    printf '\n%sdemo OK%s: 401 without a token, 200 with $(dc-token demo)\n' "$bold" "$plain"
else
    echo "demo FAILED: expected 401 then 200, got ${no_token%% *} and $code" >&2
    exit 1
fi
