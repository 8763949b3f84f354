"""The Pod Security Standards' "restricted" profile (baseline included) as a test helper: what a pod breaks.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.29+); every check
names the field, so a failing fuzz example says what fedkube let through.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

RESTRICTED_VOLUME_KINDS = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(field) or []):
            yield f"spec.{field}[{i}]", c


def _seccomp_ok(profile: Mapping[str, Any] | None) -> bool | None:
    if not profile:
        return None
    return profile.get("type") in ("RuntimeDefault", "Localhost")


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """Every way ``pod`` falls outside the restricted profile; empty when it complies."""
    spec = pod.get("spec") or {}
    psc = spec.get("securityContext") or {}
    out: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if field != "hostUsers" and spec.get(field):
            out.append(f"spec.{field} is true")
    for i, vol in enumerate(spec.get("volumes") or []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_KINDS:
            out.append(f"spec.volumes[{i}] has kind {sorted(kinds - RESTRICTED_VOLUME_KINDS)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls sets {sysctl.get('name')}")
    if (psc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        out.append("spec.securityContext.seLinuxOptions.type")
    if psc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser is 0")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = _seccomp_ok(psc.get("seccompProfile"))
    if pod_seccomp is False:
        out.append("spec.securityContext.seccompProfile is neither RuntimeDefault nor Localhost")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}.securityContext.privileged is true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}.securityContext.allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}.securityContext.capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}.securityContext.capabilities.add {caps.get('add')}")
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            out.append(f"{where}.securityContext.runAsNonRoot is not true (nor the pod's)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}.securityContext.runAsUser is 0")
        seccomp = _seccomp_ok(sc.get("seccompProfile"))
        if seccomp is False or (seccomp is None and not pod_seccomp):
            out.append(f"{where}.securityContext.seccompProfile is not RuntimeDefault/Localhost (nor the pod's)")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}.securityContext.procMount")
        if (sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            out.append(f"{where}.securityContext.seLinuxOptions.type")
        for j, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                out.append(f"{where}.ports[{j}].hostPort is {port['hostPort']}")
    return out
