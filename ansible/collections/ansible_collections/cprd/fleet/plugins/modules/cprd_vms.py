#!/usr/bin/python
# -*- coding: utf-8 -*-
# cprd.fleet.cprd_vms: a host's cprd VMs, and how they went through an upgrade.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: cprd_vms
short_description: Read a host's cprd VMs; compare them with a reading taken before an upgrade
description:
  - Runs C(cprctl --json list) and C(cprctl --json history) on the host.
  - Without O(baseline), returns the VMs and the host's clock (a baseline for later).
  - With O(baseline), reports each VM that was running then.
    Its generation before and after, the downtime of its handoff, and what became of it.
  - A VM that is no longer running was lost.
    A VM still on its old generation was not upgraded (refused or rolled back), and C(problems) says why, from cprd's history.
  - Never changes anything.
options:
  baseline:
    description:
      - The result of an earlier call (its C(vms) and C(now_usec)).
    type: dict
  fail_on_problems:
    description:
      - Fail when a VM was lost or not upgraded (with O(baseline)).
    type: bool
    default: true
  cprctl:
    description:
      - The cprctl to run.
    type: path
    default: /usr/bin/cprctl
author:
  - cprd developers
"""

EXAMPLES = r"""
- name: VMs before the upgrade
  cprd.fleet.cprd_vms:
  register: before

- name: Every VM moved to the new VMM
  cprd.fleet.cprd_vms:
    baseline: "{{ before }}"
"""

RETURN = r"""
vms:
  description: C(cprctl --json list).
  returned: always
  type: list
  elements: dict
now_usec:
  description: The host's clock when the VMs were read, in microseconds.
  returned: always
  type: int
report:
  description: One row per VM running in the baseline.
  returned: with baseline
  type: list
  elements: dict
  contains:
    vm: {description: The VM's name., type: str}
    from_generation: {description: Its generation before., type: int}
    to_generation: {description: Its generation now., type: int}
    state: {description: Its state now., type: str}
    downtime_usec: {description: Its last handoff's downtime (0 when it had none)., type: int}
    result: {description: "C(upgraded), C(not-upgraded) or C(lost)", type: str}
problems:
  description: What went wrong, one line per VM.
  returned: with baseline
  type: list
  elements: str
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule


def cprctl_json(module, *args):
    """Runs cprctl with --json and returns what it printed, parsed."""
    rc, out, err = module.run_command([module.params["cprctl"], "--json"] + list(args))
    if rc != 0:
        module.fail_json(msg="cprctl %s failed (rc %d): %s" % (" ".join(args), rc, err.strip()))
    try:
        return json.loads(out)
    except ValueError as e:
        module.fail_json(msg="cprctl %s printed no JSON: %s" % (" ".join(args), e))


def compare(baseline, vms, history):
    """Rows and problems for every VM that ran in the baseline."""
    now = {vm["name"]: vm for vm in vms}
    since = baseline.get("now_usec", 0)
    report, problems = [], []
    for before in baseline.get("vms", []):
        if before.get("state") != "running":
            continue
        name = before["name"]
        after = now.get(name, {})
        row = {
            "vm": name,
            "from_generation": before.get("generation", 0),
            "to_generation": after.get("generation", 0),
            "state": after.get("state", "gone"),
            "downtime_usec": 0,
            "result": "upgraded",
        }
        attempts = [h for h in history if h.get("vm") == name and h.get("time_usec", 0) >= since]
        failures = [h.get("error", "") for h in attempts if not h.get("ok")]
        if row["state"] != "running":
            row["result"] = "lost"
            problems.append("%s: was running, is %s" % (name, row["state"]))
        elif row["to_generation"] <= row["from_generation"]:
            row["result"] = "not-upgraded"
            why = failures[-1] if failures else "no upgrade was attempted"
            problems.append("%s: still on generation %d: %s" % (name, row["to_generation"], why))
        else:
            row["downtime_usec"] = after.get("last_downtime_usec", 0)
        report.append(row)
    return report, problems


def main():
    module = AnsibleModule(
        argument_spec=dict(
            baseline=dict(type="dict"),
            fail_on_problems=dict(type="bool", default=True),
            cprctl=dict(type="path", default="/usr/bin/cprctl"),
        ),
        supports_check_mode=True,
    )
    now_usec = int(time.time() * 1000000)
    vms = cprctl_json(module, "list")
    result = dict(changed=False, vms=vms, now_usec=now_usec)
    baseline = module.params["baseline"]
    if baseline is not None:
        history = cprctl_json(module, "history")
        report, problems = compare(baseline, vms, history)
        result.update(report=report, problems=problems)
        if problems and module.params["fail_on_problems"]:
            module.fail_json(msg="; ".join(problems), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
