# patch-agent %postun ($1: 0 = erase, 1+ = upgrade): %systemd_postun_with_restart, but only
# into a configuration that passes the check. rpm has no purge: an erase keeps
# /var/lib/patch-agent (the job journal guards against replays) and a modified agent.toml
# (as .rpmsave); remove them by hand if the host leaves the fleet.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ] && [ -d /run/systemd/system ]; then
    if patch-agent check-config --config /etc/patch-agent/agent.toml >/dev/null 2>&1; then
        systemctl try-restart patch-agent.service >/dev/null 2>&1 || :
    else
        echo "patch-agent: upgraded but not restarted: run patch-agent check-config" >&2
    fi
fi
exit 0
