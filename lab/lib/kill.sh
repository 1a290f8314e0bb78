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

# The lab guest's location record on host H (bfmigd's location.json) as "LOCATION PENDING",
# e.g. "away none", "here departing"; "missing" when there is none.
kill_location() {
    local h=$1 uuid=$2 file
    file=$(bfmig_dir "$h")/state/$uuid/location.json
    [[ -f $file ]] || { echo missing; return 0; }
    jq -r '"\(.location) \(.pending // "none")"' "$file"
}

# --kill-unconfirmed TRIP (bfmig modes): before trip TRIP's real attempt, one extra trip SRC -> DST
# runs to its end with both hosts' bfmigd frozen (SIGSTOP) before libvirt's confirmation of it
# (Stopped/Migrated on the source, Resumed/Migrated on the destination): both once the
# destination's memory stream helper runs (see below); SIGKILLed once
# `virsh migrate` returned. The migration itself must succeed. Both location records must still
# hold the trip as pending; restarted, the daemons must settle it against libvirt's real state
# (source: away, destination: here); `virsh start` on the source must be refused; the guest's
# data must verify on the destination, and the guest is migrated back (its return must be let in)
# so that trip TRIP runs as usual. Fills KILL_JSON.
kill_unconfirmed_attempt() {
    local mode=$1 src=$2 dst=$3 trip=$4
    [[ $mode == bfmig* ]] || die "--kill-unconfirmed needs --mode bfmig or bfmig-transparent"
    local out=$LAB_VAR/work/unconfirmed-$trip.out rc=0 pid_src pid_dst uuid at_kill_src at_kill_dst
    uuid=$(host_virsh "$src" domuuid "$LAB_GUEST" | head -n 1)
    pid_src=$(host_pid "$src" bfmigd) pid_dst=$(host_pid "$dst" bfmigd)
    log "$mode: trip $trip: extra trip ${src^^} -> ${dst^^} with both daemons killed between its end and libvirt's confirmation"
    host_exec "$src" timeout 600 virsh -q -c qemu:///system migrate --live --persistent "${LAB_STORAGE_ARGS[@]}" \
        "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" > "$out" 2>&1 &
    local migrate=$!
    kill_wait_helper "$src" send "$migrate" > /dev/null ||
        { wait "$migrate" || true; die "$mode: trip $trip: no memory stream helper appeared on ${src^^} (migrate: $(tr '\n' ' ' < "$out"))"; }
    # The stream's end and libvirt's confirmation come within milliseconds of each other, too
    # close to aim between from outside, so both daemons are frozen as soon as the destination's
    # memory helper runs: each has started its helpers for the trip, and all either has left to
    # see is their end and the confirmation. (The source's helper now ends only after the
    # destination's store commit, which waits for the destination daemon's word that the guest
    # runs there, or 3 s without it: later than the source's Stopped/Migrated.)
    kill_wait_helper "$dst" receive "$migrate" > /dev/null ||
        { wait "$migrate" || true; die "$mode: trip $trip: no memory stream helper appeared on ${dst^^}"; }
    kill -STOP "$pid_dst" "$pid_src"
    wait "$migrate" || rc=$?
    at_kill_src=$(kill_location "$src" "$uuid") at_kill_dst=$(kill_location "$dst" "$uuid")
    kill -KILL "$pid_src" "$pid_dst"
    for _ in $(seq 1 50); do pid_alive "$pid_src" || pid_alive "$pid_dst" || break; sleep 0.1; done
    rm -f "$LAB_RUN/$src.bfmigd.pid" "$LAB_RUN/$dst.bfmigd.pid"
    ((rc == 0)) || die "$mode: trip $trip: the extra trip failed (rc $rc): $(tail -n 1 "$out")"
    log "$mode: trip $trip: daemons killed; records at the kill: ${src^^} '$at_kill_src', ${dst^^} '$at_kill_dst'"

    # Restart both daemons (the mode's prepare starts what is not running and waits until ready).
    mode_call_optional "$mode" prepare "$dst" "$src"
    local settled_src settled_dst
    for _ in $(seq 1 100); do
        settled_src=$(kill_location "$src" "$uuid") settled_dst=$(kill_location "$dst" "$uuid")
        [[ $settled_src == "away none" && $settled_dst == "here none" ]] && break
        sleep 0.2
    done
    log "$mode: trip $trip: after the restart: ${src^^} '$settled_src', ${dst^^} '$settled_dst'"
    local start_rc=0 start_out
    start_out=$(host_virsh "$src" start "$LAB_GUEST" 2>&1) || start_rc=$?
    log "$mode: trip $trip: virsh start on ${src^^}: rc $start_rc: $(tr '\n' ' ' <<< "$start_out")"
    local dst_state bad
    dst_state=$(host_virsh "$dst" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
    guest_verify "$dst" "$KILL_CHUNKS"
    bad=$VERIFY_BAD

    # Back to the source, so that the trip itself runs as planned.
    lab_migrate_back "$mode" "$src" "$dst"
    ((LAB_BACK_RC == 0)) || die "$mode: trip $trip: the return to ${src^^} after the restart failed"
    local back_src back_dst
    for _ in $(seq 1 50); do
        back_src=$(kill_location "$src" "$uuid") back_dst=$(kill_location "$dst" "$uuid")
        [[ $back_src == "here none" && $back_dst == "away none" ]] && break
        sleep 0.2
    done
    log "$mode: trip $trip: back on ${src^^}: ${src^^} '$back_src', ${dst^^} '$back_dst'"
    KILL_JSON=$(jq -n --arg kill_src "$at_kill_src" --arg kill_dst "$at_kill_dst" --arg src "$settled_src" --arg dst "$settled_dst" \
        --argjson start_rc "$start_rc" --arg start_out "$start_out" --arg dst_state "${dst_state:-none}" --argjson bad "$bad" \
        --arg back_src "$back_src" --arg back_dst "$back_dst" \
        '{what: "bfmigd-unconfirmed", migrate_failed: false, at_kill: {source: $kill_src, destination: $kill_dst},
          after_restart: {source: $src, destination: $dst}, source_start_rc: $start_rc, source_start_output: $start_out,
          destination_state: $dst_state, destination_mismatches: $bad, after_return: {source: $back_src, destination: $back_dst}}')
}

# An attempt that got through left the guest on DST: takes it back to SRC with the mode's own
# arguments and daemons for that direction, then sets MIG_ARGS for SRC -> DST again, so that the
# trip itself runs as planned. LAB_BACK_RC: the return migration's exit code (a global, not the
# function's status, so that `set -e` still stops the lab on any other failure in here).
LAB_BACK_RC=0
lab_migrate_back() {
    local mode=$1 src=$2 dst=$3
    LAB_BACK_RC=0
    "$(mode_fn "$mode" args)" "$dst" "$src"
    mode_call_optional "$mode" prepare "$dst" "$src"
    lab_migrate virsh "$dst" "$src" || LAB_BACK_RC=$?
    mode_call_optional "$mode" cleanup "$dst" "$src"
    "$(mode_fn "$mode" args)" "$src" "$dst"
}
