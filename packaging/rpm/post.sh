# patch-agent %post ($1: 1 = install, 2+ = upgrade). The systemd rpm conventions
# (%systemd_post), plus: start on install only if the configuration check passes.
for d in /etc/patch-agent/tls /etc/patch-agent/trusted-keys /etc/patch-agent/hooks.d /var/lib/patch-agent; do
    install -d -m 0700 -o root -g root "$d"
done
if [ "$1" -eq 1 ]; then
    systemctl --no-reload enable patch-agent.service >/dev/null 2>&1 || :
    # Enrolment from the package (PATCH_AGENT_* in the environment or enroll.env); a failed
    # one leaves the package installed and the service stopped.
    enrolled=yes
    /usr/lib/patch-agent/enroll-on-install || enrolled=no
    if [ -d /run/systemd/system ] && [ "$enrolled" = yes ]; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        if problems=$(patch-agent check-config --config /etc/patch-agent/agent.toml 2>&1); then
            printf '%s\n' "$problems" | grep '^warning:' | sed 's/^/patch-agent: /' >&2 || true
            systemctl start patch-agent.service >/dev/null 2>&1 || :
        else
            echo "patch-agent: installed and enabled, but not started: the configuration check failed:" >&2
            printf '%s\n' "$problems" | sed 's/^/    /' >&2
            echo "patch-agent: put the CA certificate, the agent certificate and key in /etc/patch-agent/tls/" >&2
            echo "patch-agent: (ca.pem, agent.pem, agent.key) and job-signing keys (*.pem) in /etc/patch-agent/trusted-keys/;" >&2
            echo "patch-agent: check with: patch-agent check-config; then: systemctl start patch-agent" >&2
        fi
    fi
fi
exit 0
