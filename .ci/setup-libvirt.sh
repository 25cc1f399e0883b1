#!/usr/bin/env bash
# Prepare libvirt + QEMU (TCG) for the VM driver tests on a fresh Debian 12 machine, as root.
# Idempotent and fast when already done: no apt at all once every package is installed,
# and daemons are started only when not already running.
set -euo pipefail

PKGS=(
    qemu-system-x86            # the emulator (guests run under TCG: <domain type='qemu'>)
    libvirt-daemon             # libvirtd
    libvirt-daemon-driver-qemu # its qemu driver (the test:/// driver is built into libvirtd)
    libvirt-clients            # virsh, for the readiness check and debugging
    libvirt-dev                # headers: libvirt-python ships no wheel, pip builds it
    pkg-config                 # libvirt-python's build finds libvirt with it
    gcc                        # ... and compiles its C extension
    linux-image-amd64          # guest kernel + virtio modules (agents/guest.py extracts them)
    busybox-static             # the guest's userland (agents/guest.py packs it into an initrd)
    iproute2                   # the tests create a bridge and read addresses
    iputils-ping               # the tests ping the guests
    nftables                   # nft, and libnftables1 that pip-nftables binds to
    conntrack                  # the network driver cuts connections a removed rule allowed
    netcat-openbsd             # the tests open TCP and UDP connections between guests
    bird2                      # BGP: the LB nodes' VIP speakers and the test topology's router
)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "setup-libvirt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The kernel package is only a source of a guest kernel and modules: skip generating a
    # host initramfs for it in the kernel hook.
    export INITRD=No
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
    # Update the package lists only when needed: absent, or too old to serve the install
    # (a candidate missing, or a download failing because the lists name gone versions).
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        apt-get update -q
        apt_install
    elif ! apt_install; then
        apt-get update -q
        apt_install
    fi
fi

mkdir -p /var/log/libvirt /var/log/orch-guests

# Without libvirt-daemon-system nobody creates the user that libvirtd's qemu driver runs
# guests as, and libvirtd refuses to start the driver without it. It must also be in group
# kvm (as that package's postinst does): otherwise libvirtd's capability cache says "KVM was
# enabled when probing, but it is not available now" and re-probes QEMU on every call,
# which makes each defineXML/getVersion take ~4 s.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt \
        --no-create-home --shell /usr/sbin/nologin libvirt-qemu
restart=0
# As Debian's udev rule would: /dev/kvm for group kvm (unused by our TCG guests, but libvirt's
# capability probe and its validity check must agree on whether KVM is usable).
if [[ -c /dev/kvm ]] && [[ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]]; then
    chgrp kvm /dev/kvm
    chmod 660 /dev/kvm
    restart=1
fi
if ! id -nG libvirt-qemu | tr ' ' '\n' | grep -qx kvm; then
    usermod -aG kvm libvirt-qemu
    restart=1 # a running libvirtd keeps the stale view until restarted
fi

# No systemd here: run the daemons directly. virtlogd first, since qemu's console and
# stdout logs go through it.
pgrep -x virtlogd >/dev/null || virtlogd -d
if ((restart)) && pid=$(pgrep -x libvirtd); then
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
fi
pgrep -x libvirtd >/dev/null || libvirtd -d

for _ in $(seq 1 100); do
    if out=$(virsh -c qemu:///system version 2>/dev/null); then
        echo "setup-libvirt: libvirtd ready: $(echo "$out" | tail -n +2 | tr -s '\n' ' ')"
        exit 0
    fi
    sleep 0.2
done
echo "setup-libvirt: libvirtd did not answer on qemu:///system" >&2
virsh -c qemu:///system version >&2 || true
exit 1
