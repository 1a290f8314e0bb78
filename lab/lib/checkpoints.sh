# Scenario "checkpoints": does an ordinary migration keep libvirt checkpoints and the persistent
# qcow2 bitmaps behind them, both ways? (issue 6; docs/checkpoints.md)
#
# On A: checkpoint c1, 2 MiB written, checkpoint c2, 1 MiB written, guest restarted (so QEMU
# loads the bitmaps from the image and the departure leaves them flagged in use there), 1 MiB
# written. Trip A->B. On B: checkpoint list, incremental pull backups from c1 and from c2 (which
# 1 MiB chunks they report dirty), bitmaps of the image left on A. Then 3 MiB written on B, the
# daemon's estimate of the return trip (bfmig mode), trip B->A, the same checks on A.

CK_WORK_CHUNKS=16

# libvirt refuses to undefine a guest that has checkpoint metadata: drop it first.
ck_cleanup() {
    local h
    for h in "${LAB_HOSTS[@]}"; do
        host_virsh "$h" destroy "$LAB_GUEST" > /dev/null 2>&1 || true
        host_virsh "$h" undefine --checkpoints-metadata "$LAB_GUEST" > /dev/null 2>&1 || true
    done
    scenario_cleanup
}

ck_image_bitmaps() { # host -> JSON array of {name, flags} stored in the image there
    local img
    img=$(guest_image "$1")
    [[ -e $img ]] || { echo '[]'; return; }
    qemu-img info -U --output=json "$img" | jq -c '.["format-specific"].data.bitmaps // []'
}

ck_checkpoints() { # host -> JSON array of {name, parent}
    host_virsh "$1" checkpoint-list "$LAB_GUEST" --parent 2> /dev/null |
        awk 'NF >= 4 {print $1 " " (NF >= 5 ? $NF : "")}' |
        jq -R -s -c 'split("\n") | map(select(length > 0) | split(" ") | {name: .[0], parent: (if .[1] == "" then null else .[1] end)})'
}

# Incremental pull backup from CHECKPOINT on host H: prints the 1 MiB chunks the backup's
# bitmap marks dirty as a JSON array, or {"error": "..."} when libvirt refuses the backup.
ck_backup_chunks() {
    local h=$1 cp=$2 sock=/var/lib/libvirt/qemu/bfmig-ck-backup.sock out
    cat > "$(host_dir "$h")/lib/images/backup.xml" <<XML
<domainbackup mode='pull'>
  <incremental>$cp</incremental>
  <server transport='unix' socket='$sock'/>
  <disks><disk name='vda' backup='yes' type='file'><scratch file='/var/lib/libvirt/images/scratch.qcow2'/></disk></disks>
</domainbackup>
XML
    if ! out=$(host_virsh "$h" backup-begin "$LAB_GUEST" /var/lib/libvirt/images/backup.xml 2>&1); then
        jq -n -c --arg e "$out" '{error: $e}'
        return 0
    fi
    host_exec "$h" nbdinfo --map=qemu:dirty-bitmap:backup-vda "nbd+unix:///vda?socket=$sock" |
        awk -v mib="$MiB" '$3 == 1 { for (o = $1; o < $1 + $2; o += mib) print int(o / mib) }' |
        sort -n -u | jq -s -c .
    host_virsh "$h" domjobabort "$LAB_GUEST" > /dev/null 2>&1 || true
    rm -f "$(host_dir "$h")/lib/images/scratch.qcow2"
}

# What a host shows right after the guest arrived there (bfmig redefines in the background).
ck_arrival_json() {
    local h=$1 left=$2 mode=$3 deadline cps
    deadline=$((SECONDS + 40))
    cps=$(ck_checkpoints "$h")
    while [[ $mode == bfmig ]] && (($(jq length <<< "$cps") < 2)) && ((SECONDS < deadline)); do
        sleep 1
        cps=$(ck_checkpoints "$h")
    done
    # bfmigd cleans the image left behind once the source QEMU is gone.
    local bitmaps
    bitmaps=$(ck_image_bitmaps "$left")
    while [[ $mode == bfmig ]] && [[ $(jq '[.[] | select(.flags | index("in-use"))] | length' <<< "$bitmaps") != 0 ]] &&
          ((SECONDS < deadline)); do
        sleep 1
        bitmaps=$(ck_image_bitmaps "$left")
    done
    jq -n -c --argjson cps "$cps" --argjson c1 "$(ck_backup_chunks "$h" c1)" --argjson c2 "$(ck_backup_chunks "$h" c2)" \
        --argjson left "$bitmaps" --argjson here "$(ck_image_bitmaps "$h")" \
        '{checkpoints: $cps, backup_c1: $c1, backup_c2: $c2, left_image_bitmaps: $left, image_bitmaps: $here}'
}

