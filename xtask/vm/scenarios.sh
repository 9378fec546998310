#!/bin/bash
# Runs inside the VM that `cargo xtask vm` boots (observer-scenarios.service), against the
# system's containerd.service with the observer as a system service on the system bus.
#
# For each kernel path named in /mnt/vm/paths ("auto": the fast path where it loads;
# "tracepoint": the fast path turned off), it restarts containerd and the observer and runs:
#   sensors        which hook and path each sensor uses
#   fast_path      (auto only) accept queue on fentry/fexit and process exit on tp_btf
#   blocked        the blocked-thread program runs: on tp_btf (auto) or the classic
#                  sched_switch tracepoint (tracepoint), with runs counted
#   accept_latency the heartbeat's connections are timed from connect to accept
#   crash          SIGKILL: exit seen by eBPF, restarted over D-Bus
#   exit_cause     that exit names SIGKILL and the kill process that sent it
#   freeze         SIGSTOP: connections wait in the queue, verdict hung, restarted
#   cost           BPF run counts and average run time after a burst of connects
# Results go to /mnt/vm/results: results.tsv (path, scenario, pass|fail|skip, detail), the
# status document, sensor costs and the observer's journal of each pass.
set -u

SHARE=/mnt/vm
OUT=$SHARE/results
STATUS_URL=http://127.0.0.1:9847/status
SOCKET=/run/containerd/containerd.sock

mkdir -p "$OUT"
: >"$OUT/results.tsv"
uname -r >"$OUT/kernel"
# Program run times depend on it: under emulation a clock read can cost microseconds.
cat /sys/devices/system/clocksource/clocksource0/current_clocksource >"$OUT/clocksource"

say() { echo "vm: $*"; }

record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/results.tsv"
    say "[$1] $2: $3 ($4)"
}

# The status document; under emulation an answer can take a while, so retry a few times.
status() {
    local try
    for try in 1 2 3; do
        curl -sSf --max-time 5 "$STATUS_URL" && return 0
        sleep 0.5
    done
    say "no status document from $STATUS_URL"
    return 1
}

# wait_for SECONDS JQ_FILTER: until the status document satisfies the filter.
wait_for() {
    local deadline=$((SECONDS + $1))
    local doc
    while [ "$SECONDS" -lt "$deadline" ]; do
        # jq -e on no input at all succeeds: a missing document must not pass.
        if doc=$(status) && [ -n "$doc" ] && jq -e "$2" <<<"$doc" >/dev/null 2>&1; then
            return 0
        fi
        # Each check starts curl and jq: under emulation that is load in itself.
        sleep 0.5
    done
    return 1
}

