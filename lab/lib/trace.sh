# Opt-in trip tracing (BFMIG_LAB_TRACE=DIR, for any scenario that runs `roundtrip`, `lab speed`
# included): where a switchover's milliseconds go, recorded inside the very runs whose medians
# are reported, not in a separate run that may not reproduce them (issue 14: a return trip over
# stock's downtime in `lab speed` and not in single trips).
#
# Per trip: libvirt's monitor log on both hosts, a system-wide perf record with wall-clock
# timestamps, and afterwards DIR/MODE/tripN[-HHMMSS]/{qmp-SRC.log,qmp-DST.log,bfmigd-H.log,trip.perf,
# timeline.txt,cpu.txt} (lab/tools/switchover-timeline and switchover-cpu on them). Costs a few
# percent of a core while recording; leave it off for figures that are reported.

TRACE_PERF_PID=""

trace_trip_start() {
    [[ -n ${BFMIG_LAB_TRACE:-} ]] || return 0
    local src=$1 dst=$2 h
    ensure_commands perf:linux-perf
    for h in "$src" "$dst"; do
        host_exec "$h" rm -f "/tmp/bfmig-trace-qmp-$h.log"
        host_exec "$h" virt-admin -q daemon-log-filters "1:qemu.qemu_monitor 1:qemu.qemu_migration 4:*" > /dev/null
        host_exec "$h" virt-admin -q daemon-log-outputs "1:file:/tmp/bfmig-trace-qmp-$h.log" > /dev/null
    done
    TRACE_PERF_DATA=$(mktemp /tmp/bfmig-trace.XXXXXX.perf)
    perf record -q -a -e cpu-clock -F 1999 -k CLOCK_REALTIME -o "$TRACE_PERF_DATA" -- sleep 900 > /dev/null 2>&1 &
    TRACE_PERF_PID=$!
    sleep 1 # perf has opened its events before the trip starts
}

# A failed trip: stop the recording (the lab's hosts go down with their logging settings).
trace_trip_abandon() {
    [[ -n $TRACE_PERF_PID ]] || return 0
    kill -INT "$TRACE_PERF_PID" 2> /dev/null
    wait "$TRACE_PERF_PID" 2> /dev/null
    TRACE_PERF_PID=""
    rm -f "$TRACE_PERF_DATA"
}

trace_trip_end() {
    [[ -n ${BFMIG_LAB_TRACE:-} && -n $TRACE_PERF_PID ]] || return 0
    local mode=$1 trip=$2 src=$3 dst=$4 h out
    # A new directory per trip: `lab speed` runs each mode's trips several times.
    out=$(realpath -m "$BFMIG_LAB_TRACE")/$mode/trip$trip
    [[ -e $out ]] && out+=-$(date +%H%M%S)
    mkdir -p "$out"
    kill -INT "$TRACE_PERF_PID" 2> /dev/null
    wait "$TRACE_PERF_PID" 2> /dev/null
    TRACE_PERF_PID=""
    mv "$TRACE_PERF_DATA" "$out/trip.perf"
    for h in "$src" "$dst"; do
        host_exec "$h" cat "/tmp/bfmig-trace-qmp-$h.log" > "$out/qmp-$h.log" 2> /dev/null
        # Back to what the lab's libvirtd.conf sets (hosts.sh): no filters, its own log file.
        host_exec "$h" virt-admin -q daemon-log-outputs "3:file:/var/log/libvirt/libvirtd.log" > /dev/null 2>&1
        host_exec "$h" virt-admin -q daemon-log-filters "" > /dev/null 2>&1
        host_exec "$h" rm -f "/tmp/bfmig-trace-qmp-$h.log"
        [[ -f $(bfmig_dir "$h")/bfmigd.log ]] && cp "$(bfmig_dir "$h")/bfmigd.log" "$out/bfmigd-$h.log"
    done
    "$BFMIG_REPO/lab/tools/switchover-timeline" "$out/qmp-$src.log" "$out/qmp-$dst.log" > "$out/timeline.txt" 2>&1
    "$BFMIG_REPO/lab/tools/switchover-cpu" "$out/trip.perf" "$out/qmp-$src.log" "$out/qmp-$dst.log" --bin 50 > "$out/cpu.txt" 2>&1
    log "trace: trip $trip in $out ($(tail -n 1 "$out/timeline.txt" | cut -c 1-160))"
}
