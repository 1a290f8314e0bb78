# The fault matrix for `roundtrip --fault KIND@TRIP[:DELAY]` (bfmig modes). An in-trip fault
# runs one extra attempt of trip TRIP with KIND injected DELAY seconds (default 0) into the phase
# it names; a damage fault damages the destination's retained state before that attempt.
# Either way the guest must then run on exactly one host with verified data, and trip TRIP
# itself (the retry) runs as usual, measured and verified. The trip's result gets a "fault"
# object: what was done, how the attempt ended, where the guest was and the attempt's bytes; the
# trip's own wire_bytes are the retry's.
#
# KIND:
#   link5-mem link5-disk link60-mem link60-disk   the WAN (veth) down for 5 or 60 s, starting in
#                                  the memory phase (the memory stream's helper runs) or the disk
#                                  phase (the NBD helper runs, the memory stream has not begun)
#   abort                          virsh domjobabort on the source, in the memory phase
#   libvirtd-src libvirtd-dst      that host's libvirtd restarted (SIGTERM, started again), memory phase
#   bfmigd-src bfmigd-dst          that host's bfmigd restarted (SIGTERM, started again), memory phase
#   store-full                     the destination's BFMig store on a small file system with no
#                                  space left (loop-mounted ext4 in its mount namespace, holding a
#                                  copy of the store), for the whole attempt
#   kill-all                       SIGKILL of every bfmigd and bfmig-transfer on both hosts, then
#                                  both daemons started again; memory phase
#   damage-pages damage-map        before the attempt: 64 KiB of random bytes written into the
#                                  destination's largest retained page file (mem/*.pages) or
#                                  disk map (disk/*.map); the attempt itself is an ordinary trip
#
# Phases come from the helpers the daemons spawn: a copy-storage migration mirrors the disk
# first (NBD helper) and opens the memory stream only when the mirror is in sync (mig helper).

FAULT_KINDS=(link5-mem link5-disk link60-mem link60-disk abort libvirtd-src libvirtd-dst bfmigd-src bfmigd-dst
    store-full kill-all damage-pages damage-map)
# How long a fault may wait for its phase to begin.
FAULT_PHASE_WAIT=180

# Checks a --fault spec; dies naming what is wrong.
fault_check_spec() {
    local spec=$1 kind
    [[ $spec =~ ^([a-z0-9-]+)@([1-9][0-9]*)(:([0-9]+(\.[0-9]+)?))?$ ]] || die "--fault $spec: expected KIND@TRIP[:DELAY]"
    kind=${BASH_REMATCH[1]}
    [[ " ${FAULT_KINDS[*]} " == *" $kind "* ]] || die "--fault $spec: KIND is one of ${FAULT_KINDS[*]}"
}

fault_between_trips() { [[ $1 == damage-* ]]; }

# The helper of stream KIND (mig|nbd) in ROLE (send|receive) on host H, or nothing.
fault_helper() { host_pids_matching "$1" "bfmig-transfer $2 --kind $3" | head -n 1; }

# Waits until the trip run by the migrate process $3 (SRC $1) is in PHASE (mem|disk): prints the
# helper's pid. Fails when the migration ended first or FAULT_PHASE_WAIT passed.
fault_wait_phase() {
    local src=$1 phase=$2 migrate=$3 deadline=$((SECONDS + FAULT_PHASE_WAIT)) nbd mig
    while ((SECONDS < deadline)) && pid_alive "$migrate"; do
        mig=$(fault_helper "$src" send mig)
        if [[ $phase == mem ]]; then
            [[ -n $mig ]] && { echo "$mig"; return 0; }
        else
            nbd=$(fault_helper "$src" send nbd)
            [[ -n $nbd && -z $mig ]] && { echo "$nbd"; return 0; }
        fi
        sleep 0.05
    done
    return 1
}

fault_link() {
    local state=$1 h
    for h in "${LAB_HOSTS[@]}"; do ip -n "$(netns_name "$h")" link set "lab-$h" "$state"; done
}

# SIGTERM (as systemctl restart does) to host H's daemon WHAT (libvirtd|bfmigd), waits up to 30 s
# for it to exit, then SIGKILL.
fault_stop_daemon() {
    local h=$1 what=$2 pid
    pid=$(host_pid "$h" "$what" || true)
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 1 150); do pid_alive "$pid" || break; sleep 0.2; done
    pid_alive "$pid" && kill -KILL "$pid" 2> /dev/null
    rm -f "$LAB_RUN/$h.$what.pid"
}

