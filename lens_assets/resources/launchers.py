"""Training launchers: where a model-training job runs. Local subprocess by default, AWS ECS in deployment.

Both run a training module under Dagster Pipes and return the job's custom
messages (its training summary). A job on this machine reads and writes the
storage cache directly (``lens_assets.ml.train``); a job elsewhere (ECS) runs
``lens_assets.resources.train_remote``, which pulls its inputs from the S3 store
and pushes its checkpoints back (``shares_filesystem`` is False).
"""

import sys
from typing import Any

import dagster as dg
from pydantic import Field

TRAIN_MODULE = "lens_assets.ml.train"
TRAIN_REMOTE_MODULE = "lens_assets.resources.train_remote"


class TrainingLauncher(dg.ConfigurableResource):
    """Interface: ``launch(context, extras)`` runs one training job and returns its custom messages.

    ``shares_filesystem``: whether the job sees this process's storage cache. When
    not, the job syncs with the S3 store itself and the asset pulls its results.
    """

    shares_filesystem: bool = True

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any]) -> list:
        raise NotImplementedError(f"{type(self).__name__} does not launch jobs; use LocalSubprocessLauncher or "
                                  "EcsLauncher")


class LocalSubprocessLauncher(TrainingLauncher):
    """A child process on this machine (GPU if it has one).

    With ``shares_filesystem=False`` it runs the remote entry point as an ECS task
    would (its own cache in ``env["LENS_CACHE_DIR"]``): a way to try the
    deployment's data path on one machine.
    """

    python: str = Field(default=sys.executable, description="interpreter that runs the training module")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the job")

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any]) -> list:
        client = dg.PipesSubprocessClient(env=self.env)
        module = TRAIN_MODULE if self.shares_filesystem else TRAIN_REMOTE_MODULE
        invocation = client.run(context=context, command=[self.python, "-m", module], extras=extras)
        return invocation.get_custom_messages()


class EcsLauncher(TrainingLauncher):
    """An ECS task on a GPU capacity provider (dagster-aws ``PipesECSClient``); it syncs with the S3 store."""

    shares_filesystem: bool = False
    cluster: str
    task_definition: str
    container_name: str = "train"
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
    gpu_count: int = 1
    capacity_provider: str | None = None

    def run_task_params(self) -> dict:
        """The ECS RunTask request: the training module as the container command, with GPUs reserved."""
        params: dict[str, Any] = {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "count": 1,
            "overrides": {"containerOverrides": [{
                "name": self.container_name,
                "command": ["python", "-m", TRAIN_REMOTE_MODULE if not self.shares_filesystem else TRAIN_MODULE],
                "resourceRequirements": [{"type": "GPU", "value": str(self.gpu_count)}] if self.gpu_count else [],
            }]},
        }
        if self.subnets:
            params["networkConfiguration"] = {"awsvpcConfiguration": {
                "subnets": self.subnets, "securityGroups": self.security_groups, "assignPublicIp": "DISABLED"}}
        if self.capacity_provider:
            params["capacityProviderStrategy"] = [{"capacityProvider": self.capacity_provider, "weight": 1}]
        else:
            params["launchType"] = "EC2"
        return params

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any]) -> list:
        from dagster_aws.pipes import PipesECSClient

        invocation = PipesECSClient().run(context=context, run_task_params=self.run_task_params(), extras=extras,
                                          pipes_container_name=self.container_name)
        return invocation.get_custom_messages()