ck_trip() { # src dst -> sets CK_TRIP_OK, CK_TRIP_ERROR
    local src=$1 dst=$2
    [[ -e $(guest_image "$dst") ]] || qemu-img create -q -f qcow2 "$(guest_image "$dst")" 1G
    "$(mode_fn "$CK_MODE" args)" "$src" "$dst"
    mode_call_optional "$CK_MODE" prepare "$src" "$dst"
    log "checkpoints ($CK_MODE): trip ${src^^} -> ${dst^^}"
    CK_TRIP_ERROR=$(host_exec "$src" timeout 900 virsh -q -c qemu:///system migrate --live --persistent --copy-storage-all \
        "$LAB_GUEST" "qemu+tcp://${HOST_ADDR[$dst]}/system" "${MIG_ARGS[@]}" 2>&1) && CK_TRIP_OK=true || CK_TRIP_OK=false
    [[ $CK_TRIP_OK == true ]] && CK_TRIP_ERROR=""
    if [[ $CK_TRIP_OK == false ]]; then
        log "checkpoints ($CK_MODE): trip ${src^^} -> ${dst^^} failed: $CK_TRIP_ERROR"
        local qlog
        qlog=$(grep -h "qemu-system-x86_64: " "$(host_dir "$dst")/log/qemu/$LAB_GUEST.log" 2> /dev/null | tail -n 3 | tr '\n' ' ')
        CK_TRIP_ERROR="$CK_TRIP_ERROR | destination QEMU: $qlog"
    fi
}

# The disk stream's bytes on the wire of the last send on host H (bfmigd's per-stream log line).
ck_disk_wire_bytes() {
    grep -h "send nbd of guest $LAB_GUEST finished" "$(bfmig_dir "$1")/bfmigd.log" 2> /dev/null | tail -n 1 |
        sed -n 's/.*exit 0, \([0-9]*\) bytes on the wire for \([0-9]*\) stream bytes.*/\1 \2/p'
}

# bfmig mode keeps daemons running from trip to trip, also across scenarios: ones started from
# another checkout's binaries (or from binaries republished since) would not be the code under
# test. Then the lab is taken down (we hold its lock) and comes up fresh.
ck_fresh_daemons() {
    local h p want
    want=$(readlink -f "$BFMIG_BIN/bfmigd")
    for h in "${LAB_HOSTS[@]}"; do
        p=$(host_pid "$h" bfmigd || true)
        if pid_alive "$p" && [[ $(readlink "/proc/$p/exe") != "$want" ]]; then
            log "checkpoints: bfmigd of host $h runs $(readlink "/proc/$p/exe"), not $want: taking the lab down"
            cmd_down
            return 0
        fi
    done
}

# stock mode must see stock libvirt: daemons or hooks left by an earlier bfmig scenario would
# carry the checkpoints and hide what stock loses. Then the lab comes up fresh without them.
ck_no_daemons() {
    local h
    for h in "${LAB_HOSTS[@]}"; do
        if pid_alive "$(host_pid "$h" bfmigd || true)" || [[ -e $(bfmig_hook_path "$h") ]]; then
            log "checkpoints: host $h has bfmigd or its hook from an earlier bfmig run: taking the lab down"
            cmd_down
            return 0
        fi
    done
}

