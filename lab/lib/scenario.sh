# Scenario "roundtrip": boot on A, fill, then trips A->B, B->A, ... Each trip is one live
# migration with non-shared storage (--copy-storage-all); after each arrival the harness verifies
# memory and disk (guest checksums + offline image comparison), then changes data on the new host.
# With --storage shared the disk is a network disk both hosts use (lib/storage.sh; shared-file:
# one qcow2 path both hosts see, as a new user's first try looks): trips move memory only, the guest's own checksums verify memory and the disk as the guest sees it (there
# is one image, nothing to compare offline), and the shared image's persistent bitmap is checked.

# The storage part of `virsh migrate`: copy the whole disk (local storage), nothing (shared), or
# --unsafe (shared-file: libvirt cannot tell that the lab's directory is shared).
LAB_STORAGE_ARGS=(--copy-storage-all)
# Text of `info block` that identifies the guest's disk (its qcow2 file, or the NBD server).
GUEST_DISK_MATCH=$LAB_GUEST.qcow2
# yes: the guest's disk is each host's loop device (--storage block), not its qcow2.
LAB_DISK_BLOCK=no

# The guest's disk on host H as the machine reads it, and its format.
guest_disk_path() { if [[ $LAB_DISK_BLOCK == yes ]]; then blockdev_device "$1"; else guest_image "$1"; fi; }
guest_disk_format() { if [[ $LAB_DISK_BLOCK == yes ]]; then echo raw; else echo qcow2; fi; }

# Bytes that crossed the lab's network so far: what every host sent on its lab-<h> (each byte
# leaves exactly one host; with two hosts that is what one end of the veth saw both ways).
link_bytes() {
    local h
    for h in "${LAB_HOSTS[@]}"; do ip -n "$(netns_name "$h")" -s -j link show "lab-$h"; done |
        jq -s 'map(.[0].stats64.tx.bytes) | add'
}

# "Total downtime: 663 ms" from libvirt's completed-job statistics; the destination has them
# (sent in the migration cookie), the source keeps its own copy.
job_downtime_ms() {
    local src=$1 dst=$2 out h
    for h in "$dst" "$src"; do
        out=$(host_virsh "$h" domjobinfo --completed "$LAB_GUEST" 2> /dev/null || true)
        if grep -q '^Total downtime:' <<< "$out"; then
            JOB_DOWNTIME=$(awk '/^Total downtime:/ {print $3}' <<< "$out")
            JOB_ELAPSED=$(awk '/^Time elapsed:/ {print $3; exit}' <<< "$out")
            return 0
        fi
    done
    JOB_DOWNTIME=null
    JOB_ELAPSED=null
}

# Runs a qemu-io command in the guest's QEMU through the disk's device (a node name would
# conflict with the device's write permission). HMP prints qemu-io's output into the QEMU
# log, not into the reply, so only failures to run it are seen here.
guest_qemu_io() {
    local h=$1 cmd=$2 dev out
    dev=$(host_virsh "$h" qemu-monitor-command --hmp "$LAB_GUEST" 'info block' |
        awk -v img="$GUEST_DISK_MATCH" 'index($0, img) {found = 1} found && /Attached to:/ {print $3; exit}')
    [[ -n $dev ]] || die "no device for $LAB_GUEST.qcow2 on host $h"
    out=$(host_virsh "$h" qemu-monitor-command --hmp "$LAB_GUEST" "qemu-io -d $dev \"$cmd\"")
    [[ -z ${out//[[:space:]]/} ]] || die "qemu-io '$cmd' on $h: $out"
}

# Drives the guest's qcow2 to a consistent on-disk state and compares it with what the guest
# left behind on the source. Identical content (allocation may differ) = 0.
images_identical() {
    local src=$1 dst=$2
    guest_qemu_io "$dst" flush
    qemu-img compare -U -f "$(guest_disk_format)" -F "$(guest_disk_format)" "$(guest_disk_path "$src")" "$(guest_disk_path "$dst")" > "$LAB_VAR/work/compare.out" 2>&1
}

# Behind the guest's back: a test that the verifier can fail.
corrupt_guest() {
    local kind=$1 h=$2
    case $kind in
        disk) guest_qemu_io "$h" "write -P 0x5a 1048576 4096" ;;
        ram) guest_cmd "$h" 60 poke-ram 0 ;;
        none | "") ;;
        *) die "--corrupt: disk, ram or none" ;;
    esac
}