# containerd's main PID once it runs; a PID of 0 would make `kill` signal our own group.
main_pid() {
    local pid deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        pid=$(systemctl show -p MainPID --value containerd.service)
        if [ "${pid:-0}" -gt 1 ]; then
            echo "$pid"
            return 0
        fi
        sleep 0.5
    done
    return 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

start_pass() {
    local path=$1
    systemctl stop observer.service
    systemctl reset-failed containerd.service observer.service 2>/dev/null
    systemctl restart containerd.service
    if [ "$path" = tracepoint ]; then
        echo OBSERVER_KERNEL_HOOKS=tracepoint >/run/observer.env
    else
        : >/run/observer.env
    fi
    systemctl start observer.service
    if ! wait_for 90 '.state == "healthy"'; then
        record "$path" start fail "observer never reported containerd healthy: $(status | jq -c '{state, last_probe}')"
        return 1
    fi
    status | jq '.sensors' >"$OUT/sensors-$path.json"
    local summary
    summary=$(status | jq -r '.sensors | to_entries | map("\(.key)=\(.value.path // .value.state)") | join(" ")')
    record "$path" sensors pass "$summary"
    return 0
}

check_fast_path() {
    local path=$1
    [ "$path" = auto ] || return 0
    local accept exit
    accept=$(status | jq -r '.sensors.accept_queue.path // "none"')
    exit=$(status | jq -r '.sensors.process_exit.path // "none"')
    if [ "$accept" = fentry ] && [ "$exit" = tp_btf ]; then
        record "$path" fast_path pass "accept_queue=fentry process_exit=tp_btf"
    else
        record "$path" fast_path fail "accept_queue=$accept process_exit=$exit: $(status | jq -c '[.sensors[] | .reason]')"
    fi
}

check_blocked() {
    local path=$1 want=tp_btf got runs
    [ "$path" = tracepoint ] && want=tracepoint
    got=$(status | jq -r '.sensors.blocked_threads.path // .sensors.blocked_threads.state')
    runs=$(status | jq -r '[.sensors.blocked_threads.programs[].run_count] | add // 0')
    if [ "$got" = "$want" ] && [ "${runs:-0}" -gt 0 ]; then
        record "$path" blocked pass "blocked_threads=$got, $runs sched_switch runs"
    else
        record "$path" blocked fail "blocked_threads=$got (want $want), $runs runs: $(status | jq -c '.sensors.blocked_threads | {reason, notes}')"
    fi
}

check_accept_latency() {
    local path=$1
    if [ "$(status | jq -r '.sensors.accept_queue.state')" != on ]; then
        record "$path" accept_latency skip "accept queue sensor is $(status | jq -r '.sensors.accept_queue | "\(.state): \(.reason)"')"
        return
    fi
    if wait_for 20 '(.accept_latency.count // 0) > 0 and .pending_connections.source == "ebpf"'; then
        record "$path" accept_latency pass "$(status | jq -r '.accept_latency | "\(.count) accepts, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, max \(.max_ms) ms"')"
    else
        record "$path" accept_latency fail "no accept measured: $(status | jq -c '{accept_latency, pending_connections}')"
    fi
}

check_crash() {
    local path=$1 pid killer started
    if ! pid=$(main_pid); then
        record "$path" crash fail "containerd.service has no main process"
        return
    fi
    started=$(now_ms)
    /bin/kill -KILL "$pid" &
    killer=$!
    wait "$killer"
    if wait_for 30 "any(.restarts[]; .old_pid == $pid and .new_pid != null and .job_result == \"done\")"; then
        local took=$(($(now_ms) - started))
        record "$path" crash pass "$(status | jq -r --argjson pid "$pid" '(.verdicts | map(select(.state == "crashed" and .pid == $pid)) | last) as $v | "verdict crashed from \($v.evidence[0].source) in \($v.detection_latency_ms) ms; restarted over D-Bus"'), new PID in ${took} ms"
    else
        record "$path" crash fail "no restart of PID $pid: $(status | jq -c '{state, last_exit, restarts: .restarts[-2:], actions: .actions[-2:]}')"
    fi
    local doc
    if doc=$(status) && [ -n "$doc" ] && jq -e --argjson pid "$pid" --argjson killer "$killer" \
        '.last_exit.pid == $pid and .last_exit.source == "ebpf" and .last_exit.cause.signal == 9
         and .last_exit.cause.sender_pid == $killer and .last_exit.cause.sender_comm == "kill"' \
        <<<"$doc" >/dev/null; then
        record "$path" exit_cause pass "$(status | jq -r '.last_exit.cause | "\(.signal_name) from pid \(.sender_pid) (\(.sender_comm))"')"
    else
        record "$path" exit_cause fail "expected SIGKILL from pid $killer (kill): $(status | jq -c '.last_exit')"
    fi
    wait_for 30 '.state == "healthy"' || say "containerd is not healthy again after the crash"
}

check_freeze() {
    local path=$1 pid started
    if ! pid=$(main_pid); then
        record "$path" freeze fail "containerd.service has no main process"
        return
    fi
    started=$(now_ms)
    kill -STOP "$pid"
    if wait_for 60 "any(.restarts[]; .old_pid == $pid and .reason == \"hung\" and .new_pid != null)"; then
        local took=$(($(now_ms) - started))
        record "$path" freeze pass "$(status | jq -r --argjson pid "$pid" '(.verdicts | map(select(.state == "hung" and .pid == $pid)) | last) as $v | "verdict hung in \($v.detection_latency_ms) ms on \([$v.evidence[].source] | unique | join("+"))"'), restarted in ${took} ms"
    else
        kill -CONT "$pid" 2>/dev/null
        record "$path" freeze fail "no hang restart of PID $pid: $(status | jq -c '{state, pending_connections, verdicts: .verdicts[-2:], actions: .actions[-2:]}')"
    fi
    wait_for 30 '.state == "healthy"' || say "containerd is not healthy again after the freeze"
}

# What the sensors' programs cost during one burst of 200 connects to containerd's socket
# (each by a new curl process: an exec, a connect, an accept and an exit), from the BPF stats
# before and after. Whatever else the system does meanwhile (journald and D-Bus traffic reach
# the sock tracepoints too) is counted as well, as it would be on a node.
programs() {
    status | jq '[.sensors | to_entries[] | .key as $s | .value.path as $p
        | .value.programs[] | {sensor: $s, path: $p, name, run_count, run_time_ms}]'
}

check_cost() {
    local path=$1 i before after
    before=$(programs)
    for i in $(seq 200); do
        curl -s -o /dev/null --max-time 1 --unix-socket "$SOCKET" http://containerd/ || true
    done
    after=$(programs)
    jq -n --argjson before "$before" --argjson after "$after" '[$after[] as $a
        | ($before[] | select(.name == $a.name)) as $b
        | {sensor: $a.sensor, path: $a.path, name: $a.name,
           runs: ($a.run_count - $b.run_count), time_ms: ($a.run_time_ms - $b.run_time_ms)}
        | . + {avg_ns: (if .runs > 0 then (.time_ms * 1e6 / .runs | floor) else 0 end)}]' \
        >"$OUT/cost-$path.json"
    record "$path" cost pass "$(jq -r '"200 connects: \(map(.time_ms) | add | . * 100 | floor / 100) ms in all; "
        + (map("\(.name) \(.runs)x \(.avg_ns) ns") | join(", "))' "$OUT/cost-$path.json")"
}

for path in $(cat "$SHARE/paths" 2>/dev/null || echo auto); do
    say "=== kernel $(uname -r), path $path ==="
    if start_pass "$path"; then
        check_fast_path "$path"
        check_blocked "$path"
        check_accept_latency "$path"
        check_crash "$path"
        check_freeze "$path"
        check_cost "$path"
    fi
    status >"$OUT/status-$path.json"
    journalctl -b -u observer.service -o short-monotonic --no-pager >"$OUT/observer-$path.log"
done
systemctl stop observer.service
journalctl -b -o short-monotonic --no-pager >"$OUT/journal.log"
touch "$OUT/done"
sync
