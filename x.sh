#!/usr/bin/env bash
# vstream's entry point for developers and CI.
#
#   ./x.sh setup   install the Debian packages the build and the QEMU lab need (only the missing ones)
#                  and vhost-device-vsock 0.3.0 with cargo install (unless that version is there)
#   ./x.sh build   cargo build --workspace + the static guest agent
#   ./x.sh deb     the Debian packages vstream and vstream-agent (build/deb/), checked by lintian
#   ./x.sh demo    setup + build + `cargo xtask demo` (boots a guest, shows each device working)
#   ./x.sh test    setup + build + cargo fmt --check + cargo clippy -D warnings + deb + `cargo
#                  test --workspace` (end-to-end tests included) + a short
#                  run of every fuzz target; arguments replace all that with `cargo test ARGS`,
#                  e.g. ./x.sh test -p xtask --test foundation -- --nocapture
#
# The end-to-end tests boot real guests. They never skip silently: without QEMU they fail, unless
# VSTREAM_SKIP_E2E=1 is set, and then they (and this script) say loudly that they were skipped.
# More knobs: xtask/src/lab.rs (VSTREAM_LAB_*), xtask/src/paths.rs (where binaries are found).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# A CI run builds once: incremental caches would double target/ (about 14 GB) for nothing.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

# Debian bookworm packages. A guest tool added to GUEST_TOOLS in xtask/src/image.rs adds its package here.
APT_PACKAGES=(
    qemu-system-x86   # qemu-system-x86_64, the lab's VMM
    linux-image-amd64 # the guest kernel and its modules (/boot/vmlinuz-6.1.*, /lib/modules)
    busybox-static    # the guest's userland (must be the static build)
    lld               # ld.lld: the agent's link order (crates/agent/build.rs) with a rustc before 1.90
    cpio              # to inspect images (xtask writes the cpio archive itself)
    gzip              # compresses the initramfs
    binutils          # strip (smaller agent in the image)
    libc6-dev         # static glibc for the +crt-static agent
    ppp               # guest tool: pppd
    rng-tools5        # guest tool: rngd
    qemu-guest-agent  # guest tool: qemu-ga
    iproute2          # ip, for the network devices' tests
    socat             # talking to chardev sockets by hand; guest tool for bench-vsock
    tmux              # driving terminals by hand
    valgrind          # callgrind: cargo xtask agent-order profiles the agent with it
    dpkg-dev          # dpkg-shlibdeps: the host package's Depends
    lintian           # checks the packages (./x.sh deb)
    systemd           # systemd-analyze verify on the units (packaging/)
    libvirt-daemon             # libvirtd and virtlogd: the libvirt test (xtask/tests/libvirt.rs)
    libvirt-clients            # virsh, for the same test
    libvirt-daemon-driver-qemu # libvirt's QEMU driver (TCG domains), for the same test
    chromium                   # the headless browser of the web console's test (xtask/tests/web.rs)
    chromium-driver            # chromedriver: WebDriver for that test
)

AGENT_TARGET=x86_64-unknown-linux-gnu

log() { printf 'x.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The toolchain the workspace declares (rust-version in Cargo.toml), checked first so that a
# missing or old one is one clear line instead of an error deep in a build.
need_cargo() {
    local want have
    want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: vstream needs Rust $want or newer (install it with rustup)"
    have=$(cargo --version | sed -n 's/^cargo \([0-9][0-9.]*\).*/\1/p')
    if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n 1)" != "$want" ]; then
        die "cargo $have is too old: vstream needs Rust $want or newer (rustup update stable)"
    fi
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (no sudo)"
    fi
}

setup_apt() {
    local missing=() pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = installed ] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "setup: all ${#APT_PACKAGES[@]} packages present"
        return
    fi
    log "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# rust-vmm's vhost-device-vsock: the vsock backend of the lab's vsock guests (QEMU's
# vhost-user-vsock-pci; this host needs no /dev/vhost-vsock). Pinned: the tests know its
# command line (xtask/src/paths.rs has the same version).
VHOST_DEVICE_VSOCK_VERSION=0.3.0

