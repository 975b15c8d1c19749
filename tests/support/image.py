"""Run the services from the built container image the way their manifests run them.

``deploy/docker/image.sh env`` says which engine built the image and where buildah keeps it.
A service run is a container of that image with what ``deploy/k8s/base/<service>.yaml`` gives
the pod: the user id of ``runAsUser``, a read-only root filesystem, only the volumes the
manifest mounts (host directories standing in for its emptyDirs), the host's network (the
local stack listens on 127.0.0.1) and only the service's own settings in the environment.

Docker: ``docker run --read-only --user ... --network host``. buildah: ``buildah run`` cannot
give a read-only root (with the root made read-only underneath it, buildah 1.28 runs the
command, then panics removing its /run/.containerenv and loses the exit status), so the image
is mounted once (``buildah from`` + ``buildah mount``) and each run is a small runtime of its
own, ``RUNTIME_SH``: a private mount namespace (``unshare --mount``) where the root is a
read-only bind of the image's root filesystem with proc, sys, dev and the volumes on top;
then ``chroot`` as the manifest's user with no_new_privs, the image's working directory,
environment and entrypoint. Every ``exec`` keeps one process: signals reach the service.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.stack import parse_exports

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SH = ROOT / "deploy" / "docker" / "image.sh"
MANIFESTS = ROOT / "deploy" / "k8s" / "base"

#: settings the services read (CONTRACT.md, Settings): nothing else of the caller's
#: environment reaches a container
SETTING_PREFIXES = (
    "KAFKA_",
    "SCHEMA_REGISTRY_",
    "TOPIC_",
    "LOG_",
    "METRICS_PORT",
    "PRODUCER_",
    "ENRICHER_",
    "NOTIFIER_",
)


#: argv: ROOTFS WORKDIR UID:GID [HOST_DIR MOUNT_PATH]... -- COMMAND...; runs as root
RUNTIME_SH = r"""
set -eu
root=$1 workdir=$2 user=$3
shift 3
mount --bind "$root" "$root"
mount -o remount,bind,ro,nosuid,nodev "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount --rbind /dev "$root/dev"
while [ "$1" != -- ]; do
  mount --bind "$1" "$root$2"
  shift 2
done
shift
exec setpriv --no-new-privs chroot --userspec="$user" --groups="${user#*:}" "$root" \
  /usr/bin/env -C "$workdir" "$@"
"""


class ImageUnavailableError(Exception):
    """No engine can build or run the image here; the message says why."""


@dataclass(frozen=True)
class PodSpec:
    """What a service's manifest gives its container (the parts a local run reproduces)."""

    service: str
    run_as_user: int
    run_as_group: int
    read_only_root: bool
    mount_paths: tuple[str, ...]


def pod_spec(service: str) -> PodSpec:
    """Read ``deploy/k8s/base/<service>.yaml``'s Deployment (the first document) by pattern:
    the keys are unique there, and the test venv has no YAML parser."""
    text = (MANIFESTS / f"{service}.yaml").read_text(encoding="utf-8").split("\n---")[0]

    def one(pattern: str) -> str:
        found = re.findall(pattern, text, flags=re.MULTILINE)
        assert len(found) == 1, f"{service}.yaml: expected one match of {pattern!r}: {found}"
        return str(found[0])

    return PodSpec(
        service=service,
        run_as_user=int(one(r"^\s+runAsUser:\s*(\d+)\s*$")),
        run_as_group=int(one(r"^\s+runAsGroup:\s*(\d+)\s*$")),
        read_only_root=one(r"^\s+readOnlyRootFilesystem:\s*(\w+)\s*$") == "true",
        mount_paths=tuple(re.findall(r"^\s+mountPath:\s*(\S+)\s*$", text, flags=re.MULTILINE)),
    )


def settings_only(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(SETTING_PREFIXES)}


