# Kill injection for `roundtrip --kill WHAT@TRIP[:DELAY]` (bfmig mode): before trip TRIP's
# real attempt, one extra attempt runs and WHAT is killed (SIGKILL) DELAY seconds (default 1)
# after the memory stream's helper of that trip started. That attempt must fail cleanly: `virsh
# migrate` fails, the guest still runs on the source, its RAM and disk data verify there, and it
# does not run on the destination. Then the daemons are restarted as needed and the trip is
# made again, measured and verified as usual. The trip's result gets a "kill" object.
#
# WHAT: transfer-send (the source's bfmig-transfer of the memory stream), transfer-receive (the
# destination's), bfmigd-src, bfmigd-dst (the daemon of that host; its helpers give up the
# stream when it is gone).

KILL_WHATS=(transfer-send transfer-receive bfmigd-src bfmigd-dst)

# Checks a --kill spec; dies naming what is wrong.
kill_check_spec() {
    local spec=$1 what trip delay
    [[ $spec =~ ^([a-z-]+)@([0-9]+)(:([0-9]+(\.[0-9]+)?))?$ ]] || die "--kill $spec: expected WHAT@TRIP[:DELAY]"
    what=${BASH_REMATCH[1]} trip=${BASH_REMATCH[2]} delay=${BASH_REMATCH[4]:-1}
    [[ " ${KILL_WHATS[*]} " == *" $what "* ]] || die "--kill $spec: WHAT is one of ${KILL_WHATS[*]}"
    ((trip >= 1)) || die "--kill $spec: trips count from 1"
    : "$delay"
}

# The spec for trip $1 among the rest of the arguments (first match), or nothing.
kill_spec_for_trip() {
    local trip=$1 spec
    shift
    for spec; do
        [[ ${spec#*@} =~ ^$trip(:|$) ]] && { echo "$spec"; return 0; }
    done
    return 1
}

# Pids of processes running inside host H whose command line matches the regex $2.
host_pids_matching() {
    local h=$1 pattern=$2 ns p
    ns=$(stat -L -c %i "$LAB_RUN/$h.mnt")
    for p in $(pgrep -f -- "$pattern"); do
        [[ $(stat -L -c %i "/proc/$p/ns/mnt" 2> /dev/null) == "$ns" ]] && echo "$p"
    done
    return 0
}

# The memory stream's helper of this trip on host H (send or receive).
kill_stream_helper() { host_pids_matching "$1" "bfmig-transfer $2 --kind mig" | head -n 1; }

# Waits (up to 120 s, or until the migrate process $3 ends) for the memory stream's helper on
# host H in role $2 to start; prints its pid.
kill_wait_helper() {
    local h=$1 role=$2 migrate=$3 deadline=$((SECONDS + 120)) pid
    while ((SECONDS < deadline)) && pid_alive "$migrate"; do
        pid=$(kill_stream_helper "$h" "$role")
        [[ -n $pid ]] && { echo "$pid"; return 0; }
        sleep 0.05
    done
    return 1
}

# One attempt of the trip SRC -> DST with a kill; fills KILL_JSON. Dies when the attempt did not
# fail cleanly.
kill_attempt() {
    local mode=$1 src=$2 dst=$3 spec=$4 what trip delay
    [[ $mode == bfmig* ]] || die "--kill needs --mode bfmig or bfmig-transparent"
    [[ $spec =~ ^([a-z-]+)@([0-9]+)(:([0-9.]+))?$ ]]
    what=${BASH_REMATCH[1]} trip=${BASH_REMATCH[2]} delay=${BASH_REMATCH[4]:-1}
    local out=$LAB_VAR/work/kill-$trip.out role h victim helper rc t0 t1
    case $what in
        transfer-send | bfmigd-src) role=send h=$src ;;
        transfer-receive | bfmigd-dst) role=receive h=$dst ;;
    esac
    log "$mode: trip $trip ${src^^} -> ${dst^^}: attempt with $what killed ${delay}s into the memory stream"
    t0=$(now)
    host_exec "$src" timeout 600 virsh -q -c qemu:///system migrate --live --persistent "${LAB_STORAGE_ARGS[@]}" \
        "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" > "$out" 2>&1 &
    local migrate=$!
    helper=$(kill_wait_helper "$h" "$role" "$migrate") ||
        { wait "$migrate" || true; die "$mode: trip $trip: no memory stream helper ($role) appeared on ${h^^} (migrate: $(tr '\n' ' ' < "$out"))"; }
    sleep "$delay"
    case $what in
        transfer-*) victim=$helper ;;
        bfmigd-*) victim=$(host_pid "$h" bfmigd) ;;
    esac
    pid_alive "$helper" || { wait "$migrate" || true; die "$mode: trip $trip: the memory stream ended before the kill (delay $delay s too long?)"; }
    kill -KILL "$victim"
    log "$mode: trip $trip: killed $what (pid $victim) on ${h^^}"
    rc=0
    wait "$migrate" || rc=$?
    t1=$(now)
    ((rc != 0)) || die "$mode: trip $trip: virsh migrate succeeded although $what was killed"
    local src_state dst_state bad
    src_state=$(host_virsh "$src" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
    dst_state=$(host_virsh "$dst" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
    [[ $src_state == running ]] || die "$mode: trip $trip: after the failed attempt the guest is '$src_state' on the source ${src^^}"
    [[ $dst_state != running && $dst_state != paused ]] || die "$mode: trip $trip: the guest is '$dst_state' on the destination ${dst^^} after the failed attempt"
    guest_verify "$src" "$KILL_CHUNKS"
    bad=$VERIFY_BAD
    [[ $bad == 0 ]] || die "$mode: trip $trip: $bad guest data mismatches on the source after the failed attempt"
    log "$mode: trip $trip: attempt failed cleanly ($(tail -n 1 "$out")); guest running on ${src^^}, data verified"
    KILL_JSON=$(jq -n --arg what "$what" --argjson delay "$delay" --argjson rc "$rc" --arg err "$(tail -n 1 "$out")" \
        --arg src "$src_state" --arg dst "${dst_state:-none}" --argjson bad "$bad" \
        --argjson secs "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" \
        '{what: $what, delay_seconds: $delay, migrate_failed: true, migrate_rc: $rc, migrate_error: $err,
          source_state: $src, destination_state: $dst, source_mismatches: $bad, attempt_seconds: $secs}')
}