cmd_checkpoints() {
    local json="" rate=""
    CK_MODE=""
    while (($#)); do
        case $1 in
            --mode) CK_MODE=$2 ;;
            --json) json=$2 ;;
            --rate) rate=$2 ;;
            # How the daemons authenticate each other (lib/bfmig.sh): the checkpoint exchange
            # rides the same peer port, so it must work in both.
            --auth) BFMIG_AUTH=$2 ;;
            *) die "checkpoints: unknown option $1" ;;
        esac
        shift 2
    done
    [[ $CK_MODE == stock || $CK_MODE == bfmig ]] || die "checkpoints needs --mode stock|bfmig"
    [[ -n $json ]] || die "checkpoints needs --json FILE"
    [[ $BFMIG_AUTH == psk || $BFMIG_AUTH == tls ]] || die "checkpoints: --auth psk|tls"
    need_root
    json=$(realpath -m "$json")
    if [[ $CK_MODE == bfmig ]]; then
        bfmig_publish
        ck_fresh_daemons
    else
        ck_no_daemons
    fi
    cmd_up ${rate:+--rate "$rate"}
    local reason
    reason=$(mode_unsupported "$CK_MODE")
    if [[ -n $reason ]]; then
        json_skipped "$json" "$CK_MODE" "$reason"
        return 0
    fi
    # A destination bfmigd takes streams only for a migration its own hook announced (issue 12):
    # the hook is part of BFMig, as on a real host.
    [[ $CK_MODE == bfmig ]] && bfmig_hook_sync yes
    ck_cleanup
    EXP_M=()
    EXP_D=()
    guest_prepare_disk a 1 "$CK_WORK_CHUNKS"
    guest_xml 192 > "$LAB_VAR/work/guest.xml"
    host_virsh a define "$LAB_VAR/work/guest.xml" > /dev/null
    host_virsh a start "$LAB_GUEST" > /dev/null
    guest_wait_ready a
    host_virsh a checkpoint-create-as "$LAB_GUEST" c1 > /dev/null
    guest_cmd a 300 dwrite 20 2 || die "dwrite failed"
    host_virsh a checkpoint-create-as "$LAB_GUEST" c2 > /dev/null
    guest_cmd a 300 dwrite 30 1 || die "dwrite failed"
    log "checkpoints ($CK_MODE): restarting the guest on A (QEMU now loads the bitmaps from the image)"
    host_virsh a destroy "$LAB_GUEST" > /dev/null
    host_virsh a start "$LAB_GUEST" > /dev/null
    guest_wait_ready a
    guest_cmd a 300 dwrite 40 1 || die "dwrite failed"
    local before_trip1
    before_trip1=$(jq -n -c --argjson cps "$(ck_checkpoints a)" --argjson img "$(ck_image_bitmaps a)" '{checkpoints: $cps, image_bitmaps: $img}')

    ck_trip a b
    local trip1_ok=$CK_TRIP_OK trip1_error=$CK_TRIP_ERROR arrival1=null
    [[ $trip1_ok == true ]] && arrival1=$(ck_arrival_json b a "$CK_MODE")

    local trip2_ok=false trip2_error="trip 1 failed" arrival2=null estimate=null moved=null
    if [[ $trip1_ok == true ]]; then
        guest_cmd b 300 dwrite 50 3 || die "dwrite failed"
        if [[ $CK_MODE == bfmig ]]; then
            estimate=$(host_exec b busctl --json=short call org.bfmig.BFMig1 /org/bfmig/BFMig1 org.bfmig.BFMig1.Manager \
                Estimate ss "$LAB_GUEST" a | jq -c '{disk_bytes: .data[0], memory_bytes: .data[1], stock_disk_bytes: .data[2],
                    stock_memory_bytes: .data[3], basis: .data[4]}') || estimate=null
            log "checkpoints: estimate of the return trip: $estimate"
        fi
        ck_trip b a
        trip2_ok=$CK_TRIP_OK
        trip2_error=$CK_TRIP_ERROR
        if [[ $CK_MODE == bfmig && $trip2_ok == true ]]; then
            local wb
            wb=$(ck_disk_wire_bytes b)
            [[ -n $wb ]] && moved=$(jq -n -c --argjson w "${wb% *}" --argjson s "${wb#* }" '{disk_wire_bytes: $w, disk_stream_bytes: $s}')
        fi
        [[ $trip2_ok == true ]] && arrival2=$(ck_arrival_json a b "$CK_MODE")
    fi
    local still_on_b=false
    [[ $(host_virsh b domstate "$LAB_GUEST" 2> /dev/null) == running ]] && still_on_b=true

    jq -n --arg mode "$CK_MODE" --arg auth "$BFMIG_AUTH" --arg libvirt "$(stack_libvirt_version)" --arg qemu "$(stack_qemu_version)" \
        --argjson before "$before_trip1" \
        --argjson t1ok "$trip1_ok" --arg t1err "$trip1_error" --argjson a1 "$arrival1" \
        --argjson t2ok "$trip2_ok" --arg t2err "$trip2_error" --argjson a2 "$arrival2" \
        --argjson est "$estimate" --argjson moved "$moved" --argjson onb "$still_on_b" \
        '{mode: $mode, auth: $auth, stack: {libvirt: $libvirt, qemu: $qemu},
          written: {before_c2: [20, 21], after_c2_before_restart: [30], after_restart: [40], on_b: [50, 51, 52]},
          expected: {trip1: {c1: [20, 21, 30, 40], c2: [30, 40]}, trip2: {c1: [20, 21, 30, 40, 50, 51, 52], c2: [30, 40, 50, 51, 52]}},
          before_trip1: $before,
          trips: [{from: "A", to: "B", ok: $t1ok, error: $t1err, arrival: $a1},
                  {from: "B", to: "A", ok: $t2ok, error: $t2err, arrival: $a2, estimate: $est, moved: $moved}],
          guest_running_on_b_at_end: $onb}' > "$json"
    ck_cleanup
    log "checkpoints ($CK_MODE): results in $json"
}
