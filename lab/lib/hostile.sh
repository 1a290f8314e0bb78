# Scenario "hostile": a bfmig round trip (explicit mode) in which, before the third trip (A -> B,
# a return to a host that kept what the guest left), host A attacks B's bfmigd peer port with
# lab/tools/hostile-peer (random bytes, 200 connections at once, idle connections, a TLS
# ClientHello without a certificate, routes for guests B does not expect, log injection through
# sender names). The return trip after the attack must still be verified and cheap (against the
# second trip, a return trip without an attack), B's bfmigd the same process with its RSS within
# +16 MiB, and B's log must show the refusals rate-limited and escaped (no raw control
# characters, no line a syslog reader would take for a priority prefix). Fails (exit 1) when a
# check fails; the checks are in the result file's "hostile" object.

HOSTILE_TOOL=$LAB_DIR/tools/hostile-peer
HOSTILE_TRIP=3
HOSTILE_RSS_SLACK_KIB=$((16 * 1024))

hostile_rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2> /dev/null || echo 0; }

# Before trip 3 (both daemons prepared): remember B's bfmigd and its log, run the attack from A.
hostile_before_trip() {
    local trip=$1 src=$2 dst=$3 uuid
    ((trip == HOSTILE_TRIP)) || return 0
    HOSTILE_PID=$(host_pid "$dst" bfmigd)
    HOSTILE_RSS0=$(hostile_rss_kib "$HOSTILE_PID")
    HOSTILE_LOG=$(bfmig_dir "$dst")/bfmigd.log
    HOSTILE_LOG_OFFSET=$(stat -c %s "$HOSTILE_LOG")
    uuid=$(host_virsh "$src" domuuid "$LAB_GUEST" | tr -d '[:space:]')
    log "hostile: host ${src^^} attacks ${dst^^}'s peer port ${HOST_ADDR[$dst]}:$BFMIG_PORT (bfmigd pid $HOSTILE_PID, RSS ${HOSTILE_RSS0} KiB)"
    HOSTILE_T0=$SECONDS
    HOSTILE_PHASES=$(host_exec "$src" timeout 300 "$HOSTILE_TOOL" "${HOST_ADDR[$dst]}" "$BFMIG_PORT" "$uuid" | jq -s .) ||
        die "hostile: the attacker failed"
    HOSTILE_SECONDS=$((SECONDS - HOSTILE_T0))
    log "hostile: attack over after ${HOSTILE_SECONDS}s: $(jq -c . <<< "$HOSTILE_PHASES")"
    # The trip starts when B's port takes connections again (idle ones are closed by then).
    bfmig_wait_ready "$dst"
}

# After trip 3: B's daemon, its memory and its log since the attack began.
hostile_after_trip() {
    local trip=$1 src=$2 dst=$3 pid rss1 new lines rejected suppressed escaped raw prefix same
    ((trip == HOSTILE_TRIP)) || return 0
    pid=$(host_pid "$dst" bfmigd)
    rss1=$(hostile_rss_kib "$pid")
    new=$LAB_VAR/work/hostile-b.log
    tail -c +$((HOSTILE_LOG_OFFSET + 1)) "$HOSTILE_LOG" > "$new"
    lines=$(wc -l < "$new")
    rejected=$(grep -c 'rejected peer connection' "$new" || true)
    suppressed=$(grep -c 'more peer connections were rejected without a line each' "$new" || true)
    escaped=$(grep -cF 'a\x0a<0>forged emergency' "$new" || true)
    # Any byte below 0x20 but tab, or DEL, inside a line; and lines that start with "<N>".
    raw=$(LC_ALL=C grep -c $'[\x01-\x08\x0b-\x1f\x7f]' "$new" || true)
    prefix=$(grep -cE '^<[0-7]>' "$new" || true)
    [[ $pid == "$HOSTILE_PID" ]] && same=true || same=false
    HOSTILE_JSON=$(jq -n --argjson phases "$HOSTILE_PHASES" --argjson secs "$HOSTILE_SECONDS" \
        --argjson pid0 "$HOSTILE_PID" --argjson pid1 "${pid:-0}" --argjson same "$same" \
        --argjson rss0 "$HOSTILE_RSS0" --argjson rss1 "${rss1:-0}" --argjson slack "$HOSTILE_RSS_SLACK_KIB" \
        --argjson lines "$lines" --argjson rejected "$rejected" --argjson suppressed "$suppressed" \
        --argjson escaped "$escaped" --argjson raw "$raw" --argjson prefix "$prefix" --argjson trip "$HOSTILE_TRIP" \
        '{trip: $trip, attack_seconds: $secs, phases: $phases,
          bfmigd: {pid_before: $pid0, pid_after: $pid1, same_process: $same,
                   rss_kib_before: $rss0, rss_kib_after: $rss1, rss_within_16mib: ($rss1 - $rss0 <= $slack)},
          log: {lines: $lines, rejected_lines: $rejected, suppressed_summaries: $suppressed,
                escaped_injections: $escaped, raw_control_lines: $raw, priority_prefix_lines: $prefix}}')
    log "hostile: after the return trip: $(jq -c '.bfmigd, .log' <<< "$HOSTILE_JSON" | tr '\n' ' ')"
}

