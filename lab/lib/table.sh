# Side-by-side table of roundtrip result files (modes as columns) and the demo that makes them.

human_bytes() {
    awk -v b="$1" 'BEGIN {
        if (b == "") { print "-"; exit }
        split("B KB MB GB TB", u, " "); i = 1
        while (b >= 1000 && i < 5) { b /= 1000; i++ }
        printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'
}

cmd_table() {
    (($#)) || die "table: give one or more result files"
    local files=("$@") f width=20 first=26 ntrips=0 n i row cell longest=$1
    for f in "${files[@]}"; do
        [[ -r $f ]] || die "table: cannot read $f"
        n=$(jq '.trips | length' "$f")
        if ((n > ntrips)); then ntrips=$n; longest=$f; fi
    done

    # The command each mode ran, so that a reader sees the same command line getting cheaper.
    echo "Each trip runs, inside the source host (DST = the destination's lab address):"
    for f in "${files[@]}"; do
        [[ -n $(jq -r '.skipped // empty' "$f") ]] && continue
        local call copy="--copy-storage-all "
        call=$(jq -r '.call // "virsh"' "$f")
        [[ $(jq -r '.scenario.storage // "local"' "$f") == shared ]] && copy=""
        [[ $(jq -r '.scenario.copy_storage // "all"' "$f") == inc ]] && copy="--copy-storage-inc "
        if [[ $call == *,* ]]; then
            printf '  %-18s one call per trip: %s (mode arguments %s)\n' "$(jq -r .mode "$f")" "$call" \
                "$(jq -r '.migrate_args // [] | join(" ")' "$f" | sed -E 's/198\.18\.0\.[0-9]+/DST/g')"
            continue
        fi
        if [[ $call == virt-manager* ]]; then
            printf '  %-18s virt-manager'"'"'s call (%s): virDomainMigrate(dconn qemu+tcp://DST/system, LIVE|PERSIST_DEST|UNDEFINE_SOURCE, uri %s)\n' \
                "$(jq -r .mode "$f")" "$call" \
                "$([[ $call == virt-manager-nouri ]] && echo none || jq -r '.migrate_args as $a | ($a | index("--migrateuri")) as $i | if $i == null then "none" else $a[$i + 1] end' "$f" | sed -E 's/198\.18\.0\.[0-9]+/DST/g')"
            continue
        fi
        if [[ $call != virsh ]]; then
            printf '  %-18s OpenStack Nova'"'"'s call (%s): virDomainMigrateToURI3 qemu+tcp://DST/system, migrate_uri tcp://DST, LIVE|PEER2PEER|UNDEFINE_SOURCE|PERSIST_DEST|NON_SHARED_INC\n' \
                "$(jq -r .mode "$f")" "$(jq -r .call "$f")"
            continue
        fi
        printf '  %-18s virsh migrate --live --persistent %s%s qemu+tcp://DST/system %s\n' \
            "$(jq -r .mode "$f")" "$copy" "$(jq -r 'if (.guests // 1) > 1 then "GUEST (\(.guests) at once)" else "'"$LAB_GUEST"'" end' "$f")" \
            "$(jq -r '.migrate_args // [] | join(" ")' "$f" | sed -E 's/198\.18\.0\.[0-9]+/DST/g')"
    done
    echo
    printf "%-${first}s" ""
    for f in "${files[@]}"; do printf "%-${width}s" "$(jq -r .mode "$f")"; done
    printf '\n'
    printf "%-${first}s" "stack (libvirt/QEMU)"
    for f in "${files[@]}"; do printf "%-${width}s" "$(jq -r '"\(.stack.libvirt)/\(.stack.qemu)"' "$f")"; done
    printf '\n'

    for ((i = 0; i < ntrips; i++)); do
        local label
        label=$(jq -r ".trips[$i] | \"\(.from)->\(.to)\"" "$longest")
        local rows=(wire time downtime verified)
        # A trip preceded by a fault (roundtrip --fault, the soak) says which; its wire is the retry's.
        for f in "${files[@]}"; do
            [[ $(jq ".trips[$i].fault != null" "$f") == true ]] && { rows+=(fault); break; }
        done
        for row in "${rows[@]}"; do
            printf "%-${first}s" "trip $((i + 1)) $label $row"
            for f in "${files[@]}"; do
                if [[ $(jq -r '.skipped // empty' "$f") != "" ]]; then
                    cell=skipped
                elif [[ $(jq ".trips[$i] != null" "$f") != true ]]; then
                    cell=-
                else
                    case $row in
                        wire) cell=$(human_bytes "$(jq ".trips[$i].wire_bytes" "$f")") ;;
                        time) cell="$(jq -r ".trips[$i].total_seconds" "$f") s" ;;
                        downtime) cell="$(jq -r ".trips[$i].downtime_ms" "$f") ms" ;;
                        verified) cell=$(jq -r "if .trips[$i].verified then \"yes\" else \"NO\" end" "$f") ;;
                        fault) cell=$(jq -r ".trips[$i].fault | if . == null then \"-\" elif .attempt then \"\(.kind) (\(.attempt_wire_bytes / 1000000 | floor) MB)\" else .kind end" "$f") ;;
                    esac
                fi
                printf "%-${width}s" "$cell"
            done
            printf '\n'
        done
    done

    printf "%-${first}s" "total wire"
    for f in "${files[@]}"; do
        if [[ $(jq -r '.skipped // empty' "$f") != "" ]]; then cell=skipped; else
            cell=$(human_bytes "$(jq '[.trips[].wire_bytes] | add' "$f")"); fi
        printf "%-${width}s" "$cell"
    done
    printf '\n'
    printf "%-${first}s" "total time"
    for f in "${files[@]}"; do
        if [[ $(jq -r '.skipped // empty' "$f") != "" ]]; then cell=skipped; else
            cell="$(jq '[.trips[].total_seconds] | add * 1000 | round / 1000' "$f") s"; fi
        printf "%-${width}s" "$cell"
    done
    printf '\n'
    for f in "${files[@]}"; do
        [[ $(jq '.soak != null' "$f") == true ]] &&
            printf '%s soak: %s\n' "$(jq -r .mode "$f")" "$(jq -r '.soak | "seed \(.seed), \(.cycles) cycles, faults \(.faults): \(.trips_verified) trips verified, \(.mismatches) mismatches"' "$f")"
    done
    for f in "${files[@]}"; do
        local why
        why=$(jq -r '.skipped // empty' "$f")
        [[ -n $why ]] && printf '%s skipped: %s\n' "$(jq -r .mode "$f")" "$why"
    done
    return 0
}

