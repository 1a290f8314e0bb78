# Scenario "soak": back-and-forth trips through BFMig (2 per cycle), every trip verified, with a
# workload drawn from the seed before each trip (RAM data changed, disk data changed, discarded,
# rewritten identically, RAM data moved to other guest pages) and, with --faults yes, faults of
# the matrix (lib/faults.sh) before some trips. One seed, one run: the same trips, workloads and
# faults again. It is the roundtrip scenario with a per-trip workload (ROUNDTRIP_WORKLOAD) and
# --fault specs; the JSON adds the seed, and each trip has its workload_before and any fault.
#
#   lab scenario soak --json FILE [--cycles 50] [--seed 1] [--faults no|yes] [--mode bfmig]
#        [--ram-mib 256] [--fill-mib 128] [--disk-gib 1] [--disk-data-mib 256] [--rate 100mbit]

# Faults a soak draws from: the short ones (a 60 s link loss makes a soak cycle four times as
# long; the matrix tests it).
SOAK_FAULTS=(link5-mem link5-disk abort libvirtd-src libvirtd-dst bfmigd-src bfmigd-dst store-full kill-all
    damage-pages damage-map)

# Bounds of the drawn workload, set by cmd_soak from the guest's size.
SOAK_FILL_MIB=0
SOAK_DATA_MIB=0

# ROUNDTRIP_WORKLOAD: the changes before the trip after TRIP, drawn from bash's RANDOM (seeded
# once by cmd_soak, so the run is reproducible). Sets cmd_roundtrip's own workload variables.
soak_workload() {
    mem_pct=$((RANDOM % 31))
    disk_pct=$((RANDOM % 6))
    discard_mib=0 rewrite_mib=0 move_files=0
    ((RANDOM % 3 == 0)) && discard_mib=$((1 + RANDOM % (SOAK_DATA_MIB / 16 > 0 ? SOAK_DATA_MIB / 16 : 1)))
    ((RANDOM % 3 == 0)) && rewrite_mib=$((1 + RANDOM % (SOAK_DATA_MIB / 16 > 0 ? SOAK_DATA_MIB / 16 : 1)))
    ((RANDOM % 2 == 0)) && move_files=$((1 + RANDOM % (SOAK_FILL_MIB / 4 > 0 ? SOAK_FILL_MIB / 4 : 1)))
    return 0
}

cmd_soak() {
    local json="" cycles=50 seed=1 faults=no mode=bfmig ram=256 fill=128 dgib=1 dmib=256 rate=100mbit
    while (($#)); do
        case $1 in
            --json) json=$2 ;;
            --cycles) [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--cycles: a positive number"; cycles=$2 ;;
            --seed) [[ $2 =~ ^[0-9]+$ ]] || die "--seed: a number"; seed=$2 ;;
            --faults) [[ $2 =~ ^(yes|no)$ ]] || die "--faults: yes or no"; faults=$2 ;;
            --mode) [[ $2 == bfmig* ]] || die "soak: --mode bfmig or bfmig-transparent"; mode=$2 ;;
            --ram-mib) ram=$2 ;;
            --fill-mib) fill=$2 ;;
            --disk-gib) dgib=$2 ;;
            --disk-data-mib) dmib=$2 ;;
            --rate) rate=$2 ;;
            *) die "soak: unknown option $1" ;;
        esac
        shift 2
    done
    [[ -n $json ]] || die "soak needs --json"
    local trips=$((cycles * 2)) trip args=()
    RANDOM=$seed
    SOAK_FILL_MIB=$fill SOAK_DATA_MIB=$dmib
    # Faults from trip 3 on (trip 1 has nothing retained, trip 2 is the first normal return),
    # about one trip in four, drawn before any workload so that a seed fixes both.
    if [[ $faults == yes ]]; then
        for ((trip = 3; trip <= trips; trip++)); do
            ((RANDOM % 4 == 0)) && args+=(--fault "${SOAK_FAULTS[RANDOM % ${#SOAK_FAULTS[@]}]}@$trip")
        done
    fi
    log "soak: $cycles cycles ($trips trips), seed $seed, faults $faults${args:+: ${args[*]}}"
    ROUNDTRIP_WORKLOAD=soak_workload cmd_roundtrip --mode "$mode" --json "$json" --trips "$trips" --rate "$rate" \
        --ram-mib "$ram" --fill-mib "$fill" --disk-gib "$dgib" --disk-data-mib "$dmib" "${args[@]}"
    local tmp
    tmp=$(mktemp)
    jq --argjson seed "$seed" --argjson cycles "$cycles" --arg faults "$faults" \
        '. + {soak: {seed: $seed, cycles: $cycles, faults: $faults,
                     trips_verified: ([.trips[] | select(.verified)] | length),
                     mismatches: ([.trips[] | .guest_mismatches] | add),
                     wire_bytes: ([.trips[] | .wire_bytes] | add),
                     seconds: ([.trips[] | .total_seconds] | add)}}' "$json" > "$tmp" && mv "$tmp" "$json"
    log "soak: $(jq -c .soak "$json")"
}