fault_restart_libvirtd() {
    local h=$1
    fault_stop_daemon "$h" libvirtd
    hostns_spawn "$LAB_RUN/$h.mnt" "$(netns_name "$h")" "$(host_dir "$h")/libvirtd.out" libvirtd --listen
    echo "$HOSTNS_PID" > "$LAB_RUN/$h.libvirtd.pid"
    host_wait_ready "$h"
}

# Host H's bfmigd (peer P) as the mode runs it, without waiting for any guest's sockets.
fault_start_bfmigd() {
    local mode=$1 h=$2 peer=$3 transparent=no
    [[ $mode == bfmig-transparent* ]] && transparent=yes
    BFMIG_TRANSPARENT=$transparent bfmig_start_host "$h" "$peer"
}

# --- store-full: the destination's store on a small, full file system -----------------------

fault_store_image() { echo "$LAB_VAR/work/store-full-$1.img"; }

# Host H's store moves onto a loop-mounted ext4 just big enough for a copy of it, mounted over
# the store directory in H's mount namespace only, and then filled to the last block. Its
# bfmigd is stopped around the move (it must not keep files of the store below the mount open)
# and started again on the full store by the mode's prepare.
fault_store_fill() {
    local h=$1 dir img mib
    dir=$(bfmig_dir "$h")/state
    img=$(fault_store_image "$h")
    fault_stop_daemon "$h" bfmigd
    mib=$(($(du -sm "$dir" | cut -f1) * 11 / 10 + 16))
    rm -f "$img"
    truncate -s "${mib}M" "$img"
    mkfs.ext4 -q -m 0 -O ^has_journal -F "$img" || die "store-full: mkfs.ext4 failed"
    host_exec "$h" sh -ec '
        tmp=$(mktemp -d)
        mount -o loop "$1" "$tmp"
        cp -a --sparse=always "$2/." "$tmp/"
        umount "$tmp"
        rmdir "$tmp"
        mount -o loop "$1" "$2"
        dd if=/dev/zero of="$2/.fill" bs=1M status=none 2>/dev/null || true
        dd if=/dev/zero of="$2/.fill-tail" bs=4k status=none 2>/dev/null || true
        sync' sh "$img" "$dir" || die "store-full: mounting the small store on ${h^^} failed"
    log "store-full: ${h^^}'s store on a full ${mib} MiB ext4 ($(host_exec "$h" df -k --output=avail "$dir" | tail -n 1 | tr -d ' ') KiB free)"
}

# Back to the store directory itself, with what the daemon wrote on the small one (minus the
# filler): the store stays the daemon's, whatever it made of the full disk.
fault_store_restore() {
    local h=$1 dir img
    dir=$(bfmig_dir "$h")/state
    img=$(fault_store_image "$h")
    fault_stop_daemon "$h" bfmigd
    host_exec "$h" sh -ec '
        rm -f "$2/.fill" "$2/.fill-tail"
        tmp=$(mktemp -d)
        cp -a --sparse=always "$2/." "$tmp/"
        umount "$2"
        find "$2" -mindepth 1 -delete
        cp -a --sparse=always "$tmp/." "$2/"
        rm -rf "$tmp"' sh "$img" "$dir" || die "store-full: restoring ${h^^}'s store failed"
    rm -f "$img"
}

# --- damage between trips ------------------------------------------------------------------------

# Writes 64 KiB of random bytes into the largest retained file matching GLOB (relative to the
# guest's store directory) on host H, at an offset inside its data; prints "FILE OFFSET".
fault_damage() {
    local h=$1 glob=$2 uuid=$3 dir file size off
    dir=$(bfmig_dir "$h")/state/$uuid
    # shellcheck disable=SC2086 # GLOB is a pattern
    file=$(ls -S $dir/$glob 2> /dev/null | head -n 1)
    [[ -n $file && -s $file ]] || die "damage: host ${h^^} retains no $glob for guest $uuid"
    size=$(stat -c %s "$file")
    # The first allocated 64 KiB past the file's first quarter (a sparse page file reads zeros in
    # its holes; damage there would be rewritten anyway): take the offset from the data map.
    off=$(((size / 4) / 65536 * 65536))
    off=$(perl -e 'sysopen(my $f, $ARGV[0], 0) or die; my $o = sysseek($f, $ARGV[1], 3); print defined $o ? int($o / 65536) * 65536 : 0' "$file" "$off")
    dd if=/dev/urandom of="$file" bs=64k count=1 seek=$((off / 65536)) conv=notrunc status=none
    echo "${file#"$(bfmig_dir "$h")/state/"} $off"
}

