"""The tiny guest image that real QEMU guests boot: a Debian kernel and a busybox initramfs.

Everything comes from Debian packages already on the host (`linux-image-amd64`,
`busybox-static`, see `.ci/setup-libvirt.sh`); nothing is downloaded. The result is cached
under a key made of its inputs, so it is rebuilt only when the kernel, busybox or this
builder changes.

- kernel: the *uncompressed* ELF `vmlinux` extracted from `/boot/vmlinuz-*`. QEMU boots it
  through its PVH entry point (Debian builds with CONFIG_PVH=y), which skips the real-mode
  setup and the in-guest XZ decompression of the bzImage: that decompression alone costs
  seconds under TCG.
- initrd: an uncompressed cpio (newc) archive, written here in Python (no `cpio` package):
  static busybox with its applet links, the virtio-net/ACPI-button modules and their
  dependencies from `/lib/modules/<version>`, and `/init`.

`/init` reads its configuration from the kernel command line:

- `orch.id=ID`: printed in the ready marker `ORCH-GUEST-READY ID` on the serial console;
- `orch.nic=MAC,ADDR/PREFIX` (repeatable): the NIC with that MAC gets that address (matched
  by MAC, not by name, so the order in which the kernel names NICs does not matter);
- `orch.gw=ADDR`: optional default route.

It then answers ping, serves TCP on `SERVICE_PORT` (8080, as the namespace guests of
`agents.guest_service` do; busybox `nc -ll -e`, one process per connection): an HTTP GET
or HEAD gets an HTTP/1.0 200 whose body is the instance id and a newline (a balancer's
HTTP health check and clients), any other connection the bare id line, then EOF. It
powers off on an ACPI power button (busybox acpid), and keeps a shell on the console
(`virsh console`; tests drive it).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = "2"
READY_MARKER = "ORCH-GUEST-READY"
SERVICE_PORT = 8080  # agents.guest_service.PORT
BUSYBOX = Path("/bin/busybox")
# virtio_pci + virtio_net: the NIC (a module in Debian's kernel, with failover deps);
# button + evdev: the ACPI power button reaches busybox acpid, so shutdown() works.
MODULES = ("virtio_pci", "virtio_net", "button", "evdev")

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod "/lib/modules/$m" 2>/dev/null; done
ip link set lo up
id=unknown
gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    orch.id=*) id="${arg#orch.id=}" ;;
    orch.gw=*) gw="${arg#orch.gw=}" ;;
    orch.nic=*)
        spec="${arg#orch.nic=}"
        mac="${spec%%,*}"
        addr="${spec#*,}"
        for dev in /sys/class/net/*; do
            if [ "$(cat "$dev/address")" = "$mac" ]; then
                ifname="${dev##*/}"
                ip link set "$ifname" up
                [ "$addr" = "$spec" ] || ip addr add "$addr" dev "$ifname"
            fi
        done
        ;;
    esac
done
[ -n "$gw" ] && ip route add default via "$gw"
echo "$id" > /etc/orch-id
nc -ll -p @PORT@ -e /bin/orch-answer </dev/null >/dev/null 2>&1 &
acpid -c /etc/acpi -l /tmp/acpid.log
echo "orch-guest: kernel uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "ORCH-GUEST-READY $id"
while :; do setsid cttyhack sh; sleep 1; done
""".replace("@PORT@", str(SERVICE_PORT))
# What a connection to the service gets (stdin and stdout are the connection), in shell
# builtins only (no process besides the shell nc starts): a TCG guest keeps up better.
# The first line waits briefly: a client that sends nothing (`nc </dev/null`) still gets
# the bare id line. An HTTP request is read to its blank line ("\r" or "": at most one
# character) first: closing a socket with unread data resets it, and the client could
# lose the response.
ANSWER = r"""#!/bin/sh
read -r id </etc/orch-id
read -r -t 1 line
case "$line" in
GET\ *|HEAD\ *)
    while read -r -t 1 header && [ ${#header} -gt 1 ]; do :; done
    printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n' \
        $((${#id} + 1))
    printf 'Connection: close\r\n\r\n'
    case "$line" in GET\ *) echo "$id" ;; esac
    ;;
*) echo "$id" ;;
esac
"""

