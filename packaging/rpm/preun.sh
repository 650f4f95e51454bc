# patch-agent %preun ($1: 0 = erase, 1+ = upgrade): %systemd_preun. Not on upgrade: the agent
# may be the process applying this very upgrade.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now patch-agent.service >/dev/null 2>&1 || :
fi
exit 0
