# The libvirt/QEMU stack of the machine: Debian 12 stock (libvirt 9.0, QEMU 7.2) or
# bookworm-backports (libvirt 11.3, QEMU 10.0). Switching installs and pins the versions.

STACK_PIN=/etc/apt/preferences.d/bfmig-lab-stack
BACKPORTS_SOURCES=/etc/apt/sources.list.d/bfmig-backports.sources
STACK_PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils)

stack_libvirt_version() { libvirtd --version 2> /dev/null | awk '{print $NF}'; }
stack_qemu_version() { qemu-system-x86_64 --version 2> /dev/null | awk 'NR==1 {print $4}'; }

# Installed binary packages built from the libvirt or qemu sources.
stack_installed_packages() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${source:Package}\n' 2> /dev/null |
        awk '$1 == "ii" && ($3 == "libvirt" || $3 == "qemu") {print $2}'
}

stack_has_backports_source() {
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/
}

# The backports entry is derived from the machine's own Debian entry so that no mirror name
# is ever written by the lab: same URIs, components and key, only the suite differs.
stack_add_backports_source() {
    stack_has_backports_source && return 0
    local debian=/etc/apt/sources.list.d/debian.sources
    [[ -r $debian ]] || die "cannot derive bookworm-backports: $debian missing"
    awk 'BEGIN {RS = ""; ORS = "\n"} NR == 1 {print; exit}' "$debian" |
        sed -E 's/^Suites:.*/Suites: bookworm-backports/' > "$BACKPORTS_SOURCES.tmp"
    grep -q '^Suites: bookworm-backports$' "$BACKPORTS_SOURCES.tmp" ||
        die "first stanza of $debian has no Suites: line"
    mv "$BACKPORTS_SOURCES.tmp" "$BACKPORTS_SOURCES"
    log "added $BACKPORTS_SOURCES"
    apt-get update > /dev/null
}

stack_pin() {
    local priority=$1
    cat > "$STACK_PIN" <<EOF
# Written by BFMig's lab/lab: keeps the lab's libvirt/QEMU stack where "lab up --stack" put it.
Package: src:libvirt src:qemu
Pin: release n=bookworm-backports
Pin-Priority: $priority
EOF
}

stack_apt() {
    DEBIAN_FRONTEND=noninteractive apt-get -y --no-install-recommends \
        -o Dpkg::Options::=--force-confold "$@" >> "$LAB_VAR.apt.log" 2>&1 ||
        die "apt-get $* failed (see $LAB_VAR.apt.log)"
}

stack_use_backports() {
    stack_add_backports_source
    if ! apt-cache policy libvirt-daemon | grep -q '~bpo'; then apt-get update > /dev/null; fi
    stack_pin 990
    local pkgs
    mapfile -t pkgs < <( { stack_installed_packages; printf '%s\n' "${STACK_PACKAGES[@]}"; } | sort -u)
    log "installing from bookworm-backports: ${pkgs[*]}"
    stack_apt install -t bookworm-backports "${pkgs[@]}"
}

# Back to Debian 12: every package of the stack's sources (libvirt, qemu and the firmware they
# bring) at a backports version (~bpo) goes to the newest version bookworm itself has, or is
# removed when bookworm has none (packages the newer stack split out). Other backports
# packages on the machine are not the lab's business and stay.
stack_use_debian12() {
    stack_pin -1
    local pkg ver target args=()
    while read -r pkg ver; do
        target=$(apt-cache madison "$pkg" | awk -F'|' '$2 !~ /bpo/ {gsub(/ /, "", $2); print $2; exit}')
        if [[ -n $target ]]; then args+=("$pkg=$target"); else args+=("$pkg-"); fi
    done < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version} ${source:Package}\n' |
        awk '$1 == "ii" && $3 ~ /~bpo/ && $4 ~ /^(libvirt|qemu|seabios|ipxe|edk2)$/ {print $2, $3}')
    for pkg in "${STACK_PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2> /dev/null | grep -q '^ii' || args+=("$pkg")
    done
    ((${#args[@]} == 0)) && return 0
    log "installing Debian 12 versions: ${args[*]}"
    stack_apt install --allow-downgrades "${args[@]}"
}

stack_ensure() {
    local want=$1
    case $want in
        debian12) stack_use_debian12 ;;
        backports) stack_use_backports ;;
        *) die "unknown stack '$want' (debian12 or backports)" ;;
    esac
    log "stack now: libvirt $(stack_libvirt_version), QEMU $(stack_qemu_version)"
}

cmd_stack() {
    if (($# == 0)); then
        echo "libvirt $(stack_libvirt_version), QEMU $(stack_qemu_version)"
        return 0
    fi
    need_root
    lab_is_up && die "take the lab down first (lab down)"
    mkdir -p "$(dirname "$LAB_VAR")"
    stack_ensure "$1"
}