def run_image_sh(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IMAGE_SH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class Image:
    """The built image and the engine that holds it."""

    engine: str
    name: str
    buildah_root: str = ""
    buildah_runroot: str = ""
    buildah_driver: str = ""
    _containers: list[str] = field(default_factory=list)
    _rootfs: str = ""
    _config: dict[str, Any] | None = None

    @classmethod
    def from_env(cls) -> Image:
        proc = run_image_sh("env", timeout_s=60)
        if proc.returncode == 3:  # no engine installed or usable: a reason to skip
            raise ImageUnavailableError(proc.stderr.strip())
        # anything else (a bad IMAGE_* setting) is an error, not a skip
        assert proc.returncode == 0, f"image.sh env exited {proc.returncode}: {proc.stderr}"
        env = parse_exports(proc.stdout)
        image = cls(
            env["IMAGE_ENGINE"],
            env["IMAGE_NAME"],
            env.get("IMAGE_BUILDAH_ROOT", ""),
            env.get("IMAGE_BUILDAH_RUNROOT", ""),
            env.get("IMAGE_BUILDAH_DRIVER", ""),
        )
        if image.engine == "buildah" and os.geteuid() != 0:
            # buildah's storage and the mounts of RUNTIME_SH need root here.
            raise ImageUnavailableError("running the image with buildah needs root here")
        return image

    # -- engine commands ---------------------------------------------------------------------
    def buildah(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            self.buildah_root,
            "--runroot",
            self.buildah_runroot,
            "--storage-driver",
            self.buildah_driver,
            *args,
        ]

    def check(self, argv: Sequence[str], timeout_s: float = 300) -> str:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        assert proc.returncode == 0, f"{argv[:6]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    def exists(self) -> bool:
        if self.engine == "docker":
            argv = ["docker", "image", "inspect", self.name]
        else:
            argv = self.buildah("inspect", "--type", "image", self.name)
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def size(self) -> str:
        """The image's uncompressed size, as the engine prints it."""
        if self.engine == "docker":
            out = self.check(["docker", "image", "inspect", "-f", "{{.Size}}", self.name])
            return f"{int(out) / 1e6:.0f} MB"
        out = self.check(self.buildah("images", "--json", self.name))
        return str(json.loads(out)[0]["size"])

    # -- containers --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The image's OCI config (Env, Entrypoint, WorkingDir, User)."""
        if self._config is None:
            if self.engine == "docker":
                out = self.check(
                    ["docker", "image", "inspect", "-f", "{{json .Config}}", self.name]
                )
            else:
                out = self.check(self.buildah("inspect", "--type", "image", self.name))
                out = json.dumps(json.loads(out)["OCIv1"]["config"])
            self._config = dict(json.loads(out))
        return self._config

    def rootfs(self) -> str:
        """buildah: the image's root filesystem, mounted once (read-only in every run)."""
        if not self._rootfs:
            name = f"fa-image-test-{uuid.uuid4().hex[:8]}"
            self.check(self.buildah("from", "--pull=never", "--name", name, self.name))
            self._containers.append(name)
            self._rootfs = self.check(self.buildah("mount", name)).strip()
        return self._rootfs

    def run_argv(
        self,
        spec: PodSpec,
        args: Sequence[str],
        settings: Mapping[str, str],
        volumes: Mapping[str, Path],
        entrypoint: str | None = None,
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) of a process that runs ``args`` after the image's entrypoint
        (or ``entrypoint``, like ``docker run --entrypoint``) as ``spec``'s pod would.
        ``volumes``: mount path -> host directory, exactly the manifest's mount paths.
        Docker's container is removed when the run ends."""
        assert sorted(volumes) == sorted(spec.mount_paths), (volumes, spec.mount_paths)
        assert spec.read_only_root, f"{spec.service}: the manifests ask for a read-only root"
        for host_dir in volumes.values():
            host_dir.mkdir(parents=True, exist_ok=True)
            # an emptyDir with fsGroup: the pod's user and group may write
            os.chown(host_dir, spec.run_as_user, spec.run_as_group)
        user = f"{spec.run_as_user}:{spec.run_as_group}"
        if self.engine == "docker":
            name = f"fa-image-test-{spec.service}-{uuid.uuid4().hex[:8]}"
            self._containers.append(name)
            vol_args = [a for p, h in volumes.items() for a in ("--volume", f"{h}:{p}")]
            env_args = [a for k in sorted(settings) for a in ("--env", k)]
            argv = [
                "docker",
                "run",
                "--rm",
                "--name",
                name,
                "--network",
                "host",
                "--user",
                user,
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                *vol_args,
                *env_args,
                *(["--entrypoint", entrypoint] if entrypoint else []),
                self.name,
                *args,
            ]
            # `--env NAME` takes the value from docker's environment: no secret in argv
            return argv, {**_engine_env(), **settings}
        config = self.config()
        env = dict(str(kv).split("=", 1) for kv in config.get("Env") or [])
        env.update(settings)
        vol_args = [a for p, h in volumes.items() for a in (str(h), p)]
        argv = [
            _host_tool("unshare"),
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            RUNTIME_SH,
            "runtime.sh",
            self.rootfs(),
            str(config.get("WorkingDir") or "/"),
            user,
            *vol_args,
            "--",
            *([entrypoint] if entrypoint else [str(a) for a in config.get("Entrypoint") or []]),
            *args,
        ]
        # the runtime's own tools are found on the host's PATH, then the container's
        env["PATH"] = env.get("PATH", "") + ":" + os.defpath
        return argv, env

    def close(self) -> None:
        """Remove every container this made."""
        for name in reversed(self._containers):
            if self.engine == "docker":
                argv = ["docker", "rm", "-f", name]
            else:
                argv = self.buildah("rm", name)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(argv, capture_output=True, check=False, timeout=120)
        self._containers.clear()
        self._rootfs = ""


def _host_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageUnavailableError(f"running the image with buildah needs {name} (util-linux)")
    return path


def _engine_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_HOST") if k in os.environ}