cmd_hostile() {
    local json="" args=()
    while (($#)); do
        case $1 in
            --json) json=$2; shift 2 ;;
            --mode | --trips) die "hostile: $1 is fixed (mode bfmig, $HOSTILE_TRIP trips)" ;;
            *) args+=("$1" "$2"); shift 2 ;;
        esac
    done
    [[ -n $json ]] || die "hostile needs --json"
    json=$(realpath -m "$json")
    ensure_commands socat:socat openssl:openssl
    HOSTILE_JSON=null
    ROUNDTRIP_BEFORE_TRIP=hostile_before_trip ROUNDTRIP_AFTER_TRIP=hostile_after_trip \
        cmd_roundtrip --mode bfmig --trips "$HOSTILE_TRIP" --json "$json" "${args[@]}"
    jq -e '.skipped' "$json" > /dev/null 2>&1 && return 0
    local tmp=$json.tmp
    jq --argjson hostile "$HOSTILE_JSON" '. + {hostile: $hostile}' "$json" > "$tmp" && mv "$tmp" "$json"
    hostile_verdict "$json"
}

# The scenario's pass/fail, from the result file (the lab test checks the same fields).
hostile_verdict() {
    local json=$1 problems
    problems=$(jq -r '
        (.trips[2].wire_bytes) as $w3 | (.trips[1].wire_bytes) as $w2 | (.trips[0].wire_bytes) as $w1 |
        [ (if all(.trips[]; .verified) then empty else "a trip was not verified" end),
          (if $w3 * 5 < $w1 then empty else "the return trip after the attack (\($w3) bytes) is not cheap against the first (\($w1))" end),
          (if $w3 <= 2 * $w2 + 4194304 then empty else "the return trip after the attack (\($w3) bytes) costs more than the one before it (\($w2))" end),
          (if .hostile.bfmigd.same_process then empty else "B'"'"'s bfmigd is another process after the attack" end),
          (if .hostile.bfmigd.rss_within_16mib then empty else "B'"'"'s bfmigd grew by more than 16 MiB" end),
          (if .hostile.log.raw_control_lines == 0 then empty else "B'"'"'s log has raw control characters" end),
          (if .hostile.log.priority_prefix_lines == 0 then empty else "B'"'"'s log has lines starting with a priority prefix" end),
          (if .hostile.log.escaped_injections >= 1 then empty else "B'"'"'s log does not show the injected name escaped" end),
          (if .hostile.log.suppressed_summaries >= 1 then empty else "B'"'"'s log shows no rate-limit summary" end),
          (if .hostile.log.rejected_lines <= 10 * (.hostile.attack_seconds / 10 + 2) then empty
           else "B'"'"'s log has \(.hostile.log.rejected_lines) rejection lines for a \(.hostile.attack_seconds) s attack" end)
        ] | .[]' "$json")
    if [[ -n $problems ]]; then
        printf 'lab: hostile: FAILED: %s\n' "$problems" >&2
        return 1
    fi
    log "hostile: passed (results in $json)"
}