setup_vhost_device_vsock() {
    local bin have
    bin=$(command -v vhost-device-vsock || echo "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock")
    have=$("$bin" --version 2>/dev/null || true)
    if [ "$have" = "vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION" ]; then
        log "setup: vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION present"
        return
    fi
    log "setup: installing vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION (found: ${have:-none})"
    cargo install --locked vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION"
}

# libvirt's QEMU driver as the libvirt test needs it on a machine without systemd (a container):
# the user its packages would create, QEMU run as root with no security driver and no
# relabelling, and the log directory. The test starts virtlogd and libvirtd if they are not up.
setup_libvirt() {
    local conf=/etc/libvirt/qemu.conf
    getent group libvirt-qemu >/dev/null || as_root groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        as_root useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
    as_root mkdir -p /var/log/libvirt/qemu
    if ! grep -qs '^security_driver = "none"' "$conf"; then
        log "setup: $conf: QEMU as root, no security driver, no dynamic ownership"
        printf '%s\n' 'user = "root"' 'group = "root"' 'security_driver = "none"' 'dynamic_ownership = 0' |
            as_root tee -a "$conf" >/dev/null
    fi
}

setup() {
    setup_apt
    setup_libvirt
    setup_vhost_device_vsock
}

build_agent() {
    log "building the static guest agent ($AGENT_TARGET, +crt-static, profile agent)"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile agent --target "$AGENT_TARGET" -p vstream-agent
}

build() {
    cargo build --workspace
    build_agent
}

# Both packages from release binaries, then lintian: no error may remain (warnings are printed).
deb() {
    log "building the Debian packages (release vstreamd, vstreamctl; the static agent)"
    cargo build --release -p vstream-host --bins
    build_agent
    local out debs
    out=$(cargo xtask deb) # a failed build stops here (set -e), not in lintian
    mapfile -t debs <<<"$out"
    log "lintian ${debs[*]}"
    lintian --fail-on error --tag-display-limit 0 "${debs[@]}" || die "lintian found errors in the packages"
}

# Every parser's cargo-fuzz target, briefly (VSTREAM_FUZZ_SECONDS each, default 10): a smoke run
# in CI; long runs are for people (`cd fuzz && cargo +nightly fuzz run TARGET`).
fuzz_smoke() {
    if ! cargo +nightly --version >/dev/null 2>&1; then
        log "!!! no nightly toolchain: the fuzz smoke runs are SKIPPED (cargo-fuzz needs nightly)"
        return
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install --locked cargo-fuzz
    fi
    local t log
    log=$(mktemp)
    for t in $(cargo +nightly fuzz list); do
        log "fuzz smoke: $t (${VSTREAM_FUZZ_SECONDS:-10} s)"
        if ! cargo +nightly fuzz run "$t" -- -max_total_time="${VSTREAM_FUZZ_SECONDS:-10}" >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            die "fuzz target $t failed (its input is in fuzz/artifacts/$t)"
        fi
        grep -E '^Done [0-9]+ runs' "$log" | sed "s/^/  $t: /" >&2 || true
    done
    rm -f "$log"
}

# Formatting and every clippy lint (the workspace denies undocumented unsafe blocks) before
# the tests: hygiene that is not enforced is not kept.
lint() {
    if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
        log "installing the clippy and rustfmt components"
        rustup component add clippy rustfmt
    fi
    log "lint: cargo fmt --check, cargo clippy -D warnings"
    cargo fmt --all -- --check || die "cargo fmt --check: run cargo fmt --all"
    cargo clippy --workspace --all-targets -- -D warnings
}

skip_banner() {
    if [ "${VSTREAM_SKIP_E2E:-}" = 1 ]; then
        log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        log "!!! VSTREAM_SKIP_E2E=1: the end-to-end tests (real guests) are SKIPPED !!!"
        log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    fi
}

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    help | -h | --help) ;;
    *) need_cargo ;;
esac
case "$cmd" in
    setup) setup ;;
    build) build ;;
    deb)
        setup_apt
        deb
        ;;
    demo)
        setup
        build
        cargo xtask demo
        ;;
    test)
        setup
        build
        skip_banner
        if [ $# -eq 0 ]; then
            lint
            deb
            cargo test --workspace
            fuzz_smoke
        else
            cargo test "$@"
        fi
        skip_banner
        ;;
    help | -h | --help) usage ;;
    *)
        usage >&2
        die "unknown command: $cmd"
        ;;
esac