scenario_cleanup() {
    local h
    trace_trip_abandon
    for h in "${LAB_HOSTS[@]}"; do
        host_virsh "$h" destroy "$LAB_GUEST" > /dev/null 2>&1 || true
        host_virsh "$h" undefine "$LAB_GUEST" > /dev/null 2>&1 || true
        rm -f "$(guest_image "$h")" "$(guest_base_image "$h")"
    done
    storage_untrace
    storage_stop
    rm -f "$(storage_image)"
    blockdev_detach_all
}

json_skipped() {
    local file=$1 mode=$2 reason=$3
    jq -n --arg mode "$mode" --arg reason "$reason" \
        --arg libvirt "$(stack_libvirt_version)" --arg qemu "$(stack_qemu_version)" \
        '{mode: $mode, stack: {libvirt: $libvirt, qemu: $qemu}, skipped: $reason, trips: []}' > "$file"
}

# One trip SRC -> DST as the chosen tool makes it: virsh (the mode's MIG_ARGS), or OpenStack
# Nova's exact libvirt call through BFMig's bindings (tests/BFMig.Lab.Calls: migrate_uri
# tcp://DST, migrate_disks vda, destination/persistent XML, LIVE|PEER2PEER|UNDEFINE_SOURCE|
# PERSIST_DEST|NON_SHARED_INC, optionally AUTO_CONVERGE). Nova never passes socket URIs: with
# nova the mode decides only what runs around the call (stock: nothing; bfmig-transparent: the daemons).
# Or virt-manager's exact call (virDomainMigrate over two connections, LIVE|PERSIST_DEST|
# UNDEFINE_SOURCE, memory only): `virt-manager` passes the mode's --migrateuri as uri (tcp://DST,
# or BFMig's socket URI in explicit mode), `virt-manager-nouri` passes none (the destination's
# libvirt offers its migration_host).
lab_migrate() {
    local call=$1 src=$2 dst=$3
    case $call in
        virsh)
            host_exec "$src" timeout 3600 virsh -q -c qemu:///system migrate --live --persistent "${LAB_STORAGE_ARGS[@]}" \
                "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" ;;
        virt-manager | virt-manager-nouri)
            local uri=none
            [[ $call == virt-manager ]] && uri=$(mig_arg --migrateuri)
            [[ -n $uri ]] || die "--call virt-manager: the mode gives no --migrateuri"
            host_exec "$src" timeout 3600 "$LAB_CALLS_EXE" virt-manager --guest "$LAB_GUEST" \
                --dest-uri "qemu+tcp://${HOST_ADDR[$dst]}/system" --uri "$uri" ;;
        nova | nova-autoconverge)
            local extra=()
            [[ $call == nova-autoconverge ]] && extra=(--auto-converge)
            host_exec "$src" timeout 3600 "$LAB_CALLS_EXE" nova --guest "$LAB_GUEST" \
                --dest-uri "qemu+tcp://${HOST_ADDR[$dst]}/system" --migrate-uri "tcp://${HOST_ADDR[$dst]}" --disk vda "${extra[@]}" ;;
    esac
}

