"""Training launchers: where a model-training job runs. Local subprocess by default, AWS ECS in deployment.

Both run ``python -m lens_assets.ml.train`` under Dagster Pipes and return the
job's custom messages (its training summary).
"""

import sys
from typing import Any

import dagster as dg
from pydantic import Field

TRAIN_MODULE = "lens_assets.ml.train"


class TrainingLauncher(dg.ConfigurableResource):
    """Interface: ``launch(context, extras)`` runs one training job and returns its custom messages."""

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any]) -> list:
        raise NotImplementedError(f"{type(self).__name__} does not launch jobs; use LocalSubprocessLauncher or "
                                  "EcsLauncher")


class LocalSubprocessLauncher(TrainingLauncher):
    """A child process on this machine (GPU if it has one)."""

    python: str = Field(default=sys.executable, description="interpreter that runs the training module")

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any]) -> list:
        client = dg.PipesSubprocessClient()
        invocation = client.run(context=context, command=[self.python, "-m", TRAIN_MODULE], extras=extras)
        return invocation.get_custom_messages()


class EcsLauncher(TrainingLauncher):
    """An ECS task on a GPU capacity provider (dagster-aws ``PipesECSClient``)."""

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
                "command": ["python", "-m", TRAIN_MODULE],
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
