#!/usr/bin/env bash
# Install smartcab on a Raspberry Pi OS (Bookworm or later) as root:
#   sudo provisioning/install.sh
# Creates the smartcab user, a venv in /opt/smartcab, the config, the unit and the udev rule.
# It does not create an admin account: run `smartcab set-admin` afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
id smartcab >/dev/null 2>&1 || useradd --system --home /var/lib/smartcab --shell /usr/sbin/nologin smartcab
install -d -o smartcab -g smartcab /var/lib/smartcab
install -d /etc/smartcab /opt/smartcab
# System site packages: Raspberry Pi OS ships lgpio for gpiozero's default pin factory.
[ -d /opt/smartcab/venv ] || python3 -m venv --system-site-packages /opt/smartcab/venv
/opt/smartcab/venv/bin/pip install --quiet .
[ -f /etc/smartcab/smartcab.toml ] || install -m 0640 -g smartcab provisioning/smartcab.example.toml /etc/smartcab/smartcab.toml
/opt/smartcab/venv/bin/smartcab check-config --config /etc/smartcab/smartcab.toml >/dev/null
install -m 0644 provisioning/smartcab.service /etc/systemd/system/smartcab.service
install -m 0644 provisioning/99-smartcab.rules /etc/udev/rules.d/99-smartcab.rules
udevadm control --reload-rules || true
systemctl daemon-reload
echo "Installed. Next: sudo -u smartcab /opt/smartcab/venv/bin/smartcab set-admin --config /etc/smartcab/smartcab.toml"
echo "then: systemctl enable --now smartcab"