# The value of option NAME in MIG_ARGS ("" when absent).
mig_arg() {
    local i
    for ((i = 0; i + 1 < ${#MIG_ARGS[@]}; i++)); do
        [[ ${MIG_ARGS[i]} == "$1" ]] && { echo "${MIG_ARGS[i + 1]}"; return 0; }
    done
}

# A memory-only migration keeps only the mode's stream URI: the disk options (--disks-uri, and
# --listen-address, which a tcp:// URI naming the destination makes redundant) go.
storage_filter_args() {
    local keep=() i=0
    while ((i < ${#MIG_ARGS[@]})); do
        case ${MIG_ARGS[i]} in
            --disks-uri | --listen-address) i=$((i + 2)) ;;
            *) keep+=("${MIG_ARGS[i]}"); i=$((i + 1)) ;;
        esac
    done
    MIG_ARGS=("${keep[@]}")
}

# The Nova call's tool, built once per source tree into the lab's cache.
LAB_CALLS_EXE=""
lab_build_calls() {
    local out=$BFMIG_REPO/artifacts/lab-calls
    if [[ ! -x $out/bfmig-lab-call || -n $(find "$BFMIG_REPO/tests/BFMig.Lab.Calls" "$BFMIG_REPO/src/Native" -name '*.cs' -newer "$out/bfmig-lab-call" 2> /dev/null | head -n 1) ]]; then
        log "building tests/BFMig.Lab.Calls (Nova's migration call) into $out"
        dotnet build "$BFMIG_REPO/tests/BFMig.Lab.Calls" -c Release -o "$out" > "$LAB_VAR.calls-build.log" 2>&1 ||
            { tail -n 20 "$LAB_VAR.calls-build.log" >&2; die "building tests/BFMig.Lab.Calls failed"; }
    fi
    LAB_CALLS_EXE=$out/bfmig-lab-call
}

# After a trip with --storage shared: {bitmaps: the shared image's persistent bitmaps, bitmap_kept:
# whether $STORAGE_BITMAP is among them, bfmig_write_access: the lines of the bfmigd traces in
# which a BFMig process opened the image for writing or connected to its NBD server (null
# without --trace-shared), write_lines: the first few of them, traced_writes: how many files the
# traced processes opened for writing at all (null without --trace-shared)}.
shared_trip_json() {
    local traced=$1 bitmaps writes=null lines="[]" all=null
    bitmaps=$(storage_bitmaps)
    [[ -n $bitmaps ]] || bitmaps=null
    if [[ $traced == yes ]]; then
        local found
        found=$(storage_bfmig_writes)
        writes=$(grep -c . <<< "$found" || true)
        lines=$(head -n 5 <<< "$found" | jq -R . | jq -s 'map(select(. != ""))')
        all=$(storage_traced_writes)
    fi
    jq -n --argjson bitmaps "$bitmaps" --arg name "$STORAGE_BITMAP" --argjson writes "$writes" --argjson lines "$lines" \
        --argjson all "$all" \
        '{bitmaps: $bitmaps, bitmap_kept: (($bitmaps // []) | index($name) != null),
          bfmig_write_access: $writes, write_lines: $lines, traced_writes: $all}'
}

# Whether CALL can make the trips of MODE on STORAGE (dies with the reason when not).
roundtrip_check_call() {
    local call=$1 mode=$2 storage=$3
    case $call in
        virsh) ;;
        nova | nova-autoconverge)
            [[ $mode == stock || $mode == bfmig-transparent ]] ||
                die "--call $call carries no socket URIs; use it with --mode stock or bfmig-transparent"
            [[ $storage == local ]] || die "--call $call is Nova's block migration (NON_SHARED_INC): not with --storage $storage" ;;
        virt-manager-nouri)
            # With --mode bfmig (explicit, transparent off) the call goes around BFMig: the
            # daemons must record the trip as bypassed, at stock cost.
            [[ $mode == stock || $mode == bfmig* ]] ||
                die "--call $call: use it with --mode stock, bfmig (bypassed) or bfmig-transparent" ;;
        virt-manager)
            [[ $mode == stock || $mode == bfmig || $mode == bfmig-transparent ]] ||
                die "--call virt-manager passes only a URI: use it with --mode stock, bfmig or bfmig-transparent" ;;
        *) die "--call: virsh, nova, nova-autoconverge, virt-manager or virt-manager-nouri, not '$call'" ;;
    esac
    [[ $call != virt-manager* || $storage == shared ]] ||
        die "--call $call: virt-manager's call never copies storage; use it with --storage shared"
}