# Runs the roundtrip in every mode on the current stack, prints the table, takes the lab down.
# --storage shared: memory-only trips on the shared network disk, transparent mode through
# virt-manager's call (the tool those fleets use).
cmd_demo() {
    local quick=false out="" rate=$LAB_DEFAULT_RATE storage=local
    while (($#)); do
        case $1 in
            --quick) quick=true; shift ;;
            --out) out=$2; shift 2 ;;
            --rate) rate=$2; shift 2 ;;
            --storage) [[ $2 =~ ^(local|shared)$ ]] || die "demo: --storage local or shared"; storage=$2; shift 2 ;;
            *) die "demo: unknown option $1" ;;
        esac
    done
    need_root
    out=${out:-$(mktemp -d /tmp/bfmig-lab-demo.XXXXXX)}
    mkdir -p "$out"
    local size=()
    if $quick; then
        size=(--ram-mib 256 --fill-mib 64 --disk-gib 1 --disk-data-mib 64)
    fi
    local mode files=() failed=0 call
    cmd_up --rate "$rate" --storage "$storage"
    for mode in "${LAB_MODES[@]}"; do
        call=virsh
        [[ $storage == shared && $mode == bfmig-transparent ]] && call=virt-manager
        if ( cmd_roundtrip --mode "$mode" --json "$out/$mode.json" --storage "$storage" --call "$call" "${size[@]}" ); then
            files+=("$out/$mode.json")
        else
            log "demo: mode $mode failed"
            failed=1
        fi
    done
    cmd_down
    echo
    echo "Back-and-forth migration, rate $rate ($($quick && echo quick || echo default) scenario, $storage storage; results in $out)"
    ((${#files[@]})) && cmd_table "${files[@]}"
    return $failed
}
