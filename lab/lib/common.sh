# Shared names and small helpers of the lab.

# One lab per name on a machine (BFMIG_LAB_NAME, default bfmig-lab): namespaces <name>-a/-b,
# namespace files and pids under /run/<name> (gone at reboot), disk images and host
# directories under /var/tmp/<name> (large, on disk, not in RAM), lock /run/<name>.lock.
LAB_NAME=${BFMIG_LAB_NAME:-bfmig-lab}
[[ $LAB_NAME =~ ^[a-z][a-z0-9-]{0,20}$ ]] || { echo "lab: BFMIG_LAB_NAME must be [a-z][a-z0-9-]*, at most 21 characters" >&2; exit 2; }
LAB_RUN=/run/$LAB_NAME
LAB_VAR=/var/tmp/$LAB_NAME
LAB_LOCK=/run/$LAB_NAME.lock
LAB_HOSTS=(a b)
declare -A HOST_ADDR=([a]=198.18.0.1 [b]=198.18.0.2 [c]=198.18.0.3)
# Every host name a lab may have: what `down` cleans whatever the state says.
LAB_ALL_HOSTS=(a b c)
# A lab brought up with --hosts 3 has host C too (behind a switch namespace instead of the
# two-host veth pair); every later command of that lab learns it from the lab's state.
if [[ $(sed -n 's/^hosts=//p' "$LAB_RUN/state" 2> /dev/null) == 3 ]]; then
    LAB_HOSTS=(a b c)
fi
LAB_GUEST=lab-guest
LAB_DEFAULT_RATE=100mbit
MiB=1048576

log() { printf 'lab: %s %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "the lab needs root (namespaces, mounts, libvirtd)"; }

now() { date +%s.%N; }

# Whoever drives the lab holds its lock for the whole command, so two checkouts (or two test
# runs) on one machine take turns instead of tearing down each other's hosts. A caller that
# already holds it (a test collection, the demo) exports BFMIG_LAB_LOCK_HELD=1.
lab_lock() {
    [[ ${BFMIG_LAB_LOCK_HELD:-} == 1 ]] && return 0
    exec 9> "$LAB_LOCK"
    if ! flock -n 9; then
        log "waiting for the lab lock $LAB_LOCK (another lab command is running)"
        flock -w "${BFMIG_LAB_LOCK_WAIT:-3600}" 9 || die "lab lock $LAB_LOCK still held"
    fi
    export BFMIG_LAB_LOCK_HELD=1
}

# Installs the Debian packages behind missing commands: "command:package" pairs.
ensure_commands() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" > /dev/null || missing+=("${pair#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" > "$LAB_VAR.apt.log" 2>&1 ||
        { apt-get update >> "$LAB_VAR.apt.log" 2>&1 &&
          apt-get install -y --no-install-recommends "${missing[@]}" >> "$LAB_VAR.apt.log" 2>&1; } ||
        die "apt-get install ${missing[*]} failed (see $LAB_VAR.apt.log)"
}

ensure_lab_tools() {
    ensure_commands ip:iproute2 tc:iproute2 socat:socat jq:jq qemu-img:qemu-utils \
        qemu-system-x86_64:qemu-system-x86 libvirtd:libvirt-daemon-system virsh:libvirt-clients \
        virtlogd:libvirt-daemon-system nsenter:util-linux unshare:util-linux openssl:openssl nft:nftables
}

# Rate like 100mbit / 1gbit / 500kbit -> bits per second.
rate_bps() {
    local r=${1,,}
    case $r in
        *gbit) echo $((${r%gbit} * 1000000000)) ;;
        *mbit) echo $((${r%mbit} * 1000000)) ;;
        *kbit) echo $((${r%kbit} * 1000)) ;;
        *bit) echo "${r%bit}" ;;
        *) die "rate '$1' not understood (use e.g. 100mbit, 1gbit, or unlimited for lab up)" ;;
    esac
}