cmd_roundtrip() {
    local mode="" json="" ram_mib=512 fill_mib=384 disk_gib=2 disk_data_mib=1024
    local mem_pct=10 disk_pct=1 discard_mib=0 rewrite_mib=0 trips=2 rate="" stack="" corrupt=none touch_mib=0
    local binaries=build hook="" call=virsh storage=local trace_shared=no copy_storage=all backing_top_mib=0 guests=1
    local kills=() downs=() unconfirmed=() faults=() aborts=() spec move_files=0 content=random route_arg="" both_ways=no serial=no
    while (($#)); do
        case $1 in
            --mode) mode=$2 ;;
            --json) json=$2 ;;
            --ram-mib) ram_mib=$2 ;;
            --fill-mib) fill_mib=$2 ;;
            --disk-gib) disk_gib=$2 ;;
            --disk-data-mib) disk_data_mib=$2 ;;
            --mem-change-pct) mem_pct=$2 ;;
            --disk-change-pct) disk_pct=$2 ;;
            --disk-discard-mib) discard_mib=$2 ;;
            --disk-rewrite-mib) rewrite_mib=$2 ;;
            --trips) trips=$2 ;;
            --rate) rate=$2 ;;
            --stack) stack=$2 ;;
            --corrupt) corrupt=$2 ;;
            --touch-retained-mib) touch_mib=$2 ;;
            --binaries) binaries=$2 ;;
            --hook) hook=$2 ;;
            --kill) kill_check_spec "$2"; kills+=("$2") ;;
            --fault) fault_check_spec "$2"; faults+=("$2") ;;
            --mem-move-files) [[ $2 =~ ^[0-9]+$ ]] || die "--mem-move-files: a number of RAM files"; move_files=$2 ;;
            --call) call=$2 ;;
            --storage) [[ $2 =~ ^(local|shared|shared-file|block)$ ]] || die "--storage: local, shared, shared-file or block"; storage=$2 ;;
            --trace-shared) [[ $2 =~ ^(yes|no)$ ]] || die "--trace-shared: yes or no"; trace_shared=$2 ;;
            --daemon-down) [[ $2 =~ ^(src|dst)@[0-9]+$ ]] || die "--daemon-down: src@TRIP or dst@TRIP"; downs+=("$2") ;;
            --copy-storage) [[ $2 =~ ^(all|inc)$ ]] || die "--copy-storage: all or inc"; copy_storage=$2 ;;
            --backing-top-mib) [[ $2 =~ ^[0-9]+$ ]] || die "--backing-top-mib: a number of MiB"; backing_top_mib=$2 ;;
            --guests) [[ $2 =~ ^[1-9]$ ]] || die "--guests: 1 to 9"; guests=$2 ;;
            --both-ways) [[ $2 =~ ^(yes|no)$ ]] || die "--both-ways: yes or no"; both_ways=$2 ;;
            --serial) [[ $2 =~ ^(yes|no)$ ]] || die "--serial: yes or no"; serial=$2 ;;
            --content) [[ $2 =~ ^(random|os)$ ]] || die "--content: random or os"; content=$2 ;;
            --route) [[ $2 =~ ^a(,[abc])+$ ]] || die "--route: hosts from a, e.g. a,b,c,a"; route_arg=$2 ;;
            --kill-unconfirmed) [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--kill-unconfirmed: TRIP (from 1)"; unconfirmed+=("$2") ;;
            --abort) abort_check_spec "$2"; aborts+=("$2") ;;
            --host-binaries)
                [[ $2 =~ ^([abc])=(/[^[:space:]\;]+)$ ]] || die "--host-binaries: HOST=DIR, e.g. b=/tmp/other (an absolute directory, no spaces)"
                [[ -x ${BASH_REMATCH[2]}/bfmigd && -x ${BASH_REMATCH[2]}/bfmig-transfer ]] ||
                    die "--host-binaries: ${BASH_REMATCH[2]} holds no bfmigd and bfmig-transfer (lab/tools/other-version builds them)"
                BFMIG_HOST_BIN[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]} ;;
            *) die "roundtrip: unknown option $1" ;;
        esac
        shift 2
    done
    [[ -n $mode && -n $json ]] || die "roundtrip needs --mode and --json"
    # The hosts the guest visits, from A: --route a,b,c,a, or A and B in turn for --trips.
    local route=() i
    if [[ -n $route_arg ]]; then
        IFS=, read -r -a route <<< "$route_arg"
        for ((i = 1; i < ${#route[@]}; i++)); do
            [[ ${route[i]} != "${route[i - 1]}" ]] || die "--route: a trip from ${route[i]} to itself"
        done
        trips=$((${#route[@]} - 1))
        ((guests == 1)) || die "--route: one guest"
    else
        for ((i = 0; i <= trips; i++)); do route+=("$([[ $((i % 2)) == 0 ]] && echo a || echo b)"); done
    fi
    # --call CALL[,CALL...]: one call per trip, the last one for the remaining trips (e.g.
    # virsh,virt-manager-nouri,virsh: a trip around BFMig between two through it).
    local calls=() c
    IFS=, read -r -a calls <<< "$call"
    ((${#calls[@]} > 0)) || die "--call: give at least one call"
    for c in "${calls[@]}"; do roundtrip_check_call "$c" "$mode" "$storage"; done
    if [[ $storage == shared* ]]; then
        ((touch_mib == 0)) || die "--touch-retained-mib: with --storage $storage no image is left behind"
        LAB_STORAGE_ARGS=()
        GUEST_DISK_MATCH=$STORAGE_ADDR
    fi
    if [[ $storage == shared-file ]]; then
        LAB_STORAGE_ARGS=(--unsafe)
        GUEST_DISK_MATCH=$(storage_image)
    fi
    LAB_DISK_BLOCK=no
    if [[ $storage == block ]]; then
        [[ $copy_storage == all && $backing_top_mib == 0 && $guests == 1 && $call == virsh ]] ||
            die "--storage block: one guest, the virsh call, --copy-storage all, no --backing-top-mib"
        LAB_DISK_BLOCK=yes
        GUEST_DISK_MATCH=$LAB_GUEST.blk
    fi
    if [[ $copy_storage == inc || $backing_top_mib -gt 0 ]]; then
        [[ $storage == local ]] || die "--copy-storage inc and --backing-top-mib copy local storage: not with --storage $storage"
        ((backing_top_mib <= disk_data_mib)) || die "--backing-top-mib must lie within the disk data"
    fi
    [[ $copy_storage == inc ]] && LAB_STORAGE_ARGS=(--copy-storage-inc)
    [[ ($both_ways == no && $serial == no) || $guests -gt 1 ]] || die "--both-ways and --serial: with --guests 2 or more"
    if ((guests > 1)); then
        [[ $storage == local && $call == virsh && $copy_storage == all && $backing_top_mib == 0 && $corrupt == none &&
           $touch_mib == 0 && $discard_mib == 0 && $rewrite_mib == 0 && ${#kills[@]} == 0 && ${#downs[@]} == 0 && ${#faults[@]} == 0 &&
           ${#aborts[@]} == 0 ]] ||
            die "--guests $guests: local storage and the virsh call only, without --kill, --fault, --abort, --daemon-down, --corrupt, --touch-retained-mib, --disk-discard/rewrite-mib, --copy-storage inc or --backing-top-mib"
    fi
    [[ $trace_shared == no || ($storage == shared* && $mode == bfmig*) ]] ||
        die "--trace-shared yes: needs --storage shared or shared-file and a bfmig mode (it traces bfmigd)"
    mode_known "$mode" || die "unknown mode '$mode' (known: ${LAB_MODES[*]})"
    ((fill_mib < ram_mib)) || die "--fill-mib must be below --ram-mib"
    if [[ $content == os ]]; then
        # RAM is filled from the disk's own chunks: one copy each, no repeats to deduplicate.
        ((fill_mib <= disk_data_mib)) || die "--content os: --fill-mib must not exceed --disk-data-mib (RAM holds disk chunks)"
        ((guests == 1 && backing_top_mib == 0)) || die "--content os: one guest without --backing-top-mib"
    fi
    GUEST_CONTENT=$content
    ((disk_data_mib <= disk_gib * 1024)) || die "disk data does not fit the disk"
    ((discard_mib <= disk_data_mib && rewrite_mib <= disk_data_mib)) || die "discard/rewrite must lie within the disk data"
    need_root
    json=$(realpath -m "$json")
    # The BFMig hook: always with bfmig, on request (fail-open check) with the stock modes.
    [[ -n $hook ]] || { [[ $mode == bfmig* ]] && hook=yes || hook=no; }
    [[ $hook == yes || $hook == no ]] || die "--hook: yes or no"
    bfmig_select_binaries "$binaries"
    ((${#BFMIG_HOST_BIN[@]} == 0)) || [[ $binaries == build && $mode == bfmig* ]] ||
        die "--host-binaries: with a bfmig mode and --binaries build"

    local up_args=()
    [[ -n $stack ]] && up_args+=(--stack "$stack")
    [[ -n $rate ]] && up_args+=(--rate "$rate")
    [[ $storage == shared ]] && up_args+=(--storage shared)
    [[ " ${route[*]} " == *" c "* ]] && up_args+=(--hosts 3)
    cmd_up "${up_args[@]}"

    local reason
    reason=$(mode_unsupported "$mode")
    if [[ -n $reason ]]; then
        log "mode $mode skipped: $reason"
        json_skipped "$json" "$mode" "$reason"
        return 0
    fi

    # A mode without BFMig must not run through daemons (and their redirect) an earlier mode left.
    [[ $mode == bfmig* ]] || bfmig_stop_daemons
    if [[ $hook == yes && $mode != bfmig* ]]; then
        reason=$(bfmig_unsupported)
        [[ -z $reason ]] || die "--hook yes: $reason"
    fi
    [[ $hook == yes ]] && bfmig_publish
    bfmig_hook_sync "$hook"

    [[ $call == virsh ]] || lab_build_calls
    [[ $trace_shared == yes ]] && ensure_commands strace:strace
    scenario_cleanup
    if ((guests > 1)); then
        roundtrip_concurrent "$mode" "$json" "$guests" "$trips" "$ram_mib" "$fill_mib" "$disk_gib" "$disk_data_mib" "$mem_pct" "$disk_pct" "$hook" \
            "$both_ways" "$serial"
        return 0
    fi
    bfmig_hook_mark
    local base_sum=""
    EXP_M=()
    EXP_D=()
    if [[ $storage == shared* ]]; then
        log "$mode: preparing a ${disk_gib} GiB shared disk with ${disk_data_mib} MiB of data, persistent bitmap $STORAGE_BITMAP ($storage)"
        rm -f "$LAB_VAR"/storage/strace-*
        guest_prepare_disk a "$disk_gib" "$disk_data_mib" "$(storage_image)"
        qemu-img bitmap --add "$(storage_image)" "$STORAGE_BITMAP"
        if [[ $storage == shared ]]; then storage_serve "$(storage_image)"; fi
    elif ((backing_top_mib > 0)); then
        log "$mode: preparing a ${disk_gib} GiB disk with ${disk_data_mib} MiB of data on A: a qcow2 overlay holding ${backing_top_mib} MiB on a backing file present on both hosts"
        guest_prepare_backing_disk a "$disk_gib" "$disk_data_mib" "$backing_top_mib"
        base_sum=$(md5sum < "$(guest_base_image a)")
    elif [[ $storage == block ]]; then
        log "$mode: preparing a ${disk_gib} GiB block device (loop) with ${disk_data_mib} MiB of data on A"
        blockdev_prepare_disk a "$disk_gib" "$disk_data_mib"
    else
        log "$mode: preparing a ${disk_gib} GiB disk with ${disk_data_mib} MiB of data on A"
        guest_prepare_disk a "$disk_gib" "$disk_data_mib"
    fi
    guest_xml "$ram_mib" "$storage" > "$LAB_VAR/work/guest.xml"
    host_virsh a define "$LAB_VAR/work/guest.xml" > /dev/null
    host_virsh a start "$LAB_GUEST" > /dev/null
    guest_wait_ready a
    if [[ $content == os ]]; then
        log "$mode: guest filling ${fill_mib} MiB of RAM with its disk's files (page cache and copies)"
        guest_cmd a 1800 fill-from-disk "$fill_mib" || die "$mode: filling guest RAM failed"
    else
        log "$mode: guest filling ${fill_mib} MiB of RAM"
        guest_cmd a 1800 fill "$fill_mib" || die "$mode: filling guest RAM failed"
    fi
    guest_record

    local trip src dst trip_json=() chunks=$disk_data_mib workload_json=null
    local before after t0 t1 bad images wire secs verified
    for ((trip = 1; trip <= trips; trip++)); do
        src=${route[trip - 1]}
        dst=${route[trip]}
        if [[ $storage == block ]]; then
            [[ -n $(blockdev_device "$dst") ]] || blockdev_attach "$dst" "$disk_gib"
        elif [[ $storage != shared* && ! -e $(guest_image "$dst") ]]; then
            if ((backing_top_mib > 0)); then guest_create_overlay "$dst"; else qemu-img create -q -f qcow2 "$(guest_image "$dst")" "${disk_gib}G"; fi
        fi
        local backing_json=null top_bytes=0
        ((backing_top_mib == 0)) || top_bytes=$(guest_top_bytes "$src")
        "$(mode_fn "$mode" args)" "$src" "$dst"
        [[ $storage == shared* ]] && storage_filter_args
        mode_call_optional "$mode" prepare "$src" "$dst"
        if [[ $trace_shared == yes ]]; then
            storage_trace_bfmig "$src"
            storage_trace_bfmig "$dst"
        fi
        KILL_JSON=null
        if spec=$(kill_spec_for_trip "$trip" "${kills[@]}"); then
            KILL_CHUNKS=$chunks
            kill_attempt "$mode" "$src" "$dst" "$spec"
            # Restarts whatever daemon the kill took and waits until both are ready again.
            mode_call_optional "$mode" prepare "$src" "$dst"
        fi
        FAULT_JSON=null
        if spec=$(kill_spec_for_trip "$trip" "${faults[@]}"); then
            FAULT_CHUNKS=$chunks
            fault_run "$mode" "$src" "$dst" "$spec"
        fi
        if [[ " ${unconfirmed[*]} " == *" $trip "* ]]; then
            KILL_CHUNKS=$chunks
            kill_unconfirmed_attempt "$mode" "$src" "$dst" "$trip"
            mode_call_optional "$mode" prepare "$src" "$dst"
        fi
        ABORT_JSON=null
        if spec=$(abort_delay_for_trip "$trip" "${aborts[@]}"); then
            ABORT_CHUNKS=$chunks
            abort_attempt "$mode" "$src" "$dst" "$trip" "$spec"
            mode_call_optional "$mode" prepare "$src" "$dst"
        fi
        DOWN_JSON=null
        for spec in "${downs[@]}"; do
            [[ ${spec#*@} == "$trip" ]] && bfmig_daemon_down "$mode" "${spec%@*}" "$src" "$dst"
        done
        # Another scenario's step before this trip (both daemons prepared), e.g. hostile's attack.
        [[ -z ${ROUNDTRIP_BEFORE_TRIP:-} ]] || "$ROUNDTRIP_BEFORE_TRIP" "$trip" "$src" "$dst"
        trace_trip_start "$src" "$dst"
        log "$mode: trip $trip ${src^^} -> ${dst^^}"
        before=$(link_bytes)
        t0=$(now)
        c=${calls[trip - 1]:-${calls[-1]}}
        ((${#calls[@]} == 1)) || log "$mode: trip $trip by call $c"
        if ! lab_migrate "$c" "$src" "$dst"; then
            [[ $mode != bfmig* ]] || bfmig_log_excerpt "$src" "$dst"
            mode_call_optional "$mode" cleanup "$src" "$dst"
            scenario_cleanup
            die "$mode: trip $trip ${src^^} -> ${dst^^} failed"
        fi
        t1=$(now)
        after=$(link_bytes)
        mode_call_optional "$mode" cleanup "$src" "$dst"
        trace_trip_end "$mode" "$trip" "$src" "$dst"
        wire=$((after - before))
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
        job_downtime_ms "$src" "$dst"

        [[ -z ${ROUNDTRIP_AFTER_TRIP:-} ]] || "$ROUNDTRIP_AFTER_TRIP" "$trip" "$src" "$dst"
        ((trip == 1)) && corrupt_guest "$corrupt" "$dst"
        guest_verify "$dst" "$chunks"
        bad=$VERIFY_BAD
        verified=false
        local shared_json=null records=null
        if [[ $mode == bfmig* ]]; then
            # What each daemon recorded about this trip (bfmig list's LAST TRIP).
            local uuid since=${t0%.*}
            uuid=$(host_virsh "$dst" domuuid "$LAB_GUEST" 2> /dev/null | tr -d '[:space:]')
            records=$(jq -n --argjson s "$(bfmig_trip_record "$src" "$uuid" "$since")" \
                --argjson d "$(bfmig_trip_record "$dst" "$uuid" "$since")" '{source: $s, destination: $d}')
        fi
        if [[ $storage == shared* ]]; then
            # One image: what the guest reads back is the whole truth about the disk.
            images=null
            [[ $bad == 0 ]] && verified=true
            shared_json=$(shared_trip_json "$trace_shared")
            log "$mode: trip $trip: shared image $(jq -c . <<< "$shared_json")"
        else
            if images_identical "$src" "$dst"; then images=true; else images=false; fi
            [[ $bad == 0 && $images == true ]] && verified=true
        fi
        if ((backing_top_mib > 0)); then
            # The backing file is read by both hosts and written by no one: the same bytes as made.
            local intact=true h
            for h in "${LAB_HOSTS[@]}"; do [[ $(md5sum < "$(guest_base_image "$h")") == "$base_sum" ]] || intact=false; done
            [[ $intact == true ]] || { verified=false; log "$mode: trip $trip: a backing file changed"; }
            backing_json=$(jq -n --argjson top "$top_bytes" --argjson intact "$intact" '{source_top_layer_bytes: $top, backing_files_intact: $intact}')
            log "$mode: trip $trip: source's top layer held $top_bytes bytes; backing files intact: $intact"
        fi
        log "$mode: trip $trip: $wire bytes, ${secs}s, downtime ${JOB_DOWNTIME} ms, guest mismatches $bad, images identical $images"
        [[ $FAULT_JSON == null ]] || log "$mode: trip $trip: after fault $(jq -r .kind <<< "$FAULT_JSON"): the retry moved $wire bytes in ${secs}s, verified $verified"
        trip_json+=("$(jq -n --arg from "${src^^}" --arg to "${dst^^}" --argjson wire "$wire" \
            --argjson secs "$secs" --argjson down "$JOB_DOWNTIME" --argjson elapsed "$JOB_ELAPSED" \
            --argjson verified "$verified" --argjson bad "$bad" --argjson images "$images" --argjson kill "$KILL_JSON" --argjson abort "$ABORT_JSON" \
            --argjson daemondown "$DOWN_JSON" --argjson shared "$shared_json" --argjson records "$records" --arg call "$c" \
            --argjson backing "$backing_json" --argjson fault "$FAULT_JSON" --argjson workload "$workload_json" \
            '{from: $from, to: $to, call: $call, wire_bytes: $wire, total_seconds: $secs, downtime_ms: $down,
              verified: $verified, libvirt_elapsed_ms: $elapsed, guest_mismatches: $bad,
              images_identical: $images} + (if $kill == null then {} else {kill: $kill} end)
              + (if $abort == null then {} else {abort: $abort} end)
              + (if $daemondown == null then {} else {daemon_down: $daemondown} end)
              + (if $shared == null then {} else {shared: $shared} end)
              + (if $records == null then {} else {bfmig_trip: $records} end)
              + (if $backing == null then {} else {backing: $backing} end)
              + (if $fault == null then {} else {fault: $fault} end)
              + (if $workload == null then {} else {workload_before: $workload} end)')")

        if ((trip < trips)); then
            if ((touch_mib > 0)); then
                # Behind BFMig's back: the image the guest left on SRC (where the next trip returns)
                # gets a pattern at the end of the disk, where the guest has no data; only a trip
                # that sends the whole disk puts back what the guest has there.
                log "$mode: writing ${touch_mib} MiB into the image the guest left on ${src^^} (qemu-io)"
                qemu-io -f "$(guest_disk_format)" -c "write -P 0x5a $((disk_gib * 1024 - touch_mib))M ${touch_mib}M" "$(guest_disk_path "$src")" > /dev/null ||
                    die "$mode: writing into ${src^^}'s retained image failed"
            fi
            # A scenario may choose each trip's changes (the soak draws them from its seed).
            [[ -z ${ROUNDTRIP_WORKLOAD:-} ]] || "$ROUNDTRIP_WORKLOAD" "$trip"
            log "$mode: changing ${mem_pct}% of RAM data and ${disk_pct}% of disk data on ${dst^^}"
            guest_cmd "$dst" 1800 mchange "$mem_pct" "$trip" || die "$mode: changing RAM data failed"
            guest_record
            guest_cmd "$dst" 1800 dchange "$disk_pct" "$trip" "$disk_data_mib" || die "$mode: changing disk data failed"
            guest_record
            if ((discard_mib > 0)); then
                guest_cmd "$dst" 600 discard $(((trip - 1) * discard_mib % (disk_data_mib - discard_mib + 1))) "$discard_mib" ||
                    die "$mode: discard failed"
                guest_record
            fi
            if ((rewrite_mib > 0)); then
                guest_cmd "$dst" 600 rewrite $((trip * 7 % (disk_data_mib - rewrite_mib + 1))) "$rewrite_mib" ||
                    die "$mode: rewrite failed"
                guest_record
            fi
            if ((move_files > 0)); then
                guest_cmd "$dst" 600 mmove "$move_files" "$trip" || die "$mode: moving RAM data failed"
                guest_record
            fi
            workload_json=$(jq -n --argjson m "$mem_pct" --argjson d "$disk_pct" --argjson disc "$discard_mib" \
                --argjson rew "$rewrite_mib" --argjson mv "$move_files" \
                '{mem_change_pct: $m, disk_change_pct: $d, disk_discard_mib: $disc, disk_rewrite_mib: $rew, mem_move_files: $mv}')
        fi
    done

    jq -n --arg mode "$mode" --arg libvirt "$(stack_libvirt_version)" --arg qemu "$(stack_qemu_version)" \
        --arg rate "$(state_get rate)" --argjson ram "$ram_mib" --argjson fill "$fill_mib" \
        --argjson dgib "$disk_gib" --argjson dmib "$disk_data_mib" --argjson mpct "$mem_pct" \
        --argjson dpct "$disk_pct" --argjson disc "$discard_mib" --argjson rew "$rewrite_mib" \
        --arg corrupt "$corrupt" --argjson touch "$touch_mib" --arg storage "$storage" --arg copy "$copy_storage" --argjson top "$backing_top_mib" --arg content "$content" --arg route "$route_arg" --argjson bfmig "$(bfmig_hook_report "$hook")" --arg call "$call" --argjson migargs "$(printf '%s\n' "${MIG_ARGS[@]}" | jq -R . | jq -s 'map(select(. != ""))')" \
        '{mode: $mode, stack: {libvirt: $libvirt, qemu: $qemu}, rate: $rate,
          scenario: ({ram_mib: $ram, fill_mib: $fill, disk_gib: $dgib, disk_data_mib: $dmib,
                     mem_change_pct: $mpct, disk_change_pct: $dpct, disk_discard_mib: $disc,
                     disk_rewrite_mib: $rew, corrupt: $corrupt, touch_retained_mib: $touch, storage: $storage}
                    + (if $copy == "all" then {} else {copy_storage: $copy} end)
                    + (if $top == 0 then {} else {backing_top_mib: $top} end)
                    + (if $content == "random" then {} else {content: $content} end)
                    + (if $route == "" then {} else {route: ($route | split(","))} end)),
          call: $call, migrate_args: $migargs, bfmig: $bfmig, trips: $ARGS.positional}' \
        --jsonargs "${trip_json[@]}" > "$json"
    scenario_cleanup
    log "$mode: results in $json"
}
