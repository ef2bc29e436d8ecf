#!/usr/bin/env bash
# Warm one model on every host of a list: each host's agent downloads it (peers first,
# so the mirror serves it about once however many hosts there are), JOBS hosts at once.
#
#   examples/warm-hosts.sh HOSTS_FILE REPO [hfswarm download flags...]
#   examples/warm-hosts.sh hosts.txt meta-llama/Llama-3.1-8B --revision main
#   JOBS=16 examples/warm-hosts.sh - org/model < hosts.txt
#
# It uses ssh: each host must accept `ssh HOST hfswarm download REPO --quiet` without a
# prompt (keys; BatchMode is on) and should run an agent (without one, the download runs
# in the ssh session, from the mirror only). HOSTS_FILE: one [user@]host per line;
# blank lines and # comments are skipped; `-` reads standard input.
#
# Environment: JOBS (hosts at once, default 8), SSH (the ssh command, default
# `ssh -o BatchMode=yes -o ConnectTimeout=10`), HFSWARM (the command on the hosts,
# default `hfswarm`, e.g. /opt/hfswarm/bin/hfswarm).
# Prints one line per host (ok with the snapshot path, or FAIL with the last error line),
# then a summary; exits 0 only if every host succeeded.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
hosts_file=$1
shift
jobs=${JOBS:-8}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "warm-hosts: JOBS=$jobs is not a positive number" >&2; exit 2; }

[[ $hosts_file == - ]] && hosts_file=/dev/stdin
mapfile -t hosts < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$hosts_file" | grep -v '^$' || true)
if [[ ${#hosts[@]} -eq 0 ]]; then
    echo "warm-hosts: no hosts in $hosts_file" >&2
    exit 2
fi

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT

# The remote command line, each argument quoted for the remote shell.
remote="${HFSWARM:-hfswarm} download $(printf '%q ' "$@")--quiet"

warm_one() {  # host index: runs in the background, leaves index.ok or index.fail
    local host=$1 i=$2 out
    # shellcheck disable=SC2086  # SSH is a command line on purpose
    if out=$(${SSH:-ssh -o BatchMode=yes -o ConnectTimeout=10} "$host" "$remote" </dev/null 2>"$results/$i.err"); then
        printf '%s\n' "${out##*$'\n'}" >"$results/$i.ok"
    else
        echo "exit $?: $(grep -v '^[[:space:]]*$' "$results/$i.err" | tail -n 1)" >"$results/$i.fail"
    fi
}

running=0
for i in "${!hosts[@]}"; do
    warm_one "${hosts[$i]}" "$i" &
    running=$((running + 1))
    if ((running >= jobs)); then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

ok=0
failed=0
for i in "${!hosts[@]}"; do
    if [[ -f $results/$i.ok ]]; then
        ok=$((ok + 1))
        printf 'ok    %s  %s\n' "${hosts[$i]}" "$(cat "$results/$i.ok")"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s  %s\n' "${hosts[$i]}" "$(cat "$results/$i.fail" 2>/dev/null || echo 'no result')"
    fi
done
echo "$ok ok, $failed failed, of ${#hosts[@]} hosts"
((failed == 0))
