# The lab guest: Debian cloud kernel + busybox initramfs (lab/guest), TCG, one virtio qcow2
# disk, serial console on a unix socket that the harness drives (protocol in lab/guest/init).

GUEST_SEQ=0
GUEST_OUT=()
declare -A EXP_M=() EXP_D=()

guest_build() {
    local out=$1
    [[ -s $out/initrd.img && $out/initrd.img -nt $LAB_DIR/guest/init ]] && return 0
    "$LAB_DIR/guest/build" "$out"
}

guest_image() { echo "$(host_dir "$1")/lib/images/$LAB_GUEST.qcow2"; }
guest_serial() { echo "$(host_dir "$1")/lib/qemu/$LAB_GUEST.serial"; }

# RAM_MIB [STORAGE]: STORAGE local (default: the qcow2 in each host's own images directory) or
# shared (the network disk of lib/storage.sh, the same on both hosts) or shared-file (the same
# qcow2 path on both hosts, which libvirt cannot know is shared) or block (each host's loop
# device, lib/blockdev.sh).
guest_xml() {
    local ram_mib=$1 storage=${2:-local} disk
    if [[ $storage == shared ]]; then
        disk=$(storage_disk_xml)
    elif [[ $storage == shared-file ]]; then
        disk=$(storage_file_disk_xml)
    elif [[ $storage == block ]]; then
        disk=$(blockdev_disk_xml)
    else
        disk="    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/$LAB_GUEST.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>"
    fi
    cat <<EOF
<domain type='qemu'>
  <name>$LAB_GUEST</name>
  <memory unit='MiB'>$ram_mib</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/var/lib/libvirt/boot/vmlinuz</kernel>
    <initrd>/var/lib/libvirt/boot/initrd.img</initrd>
    <cmdline>console=ttyS0 loglevel=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
$disk
    <serial type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/$LAB_GUEST.serial'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# Sends one command to the guest on host H and collects its @@ lines in GUEST_OUT.
# Fails when the guest does not answer within TIMEOUT seconds or the command failed.
guest_cmd() {
    local h=$1 timeout=$2
    shift 2
    local sock seq line rc=""
    sock=$(guest_serial "$h")
    GUEST_SEQ=$((GUEST_SEQ + 1))
    seq=$GUEST_SEQ
    GUEST_OUT=()
    coproc GUEST_IO { exec socat -t 5 - "UNIX-CONNECT:$sock"; }
    local io_pid=$GUEST_IO_PID in=${GUEST_IO[0]} out=${GUEST_IO[1]}
    echo "$seq $*" >&"$out"
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)) && IFS= read -r -t $((deadline - SECONDS)) line <&"$in"; do
        line=${line%$'\r'}
        case $line in
            "@@end $seq "*) rc=${line##* }; break ;;
            @@*) GUEST_OUT+=("$line") ;;
        esac
    done
    kill "$io_pid" 2> /dev/null || true
    wait "$io_pid" 2> /dev/null || true
    [[ -n $rc ]] || { log "guest on $h: no answer to '$*' within ${timeout}s"; return 1; }
    [[ $rc == 0 ]] || { log "guest on $h: '$*' failed with $rc: ${GUEST_OUT[*]}"; return 1; }
}

guest_wait_ready() {
    local h=$1 i
    for ((i = 0; i < 120; i++)); do
        if [[ -S $(guest_serial "$h") ]] && guest_cmd "$h" 2 ping 2> /dev/null; then return 0; fi
        sleep 1
    done
    die "guest on $h did not answer on its serial console"
}

# Takes the sums a write reported as the new truth.
guest_record() {
    local line kind idx sum
    for line in "${GUEST_OUT[@]}"; do
        read -r _ kind idx sum <<< "$line"
        case $line in
            "@@sum m "*) EXP_M[$idx]=$sum ;;
            "@@sum d "*) EXP_D[$idx]=$sum ;;
        esac
    done
}

# Re-reads all guest data and compares with the truth: VERIFY_BAD = number of mismatches
# (-1 when the guest did not answer).
guest_verify() {
    local h=$1 chunks=$2 line kind idx sum bad=0
    local -A seen_m=() seen_d=()
    VERIFY_BAD=-1
    guest_cmd "$h" 1800 verify "$chunks" || return 0
    for line in "${GUEST_OUT[@]}"; do
        [[ $line == "@@sum "* ]] || continue
        read -r _ kind idx sum <<< "$line"
        if [[ $kind == m ]]; then
            seen_m[$idx]=1
            [[ ${EXP_M[$idx]:-} == "$sum" ]] || { bad=$((bad + 1)); log "RAM file $idx: $sum, expected ${EXP_M[$idx]:-none}"; }
        else
            seen_d[$idx]=1
            [[ ${EXP_D[$idx]:-} == "$sum" ]] || { bad=$((bad + 1)); log "disk chunk $idx: $sum, expected ${EXP_D[$idx]:-none}"; }
        fi
    done
    for idx in "${!EXP_M[@]}"; do [[ -n ${seen_m[$idx]:-} ]] || { bad=$((bad + 1)); log "RAM file $idx missing"; }; done
    for idx in "${!EXP_D[@]}"; do [[ -n ${seen_d[$idx]:-} ]] || { bad=$((bad + 1)); log "disk chunk $idx missing"; }; done
    VERIFY_BAD=$bad
}

# DATA_MIB random MiB at the start of a sparse DISK_GIB raw file RAW; records the chunk sums.
guest_random_raw() {
    local raw=$1 disk_gib=$2 data_mib=$3
    mkdir -p "$LAB_VAR/work"
    rm -f "$raw"
    truncate -s "${disk_gib}G" "$raw"
    if ((data_mib > 0)); then
        dd if=/dev/urandom of="$raw" bs=1M count="$data_mib" conv=notrunc status=none
        guest_record_raw "$raw" "$data_mib"
    fi
}

