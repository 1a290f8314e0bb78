# "lab speed": stock and BFMig side by side at several link rates, several runs each, medians
# printed per trip (issue 14: an operator on a datacenter link judges a migration by its downtime
# first, so time and downtime must stay visible at every rate, not only the WAN's bytes).
#
# Each (rate, run) brings the link to RATE and runs every mode's roundtrip in turn, so the modes
# of one run share the machine's load; the medians are over runs. Results: OUT/RATE/runN/MODE.json
# and OUT/summary.json.

SPEED_DEFAULT_SIZE=(--ram-mib 512 --fill-mib 256 --disk-gib 1 --disk-data-mib 256 --trips 3)

cmd_speed() {
    local rates=100mbit,1gbit,unlimited runs=3 modes=stock,bfmig-transparent out="" stack=""
    local size=() rate run mode
    while (($#)); do
        case $1 in
            --rates) rates=$2 ;;
            --runs) [[ $2 =~ ^[1-9]$ ]] || die "--runs: 1 to 9"; runs=$2 ;;
            --modes) modes=$2 ;;
            --out) out=$2 ;;
            --stack) stack=$2 ;;
            --ram-mib | --fill-mib | --disk-gib | --disk-data-mib | --trips | --content) size+=("$1" "$2") ;;
            *) die "speed: unknown option $1" ;;
        esac
        shift 2
    done
    ((${#size[@]})) || size=("${SPEED_DEFAULT_SIZE[@]}")
    local rate_list=() mode_list=()
    IFS=, read -r -a rate_list <<< "$rates"
    IFS=, read -r -a mode_list <<< "$modes"
    for rate in "${rate_list[@]}"; do [[ $rate == unlimited ]] || rate_bps "$rate" > /dev/null; done
    for mode in "${mode_list[@]}"; do mode_known "$mode" || die "speed: unknown mode '$mode' (known: ${LAB_MODES[*]})"; done
    need_root
    out=$(realpath -m "${out:-$(mktemp -d /tmp/bfmig-lab-speed.XXXXXX)}")
    mkdir -p "$out"
    # Downtime depends on how fast a fresh destination QEMU can touch memory, which a VM that
    # returns freed memory to its host slows many times (lab/tools/memory-reporting).
    local failed=0 stack_args=() reporting
    reporting=$("$BFMIG_REPO/lab/tools/memory-reporting" show)
    log "speed: free page reporting: $reporting"
    [[ -n $stack ]] && stack_args=(--stack "$stack")
    for rate in "${rate_list[@]}"; do
        for ((run = 1; run <= runs; run++)); do
            mkdir -p "$out/$rate/run$run"
            for mode in "${mode_list[@]}"; do
                log "speed: rate $rate, run $run/$runs, mode $mode"
                # A subshell per roundtrip, as the demo does: one mode's failure (die) is
                # recorded and the matrix goes on.
                if ! (cmd_roundtrip --mode "$mode" --rate "$rate" "${stack_args[@]}" "${size[@]}" \
                    --json "$out/$rate/run$run/$mode.json"); then
                    log "speed: rate $rate run $run mode $mode failed"
                    failed=1
                fi
            done
        done
    done
    cmd_down
    [[ $("$BFMIG_REPO/lab/tools/memory-reporting" show) == "$reporting" ]] ||
        { log "speed: free page reporting changed during the runs (was: $reporting)"; reporting="changed during the runs"; }
    speed_summary "$out" "${mode_list[0]}" | jq --arg reporting "$reporting" \
        '.free_page_reporting = $reporting' > "$out/summary.json"
    speed_table "$out/summary.json"
    return $failed
}

# One JSON of medians: per rate, mode and trip, over every run whose trip was verified; runs
# with an unverified trip are counted, never averaged in.
speed_summary() {
    local out=$1 base=$2
    find "$out" -mindepth 3 -maxdepth 3 -name '*.json' -print0 | sort -z | xargs -0 jq -c \
        --arg out "$out" '{rate: (input_filename | ltrimstr($out + "/") | split("/")[0]), mode: .mode,
              skipped: (.skipped // null),
              trips: [(.trips // [])[] | {wire_bytes, seconds: .total_seconds, downtime_ms, verified}]}' |
    jq -s --arg base "$base" '
        def median: sort | if length == 0 then null
            elif length % 2 == 1 then .[length / 2 | floor]
            else (.[length / 2 - 1] + .[length / 2]) / 2 end;
        group_by(.rate) | map({rate: .[0].rate, modes: (group_by(.mode) | map(
            . as $runs | {mode: .[0].mode, runs: length,
             unverified_runs: ([.[] | select(any(.trips[]; .verified != true) or (.trips | length) == 0)] | length),
             trips: [range(0; ([.[].trips | length] | max)) as $i |
                [$runs[] | select(all(.trips[]; .verified == true)) | .trips[$i] | select(. != null)] |
                {trip: ($i + 1), wire_bytes: ([.[].wire_bytes] | median), seconds: ([.[].seconds] | median),
                 downtime_ms: ([.[].downtime_ms] | median), runs: length}]}))})
        | {base: $base, rates: .}'
}

# Medians side by side: every mode against the base mode (the first of --modes, stock by
# default), with the issue's bounds: downtime <= base + 50 ms, first trip <= 1.05 x base's time.
speed_table() {
    jq -r '
        def r(x): if x == null then "-" else (x * 100 | round / 100 | tostring) end;
        "free page reporting: \(.free_page_reporting // "not recorded")",
        (.base as $base | .rates[] | . as $rate |
        ($rate.modes | map(select(.mode == $base)) | .[0]) as $b |
        "rate \($rate.rate) (medians of verified runs; base \($base))",
        ($rate.modes[] | select(.mode != $base) | . as $m |
          "  \($m.mode): \($m.runs) runs, \($m.unverified_runs) with an unverified trip",
          ($m.trips[] | . as $t | ($b.trips[$t.trip - 1] // {}) as $bt |
            "    trip \($t.trip): time \(r($t.seconds)) s vs \(r($bt.seconds)) s (x\(if $bt.seconds then r($t.seconds / $bt.seconds) else "-" end)), downtime \($t.downtime_ms // "-") ms vs \($bt.downtime_ms // "-") ms (\(if $bt.downtime_ms and $t.downtime_ms then (if $t.downtime_ms - $bt.downtime_ms <= 50 then "within +50 ms" else "OVER +50 ms" end) else "-" end)), bytes x\(if $bt.wire_bytes and $t.wire_bytes then r($t.wire_bytes / $bt.wire_bytes) else "-" end)")),
        "")' "$1"
}