# --- the attempt -----------------------------------------------------------------------------------

# Where the guest runs, as "SRC_STATE DST_STATE" once libvirt has settled (no host paused, at
# most 60 s): a failed incoming migration's QEMU may take a moment to go.
fault_settle() {
    local src=$1 dst=$2 s d
    for _ in $(seq 1 120); do
        s=$(host_virsh "$src" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
        d=$(host_virsh "$dst" domstate "$LAB_GUEST" 2> /dev/null | head -n 1 || true)
        [[ $s != paused && $d != paused && $s != "in shutdown" && $d != "in shutdown" ]] &&
            [[ $s != running || $d != running ]] && break
        sleep 0.5
    done
    echo "${s:-none}|${d:-none}"
}

# One fault for trip TRIP SRC -> DST; fills FAULT_JSON. Dies when the guest does not end on
# exactly one host with verified data.
fault_run() {
    local mode=$1 src=$2 dst=$3 spec=$4 kind trip delay
    [[ $mode == bfmig* ]] || die "--fault needs --mode bfmig or bfmig-transparent"
    [[ $spec =~ ^([a-z0-9-]+)@([0-9]+)(:([0-9.]+))?$ ]]
    kind=${BASH_REMATCH[1]} trip=${BASH_REMATCH[2]} delay=${BASH_REMATCH[4]:-0}
    local phase=mem out=$LAB_VAR/work/fault-$trip.out helper rc=0 t0 t1 before after injected="" h damaged=null
    [[ $kind == *-disk ]] && phase=disk
    if fault_between_trips "$kind"; then
        # The damage is done before the attempt, which then runs as any trip would.
        local uuid where
        uuid=$(host_virsh "$src" domuuid "$LAB_GUEST" | head -n 1)
        case $kind in
            damage-pages) where=$(fault_damage "$dst" "mem/*.pages" "$uuid") ;;
            damage-map) where=$(fault_damage "$dst" "disk/*.map" "$uuid") ;;
        esac
        log "$mode: trip $trip: $kind: 64 KiB of random bytes into ${dst^^}'s retained ${where% *} at ${where#* }"
        damaged=$(jq -n --arg host "${dst^^}" --arg file "${where% *}" --argjson off "${where#* }" \
            '{host: $host, file: $file, offset: $off, bytes: 65536}')
        phase=before
    fi
    # A full store is full from the attempt's first byte on.
    [[ $kind == store-full ]] && { fault_store_fill "$dst"; mode_call_optional "$mode" prepare "$src" "$dst"; phase=before; }
    log "$mode: trip $trip ${src^^} -> ${dst^^}: attempt with $kind ${delay}s into the $phase phase"
    before=$(link_bytes)
    t0=$(now)
    host_exec "$src" timeout 900 virsh -q -c qemu:///system migrate --live --persistent "${LAB_STORAGE_ARGS[@]}" \
        "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" > "$out" 2>&1 &
    local migrate=$!
    if [[ $phase == before ]]; then
        injected=0
    elif helper=$(fault_wait_phase "$src" "$phase" "$migrate"); then
        sleep "$delay"
        injected=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}')
        case $kind in
            link5-* | link60-*)
                local secs=${kind#link}
                secs=${secs%-*}
                fault_link down
                log "$mode: trip $trip: link down for ${secs}s ($phase phase, ${injected}s into the attempt)"
                sleep "$secs"
                fault_link up ;;
            abort) host_virsh "$src" domjobabort "$LAB_GUEST" || log "$mode: trip $trip: domjobabort failed" ;;
            libvirtd-src) fault_restart_libvirtd "$src" ;;
            libvirtd-dst) fault_restart_libvirtd "$dst" ;;
            # Started again at once; a graceful stop may first let the trip finish, so where the
            # guest's sockets must be is known only after the attempt (the prepare below).
            bfmigd-src) fault_stop_daemon "$src" bfmigd; fault_start_bfmigd "$mode" "$src" "$dst" ;;
            bfmigd-dst) fault_stop_daemon "$dst" bfmigd; fault_start_bfmigd "$mode" "$dst" "$src" ;;
            kill-all)
                local pids=()
                for h in "${LAB_HOSTS[@]}"; do
                    mapfile -t -O "${#pids[@]}" pids < <(host_pids_matching "$h" 'bfmig-transfer |bfmigd')
                    rm -f "$LAB_RUN/$h.bfmigd.pid"
                done
                kill -KILL "${pids[@]}" 2> /dev/null || true
                log "$mode: trip $trip: SIGKILL to ${#pids[@]} BFMig processes (${pids[*]})" ;;
        esac
        log "$mode: trip $trip: $kind injected ${injected}s into the attempt"
    else
        log "$mode: trip $trip: the attempt never reached its $phase phase (or ended before it): no fault injected"
    fi
    wait "$migrate" || rc=$?
    t1=$(now)
    after=$(link_bytes)
    [[ $kind == link* ]] && fault_link up
    [[ $kind == store-full ]] && fault_store_restore "$dst"
    for h in "${LAB_HOSTS[@]}"; do pid_alive "$(host_pid "$h" libvirtd)" || fault_restart_libvirtd "$h"; done
    mode_call_optional "$mode" cleanup "$src" "$dst"
    local states s d on bad
    states=$(fault_settle "$src" "$dst")
    s=${states%|*} d=${states#*|}
    if [[ $s == running && $d != running ]]; then
        on=$src
    elif [[ $d == running && $s != running ]]; then
        on=$dst
    else
        die "$mode: trip $trip: after the $kind attempt the guest is '$s' on ${src^^} and '$d' on ${dst^^}: not on exactly one host"
    fi
    # The daemons that a fault took are started again; both must come back ready (the host the
    # guest runs on with its sockets towards the other).
    if [[ $on == "$src" ]]; then mode_call_optional "$mode" prepare "$src" "$dst"; else mode_call_optional "$mode" prepare "$dst" "$src"; fi
    guest_verify "$on" "$FAULT_CHUNKS"
    bad=$VERIFY_BAD
    [[ $bad == 0 ]] || die "$mode: trip $trip: $bad guest data mismatches on ${on^^} after the $kind attempt"
    log "$mode: trip $trip: $kind attempt rc $rc ($(tail -n 1 "$out")); guest runs on ${on^^} only ($s/$d), data verified; attempt moved $((after - before)) bytes"
    if [[ $on == "$dst" ]]; then
        # The attempt got through despite the fault: back to the source, so that the trip
        # itself (the one measured) runs as planned.
        lab_migrate_back "$mode" "$src" "$dst"
        mode_call_optional "$mode" prepare "$src" "$dst"
        ((LAB_BACK_RC == 0)) || die "$mode: trip $trip: the return to ${src^^} after the $kind attempt succeeded failed"
        guest_verify "$src" "$FAULT_CHUNKS"
        [[ $VERIFY_BAD == 0 ]] || die "$mode: trip $trip: $VERIFY_BAD guest data mismatches on ${src^^} after the return"
    fi
    FAULT_JSON=$(jq -n --arg kind "$kind" --arg phase "$phase" --argjson delay "$delay" --arg injected "${injected:-}" \
        --argjson rc "$rc" --arg err "$(tail -n 1 "$out")" --arg s "$s" --arg d "$d" --arg on "${on^^}" --argjson bad "$bad" \
        --argjson damaged "$damaged" --argjson wire $((after - before)) --argjson secs "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" \
        '{kind: $kind, attempt: true, phase: $phase, delay_seconds: $delay,
          injected_after_seconds: (if $injected == "" then null else ($injected | tonumber) end),
          migrate_failed: ($rc != 0), migrate_rc: $rc, migrate_error: $err, source_state: $s, destination_state: $d,
          guest_on: $on, mismatches: $bad, attempt_wire_bytes: $wire, attempt_seconds: $secs}
         + (if $damaged == null then {} else {damaged: $damaged} end)')
}
