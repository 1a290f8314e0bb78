# Abort injection for `roundtrip --abort TRIP[:DELAY]`: before trip TRIP's real attempt, one extra
# attempt runs and `virsh domjobabort` is called on the source DELAY seconds (default 1) after
# `virsh migrate` started. That attempt must fail cleanly: `virsh migrate` fails, the guest still
# runs on the source and its RAM and disk data verify there, and it does not run on the
# destination. Then the trip is made again (the retry), measured and verified as usual; its
# result gets an "abort" object with the failed attempt's bytes and seconds. Any mode (stock too,
# for comparison).

# Checks an --abort spec; dies naming what is wrong.
abort_check_spec() {
    [[ $1 =~ ^([0-9]+)(:([0-9]+(\.[0-9]+)?))?$ ]] || die "--abort $1: expected TRIP[:DELAY]"
    ((BASH_REMATCH[1] >= 1)) || die "--abort $1: trips count from 1"
}

# The delay of the --abort spec for trip $1 among the rest of the arguments, or nothing.
abort_delay_for_trip() {
    local trip=$1 spec
    shift
    for spec; do
        [[ $spec =~ ^$trip(:([0-9.]+))?$ ]] && { echo "${BASH_REMATCH[2]:-1}"; return 0; }
    done
    return 1
}

# One attempt of the trip SRC -> DST aborted DELAY s in; fills ABORT_JSON. Dies when the attempt
# did not fail cleanly.
abort_attempt() {
    local mode=$1 src=$2 dst=$3 trip=$4 delay=$5
    local out=$LAB_VAR/work/abort-$trip.out rc=0 t0 t1 before after abort_rc=0 abort_out
    log "$mode: trip $trip ${src^^} -> ${dst^^}: attempt aborted (virsh domjobabort) ${delay}s in"
    before=$(link_bytes)
    t0=$(now)
    host_exec "$src" timeout 600 virsh -q -c qemu:///system migrate --live --persistent "${LAB_STORAGE_ARGS[@]}" \
        "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" > "$out" 2>&1 &
    local migrate=$!
    sleep "$delay"
    pid_alive "$migrate" || { wait "$migrate" || true; die "$mode: trip $trip: the migration ended before the abort (delay $delay s too long?): $(tr '\n' ' ' < "$out")"; }
    abort_out=$(host_virsh "$src" domjobabort "$LAB_GUEST" 2>&1) || abort_rc=$?
    log "$mode: trip $trip: domjobabort on ${src^^}: rc $abort_rc $(tr '\n' ' ' <<< "$abort_out")"
    wait "$migrate" || rc=$?
    t1=$(now)
    after=$(link_bytes)
    ((rc != 0)) || die "$mode: trip $trip: virsh migrate succeeded although its job was aborted"
    # The destination's QEMU of the failed attempt goes away asynchronously.
    local src_state dst_state bad
    for _ in $(seq 1 50); do
        dst_state=$(host_virsh "$dst" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
        [[ $dst_state == running || $dst_state == paused ]] || break
        sleep 0.2
    done
    src_state=$(host_virsh "$src" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
    [[ $src_state == running ]] || die "$mode: trip $trip: after the aborted attempt the guest is '$src_state' on the source ${src^^}"
    [[ $dst_state != running && $dst_state != paused ]] || die "$mode: trip $trip: the guest is '$dst_state' on the destination ${dst^^} after the aborted attempt"
    guest_verify "$src" "$ABORT_CHUNKS"
    bad=$VERIFY_BAD
    [[ $bad == 0 ]] || die "$mode: trip $trip: $bad guest data mismatches on the source after the aborted attempt"
    log "$mode: trip $trip: aborted attempt failed cleanly in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s, $((after - before)) bytes ($(tail -n 1 "$out")); guest running on ${src^^}, data verified"
    ABORT_JSON=$(jq -n --argjson delay "$delay" --argjson rc "$rc" --arg err "$(tail -n 1 "$out")" \
        --arg src "$src_state" --arg dst "${dst_state:-none}" --argjson bad "$bad" --argjson wire "$((after - before))" \
        --argjson secs "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" \
        '{delay_seconds: $delay, migrate_failed: true, migrate_rc: $rc, migrate_error: $err,
          source_state: $src, destination_state: $dst, source_mismatches: $bad,
          attempt_wire_bytes: $wire, attempt_seconds: $secs}')
}
