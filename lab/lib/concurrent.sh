# Scenario "roundtrip --guests N": N guests (lab-guest, lab-guest2, ...) on host A, each with its
# own disk, RAM workload and verification, and every trip migrates all of them at the same moment
# (one `virsh migrate` per guest, started together, the mode's own command line). --both-ways yes:
# the even guests start on B, so that each trip sends half of them A -> B while the rest go
# B -> A. --serial yes: the same trips one guest after the other (the figures to compare with). After each
# arrival every guest is verified as in the one-guest round trip (guest checksums and offline
# image comparison), then changes its data on the new host. Local storage and the virsh call only.
#
# The one-guest functions (lib/guest.sh, lib/scenario.sh) work on $LAB_GUEST and the expected
# sums EXP_M/EXP_D: guest_use switches all three to another guest, keeping each guest's sums in
# $LAB_VAR/work/<guest>.exp while another is current.

GUEST_CURRENT=""

guest_use() {
    local name=$1 work=$LAB_VAR/work
    if [[ -n $GUEST_CURRENT ]]; then
        declare -p EXP_M EXP_D | sed 's/^declare -A /declare -gA /' > "$work/$GUEST_CURRENT.exp"
    fi
    LAB_GUEST=$name
    GUEST_DISK_MATCH=$name.qcow2
    GUEST_CURRENT=$name
    EXP_M=()
    EXP_D=()
    # shellcheck disable=SC1090
    if [[ -f $work/$name.exp ]]; then source "$work/$name.exp"; fi
}

# Bytes of one of QEMU's counters in `domjobinfo --completed` ("Memory processed: 1.5 GiB").
job_bytes() {
    awk -v key="$2:" 'index($0, key) == 1 {
        v = $(NF - 1); u = $NF
        m = (u == "KiB") ? 1024 : (u == "MiB") ? 1048576 : (u == "GiB") ? 1073741824 : (u == "TiB") ? 1099511627776 : 1
        printf "%.0f\n", v * m; found = 1; exit
    } END { if (!found) print "null" }' <<< "$1"
}

# Wire bytes of GUEST's sending helpers in SRC's bfmigd log after line FROM (event 41 lines).
bfmig_guest_wire_bytes() {
    local src=$1 guest=$2 from=$3
    tail -n +"$((from + 1))" "$(bfmig_dir "$src")/bfmigd.log" 2> /dev/null |
        sed -n "s/.*: send [a-z]* of guest $guest finished: exit 0, \([0-9]*\) bytes on the wire.*/\1/p" |
        awk '{ s += $1; n++ } END { print (n ? s : "null") }'
}

# The host other than H (two-host lab).
other_host() { [[ $1 == a ]] && echo b || echo a; }

