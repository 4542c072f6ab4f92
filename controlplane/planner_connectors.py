"""Where the planner's decisions take effect: one small interface, a connector per platform.

A connector knows the pools it manages (`roles`), reads a pool's replica count and sets it.
- `KubernetesConnector`: the scale subresource of each pool's Deployment
  (`/apis/apps/v1/namespaces/NS/deployments/NAME/scale`), through the official `kubernetes`
  client, configured in-cluster (the pod's service account; the chart's Role allows exactly this)
  or from a kubeconfig. Kubernetes then starts pods or stops them (SIGTERM: a worker deregisters
  and drains within its grace period, docs/deployment.md).
- `LauncherConnector`: the workers of one of the cluster's launchers, `kvweave worker` processes on
  this machine (controlplane.cluster.LocalWorkers, `--connector local`) or Ray actors
  (controlplane.ray_launcher.RayWorkers, `--connector ray`): scaling up starts workers of the role
  the way the launcher starts its first ones, scaling down stops the newest ones (SIGTERM, or the
  actor's `stop`), so they deregister and drain as a pod does.
Connector errors are `ConnectorError`s with a message that says what to fix; a pool the connector does
not scale, or a negative replica count, is one.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from controlplane.cluster_config import ClusterError

if TYPE_CHECKING:
    from controlplane.cluster import LocalWorkers
    from controlplane.ray_launcher import RayWorkers

logger = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
"""The pod's namespace, mounted with its service account token."""


class ConnectorError(RuntimeError):
    """A pool's replicas could not be read or set."""


class Connector(Protocol):
    roles: tuple[str, ...]
    """The pools this connector scales."""

    async def get_replicas(self, role: str) -> int: ...

    async def set_replicas(self, role: str, num_replicas: int) -> None: ...

    async def close(self) -> None: ...


def check_pool(connector: Connector, role: str, num_replicas: int = 0) -> None:
    """Raise ConnectorError unless `connector` scales `role` and `num_replicas` >= 0."""
    if role not in connector.roles:
        raise ConnectorError(f"the {role!r} pool is not scaled by this connector; its pools: "
                             f"{', '.join(connector.roles) or '(none)'}")
    if num_replicas < 0:
        raise ConnectorError(f"cannot scale the {role} pool to {num_replicas} replicas: the count must be >= 0")


def kubernetes_api_client(kubeconfig: str | None = None):
    """A `kubernetes.client.ApiClient`: in-cluster configuration inside a pod, else `kubeconfig` (None:
    $KUBECONFIG or ~/.kube/config). Raises ConnectorError when neither works."""
    try:
        from kubernetes import client, config
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ConnectorError("the kubernetes connector needs the `kubernetes` package (`make setup` installs it)"
                             ) from e
    configuration = client.Configuration()
    try:
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            except config.ConfigException:
                pass
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as e:
        raise ConnectorError(f"no Kubernetes configuration: not in a pod, and the kubeconfig "
                             f"{kubeconfig or '(default)'} is unusable: {e}") from None
    return client.ApiClient(configuration)


def default_namespace() -> str:
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


class KubernetesConnector:
    """Scales `deployments` (role -> Deployment name) in `namespace` through their scale subresource."""

    def __init__(self, namespace: str, deployments: dict[str, str], api_client) -> None:
        from kubernetes import client

        if not deployments:
            raise ValueError("the kubernetes connector needs at least one Deployment (prefill or decode)")
        self.namespace, self.deployments = namespace, dict(deployments)
        self.roles = tuple(deployments)
        self.api_client = api_client
        self.apps = client.AppsV1Api(api_client)

    async def get_replicas(self, role: str) -> int:
        check_pool(self, role)
        scale = await self._call(role, "read", self.apps.read_namespaced_deployment_scale,
                                 self.deployments[role], self.namespace)
        return int(scale.spec.replicas or 0)

    async def set_replicas(self, role: str, num_replicas: int) -> None:
        check_pool(self, role, num_replicas)
        await self._call(role, "scale", self.apps.patch_namespaced_deployment_scale, self.deployments[role],
                         self.namespace, {"spec": {"replicas": num_replicas}},
                         _content_type="application/merge-patch+json")
        logger.info("deployment %s/%s scaled to %d", self.namespace, self.deployments[role], num_replicas)

    async def _call(self, role: str, what: str, method, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        name = f"{self.namespace}/{self.deployments[role]}"
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except ApiException as e:
            hint = {404: "no such Deployment (check --namespace and --%s-deployment)" % role,
                    403: "forbidden: the planner's service account needs get/patch on deployments/scale",
                    401: "unauthorized: the planner's credentials were refused"}.get(e.status, e.reason)
            raise ConnectorError(f"cannot {what} the {role} pool's Deployment {name}: HTTP {e.status}, {hint}"
                                 ) from None
        except (OSError, HTTPError) as e:  # the API server is unreachable
            raise ConnectorError(f"cannot {what} the {role} pool's Deployment {name}: "
                                 f"{getattr(e, 'reason', None) or e}") from None

    async def close(self) -> None:
        await asyncio.to_thread(self.api_client.close)


class LauncherConnector:
    """Scales the pools of `workers`, a launcher's workers: LocalWorkers (`kvweave worker` processes on
    this machine) or RayWorkers (Ray actors). Both keep `roles` (worker id -> role, oldest first),
    `add(role) -> worker id`, `remove(worker ids)` (each deregisters and drains) and `stop()`."""

    def __init__(self, workers: LocalWorkers | RayWorkers, roles: tuple[str, ...] = ("prefill", "decode")) -> None:
        self.workers, self.roles = workers, roles

    async def get_replicas(self, role: str) -> int:
        check_pool(self, role)
        return sum(1 for r in self.workers.roles.values() if r == role)

    async def set_replicas(self, role: str, num_replicas: int) -> None:
        check_pool(self, role, num_replicas)
        ids = [i for i, r in self.workers.roles.items() if r == role]
        try:
            for _ in range(num_replicas - len(ids)):
                worker_id = await asyncio.to_thread(self.workers.add, role)
                logger.info("started %s worker %s", role, worker_id)
        except (ValueError, ClusterError) as e:  # Ray refused the actor
            raise ConnectorError(f"cannot add a {role} worker: {e}") from e
        if len(ids) > num_replicas:
            gone = ids[num_replicas:][::-1]  # the newest first
            await asyncio.to_thread(self.workers.remove, gone)
            logger.info("stopped %s worker(s) %s", role, ", ".join(gone))

    async def close(self) -> None:
        await asyncio.to_thread(self.workers.stop)