# Records the sums of the first DATA_MIB MiB chunks of RAW as the disk's truth.
guest_record_raw() {
    local raw=$1 data_mib=$2 i=0 sum
    while read -r sum _; do
        EXP_D[$i]=$sum
        i=$((i + 1))
    done < <(head -c $((data_mib * MiB)) "$raw" | split -b $MiB -a 6 --filter='md5sum' -)
}

# OS-like content (--content os): an ext4 file system of DATA_MIB MiB at the start of a sparse
# DISK_GIB raw file RAW, holding this machine's own files (programs, libraries, documentation,
# locale data: what a guest's root file system holds) up to about 85 % of it, taken in a fixed
# order so every run builds the same image from the same machine. Records the chunk sums.
guest_os_raw() {
    local raw=$1 disk_gib=$2 data_mib=$3 tree budget
    ensure_commands mkfs.ext4:e2fsprogs
    mkdir -p "$LAB_VAR/work"
    tree=$LAB_VAR/work/os-tree
    rm -rf "$tree" "$raw"
    mkdir -p "$tree"
    budget=$((data_mib * MiB * 85 / 100))
    # Sorted paths mix binaries, libraries and text as a root file system does.
    # awk reads to the end (no early exit) so no stage of the pipe dies of SIGPIPE under pipefail.
    { (cd / && find usr/bin usr/lib usr/share -xdev -type f -size -8M -printf '%s\t%p\n' 2> /dev/null) || true; } |
        sort -t $'\t' -k2 |
        awk -F '\t' -v budget="$budget" '!full { if (total + $1 > budget) full = 1; else { total += $1; print $2 } }' |
        tar -cf - -C / --no-recursion --verbatim-files-from --files-from=- | tar -C "$tree" -xf -
    truncate -s "${data_mib}M" "$raw"
    mkfs.ext4 -q -F -d "$tree" -E lazy_itable_init=0,lazy_journal_init=0 "$raw" > /dev/null || die "mkfs.ext4 -d failed"
    rm -rf "$tree"
    truncate -s "${disk_gib}G" "$raw"
    guest_record_raw "$raw" "$data_mib"
}

# The disk's content: random (GUEST_CONTENT=random, default; no compressor helps) or os.
GUEST_CONTENT=random

# Prepares the disk on the host (much faster than writing it under TCG): DATA_MIB MiB of
# GUEST_CONTENT at the start of a DISK_GIB qcow2, the rest unallocated. Records the chunk sums.
# The image is host H's own unless IMAGE names another (the shared storage's).
guest_prepare_disk() {
    local h=$1 disk_gib=$2 data_mib=$3 image=${4:-} raw
    [[ -n $image ]] || image=$(guest_image "$h")
    raw=$LAB_VAR/work/disk.raw
    if [[ $GUEST_CONTENT == os ]]; then
        guest_os_raw "$raw" "$disk_gib" "$data_mib"
    else
        guest_random_raw "$raw" "$disk_gib" "$data_mib"
    fi
    mkdir -p "$(dirname "$image")"
    qemu-img convert -f raw -O qcow2 "$raw" "$image"
    rm -f "$raw"
}

# The backing file of the guest's disk (--backing-top-mib), beside the image on every host.
guest_base_image() { echo "$(host_dir "$1")/lib/images/$LAB_GUEST-base.qcow2"; }

# The guest's disk as a qcow2 overlay on a backing file (an OpenStack instance on its image):
# DATA_MIB random MiB as guest_prepare_disk makes them, of which the base holds all but the first
# TOP_MIB (there it holds other random data: what the guest overwrote since), and the overlay on
# host H only those TOP_MIB. The base goes to every host, identical (libvirt needs it present on a
# destination; only the top layer travels with --copy-storage-inc). The backing file is named
# relative to the overlay, so it resolves the same inside a host and from the machine.
guest_prepare_backing_disk() {
    local h=$1 disk_gib=$2 data_mib=$3 top_mib=$4 raw old base image other
    image=$(guest_image "$h")
    base=$(guest_base_image "$h")
    raw=$LAB_VAR/work/disk.raw
    old=$LAB_VAR/work/base.raw
    guest_random_raw "$raw" "$disk_gib" "$data_mib"
    cp --sparse=always "$raw" "$old"
    dd if=/dev/urandom of="$old" bs=1M count="$top_mib" conv=notrunc status=none
    mkdir -p "$(dirname "$image")"
    qemu-img convert -f raw -O qcow2 "$old" "$base"
    guest_create_overlay "$h"
    head -c $((top_mib * MiB)) "$raw" > "$old"
    ((top_mib == 0)) || qemu-io -f qcow2 -c "write -q -s $old 0 ${top_mib}M" "$image" || die "writing the overlay's top layer failed"
    rm -f "$raw" "$old"
    for other in "${LAB_HOSTS[@]}"; do
        [[ $other == "$h" ]] || { mkdir -p "$(dirname "$(guest_base_image "$other")")"; cp --sparse=always "$base" "$(guest_base_image "$other")"; }
    done
}

# An empty overlay on the guest's backing file on host H: where --copy-storage-inc lands.
guest_create_overlay() {
    local image
    image=$(guest_image "$1")
    (cd "$(dirname "$image")" && qemu-img create -q -f qcow2 -b "$(basename "$(guest_base_image "$1")")" -F qcow2 "$(basename "$image")")
}

# Bytes allocated in the top layer of host H's image (what --copy-storage-inc copies).
guest_top_bytes() {
    qemu-img map -U --output=json "$(guest_image "$1")" | jq '[.[] | select(.depth == 0 and .data) | .length] | add // 0'
}