roundtrip_concurrent() {
    local mode=$1 json=$2 n=$3 trips=$4 ram_mib=$5 fill_mib=$6 disk_gib=$7 disk_data_mib=$8 mem_pct=$9 disk_pct=${10} hook=${11}
    local both_ways=${12:-no} serial=${13:-no}
    local first=$LAB_GUEST names=() g i work=$LAB_VAR/work
    # Where each guest is: all start on A, or with --both-ways the even ones on B (each trip then
    # sends half the guests A -> B while the other half go B -> A).
    local -A at=()
    for ((i = 1; i <= n; i++)); do
        if ((i == 1)); then g=$first; else g=$first$i; fi
        names+=("$g")
        at[$g]=a
        [[ $both_ways == yes && $((i % 2)) == 0 ]] && at[$g]=b
    done
    mkdir -p "$work"
    rm -f "$work"/*.exp "$work"/*.trip
    GUEST_CURRENT=""
    bfmig_hook_mark
    for g in "${names[@]}"; do
        guest_use "$g"
        scenario_cleanup
        log "$mode: $g: preparing a ${disk_gib} GiB disk with ${disk_data_mib} MiB of data on ${at[$g]^^}"
        guest_prepare_disk "${at[$g]}" "$disk_gib" "$disk_data_mib"
        guest_xml "$ram_mib" local > "$work/$g.xml"
        host_virsh "${at[$g]}" define "$work/$g.xml" > /dev/null
        host_virsh "${at[$g]}" start "$g" > /dev/null
    done
    for g in "${names[@]}"; do
        guest_use "$g"
        guest_wait_ready "${at[$g]}"
        log "$mode: $g: filling ${fill_mib} MiB of RAM"
        guest_cmd "${at[$g]}" 1800 fill "$fill_mib" || die "$mode: $g: filling guest RAM failed"
        guest_record
    done

    local trip src dst trip_json=() before after t0 t1 wire secs all_verified h directions
    local -A log_from=()
    for ((trip = 1; trip <= trips; trip++)); do
        directions=""
        for g in "${names[@]}"; do
            guest_use "$g"
            src=${at[$g]} dst=$(other_host "${at[$g]}")
            [[ -e $(guest_image "$dst") ]] || qemu-img create -q -f qcow2 "$(guest_image "$dst")" "${disk_gib}G"
            "$(mode_fn "$mode" args)" "$src" "$dst"
            [[ $directions == *"$src$dst"* ]] || { mode_call_optional "$mode" prepare "$src" "$dst"; directions+=" $src$dst"; }
        done
        for h in a b; do
            log_from[$h]=0
            [[ $mode != bfmig* ]] || log_from[$h]=$(wc -l < "$(bfmig_dir "$h")/bfmigd.log")
        done
        log "$mode: trip $trip:$(for g in "${names[@]}"; do printf ' %s %s->%s' "$g" "${at[$g]^^}" "$(other_host "${at[$g]}" | tr a-z A-Z)"; done)$([[ $serial == yes ]] && echo ', one at a time' || echo ', all at once')"
        before=$(link_bytes)
        t0=$(now)
        local pids=()
        for g in "${names[@]}"; do
            # Each guest's own command line (explicit mode names the guest's sockets).
            (
                LAB_GUEST=$g
                src=${at[$g]} dst=$(other_host "${at[$g]}")
                "$(mode_fn "$mode" args)" "$src" "$dst"
                s=$(now)
                rc=0
                lab_migrate virsh "$src" "$dst" > "$work/$g.migrate.out" 2>&1 || rc=$?
                echo "$rc $s $(now)" > "$work/$g.trip"
            ) &
            pids+=($!)
            if [[ $serial == yes ]]; then wait "$!" || true; fi
        done
        wait "${pids[@]}" || true
        t1=$(now)
        after=$(link_bytes)
        for h in $directions; do mode_call_optional "$mode" cleanup "${h:0:1}" "${h:1:1}"; done
        wire=$((after - before))
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')

        local guest_json=() rc gs ge gsecs job bad images verified records gwire
        all_verified=true
        for g in "${names[@]}"; do
            guest_use "$g"
            src=${at[$g]} dst=$(other_host "${at[$g]}")
            read -r rc gs ge < "$work/$g.trip" || rc=missing
            if [[ $rc != 0 ]]; then
                cat "$work/$g.migrate.out" >&2 || true
                for g in "${names[@]}"; do guest_use "$g"; scenario_cleanup; done
                die "$mode: trip $trip ${src^^} -> ${dst^^} of $g failed (exit $rc)"
            fi
            gsecs=$(awk -v a="$gs" -v b="$ge" 'BEGIN {printf "%.3f", b - a}')
            job_downtime_ms "$src" "$dst"
            # The source keeps QEMU's full counters; the destination's copy may lack some.
            job=$(host_virsh "$src" domjobinfo --completed "$g" 2> /dev/null || true)
            job+=$'\n'$(host_virsh "$dst" domjobinfo --completed "$g" 2> /dev/null || true)
            guest_verify "$dst" "$disk_data_mib"
            bad=$VERIFY_BAD
            if images_identical "$src" "$dst"; then images=true; else images=false; fi
            verified=false
            [[ $bad == 0 && $images == true ]] && verified=true
            [[ $verified == true ]] || all_verified=false
            records=null gwire=null
            if [[ $mode == bfmig* ]]; then
                local uuid
                uuid=$(host_virsh "$dst" domuuid "$g" 2> /dev/null | tr -d '[:space:]')
                records=$(jq -n --argjson s "$(bfmig_trip_record "$src" "$uuid" "${t0%.*}")" \
                    --argjson d "$(bfmig_trip_record "$dst" "$uuid" "${t0%.*}")" '{source: $s, destination: $d}')
                gwire=$(bfmig_guest_wire_bytes "$src" "$g" "${log_from[$src]}")
            fi
            log "$mode: trip $trip: $g ${gsecs}s, downtime ${JOB_DOWNTIME} ms, BFMig wire bytes $gwire, guest mismatches $bad, images identical $images"
            guest_json+=("$(jq -n --arg name "$g" --arg from "${src^^}" --arg to "${dst^^}" --argjson secs "$gsecs" --argjson down "$JOB_DOWNTIME" \
                --argjson mem "$(job_bytes "$job" 'Memory processed')" --argjson disk "$(job_bytes "$job" 'File processed')" \
                --argjson data "$(job_bytes "$job" 'Data processed')" --argjson gwire "$gwire" \
                --argjson verified "$verified" --argjson bad "$bad" --argjson images "$images" --argjson records "$records" \
                '{guest: $name, from: $from, to: $to, total_seconds: $secs, downtime_ms: $down, qemu_data_bytes: $data, qemu_memory_bytes: $mem,
                  qemu_disk_bytes: $disk, bfmig_wire_bytes: $gwire, verified: $verified, guest_mismatches: $bad,
                  images_identical: $images} + (if $records == null then {} else {bfmig_trip: $records} end)')")
        done
        log "$mode: trip $trip: $wire bytes on the link, ${secs}s for all $n guests, all verified: $all_verified"
        # The trip's direction is the first guest's (with --both-ways each guest's own is in its record).
        src=${at[$first]} dst=$(other_host "${at[$first]}")
        trip_json+=("$(jq -n --arg from "${src^^}" --arg to "${dst^^}" --argjson wire "$wire" --argjson secs "$secs" \
            --argjson verified "$all_verified" '{from: $from, to: $to, call: "virsh", wire_bytes: $wire,
              total_seconds: $secs, downtime_ms: ([$ARGS.positional[].downtime_ms] | max), verified: $verified,
              guests: $ARGS.positional}' --jsonargs "${guest_json[@]}")")

        for g in "${names[@]}"; do at[$g]=$(other_host "${at[$g]}"); done
        if ((trip < trips)); then
            for g in "${names[@]}"; do
                guest_use "$g"
                dst=${at[$g]}
                log "$mode: $g: changing ${mem_pct}% of RAM data and ${disk_pct}% of disk data on ${dst^^}"
                guest_cmd "$dst" 1800 mchange "$mem_pct" "$trip" || die "$mode: $g: changing RAM data failed"
                guest_record
                guest_cmd "$dst" 1800 dchange "$disk_pct" "$trip" "$disk_data_mib" || die "$mode: $g: changing disk data failed"
                guest_record
            done
        fi
    done

    guest_use "$first"
    jq -n --arg mode "$mode" --arg libvirt "$(stack_libvirt_version)" --arg qemu "$(stack_qemu_version)" \
        --arg rate "$(state_get rate)" --argjson n "$n" --argjson ram "$ram_mib" --argjson fill "$fill_mib" \
        --argjson dgib "$disk_gib" --argjson dmib "$disk_data_mib" --argjson mpct "$mem_pct" --argjson dpct "$disk_pct" \
        --argjson bfmig "$(bfmig_hook_report "$hook")" --argjson both "$([[ $both_ways == yes ]] && echo true || echo false)" \
        --argjson serial "$([[ $serial == yes ]] && echo true || echo false)" \
        --argjson migargs "$(printf '%s\n' "${MIG_ARGS[@]}" | jq -R . | jq -s 'map(select(. != ""))')" \
        '{mode: $mode, stack: {libvirt: $libvirt, qemu: $qemu}, rate: $rate, guests: $n, both_ways: $both, serial: $serial,
          scenario: {ram_mib: $ram, fill_mib: $fill, disk_gib: $dgib, disk_data_mib: $dmib,
                     mem_change_pct: $mpct, disk_change_pct: $dpct, storage: "local"},
          call: "virsh", migrate_args: $migargs, bfmig: $bfmig, trips: $ARGS.positional}' \
        --jsonargs "${trip_json[@]}" > "$json"
    for g in "${names[@]}"; do guest_use "$g"; scenario_cleanup; done
    guest_use "$first"
    log "$mode: results in $json"
}