# busybox acpid runs /etc/acpi/PWRF/00000080 on a power button press. (acpid needs a
# writable log file: with its default /var/log/acpid.log missing it silently exits.)
POWER_BUTTON = "#!/bin/sh\npoweroff -f\n"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def default_cache_dir() -> Path:
    # libvirt runs QEMU as libvirt-qemu, which must be able to reach the files: root's home
    # is not traversable, so as root cache under /var/cache.
    if os.geteuid() == 0:
        return Path("/var/cache/orch-guest")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orch-guest"


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel() -> tuple[Path, Path]:
    """The newest installed Debian kernel that has its modules: (vmlinuz, modules dir)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        if (moddir / "modules.dep").exists():
            found.append((_version_key(version), vmlinuz, moddir))
    if not found:
        raise FileNotFoundError(
            "no /boot/vmlinuz-* with modules: apt-get install linux-image-amd64"
        )
    _, vmlinuz, moddir = max(found)
    return vmlinuz, moddir


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (boot protocol >= 2.08)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    elif payload.startswith(b"\x5d\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    else:
        raise ValueError(f"unsupported kernel compression (magic {payload[:6].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise ValueError("decompressed kernel is not an ELF image")
    return out


def module_load_order(moddir: Path, names: tuple[str, ...] = MODULES) -> list[str]:
    """Relative paths of `names` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        base = Path(mod).name.split(".ko")[0]
        by_name[base] = mod
        by_name[base.replace("-", "_")] = mod
    builtin = (moddir / "modules.builtin").read_text().split()
    builtin_names = {Path(m).name.split(".ko")[0].replace("-", "_") for m in builtin}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists the full closure; visiting each dep first orders it correctly.
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin_names:
            raise FileNotFoundError(f"kernel module {name} not found in {moddir}")
    return order


class _Cpio:
    """A minimal cpio 'newc' writer: enough for an initramfs, device nodes included."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts.append(header + namez + b"\0" * (-(len(header) + len(namez)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def build_initrd(moddir: Path, busybox: Path = BUSYBOX) -> bytes:
    cpio = _Cpio()
    for d in (
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "lib",
        "lib/modules",
        "root",
    ):
        cpio.dir(d)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in sorted(set(applets) - {"busybox"}):
        cpio.symlink(f"bin/{applet}", "busybox")
    loaded = []
    for mod in module_load_order(moddir):
        name = Path(mod).name
        data = (moddir / mod).read_bytes()
        if name.endswith(".xz"):  # a kernel with compressed modules: insmod wants them raw
            data, name = lzma.decompress(data), name.removesuffix(".xz")
        cpio.file(f"lib/modules/{name}", data)
        loaded.append(name)
    cpio.file("etc/modules", ("\n".join(loaded) + "\n").encode())
    cpio.file("etc/acpi/PWRF/00000080", POWER_BUTTON.encode(), 0o755)
    cpio.file("bin/orch-answer", ANSWER.encode(), 0o755)
    cpio.file("init", INIT.encode(), 0o755)
    return cpio.bytes()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def build_guest_image(cache_dir: Path | None = None) -> GuestImage:
    """Build (or reuse from the cache) the guest kernel and initrd."""
    cache_dir = cache_dir or default_cache_dir()
    vmlinuz, moddir = find_kernel()
    bzimage = vmlinuz.read_bytes()
    busybox = BUSYBOX.read_bytes()
    mods = [(moddir / m).read_bytes() for m in module_load_order(moddir)]
    # BUILDER_VERSION stands for this file's code: bump it when the layout changes.
    key = _digest(
        BUILDER_VERSION.encode(), INIT.encode(), ANSWER.encode(), POWER_BUTTON.encode(),
        bzimage, busybox, *mods,
    )
    target = cache_dir / f"{vmlinuz.name.removeprefix('vmlinuz-')}-{key}"
    image = GuestImage(kernel=target / "vmlinux", initrd=target / "initrd.cpio")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place: concurrent builders and crashes never leave a
    # half-written image under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        (tmp / "vmlinux").write_bytes(extract_vmlinux(bzimage))
        (tmp / "initrd.cpio").write_bytes(build_initrd(moddir))
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not image.kernel.exists():  # not simply lost a race to another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache_dir.chmod(cache_dir.stat().st_mode | 0o055)  # libvirt-qemu must traverse it
    # Older builds are dead weight (~70 MB each); a domain defined on one is redefined on
    # the new image by its next apply, since the image paths are part of its definition.
    for old in cache_dir.glob("*-*"):
        # (".build-*" dirs are other builders' work in progress: not ours to remove.)
        if old != target and not old.name.startswith(".") and (old / "vmlinux").exists():
            shutil.rmtree(old, ignore_errors=True)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny orch guest image.")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    image = build_guest_image(args.cache_dir)
    for path in (image.kernel, image.initrd):
        print(f"{path}\t{path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
