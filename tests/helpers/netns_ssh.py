#!/usr/bin/env python3
"""An ``ssh`` for MPICH's Hydra on namespaced hosts: ``netns_ssh.py [ssh options] HOST COMMAND...`` runs
COMMAND through ``sh -c`` in the network namespace whose address is HOST, taken from MOETRAIN_NETNS_HOSTS
(``addr=namespace,...``). Hydra starts one proxy per host with it (``-launcher ssh -launcher-exec``)."""

import os
import sys

hosts = dict(item.split("=", 1) for item in os.environ["MOETRAIN_NETNS_HOSTS"].split(","))
args = sys.argv[1:]
while args and args[0].startswith("-"):  # ssh options Hydra may pass: -x, -q, -o KEY=VALUE, ...
    flag = args.pop(0)
    if flag in ("-o", "-p", "-l", "-i", "-F") and args:
        args.pop(0)
host, command = args[0], " ".join(args[1:])
if host not in hosts:
    sys.exit(f"netns_ssh: no namespaced host {host!r} (known: {', '.join(hosts)})")
os.execvp("ip", ["ip", "netns", "exec", hosts[host], "sh", "-c", command])
