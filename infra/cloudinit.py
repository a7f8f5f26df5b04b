"""cloud-init user data for both droplets: a `deploy` user, sshd hardened, security upgrades on.

Kept free of anything that changes between deploys: DigitalOcean replaces a droplet when its
user data changes, so everything that evolves (packages, scripts, configs) is provisioned over
SSH by the remote command chain instead.
"""

from __future__ import annotations

import yaml

SSHD_DROPIN = """\
# minitwit-ha: only the deploy user, only with a key. Read before DigitalOcean's own drop-ins
# (sshd keeps the first value it sees), hence the 00- prefix.
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowUsers deploy
"""

AUTO_UPGRADES = """\
// minitwit-ha: install security updates every day (unattended-upgrades' default origins).
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
"""


def render_cloud_init(ssh_public_key: str | None) -> str:
    """The #cloud-config document. DigitalOcean puts the droplet's SSH keys in root's
    authorized_keys; they are copied to `deploy` (so keys chosen by fingerprint work too) before
    root login is switched off."""
    deploy_user: dict = {
        "name": "deploy",
        "gecos": "minitwit-ha deploy user",
        "shell": "/bin/bash",
        "groups": ["sudo"],
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "lock_passwd": True,
    }
    if ssh_public_key:
        deploy_user["ssh_authorized_keys"] = [ssh_public_key]
    doc = {
        "users": [deploy_user],
        # Keep root's keys usable until they are copied; PermitRootLogin no closes root anyway.
        "disable_root": False,
        "ssh_pwauth": False,
        "package_update": True,
        "packages": ["unattended-upgrades", "apt-listchanges"],
        "write_files": [
            {"path": "/etc/ssh/sshd_config.d/00-minitwit-ha.conf", "permissions": "0644",
             "owner": "root:root", "content": SSHD_DROPIN},
            {"path": "/etc/apt/apt.conf.d/20auto-upgrades", "permissions": "0644",
             "owner": "root:root", "content": AUTO_UPGRADES},
        ],
        "runcmd": [
            ["install", "-d", "-m", "0700", "-o", "deploy", "-g", "deploy", "/home/deploy/.ssh"],
            ["sh", "-c", "cat /root/.ssh/authorized_keys /home/deploy/.ssh/authorized_keys 2>/dev/null"
                         " | sort -u > /home/deploy/.ssh/authorized_keys.new"
                         " && install -m 0600 -o deploy -g deploy /home/deploy/.ssh/authorized_keys.new"
                         " /home/deploy/.ssh/authorized_keys && rm -f /home/deploy/.ssh/authorized_keys.new"],
            ["systemctl", "reload", "ssh"],
        ],
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
