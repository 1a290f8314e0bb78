# Opt-in trip tracing (BFMIG_LAB_TRACE=DIR, for `lab speed` and `lab scenario roundtrip` with one
# guest): where a switchover's milliseconds go, recorded in runs made exactly as the reported ones
# are, not in a separate single trip that may not reproduce them (issue 14: a return trip over
# stock's downtime in `lab speed` and not in single trips). Medians of traced runs are not for
# publishing: perf takes its share of the 2 cores.
#
# Per trip, into DIR/MODE/tripN-HHMMSS/: libvirt's monitor log of both hosts (qmp-H.log), a
# system-wide perf record with wall-clock timestamps (trip.perf), what each bfmigd logged during
# the trip (bfmigd-H.log, bfmig modes), and lab/tools/switchover-timeline and switchover-cpu on
# them (timeline.txt, cpu.txt).

TRACE_PERF_PID=""
TRACE_PERF_DATA=""
TRACE_HOSTS=()
declare -A TRACE_FILTERS=() TRACE_OUTPUTS=() TRACE_BFMIGD_AT=()

# Inside each host /var/log/libvirt is its own (hosts.sh): per host and per lab, gone with `lab down`.
TRACE_QMP_LOG=/var/log/libvirt/bfmig-trace-qmp.log

trace_trip_start() {
    [[ -n ${BFMIG_LAB_TRACE:-} ]] || return 0
    local h log
    ensure_commands perf:linux-perf
    TRACE_HOSTS=("$@")
    for h in "${TRACE_HOSTS[@]}"; do
        # Put back afterwards exactly what was set (libvirtd.conf's values, or a user's).
        TRACE_FILTERS[$h]=$(host_exec "$h" virt-admin -q daemon-log-filters | xargs)
        TRACE_OUTPUTS[$h]=$(host_exec "$h" virt-admin -q daemon-log-outputs | xargs)
        host_exec "$h" rm -f "$TRACE_QMP_LOG"
        host_exec "$h" virt-admin -q daemon-log-filters "1:qemu.qemu_monitor 1:qemu.qemu_migration 4:*" > /dev/null
        host_exec "$h" virt-admin -q daemon-log-outputs "1:file:$TRACE_QMP_LOG" > /dev/null
        log=$(bfmig_dir "$h")/bfmigd.log
        TRACE_BFMIGD_AT[$h]=$(stat -c %s "$log" 2> /dev/null || echo 0)
    done
    TRACE_PERF_DATA=$(mktemp /tmp/bfmig-trace.XXXXXX.perf)
    perf record -q -a -e cpu-clock -F 1999 -k CLOCK_REALTIME -o "$TRACE_PERF_DATA" -- sleep 900 > /dev/null 2>&1 &
    TRACE_PERF_PID=$!
    # Whatever ends this shell before the trip's end (a die in a mode's step) stops the recording.
    trap trace_trip_abandon EXIT
    sleep 1 # perf has opened its events before the trip starts
    if ! kill -0 "$TRACE_PERF_PID" 2> /dev/null; then
        log "trace: perf record did not start; this trip has no CPU profile"
        TRACE_PERF_PID=""
    fi
}

# perf ends by SIGINT (it saves its data, then exits by the signal: wait's status is not an error here).
trace_perf_stop() {
    [[ -n $TRACE_PERF_PID ]] || return 0
    kill -INT "$TRACE_PERF_PID" 2> /dev/null || true
    wait "$TRACE_PERF_PID" 2> /dev/null || true
    TRACE_PERF_PID=""
}

# Each host's logging back to what it was, and its trace log gone.
trace_logging_restore() {
    local h
    for h in "${TRACE_HOSTS[@]}"; do
        host_exec "$h" virt-admin -q daemon-log-outputs "${TRACE_OUTPUTS[$h]}" > /dev/null 2>&1 || true
        host_exec "$h" virt-admin -q daemon-log-filters "${TRACE_FILTERS[$h]}" > /dev/null 2>&1 || true
        host_exec "$h" rm -f "$TRACE_QMP_LOG" || true
    done
    TRACE_HOSTS=()
}

# A trip that did not reach its end: stop recording, keep nothing.
trace_trip_abandon() {
    ((${#TRACE_HOSTS[@]})) || return 0
    trace_perf_stop
    rm -f "$TRACE_PERF_DATA"
    trace_logging_restore
}

trace_trip_end() {
    ((${#TRACE_HOSTS[@]})) || return 0
    local mode=$1 trip=$2 src=$3 dst=$4 h out
    out=$(realpath -m "$BFMIG_LAB_TRACE")/$mode/trip$trip-$(date +%H%M%S)
    mkdir -p "$out"
    trace_perf_stop
    mv "$TRACE_PERF_DATA" "$out/trip.perf"
    for h in "${TRACE_HOSTS[@]}"; do
        host_exec "$h" cat "$TRACE_QMP_LOG" > "$out/qmp-$h.log" 2> /dev/null || true
        # Only what this trip added: the log outlives daemons (bfmig.sh rotates it when one starts).
        [[ $mode != bfmig* ]] || tail -c +"$((TRACE_BFMIGD_AT[$h] + 1))" "$(bfmig_dir "$h")/bfmigd.log" > "$out/bfmigd-$h.log" 2> /dev/null || true
    done
    trace_logging_restore
    trap - EXIT
    "$BFMIG_REPO/lab/tools/switchover-timeline" "$out/qmp-$src.log" "$out/qmp-$dst.log" > "$out/timeline.txt" 2>&1 || true
    if [[ -s $out/trip.perf ]]; then
        "$BFMIG_REPO/lab/tools/switchover-cpu" "$out/trip.perf" "$out/qmp-$src.log" "$out/qmp-$dst.log" --bin 50 > "$out/cpu.txt" 2>&1 || true
    fi
    log "trace: trip $trip in $out ($(tail -n 1 "$out/timeline.txt" | cut -c 1-160))"
}
