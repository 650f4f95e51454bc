#!/usr/bin/env bash
# A large zypper root for benches/zypper.rs: N installed packages (bulk-0001..), 1.0-1; a
# repository with all of them at 1.0-1 and the first U at 1.1-1; P patches over those U
# updates (three packages each, categories and severities in rotation, two CVEs each).
# One spec with N subpackages, so rpmbuild runs twice, not 2N times.
# Usage: zypper-bulk.sh DIR N U P
set -euo pipefail
S="$1" N="$2" U="$3" P="$4"
rm -rf "$S"
mkdir -p "$S"/{rpmbuild/SPECS,old,new,repo,root/etc,root/run}

spec() { # version count outdir
    {
        printf 'Name: bulk\nVersion: %s\nRelease: 1\nSummary: bulk\nLicense: MIT\nBuildArch: noarch\n%%description\nbulk\n' "$1"
        for i in $(seq -f %04g 1 "$2"); do
            printf '%%package -n bulk-%s\nSummary: bulk package %s\n%%description -n bulk-%s\nbulk\n%%files -n bulk-%s\n/usr/share/bulk/%s\n' "$i" "$i" "$i" "$i" "$i"
        done
        printf '%%install\nmkdir -p %%{buildroot}/usr/share/bulk\nfor i in $(seq -f %%04g 1 %s); do echo %s > %%{buildroot}/usr/share/bulk/$i; done\n' "$2" "$1"
    } > "$S/rpmbuild/SPECS/bulk-$1.spec"
    rpmbuild --quiet --define "_topdir $S/rpmbuild" --define "_rpmdir $3" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        -bb "$S/rpmbuild/SPECS/bulk-$1.spec" >/dev/null 2>&1
}
spec 1.0 "$N" "$S/old"
spec 1.1 "$U" "$S/new"
rm -f "$S"/old/bulk-1.0-1.noarch.rpm "$S"/new/bulk-1.1-1.noarch.rpm
cp "$S"/old/*.rpm "$S"/new/*.rpm "$S/repo/"
createrepo_c -q "$S/repo"

cats=(security security recommended optional security feature)
sevs=(critical important moderate low)
{
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo '<updates>'
    for p in $(seq 1 "$P"); do
        c=${cats[$((p % 6))]} v=${sevs[$((p % 4))]}
        printf '<update from="m@example.com" status="stable" type="%s" version="1"><id>BULK-%04d</id><title>t</title><severity>%s</severity><issued date="%s"/>' "$c" "$p" "$v" "$((1767225600 + p * 86400))"
        printf '<references><reference href="h" id="CVE-2026-%05d" type="cve" title="c"/><reference href="h" id="CVE-2026-%05d" type="cve" title="c"/><reference href="h" id="%d" type="bugzilla" title="b"/></references><description>d</description><pkglist><collection>' "$((2 * p))" "$((2 * p + 1))" "$((100000 + p))"
        for k in 0 1 2; do
            i=$(printf %04d $(( ((p - 1) * 3 + k) % U + 1 )))
            printf '<package name="bulk-%s" version="1.1" release="1" epoch="0" arch="noarch"><filename>bulk-%s-1.1-1.noarch.rpm</filename></package>' "$i" "$i"
        done
        echo '</collection></pkglist></update>'
    done
    echo '</updates>'
} > "$S/updateinfo.xml"
modifyrepo_c --mdtype=updateinfo "$S/updateinfo.xml" "$S/repo/repodata" >/dev/null

printf 'ID="sles"\nID_LIKE="suse"\nVERSION_ID="15.6"\nPRETTY_NAME="SUSE Linux Enterprise Server 15 SP6"\n' > "$S/root/etc/os-release"
rpm --root "$S/root" --initdb 2>/dev/null
rpm --root "$S/root" -i --nodeps --justdb "$S"/old/*.rpm 2>/dev/null
zypper --root "$S/root" --non-interactive --no-color addrepo --no-gpgcheck "file://$S/repo" bulk >/dev/null
zypper --root "$S/root" --non-interactive --no-color refresh >/dev/null
